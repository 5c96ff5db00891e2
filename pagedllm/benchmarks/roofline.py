"""The machine's limits, measured in the same run as the benchmark: matmul FLOP/s at the model's own
linear shapes, and memory read bandwidth. From them, the best throughput the work could reach."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from pagedllm import kernels
from pagedllm.config import ModelConfig


def layer_linear_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(in, out) of one decoder layer's matmuls (fused QKV, output, fused gate/up, down)."""
    h, q, kv, i = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    return [(h, q + 2 * kv), (q, h), (h, 2 * i), (i, h)]


def matmul_params_per_token(cfg: ModelConfig) -> int:
    """Weights each token multiplies through (all layers), without the LM head (only sampled tokens need it)."""
    return cfg.num_layers * sum(a * b for a, b in layer_linear_shapes(cfg))


def _best_time(fn, min_seconds: float = 0.5, min_calls: int = 5) -> float:
    """The fastest of repeated calls: a machine's limit is what it reaches when nothing else interferes."""
    fn()
    best, calls, start = float("inf"), 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        best, calls = min(best, time.perf_counter() - t), calls + 1
    return best


@torch.inference_mode()
def matmul_flops(cfg: ModelConfig, tokens: int, dtype: torch.dtype, device: torch.device) -> float:
    """FLOP/s of the model's linear layers on `tokens` rows: every layer's own (random) weights, so they
    stream from memory as the real model's do instead of sitting in cache; through the native linear op where the
    engine runs it (on CPUs without AVX512-BF16 it multiplies bf16 rows in fp32: torch's bf16 matmul there ran at a
    seventh of the speed, which made a roofline the engine exceeded several times over)."""
    shapes = layer_linear_shapes(cfg) * cfg.num_layers
    weights = [torch.randn(o, i, dtype=dtype, device=device) for i, o in shapes]
    inputs = {i: torch.randn(tokens, i, dtype=dtype, device=device) for i, _ in shapes}
    linear = kernels.linear if kernels.native_ops_enabled(device, dtype) else F.linear

    def run():
        for w in weights:
            linear(inputs[w.shape[1]], w)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    flops = 2 * tokens * sum(w.numel() for w in weights)
    return flops / _best_time(run)


@torch.inference_mode()
def read_bandwidth(device: torch.device, nbytes: int = 256 << 20) -> float:
    """Bytes read per second streaming a large buffer (a sum over it): what decoding one token at a time
    needs, as it reads every weight once."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    return nbytes / _best_time(lambda: src.sum().item())


def machine_limits(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, decode_batch: int) -> dict:
    return {
        "matmul_flops_1_token": matmul_flops(cfg, 1, dtype, device),
        f"matmul_flops_{decode_batch}_tokens": matmul_flops(cfg, decode_batch, dtype, device),
        "matmul_flops_1024_tokens": matmul_flops(cfg, 1024, dtype, device),
        "read_bandwidth": read_bandwidth(device),
        "decode_batch": decode_batch,
    }


def throughput_roofline(cfg: ModelConfig, limits: dict, prompt_tokens: int, output_tokens: int) -> dict:
    """Fastest possible time for the workload's matmuls: prompts at the large-batch rate, generated tokens
    (plus their LM head) at the decode-batch rate. Attention is left out (small at these lengths)."""
    per_token = 2 * matmul_params_per_token(cfg)
    lm_head = 2 * cfg.hidden_size * cfg.vocab_size
    t_prefill = prompt_tokens * per_token / limits["matmul_flops_1024_tokens"]
    t_decode = output_tokens * (per_token + lm_head) / limits[f"matmul_flops_{limits['decode_batch']}_tokens"]
    return {"model_flops": prompt_tokens * per_token + output_tokens * (per_token + lm_head),
            "min_seconds": t_prefill + t_decode, "max_output_tok_s": output_tokens / (t_prefill + t_decode)}


def decode_kv_read_seconds(cfg: ModelConfig, limits: dict, prompt_lens: list[int], output_lens: list[int],
                           kv_bytes: int) -> float:
    """Time to read, at the measured read bandwidth, the keys and values every decode step must read: a request
    with p prompt and n output tokens decodes n - 1 times over contexts p + 1 ... p + n - 1. The matmul
    roofline above leaves this out; it is not small once contexts reach hundreds of tokens."""
    from pagedllm.memory.kv_sizing import kv_bytes_per_token

    tokens_read = sum((n - 1) * p + n * (n - 1) // 2 for p, n in zip(prompt_lens, output_lens))
    return tokens_read * kv_bytes_per_token(cfg, kv_bytes) / limits["read_bandwidth"]
