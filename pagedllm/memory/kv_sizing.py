"""KV-cache bytes per token (exact for grouped-query attention, and the brief's rule of thumb) and pool budgets.

Exact: 2 (K and V) · layers · kv_heads · head_dim · bytes. The brief's Mt = 2 · s · layers · hidden
assumes every query head keeps its own K and V; with grouped-query attention only kv_heads ·
head_dim values per layer are stored, so the exact figure is smaller by heads · head_dim / (kv_heads · head_dim).
"""

from __future__ import annotations

import os

from pagedllm.config import ModelConfig
from pagedllm.memory.units import GiB

CPU_DEFAULT_KV_BYTES = 4 * GiB  # the CPU pool when --kv-cache-memory is not given ...
CPU_DEFAULT_RAM_SHARE = 0.4  # ... and never more than this share of free RAM


def kv_bytes_per_token(cfg: ModelConfig, kv_bytes: int, tp: int = 1, num_layers: int | None = None) -> int:
    layers = cfg.num_layers if num_layers is None else num_layers
    return 2 * layers * cfg.kv_heads_per_rank(tp) * cfg.head_dim * kv_bytes


def brief_kv_bytes_per_token(cfg: ModelConfig, kv_bytes: int) -> int:
    """The brief's Mt = 2 · s · Nlayers · H."""
    return 2 * kv_bytes * cfg.num_layers * cfg.hidden_size


def available_ram() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 * GiB


def cpu_default_kv_budget(needed_bytes: int) -> int:
    """min(4 GiB, 40 % of free RAM), and no more than max_num_seqs sequences of max_model_len need."""
    return min(CPU_DEFAULT_KV_BYTES, int(CPU_DEFAULT_RAM_SHARE * available_ram()), needed_bytes)
