"""Native CPU kernels: C++ built once with the machine's compiler on first use (a few seconds), cached
under ~/.cache/pagedllm/kernels, and loaded as torch operators (`torch.ops.pagedllm.*`).

Everything here has a pure-torch fallback: with no compiler, or PAGEDLLM_ATTENTION_BACKEND=torch,
the engine computes the same attention with torch ops (slower: it gathers each sequence's history, pads and masks).
`python -m pagedllm.kernels` builds them ahead of time (`make setup` does).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger("pagedllm")

SOURCES = [Path(__file__).parent / "csrc" / "paged_attention_cpu.cpp"]
HEAD_DIMS = (16, 32, 64, 128)  # the head sizes the attention kernel is instantiated for
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Build flags for ATen's SIMD types (at::vec), matching the capability torch itself picked on this CPU.
_ISA_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
               "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}


def attention_backend() -> str:
    """PAGEDLLM_ATTENTION_BACKEND: "auto" (native kernel where it is built and applies), "native" or "torch"."""
    choice = os.environ.get("PAGEDLLM_ATTENTION_BACKEND", "auto").lower()
    if choice not in ("auto", "native", "torch"):
        raise ValueError(f"PAGEDLLM_ATTENTION_BACKEND must be auto, native or torch, not {choice!r}")
    return choice


@functools.cache
def load_cpu_ops() -> bool:
    """Build (first time only) and load the CPU operators; False, with one warning, if that is not possible."""
    from torch.utils import cpp_extension

    isa = torch.backends.cpu.get_cpu_capability()
    build_dir = Path.home() / ".cache" / "pagedllm" / "kernels" / f"torch{torch.__version__}-{isa}"
    build_dir.mkdir(parents=True, exist_ok=True)
    if not (build_dir / "pagedllm_cpu_ops.so").exists():
        logger.info("building the native CPU attention kernel (once, about 10 s)")
    try:
        import ninja  # the PyPI wheel; torch looks for the `ninja` binary on PATH

        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    except ImportError:
        pass
    try:
        cpp_extension.load("pagedllm_cpu_ops", [str(s) for s in SOURCES], build_directory=str(build_dir),
                           extra_cflags=["-O3", "-fopenmp", *_ISA_FLAGS.get(isa, ["-DCPU_CAPABILITY=DEFAULT"])],
                           extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as e:  # no compiler, no ninja, a failed build: the torch path still works
        if attention_backend() == "native":
            raise
        logger.warning("native CPU kernels unavailable (%s); using torch attention", str(e).splitlines()[0])
        return False
    return True


def native_attention_supported(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether attention on this device and shape runs in the native kernel."""
    backend = attention_backend()
    if backend == "torch" or device.type != "cpu" or dtype not in DTYPES or head_dim not in HEAD_DIMS:
        if backend == "native":
            raise ValueError(f"the native attention kernel does not cover {device.type} / {dtype} / head_dim {head_dim}")
        return False
    return load_cpu_ops()


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    query_start: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of a step's query tokens q [T, heads, D] (sequence b's are q[query_start[b]:
    query_start[b + 1]], the last of its context_lens[b] tokens) over each sequence's keys and values in
    the pool ([kv_heads, blocks, block_size, D]), found through its block table."""
    return torch.ops.pagedllm.paged_attention(q, k_cache, v_cache, block_tables, query_start, context_lens, scale)
