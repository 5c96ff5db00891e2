"""Native CPU kernels (paged attention; fused RMSNorm, rotary embedding, SwiGLU; linear layers with a
memory-speed GEMV for decode batches; a stack of decoder layers in one call), and Triton's attention kernels for
the GPU (triton_attention.py). The CPU ones are C++ built once with the machine's compiler on first use (a few
seconds), cached under ~/.cache/pagedllm/kernels, and loaded as torch operators (`torch.ops.pagedllm.*`).

Everything here has a pure-torch fallback: with no compiler, or PAGEDLLM_ATTENTION_BACKEND=torch,
the engine computes the same layers with torch ops (slower: attention gathers each sequence's history,
pads and masks; each fused layer becomes a chain of ops).
`python -m pagedllm.kernels` builds them ahead of time (`make setup` does).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger("pagedllm")

SOURCES = [Path(__file__).parent / "csrc" / name
           for name in ("paged_attention_cpu.cpp", "layers_cpu.cpp", "linear_cpu.cpp", "decoder_layer_cpu.cpp",
                        "sampler_cpu.cpp", "embedding_cpu.cpp")]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HEAD_DIMS = (16, 32, 64, 128)  # the head sizes the attention kernel is instantiated for

# Build flags for ATen's SIMD types (at::vec), matching the capability torch itself picked on this CPU.
_ISA_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
               "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}


ATTENTION_BACKENDS = ("auto", "native", "triton", "torch")


def attention_backend() -> str:
    """PAGEDLLM_ATTENTION_BACKEND (or --attention-backend): "auto" (Triton on CUDA, the native kernel on the CPU where
    it is built and applies), "native", "triton" (on the CPU only under TRITON_INTERPRET=1, for testing) or "torch"."""
    choice = os.environ.get("PAGEDLLM_ATTENTION_BACKEND", "auto").lower()
    if choice not in ATTENTION_BACKENDS:
        raise ValueError(f"PAGEDLLM_ATTENTION_BACKEND must be one of {', '.join(ATTENTION_BACKENDS)}, not {choice!r}")
    return choice


def triton_attention_enabled(device: torch.device, block_size: int, head_dim: int) -> bool:
    """Whether this device's attention runs in the Triton kernels (kernels/triton_attention.py)."""
    backend = attention_backend()
    if backend == "triton" or (backend == "auto" and device.type == "cuda" and _triton_importable()):
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("the triton attention backend runs on CUDA (or on the CPU under TRITON_INTERPRET=1, "
                             "Triton's interpreter, for testing)")
        if not all(n >= 16 and n & (n - 1) == 0 for n in (block_size, head_dim)):
            raise ValueError(f"the triton attention kernel needs a block size and head_dim that are powers of two "
                             f"of at least 16 (got {block_size} and {head_dim})")
        return True
    return False


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def load_cpu_ops() -> bool:
    """Build (first time only) and load the CPU operators; False, with one warning, if that is not possible."""
    from torch.utils import cpp_extension

    isa = torch.backends.cpu.get_cpu_capability()
    build_dir = Path.home() / ".cache" / "pagedllm" / "kernels" / f"torch{torch.__version__}-{isa}"
    build_dir.mkdir(parents=True, exist_ok=True)
    if not (build_dir / "pagedllm_cpu_ops.so").exists():
        logger.info("building the native CPU kernels (once, about 10 s)")
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
        logger.warning("native CPU kernels unavailable (%s); using the torch implementations", str(e).splitlines()[0])
        return False
    return True


def native_ops_enabled(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fused layers (RMSNorm, rotary, SwiGLU, stacks of decoder layers) and linear layers run natively for a
    model on this device and dtype."""
    backend = attention_backend()
    if backend in ("torch", "triton") or device.type != "cpu" or dtype not in DTYPES:
        if backend == "native":
            raise ValueError(f"the native kernels do not cover {device.type} / {dtype}")
        return False
    return load_cpu_ops()


def native_attention_supported(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether attention on this device and shape runs in the native kernel."""
    if head_dim not in HEAD_DIMS and attention_backend() == "native":
        raise ValueError(f"the native attention kernel does not cover head_dim {head_dim}")
    return head_dim in HEAD_DIMS and native_ops_enabled(device, dtype)


def _triton_kernels(device: torch.device):
    """The Triton kernels module where this device's attention runs in it, else None (the native CPU operators)."""
    if device.type == "cpu" and attention_backend() != "triton":
        return None
    from pagedllm.kernels import triton_attention

    return triton_attention


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    query_start: torch.Tensor, context_lens: torch.Tensor, scale: float,
                    max_context: int = 0) -> torch.Tensor:
    """Causal attention of a step's query tokens q [T, heads, D] (sequence b's are q[query_start[b]:
    query_start[b + 1]], the last of its context_lens[b] tokens) over each sequence's keys and values in
    the pool ([kv_heads, blocks, block_size, D]), found through its block table: the native CPU kernel, or
    Triton's (GPU), which splits long contexts (`max_context`, known on the host) over several programs when the
    step has few queries."""
    impl = _triton_kernels(q.device)
    if impl is not None:
        splits = impl.kv_splits(q.shape[0] * k_cache.shape[0], max_context)
        return impl.paged_attention(q, k_cache, v_cache, block_tables, query_start, context_lens, scale, splits)
    return torch.ops.pagedllm.paged_attention(q, k_cache, v_cache, block_tables, query_start, context_lens, scale)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """Write a step's keys and values [T, kv_heads, D] into the pool [kv_heads, blocks, block_size, D] at their slots."""
    impl = _triton_kernels(key.device)
    if impl is not None:
        return impl.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)
    torch.ops.pagedllm.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.ops.pagedllm.rms_norm(x, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """residual += x; x = rms_norm(residual), both in place."""
    torch.ops.pagedllm.fused_add_rms_norm(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.pagedllm.silu_and_mul(x)


def rotary_embedding(positions: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate-half rotary embedding of x [T, heads, head_dim] in place, from fp32 tables [positions, head_dim / 2]."""
    torch.ops.pagedllm.rotary_embedding(positions, x, cos, sin)


def tiled_weights_supported() -> bool:
    """Whether this CPU runs quantized weights tiled for int8 dot products (csrc/quant_gemv_tiled.h)."""
    return load_cpu_ops() and torch.ops.pagedllm.tiled_weights_supported()


INT8_ACTIVATIONS = ("auto", "1", "0")


def int8_activations(quantization: str | None) -> bool:
    """Whether decode steps multiply a model's quantized weights (quantized by `quantization`, the engine's method)
    with int8 activations (tiled weights, on CPUs with int8 dot products): faster, at an accuracy cost that `pagedllm
    bench quantization` measures. PAGEDLLM_INT8_ACTIVATIONS: "auto" (default) for GGUF files run in their own
    quantization, as vLLM's GGUF kernels and llama.cpp do, while AWQ, GPTQ and round-to-nearest weights keep bf16
    activations, as vLLM's kernels for them do; "1" for every quantized model; "0" for none."""
    choice = os.environ.get("PAGEDLLM_INT8_ACTIVATIONS", "auto").lower()
    if choice not in INT8_ACTIVATIONS:
        raise ValueError(f"PAGEDLLM_INT8_ACTIVATIONS must be one of {', '.join(INT8_ACTIVATIONS)}, not {choice!r}")
    return (choice == "1" or (choice == "auto" and quantization == "gguf")) and tiled_weights_supported()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           scale: torch.Tensor | None = None, offset: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias); quantized weights (int8 [N, K] or 4-bit [N, K / 2], or either tiled) come
    with fp16 group scales [N, groups] and optionally offsets (layers/quantization.py). Up to 4 rows (8 for 4-bit and
    tiled weights) stream the weights at memory speed; more go to a matrix product."""
    return torch.ops.pagedllm.linear(x, weight, bias, scale, offset)


def quantized_embedding(ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                        dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` (int64 [T]) of a quantized table (layers/quantization.py's format, tiled or not), dequantized to
    dtype [T, K] exactly as quantization.dequantize computes them."""
    return torch.ops.pagedllm.quantized_embedding(ids, weight, scale, offset, dtype)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """Index of each row's maximum of a 2-D CPU tensor (the first on ties, as torch.argmax), int64."""
    return torch.ops.pagedllm.argmax(x)


def decoder_stack(weights: list[torch.Tensor | None], num_heads: int, eps: float, scale: float):
    """A stack of decoder layers' weights (csrc/decoder_layer_cpu.cpp's order) as one object, converted once."""
    return torch.classes.pagedllm.DecoderStack(weights, num_heads, eps, scale)


def decoder_layers(x: torch.Tensor | None, residual: torch.Tensor, positions: torch.Tensor, *metadata_and_stack):
    """A stack of decoder layers (see csrc/decoder_layer_cpu.cpp for the arguments): residual += x, then each layer
    on the normed residual; returns the last one's output. x and residual are updated in place."""
    return torch.ops.pagedllm.decoder_layers(x, residual, positions, *metadata_and_stack)
