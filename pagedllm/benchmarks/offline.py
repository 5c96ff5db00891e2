"""`pagedllm bench throughput` (and what `bench latency` shares with it): the offline engine, with the machine's
limits and HF beside it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from pagedllm.benchmarks import hf_baseline, roofline
from pagedllm.benchmarks.workloads import Workload, make_workload
from pagedllm.config import dtype_name
from pagedllm.engine.spec_decode import SpecDecodeStats
from pagedllm.entrypoints.cli_args import engine_args_from
from pagedllm.entrypoints.llm import LLM
from pagedllm.executor.multiproc import bubble_report
from pagedllm.sampling_params import SamplingParams


def make_llm(ns: argparse.Namespace, overrides: dict | None = None) -> LLM:
    """The engine the command's arguments describe, with `overrides` (--against's) changed."""
    return LLM(**{**vars(engine_args_from(ns)), **(overrides or {})})


def _run(llm: LLM, w: Workload, use_tqdm: bool = True) -> float:
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in w.output_lens]
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in w.prompts], params, use_tqdm=use_tqdm)
    elapsed = time.perf_counter() - start
    assert sum(len(o.outputs[0].token_ids) for o in outs) == w.num_output_tokens
    return elapsed


def _prefix_hits(engine) -> int:
    return sum(stats.prefix_cache_hits for _, stats in engine.stats())


def write_result(ns: argparse.Namespace, result: dict) -> None:
    result["command"] = "pagedllm " + " ".join(sys.argv[1:]) if sys.argv and "pagedllm" in sys.argv[0] else None
    if ns.output_json:
        with open(ns.output_json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"results written to {ns.output_json}")


def warm_up(llm: LLM, w: Workload) -> None:
    """A few short requests from the workload's prompts; then their prefixes are forgotten, so that the measured
    run computes every prompt token itself."""
    _run(llm, Workload([p[:64] for p in w.prompts[:4]], [4] * min(4, len(w.prompts))), use_tqdm=False)
    llm.reset_prefix_cache()


def cmd_throughput(ns: argparse.Namespace) -> None:
    llm = make_llm(ns)
    engine = llm.engine
    w = make_workload(ns, engine.config.model.vocab_size)
    warm_up(llm, w)
    hits0 = _prefix_hits(engine)
    elapsed = _run(llm, w)
    result = {
        "benchmark": "throughput", "model": engine.config.model.name, "dtype": dtype_name(engine.config.dtype),
        "quantization": engine.config.load.quantization, "num_prompts": len(w.prompts),
        "prompt_tokens": w.num_prompt_tokens, "output_tokens": w.num_output_tokens,
        "elapsed_s": elapsed, "requests_per_s": len(w.prompts) / elapsed, "output_tok_s": w.num_output_tokens / elapsed,
        "total_tok_s": (w.num_prompt_tokens + w.num_output_tokens) / elapsed,
        "prefix_cache_hit_tokens": _prefix_hits(engine) - hits0,
        "settings": {"max_num_seqs": ns.max_num_seqs, "max_num_batched_tokens": ns.max_num_batched_tokens,
                     "tensor_parallel_size": ns.tensor_parallel_size, "data_parallel_size": ns.data_parallel_size,
                     "pipeline_parallel_size": ns.pipeline_parallel_size,
                     "quantization": ns.quantization,
                     "enable_prefix_caching": ns.enable_prefix_caching, "enable_chunked_prefill": ns.enable_chunked_prefill,
                     "shared_prefix_len": ns.shared_prefix_len, "input_len": ns.input_len, "output_len": ns.output_len},
    }
    if ns.pipeline_parallel_size > 1:
        times = engine.executor.stage_times()
        result["pipeline"] = bubble_report(times, micro_batches=len(times[0]))
        bubbles = ", ".join(f"{100 * b:.0f} %" for b in result["pipeline"]["bubble_fraction"])
        print(f"  pipeline: {len(times[0])} micro-batches; idle (bubble) per stage {bubbles}; "
              f"ideal for a full pipeline {100 * result['pipeline']['ideal_bubble_fraction']:.1f} %")
    add_speculation(engine, result)
    if ns.against is not None:
        _against(ns, llm, w, result)
    cfg, folder = engine.config.model, engine.config.load.model_path
    engine.shutdown()  # the machine's limits are measured with the engine (and its processes) gone
    del llm, engine
    limits = roofline.machine_limits(cfg, torch_dtype(result["dtype"]), bench_device(ns), min(len(w.prompts), ns.max_num_seqs))
    computed_prompt = w.num_prompt_tokens - result["prefix_cache_hit_tokens"]  # cached tokens cost no compute
    roof = roofline.throughput_roofline(cfg, limits, computed_prompt, w.num_output_tokens)
    result["limits"] = limits
    result["roofline"] = {**roof, "fraction": result["output_tok_s"] / roof["max_output_tok_s"],
                          "achieved_flops": roof["model_flops"] / elapsed}
    kv_s = roofline.decode_kv_read_seconds(cfg, limits, [len(p) for p in w.prompts], w.output_lens,
                                           torch_dtype(result["dtype"]).itemsize)
    with_kv = w.num_output_tokens / (roof["min_seconds"] + kv_s)
    result["roofline_with_kv_reads"] = {"kv_read_seconds": kv_s, "max_output_tok_s": with_kv,
                                        "fraction": result["output_tok_s"] / with_kv}
    if ns.compare == "hf":
        model = hf_baseline.load_hf(folder, torch_dtype(result["dtype"]), bench_device(ns), ns.load_format)
        hf = {"static_batch_16_s": hf_baseline.static_batches(model, w)}
        if not ns.skip_hf_continuous:
            hf["generate_batch_s"] = hf_baseline.continuous_batching(model, w)
        for key in list(hf):
            hf[key.replace("_s", "_output_tok_s")] = w.num_output_tokens / hf[key]
            hf["speedup_vs_" + key.removesuffix("_s")] = result["output_tok_s"] / hf[key.replace("_s", "_output_tok_s")]
        result["hf"] = hf
    _print_throughput(result)
    print_speculation(result)
    write_result(ns, result)


def _rerun(llm: LLM, w: Workload) -> float:
    """The workload again, its prompts' prefixes forgotten first: a repeat would find every prompt cached (measured:
    W1's second run skipped most of its prefill and took 13 s against the first's 24)."""
    llm.reset_prefix_cache()
    return _run(llm, w)


def _against(ns: argparse.Namespace, llm: LLM, w: Workload, result: dict) -> None:
    """The workload through a second configuration (these engine arguments changed) in this process, in the order
    first, second, second, first: each run of one beside one of the other (this VM's bandwidth moves within minutes)."""
    other = make_llm(ns, ns.against)
    warm_up(other, w)
    second = [_run(other, w), _rerun(other, w)]
    spec: dict = {}
    add_speculation(other.engine, spec)
    other.shutdown()
    first = [result["elapsed_s"], _rerun(llm, w)]
    result["output_tok_s_each"] = [w.num_output_tokens / t for t in first]
    result["against"] = {"overrides": ns.against, "output_tok_s_each": [w.num_output_tokens / t for t in second], **spec}
    result["speedups"] = [b / a for a, b in zip(first, second)]
    print(f"\n  {', '.join(f'{x:.1f}' for x in result['output_tok_s_each'])} output tok/s against "
          f"{', '.join(f'{x:.1f}' for x in result['against']['output_tok_s_each'])} with {ns.against} run beside them: "
          f"speed-up {', '.join(f'{x:.2f}x' for x in result['speedups'])}")


def add_speculation(engine, result: dict) -> None:
    """Speculative decoding's counters over the whole run (warm-up included), summed over replicas."""
    if engine.config.speculative is None:
        return
    stats = [s for _, s in engine.stats()]
    spec = SpecDecodeStats(sum(s.spec_decode_num_drafts for s in stats), sum(s.spec_decode_num_draft_tokens for s in stats),
                           sum(s.spec_decode_num_accepted_tokens for s in stats))
    result["speculative"] = {**dataclasses.asdict(spec), "acceptance_rate": spec.acceptance_rate,
                             "mean_accepted_length": spec.mean_accepted_length}


def print_speculation(result: dict) -> None:
    if "speculative" in result:
        spec = result["speculative"]
        print(f"  speculative decoding: {spec['num_drafts']} verifying steps, {spec['num_draft_tokens']} proposed "
              f"tokens, {100 * spec['acceptance_rate']:.0f} % accepted, {spec['mean_accepted_length']:.2f} tokens per "
              "verifying step")


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def bench_device(ns: argparse.Namespace):
    from pagedllm.platform import resolve_device

    return resolve_device(ns.device)


def _print_throughput(r: dict) -> None:
    lim, roof = r["limits"], r["roofline"]
    b = lim["decode_batch"]
    weights = f"{r['quantization']} weights, {r['dtype']} activations" if r.get("quantization") else r["dtype"]
    print(f"\n{r['model']} ({weights}): {r['num_prompts']} requests, {r['prompt_tokens']} prompt + "
          f"{r['output_tokens']} output tokens in {r['elapsed_s']:.1f} s")
    print(f"  output {r['output_tok_s']:.1f} tok/s | total {r['total_tok_s']:.1f} tok/s | {r['requests_per_s']:.2f} req/s")
    print(f"  machine: matmul {lim['matmul_flops_1_token'] / 1e9:.0f} / {lim[f'matmul_flops_{b}_tokens'] / 1e9:.0f} / "
          f"{lim['matmul_flops_1024_tokens'] / 1e9:.0f} GFLOP/s at 1 / {b} / 1024 tokens; "
          f"memory read {lim['read_bandwidth'] / 1e9:.1f} GB/s")
    print(f"  roofline {roof['max_output_tok_s']:.0f} output tok/s -> we reach {100 * roof['fraction']:.0f} % "
          f"({roof['achieved_flops'] / 1e9:.0f} GFLOP/s of model matmuls)")
    kv = r["roofline_with_kv_reads"]
    print(f"  with decode's KV reads ({kv['kv_read_seconds']:.1f} s at the read bandwidth): {kv['max_output_tok_s']:.0f} "
          f"output tok/s -> we reach {100 * kv['fraction']:.0f} %")
    if "hf" in r:
        hf = r["hf"]
        for key in ("static_batch_16", "generate_batch"):
            if f"{key}_output_tok_s" in hf:
                print(f"  HF {key}: {hf[f'{key}_output_tok_s']:.1f} tok/s -> pagedllm is {hf[f'speedup_vs_{key}']:.1f}x")


def _ttft_behind_long_prompt(args, long_prompt: list[int], short_prompt: list[int], delay: float) -> dict:
    """Start the long prompt, send the short one `delay` seconds later; time the short one's first token."""
    import asyncio

    from pagedllm.engine.async_engine import AsyncLLMEngine
    from pagedllm.engine.llm_engine import LLMEngine

    engine = AsyncLLMEngine(lambda: LLMEngine.from_engine_args(args))

    async def scenario() -> dict:
        await engine.call(lambda e: e.score(short_prompt))  # warm-up
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        start = time.perf_counter()
        long_stream = await engine.add_request({"prompt_token_ids": long_prompt}, params)
        await asyncio.sleep(delay)
        sent = time.perf_counter()
        short_stream = await engine.add_request({"prompt_token_ids": short_prompt}, params)
        ttft = None
        async for _out in short_stream:
            ttft = ttft or time.perf_counter() - sent
        async for _out in long_stream:
            pass
        return {"short_ttft_s": ttft, "long_request_s": time.perf_counter() - start}

    try:
        return asyncio.run(scenario())
    finally:
        engine.shutdown()


def cmd_interference(ns: argparse.Namespace) -> None:
    import torch

    gen = torch.Generator().manual_seed(ns.workload_seed)
    long_prompt = torch.randint(100, 49000, (ns.long_prompt_len,), generator=gen).tolist()
    short_prompt = torch.randint(100, 49000, (ns.short_prompt_len,), generator=gen).tolist()
    base = engine_args_from(ns)
    base.max_model_len = base.max_model_len or ns.long_prompt_len + 64
    result = {"benchmark": "interference", "long_prompt_tokens": ns.long_prompt_len,
              "short_prompt_tokens": ns.short_prompt_len, "delay_s": ns.delay}
    for chunked in (True, False):
        args = dataclasses.replace(base, enable_chunked_prefill=chunked, enable_prefix_caching=False,
                                   max_num_batched_tokens=base.max_num_batched_tokens if chunked else base.max_model_len)
        result["chunked" if chunked else "unchunked"] = _ttft_behind_long_prompt(args, long_prompt, short_prompt, ns.delay)
    for mode in ("chunked", "unchunked"):
        r = result[mode]
        print(f"chunked prefill {'on ' if mode == 'chunked' else 'off'}: short request's TTFT "
              f"{1000 * r['short_ttft_s']:.0f} ms, long request done in {r['long_request_s']:.2f} s")
    write_result(ns, result)
