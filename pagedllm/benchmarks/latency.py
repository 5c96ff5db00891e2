"""`pagedllm bench latency`: one request's time to first token and per output token, against the memory-bandwidth
limit for the weights; with --against, a second configuration of the engine in the same process, the two run in
alternation (this VM's bandwidth moves by up to 2x within minutes: separate runs do not compare)."""

from __future__ import annotations

import argparse
import time

from pagedllm.benchmarks import hf_baseline, roofline
from pagedllm.benchmarks.offline import (
    add_speculation,
    bench_device,
    make_llm,
    median,
    print_speculation,
    torch_dtype,
    warm_up,
    write_result,
)
from pagedllm.benchmarks.workloads import make_workload
from pagedllm.config import dtype_name
from pagedllm.entrypoints.llm import LLM
from pagedllm.sampling_params import SamplingParams


def _one_request(llm: LLM, prompt: list[int], n: int, chat: bool) -> tuple[float, float, int, float]:
    """(time to first token, time per output token, output tokens, the read bandwidth measured right after)."""
    engine = llm.engine
    llm.reset_prefix_cache()  # each iteration prefills the whole prompt
    rid = engine.add_request({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=n, ignore_eos=not chat))
    start, first, done, count = time.perf_counter(), None, None, 0
    while done is None:
        for out in engine.step():
            if out.request_id == rid:
                first = first or time.perf_counter()
                done = time.perf_counter() if out.finished else None
                count = len(out.outputs[0].token_ids)
    return first - start, (done - first) / max(1, count - 1), count, roofline.read_bandwidth(engine.config.device)


def _result(llm: LLM, prompt: list[int], runs: list[tuple[float, float, int, float]]) -> dict:
    engine = llm.engine
    ttfts, tpots, generated, bandwidths = zip(*runs)
    weight_bytes = engine.executor.weight_bytes()[0]
    tpot, bandwidth = median(tpots), median(bandwidths)
    result = {
        "benchmark": "latency", "model": engine.config.model.name, "dtype": dtype_name(engine.config.dtype),
        "quantization": engine.config.load.quantization, "prompt_tokens": len(prompt),
        "output_tokens": median(generated), "iterations": len(runs), "ttft_s": median(ttfts), "tpot_s": tpot,
        "decode_tok_s": 1 / tpot, "decode_tok_s_each": [1 / t for t in tpots], "weight_bytes": weight_bytes,
        "read_bandwidth": bandwidth, "read_bandwidth_each": list(bandwidths), "bandwidth_limit_tok_s": bandwidth / weight_bytes,
        # each decode against the bandwidth measured beside it
        "bandwidth_fraction": median([weight_bytes / t / b for t, b in zip(tpots, bandwidths)]),
    }
    add_speculation(engine, result)
    return result


def _print(r: dict, what: str) -> None:
    print(f"\n{what}: {r['model']} ({r['quantization'] or r['dtype']}), one request of {r['prompt_tokens']} prompt "
          f"tokens, {r['output_tokens']} output tokens (median of {r['iterations']}):")
    print(f"  time to first token {1000 * r['ttft_s']:.1f} ms | time per output token {1000 * r['tpot_s']:.2f} ms "
          f"({r['decode_tok_s']:.1f} tok/s; each run: {', '.join(f'{x:.1f}' for x in r['decode_tok_s_each'])})")
    print(f"  weights {r['weight_bytes'] / 1e6:.0f} MB per token at {r['read_bandwidth'] / 1e9:.1f} GB/s (median, measured "
          f"after each decode) -> limit {r['bandwidth_limit_tok_s']:.1f} tok/s; we reach {100 * r['bandwidth_fraction']:.0f} %")
    print_speculation(r)


def cmd_latency(ns: argparse.Namespace) -> None:
    llm = make_llm(ns)
    engine = llm.engine
    w = make_workload(ns, engine.config.model.vocab_size)
    prompt, n = w.prompts[0], w.output_lens[0]
    if ns.chat:  # a real conversation, answered until the model ends it (at most n tokens)
        prompt = engine.processor.chat_prompt([{"role": "user", "content": ns.chat}])["prompt_token_ids"]
    if n < 2:
        raise ValueError("--output-len must be at least 2 to measure time per output token")
    engines = [(llm, [])]
    if ns.against is not None:
        engines.append((make_llm(ns, ns.against), []))
    for other, _ in engines:
        warm_up(other, w)
    for i in range(ns.num_iters):  # in alternation, each engine first every other time
        for other, runs in (engines if i % 2 == 0 else engines[::-1]):
            runs.append(_one_request(other, prompt, n, bool(ns.chat)))
    result = _result(llm, prompt, engines[0][1])
    _print(result, "pagedllm")
    if ns.against is not None:
        result["against"] = {"overrides": ns.against, **_result(engines[1][0], prompt, engines[1][1])}
        result["speedups"] = [b[1] / a[1] for a, b in zip(engines[0][1], engines[1][1])]  # per pair, time ratio
        _print(result["against"], f"against {ns.against}")
        print(f"\n  speed-up of the first configuration, pair by pair: {', '.join(f'{x:.2f}x' for x in result['speedups'])} "
              f"(median {median(result['speedups']):.2f}x)")
    if ns.compare == "hf":
        folder = engine.config.load.model_path
        del llm, engine, engines
        model = hf_baseline.load_hf(folder, torch_dtype(result["dtype"]), bench_device(ns), ns.load_format)
        hf = hf_baseline.single_request_tpot(model, prompt, n)
        hf["decode_tok_s"] = 1 / hf["tpot_s"]
        result["hf"] = hf
        print(f"  HF generate batch 1: TTFT {1000 * hf['ttft_s']:.1f} ms, {hf['decode_tok_s']:.1f} tok/s -> pagedllm "
              f"decodes {result['decode_tok_s'] / hf['decode_tok_s']:.1f}x faster")
    write_result(ns, result)
