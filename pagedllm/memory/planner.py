"""The memory plan: weights, KV cache, activations and what fits, per device, for one model and settings.

`pagedllm plan` prints it; the engine sizes its pool with the same functions. Every figure is in
bytes or counts so that `--json` output can be checked against reality.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagedllm.config import ModelConfig
from pagedllm.memory.kv_sizing import brief_kv_bytes_per_token, kv_bytes_per_token, kv_heads_per_rank
from pagedllm.memory.weights import (
    WEIGHT_DTYPES,
    count_parameters,
    replicated_tensors,
    weight_dtype_name,
    weights_per_stage,
)


def gqa_note(cfg: ModelConfig) -> str:
    kv = cfg.num_kv_heads * cfg.head_dim
    return (f"The brief's 2·s·layers·hidden stores hidden={cfg.hidden_size} values per layer for K and for V, as if every "
            f"query head kept its own; with grouped-query attention only kv_heads·head_dim = {cfg.num_kv_heads}·"
            f"{cfg.head_dim} = {kv} are stored.")


@dataclass
class PlanSettings:
    weight_dtype: str = "bfloat16"
    kv_cache_dtype: str = "auto"  # auto: the weights' dtype (bf16 under int8 weights)
    max_model_len: int = 2048
    concurrency: int = 8
    device_memory: int | None = None  # bytes per device
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    pipeline_partition: list[int] | None = None  # layers per stage; default: an even split
    block_size: int = 16
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256

    def kv_dtype(self) -> str:
        if self.kv_cache_dtype == "auto":
            weights = weight_dtype_name(self.weight_dtype)
            return "bfloat16" if weights == "int8" else weights
        name = weight_dtype_name(self.kv_cache_dtype)
        if name == "int8":
            raise ValueError("an int8 KV cache is not supported; use auto, fp32, bf16 or fp16")
        return name


def activation_estimate(cfg: ModelConfig, act_bytes: int, tokens: int, tp: int, sample_rows: int) -> int:
    """Peak activations of one forward pass over `tokens` tokens, as a documented estimate: per token the
    residual stream, normed input and MLP output (3·hidden), fused QKV and attention output, gate/up and
    the SwiGLU product (3·intermediate), all per rank; plus fp32 logits and their softmax for the sampled rows."""
    q = cfg.num_heads * cfg.head_dim // tp
    kv = kv_heads_per_rank(cfg, tp) * cfg.head_dim
    per_token = 3 * cfg.hidden_size + (q + 2 * kv) + q + 3 * cfg.intermediate_size // tp
    return tokens * per_token * act_bytes + 2 * sample_rows * cfg.vocab_size * 4


def capacity(num_blocks: int, block_size: int, max_model_len: int, concurrency: int) -> dict:
    per_seq = -(-max_model_len // block_size)
    tradeoff, ctx = [], 512
    while ctx < max_model_len:
        tradeoff.append({"context": ctx, "max_concurrency": num_blocks // -(-ctx // block_size)})
        ctx *= 2
    tradeoff.append({"context": max_model_len, "max_concurrency": num_blocks // per_seq})
    return {
        "num_blocks": num_blocks,
        "tokens": num_blocks * block_size,
        "max_concurrency_at_max_model_len": num_blocks // per_seq,
        "max_context_at_concurrency": (num_blocks // concurrency) * block_size,
        "tradeoff": tradeoff,
    }


def make_plan(cfg: ModelConfig, s: PlanSettings) -> dict:
    wdtype, kvdtype = weight_dtype_name(s.weight_dtype), s.kv_dtype()
    tp, pp = s.tensor_parallel_size, s.pipeline_parallel_size
    if cfg.num_heads % tp or (cfg.num_kv_heads % tp and tp % cfg.num_kv_heads):
        raise ValueError(f"tensor_parallel_size {tp} must divide the {cfg.num_heads} attention heads, and divide or be "
                         f"a multiple of the {cfg.num_kv_heads} KV heads")
    kv_b = WEIGHT_DTYPES[kvdtype]
    exact = kv_bytes_per_token(cfg, kv_b)
    brief = brief_kv_bytes_per_token(cfg, kv_b)
    ctx_conc = s.max_model_len * s.concurrency
    stages = weights_per_stage(cfg, wdtype, tp, pp, s.pipeline_partition)
    devices = []
    for st in stages:
        per_token = kv_bytes_per_token(cfg, kv_b, tp, st.layers[1] - st.layers[0])
        act = activation_estimate(cfg, 2 if wdtype == "int8" else WEIGHT_DTYPES[wdtype], s.max_num_batched_tokens, tp,
                                  min(s.max_num_seqs, s.max_num_batched_tokens))
        dev = {
            "pp_rank": st.pp_rank, "layers": list(st.layers), "weight_params": st.params, "weight_bytes": st.bytes,
            "sharded_weight_bytes": st.sharded_bytes, "replicated_weight_bytes": st.replicated_bytes,
            "kv_heads": kv_heads_per_rank(cfg, tp), "kv_bytes_per_token": per_token,
            "kv_bytes_per_block": per_token * s.block_size, "activation_bytes": act,
        }
        if s.device_memory is not None:
            free = int(s.device_memory * s.gpu_memory_utilization) - st.bytes - act
            dev["kv_budget_bytes"] = max(0, free)
            dev["num_blocks"] = max(0, free) // dev["kv_bytes_per_block"]
        devices.append(dev)
    plan = {
        "model": {"name": cfg.name, "architecture": cfg.model_type, "vocab_size": cfg.vocab_size,
                  "hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
                  "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.intermediate_size,
                  "tie_word_embeddings": cfg.tie_word_embeddings},
        "settings": {"weight_dtype": wdtype, "kv_cache_dtype": kvdtype, "max_model_len": s.max_model_len,
                     "concurrency": s.concurrency, "device_memory": s.device_memory,
                     "gpu_memory_utilization": s.gpu_memory_utilization, "tensor_parallel_size": tp,
                     "pipeline_parallel_size": pp, "pipeline_partition": s.pipeline_partition, "block_size": s.block_size,
                     "max_num_batched_tokens": s.max_num_batched_tokens},
        "parameters": count_parameters(cfg),
        "weight_bytes": {name: weights_per_stage(cfg, name)[0].bytes for name in WEIGHT_DTYPES},
        "kv_cache": {
            "bytes_per_token": exact, "brief_bytes_per_token": brief, "brief_over_exact": brief / exact,
            "why": gqa_note(cfg), "bytes_per_block": exact * s.block_size,
            "total_bytes": exact * ctx_conc, "brief_total_bytes": brief * ctx_conc,
        },
        "devices": devices,
        "replicated_tensors": replicated_tensors(cfg, tp) if tp > 1 else [],
        "num_devices": tp * pp,
    }
    if s.device_memory is not None:
        plan["capacity"] = capacity(min(d["num_blocks"] for d in devices), s.block_size, s.max_model_len, s.concurrency)
    return plan
