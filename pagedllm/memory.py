"""The brief's memory model, exact for grouped-query attention, and the engine's KV-pool sizing.

KV bytes per token = 2 (K and V) · layers · kv_heads · head_dim · bytes per element. The brief's
rule of thumb, 2 · bytes · layers · hidden, assumes every query head keeps its own K/V; with
grouped-query attention only kv_heads · head_dim values per layer are stored.
"""

from __future__ import annotations

import os

import torch

from pagedllm.config import ModelConfig

GiB = 1 << 30
CPU_DEFAULT_KV_BYTES = 4 * GiB  # CPU pool when --kv-cache-memory is not given (capped by free RAM)
CPU_DEFAULT_RAM_SHARE = 0.4


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def kv_bytes_per_token(cfg: ModelConfig, kv_bytes: int, tensor_parallel_size: int = 1, num_layers: int | None = None) -> int:
    """Exact, per device: each rank keeps its share of KV heads (at least one, replicated past kv_heads)."""
    kv_heads = max(1, cfg.num_kv_heads // tensor_parallel_size)
    layers = cfg.num_layers if num_layers is None else num_layers
    return 2 * layers * kv_heads * cfg.head_dim * kv_bytes


def brief_kv_bytes_per_token(cfg: ModelConfig, kv_bytes: int) -> int:
    """The brief's Mt = 2 · s · Nlayers · H (no grouped-query attention)."""
    return 2 * kv_bytes * cfg.num_layers * cfg.hidden_size


def available_ram() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 * GiB


def cpu_kv_budget(kv_cache_memory: int | None, needed_bytes: int) -> int:
    """The CPU pool: --kv-cache-memory if given; else min(4 GiB, 40 % of free RAM), never more than
    max_num_seqs sequences of max_model_len need."""
    if kv_cache_memory is not None:
        return kv_cache_memory
    return min(CPU_DEFAULT_KV_BYTES, int(CPU_DEFAULT_RAM_SHARE * available_ram()), needed_bytes)


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def parse_bytes(text: str) -> int:
    """'4GiB', '512MB', '1e9' -> bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    mult = 1
    if t and t[-1] in units:
        mult, t = units[t[-1]], t[:-1]
    try:
        value = float(t) * mult
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a size (examples: 4GiB, 512MiB, 80GB)") from None
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return int(value)
