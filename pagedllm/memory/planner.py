"""The memory plan: weights, KV cache, activations and what fits, per device, for one model and settings.

`pagedllm plan` prints it; the engine sizes its pool with the same functions. Every figure is in
bytes or counts so that `--json` output can be checked against reality.
"""

from __future__ import annotations

from pagedllm.config import EngineConfig, ModelConfig, dtype_name
from pagedllm.memory.kv_sizing import brief_kv_bytes_per_token, kv_bytes_per_token
from pagedllm.memory.weights import (
    FLOAT_BYTES,
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


def activation_estimate(cfg: ModelConfig, act_bytes: int, tokens: int, tp: int, sample_rows: int) -> int:
    """Peak activations of one forward pass over `tokens` tokens, as a documented estimate: per token the
    residual stream, normed input and MLP output (3·hidden), fused QKV and attention output, gate/up and
    the SwiGLU product (3·intermediate), all per rank; plus fp32 logits and their softmax for the sampled rows."""
    q = cfg.num_heads * cfg.head_dim // tp
    kv = cfg.kv_heads_per_rank(tp) * cfg.head_dim
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


def make_plan(config: EngineConfig, concurrency: int = 8, device_memory: int | None = None) -> dict:
    """The plan for an engine configuration (the one the engine itself would run with), `concurrency` requests of
    max_model_len, and optionally `device_memory` bytes per device."""
    cfg, cache, sched, par = config.model, config.cache, config.scheduler, config.parallel
    wdtype, kvdtype = weight_dtype_name(config), dtype_name(cache.cache_dtype)
    tp, pp = par.tensor_parallel_size, par.pipeline_parallel_size
    kv_b = FLOAT_BYTES[kvdtype]
    exact = kv_bytes_per_token(cfg, kv_b)
    brief = brief_kv_bytes_per_token(cfg, kv_b)
    ctx_conc = sched.max_model_len * concurrency
    stages = weights_per_stage(cfg, wdtype, tp, pp, par.pipeline_partition)
    devices = []
    for st in stages:
        per_token = kv_bytes_per_token(cfg, kv_b, tp, st.layers[1] - st.layers[0])
        act = activation_estimate(cfg, config.dtype.itemsize, sched.max_num_batched_tokens, tp,
                                  min(sched.max_num_seqs, sched.max_num_batched_tokens))
        dev = {
            "pp_rank": st.pp_rank, "layers": list(st.layers), "weight_params": st.params, "weight_bytes": st.bytes,
            "sharded_weight_bytes": st.sharded_bytes, "replicated_weight_bytes": st.replicated_bytes,
            "kv_heads": cfg.kv_heads_per_rank(tp), "kv_bytes_per_token": per_token,
            "kv_bytes_per_block": per_token * cache.block_size, "activation_bytes": act,
        }
        if device_memory is not None:
            free = int(device_memory * cache.gpu_memory_utilization) - st.bytes - act
            dev["kv_budget_bytes"] = max(0, free)
            dev["num_blocks"] = max(0, free) // dev["kv_bytes_per_block"]
        devices.append(dev)
    plan = {
        "model": {"name": cfg.name, "architecture": cfg.model_type, "vocab_size": cfg.vocab_size,
                  "hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
                  "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.intermediate_size,
                  "tie_word_embeddings": cfg.tie_word_embeddings, "num_experts": cfg.num_experts,
                  "num_experts_per_tok": cfg.num_experts_per_tok, "moe_intermediate_size": cfg.moe_intermediate_size},
        "settings": {"weight_dtype": wdtype, "kv_cache_dtype": kvdtype, "max_model_len": sched.max_model_len,
                     "concurrency": concurrency, "device_memory": device_memory,
                     "gpu_memory_utilization": cache.gpu_memory_utilization, "tensor_parallel_size": tp,
                     "pipeline_parallel_size": pp,
                     "pipeline_partition": list(par.pipeline_partition) if par.pipeline_partition else None,
                     "block_size": cache.block_size, "max_num_batched_tokens": sched.max_num_batched_tokens},
        "parameters": count_parameters(cfg),
        "active_parameters": count_parameters(cfg, active=True),  # per token: a MoE model's top-k experts
        "weight_bytes": {name: weights_per_stage(cfg, name)[0].bytes
                         for name in (*WEIGHT_DTYPES, *([cfg.quant_method] if cfg.quant_method else []))},
        "kv_cache": {
            "bytes_per_token": exact, "brief_bytes_per_token": brief, "brief_over_exact": brief / exact,
            "why": gqa_note(cfg), "bytes_per_block": exact * cache.block_size,
            "total_bytes": exact * ctx_conc, "brief_total_bytes": brief * ctx_conc,
        },
        "devices": devices,
        "replicated_tensors": replicated_tensors(cfg, tp) if tp > 1 else [],
        "num_devices": tp * pp,
    }
    if device_memory is not None:
        plan["capacity"] = capacity(min(d["num_blocks"] for d in devices), cache.block_size, sched.max_model_len,
                                    concurrency)
    return plan
