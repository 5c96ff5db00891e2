"""`pagedllm plan`: the memory plan as a readable table or JSON. Instant: reads a config, loads no weights."""

from __future__ import annotations

import argparse
import json

from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.entrypoints.cli_args import layer_counts
from pagedllm.memory.planner import make_plan
from pagedllm.memory.units import format_bytes, parse_bytes
from pagedllm.model_loader.resolve import model_config_for
from pagedllm.quant_config import RTN_SCHEMES


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="memory plan: weights, KV cache per token, what fits (loads no weights)")
    p.add_argument("model", nargs="?", default=None,
                   help="HF folder, .gguf file, qwen3-0.6b ... qwen3-32b, or nothing for the embedded model")
    p.add_argument("--dtype", default="bf16", help="weight dtype: fp32, bf16, fp16, int8, int4")
    p.add_argument("--kv-cache-dtype", default="auto", help="auto (as the weights; bf16 under int8), fp32, bf16, fp16")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--device-memory", default=None, help="memory per device, e.g. 80GB, 24GiB")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-partition", type=layer_counts, default=None, help="layers per stage, e.g. 16,12")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--json", action="store_true", help="every figure in bytes or counts")
    p.set_defaults(func=cmd_plan)


def plan_config(ns: argparse.Namespace):
    """The engine configuration the plan is for, built as the engine builds its own (nothing loaded or converted)."""
    if ns.concurrency < 1:
        raise ValueError("--concurrency must be at least 1")
    quantized = ns.dtype.lower() in RTN_SCHEMES
    args = EngineArgs(model=ns.model, dtype="bfloat16" if quantized else ns.dtype,
                      quantization=ns.dtype.lower() if quantized else None,
                      kv_cache_dtype=ns.kv_cache_dtype, max_model_len=ns.max_model_len, block_size=ns.block_size,
                      max_num_batched_tokens=ns.max_num_batched_tokens, gpu_memory_utilization=ns.gpu_memory_utilization,
                      tensor_parallel_size=ns.tensor_parallel_size, pipeline_parallel_size=ns.pipeline_parallel_size,
                      pipeline_partition=ns.pipeline_partition, device="cpu")
    return args.create_engine_config(model_config_for(ns.model))


def cmd_plan(ns: argparse.Namespace) -> None:
    device_memory = parse_bytes(ns.device_memory) if ns.device_memory else None
    plan = make_plan(plan_config(ns), ns.concurrency, device_memory)
    print(json.dumps(plan, indent=2) if ns.json else render(plan))


def render(plan: dict) -> str:
    m, st, kv = plan["model"], plan["settings"], plan["kv_cache"]
    b = {"float32": 4, "bfloat16": 2, "float16": 2}[st["kv_cache_dtype"]]
    w = plan["weight_bytes"]
    lines = [
        f"pagedllm plan: {m['name'] or m['architecture']} ({m['architecture']}), weights {st['weight_dtype']}, "
        f"KV cache {st['kv_cache_dtype']}",
        "",
        f"Model        {m['num_layers']} layers, hidden {m['hidden_size']}, {m['num_heads']} heads / "
        f"{m['num_kv_heads']} KV heads x {m['head_dim']}, intermediate {m['intermediate_size']}, vocab {m['vocab_size']}"
        f"{', tied embeddings' if m['tie_word_embeddings'] else ''}"
        + (f", {m['num_experts']} experts of {m['moe_intermediate_size']} ({m['num_experts_per_tok']} per token)"
           if m["num_experts"] else ""),
        f"Parameters   {plan['parameters']:,}" + (f" in all, {plan['active_parameters']:,} active per token (routed experts)"
                                                   if plan["active_parameters"] != plan["parameters"] else ""),
        "Weights      " + "   ".join(f"{k} {format_bytes(v)}" for k, v in w.items()),
        "             (int8: + an fp16 scale per row; int4: 4-bit groups of 32 with an fp16 scale and offset each,"
        " the vocabulary tables in int8)",
        "",
        "KV cache per token",
        f"  exact (GQA)       {kv['bytes_per_token']:>12,} B  {format_bytes(kv['bytes_per_token']):>12}"
        f"  = 2 x {m['num_layers']} layers x {m['num_kv_heads']} kv_heads x {m['head_dim']} head_dim x {b} B",
        f"  brief's formula   {kv['brief_bytes_per_token']:>12,} B  {format_bytes(kv['brief_bytes_per_token']):>12}"
        f"  = 2 x {b} B x {m['num_layers']} layers x {m['hidden_size']} hidden",
        f"  brief / exact     {kv['brief_over_exact']:.2f}x. {kv['why']}",
        f"  per block of {st['block_size']:<4} {kv['bytes_per_block']:>12,} B  {format_bytes(kv['bytes_per_block']):>12}",
        f"Total KV for {st['max_model_len']} tokens x {st['concurrency']} requests: exact "
        f"{format_bytes(kv['total_bytes'])} ({kv['total_bytes']:,} B), brief {format_bytes(kv['brief_total_bytes'])}",
        "",
        f"Per device: TP {st['tensor_parallel_size']} x PP {st['pipeline_parallel_size']} = {plan['num_devices']} device(s)",
        "  stage  layers   weights      sharded      replicated   KV heads  KV/token     activations  KV budget    blocks",
    ]
    for d in plan["devices"]:
        lines.append(
            f"  {d['pp_rank']:<6} {d['layers'][0]:>3}-{d['layers'][1] - 1:<4} {format_bytes(d['weight_bytes']):<12} "
            f"{format_bytes(d['sharded_weight_bytes']):<12} {format_bytes(d['replicated_weight_bytes']):<12} "
            f"{d['kv_heads']:<9} {format_bytes(d['kv_bytes_per_token']):<12} {format_bytes(d['activation_bytes']):<12} "
            f"{format_bytes(d['kv_budget_bytes']) if 'kv_budget_bytes' in d else '-':<12} {d.get('num_blocks', '-')}"
        )
    if plan["replicated_tensors"]:
        lines.append("  replicated on every tensor-parallel rank: " + ", ".join(plan["replicated_tensors"]))
    cap = plan.get("capacity")
    if cap is None:
        lines += ["", "Give --device-memory (e.g. 80GB) to see what fits."]
    else:
        lines += [
            "",
            f"Capacity ({format_bytes(st['device_memory'])} x {st['gpu_memory_utilization']} per device; what is left after "
            "weights and activations goes to the KV cache; the pool is the smallest over devices)",
            f"  {cap['num_blocks']:,} blocks = {cap['tokens']:,} tokens",
            f"  max concurrency at {st['max_model_len']} tokens: {cap['max_concurrency_at_max_model_len']:,}",
            f"  max context with {st['concurrency']} concurrent requests: {cap['max_context_at_concurrency']:,} tokens",
            "  context    max concurrent requests",
        ]
        lines += [f"  {row['context']:<10} {row['max_concurrency']:,}" for row in cap["tradeoff"]]
    return "\n".join(lines)
