"""`pagedllm bench serve`: load a running OpenAI-compatible server (pagedllm, vLLM or any other) and measure what
its users feel, with `vllm bench serve`'s flags and report fields.

Requests stream through /v1/completions or /v1/chat/completions at a maximum concurrency and / or a Poisson
arrival rate; for each we record time to first token, inter-token latencies and the end-to-end latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime

import httpx
from tqdm import tqdm

from pagedllm.benchmarks.datasets import SampleRequest, sample_requests

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


@dataclass
class RequestResult:
    ok: bool = False
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str = ""


def _text(chunk: dict) -> str:
    """The text a stream chunk adds, for completions (text) and chat (delta.content, or reasoning)."""
    choice = (chunk.get("choices") or [{}])[0]
    delta = choice.get("delta") or {}
    return choice.get("text") or delta.get("content") or delta.get("reasoning_content") or ""


async def _one(client: httpx.AsyncClient, url: str, body: dict, headers: dict) -> RequestResult:
    r, start = RequestResult(), time.perf_counter()
    last = start
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                r.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:200]}"
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    r.output_tokens = chunk["usage"]["completion_tokens"]
                if not _text(chunk):
                    continue
                now = time.perf_counter()
                if r.ttft == 0.0:
                    r.ttft = now - start
                else:
                    r.itl.append(now - last)
                last = now
        r.latency, r.ok = time.perf_counter() - start, True
    except httpx.HTTPError as exc:
        r.error = repr(exc)
    return r


def _body(endpoint: str, model: str, req: SampleRequest) -> dict:
    body = {"model": model, "max_tokens": req.output_len, "ignore_eos": True, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if endpoint.endswith("chat/completions"):
        return {**body, "messages": [{"role": "user", "content": req.prompt}]}
    return {**body, "prompt": req.prompt}


def _metrics(name: str, values: list[float], percentiles: list[float]) -> dict:
    """vLLM's fields for one metric, in ms: mean_, median_, std_ and p<q>_<name>_ms."""
    v = sorted(values) or [0.0]
    out = {f"mean_{name}_ms": 1000 * statistics.fmean(v), f"median_{name}_ms": 1000 * statistics.median(v),
           f"std_{name}_ms": 1000 * statistics.pstdev(v)}
    for q in percentiles:
        out[f"p{q:g}_{name}_ms"] = 1000 * v[min(len(v) - 1, int(q / 100 * len(v)))]
    return out


async def _run(ns: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {ns.api_key}"} if ns.api_key else {}
    requests = sample_requests(ns)
    async with httpx.AsyncClient(base_url=ns.base_url, timeout=None) as client:
        model = ns.model or (await client.get("/v1/models", headers=headers)).json()["data"][0]["id"]
        sem = asyncio.Semaphore(ns.max_concurrency or len(requests))
        bar = tqdm(total=len(requests), desc="requests", disable=ns.disable_tqdm)
        rng = random.Random(ns.seed)

        async def limited(req: SampleRequest) -> RequestResult:
            async with sem:
                res = await _one(client, ns.endpoint, _body(ns.endpoint, model, req), headers)
                bar.update(1)
                return res

        start = time.perf_counter()
        tasks = []
        for req in requests:
            tasks.append(asyncio.create_task(limited(req)))
            if ns.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(ns.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        bar.close()
    good = [(q, r) for q, r in zip(requests, results) if r.ok]
    inputs, outputs = sum(q.prompt_len for q, _ in good), sum(r.output_tokens for _, r in good)
    values = {"ttft": [r.ttft for _, r in good], "itl": [x for _, r in good for x in r.itl],
              "tpot": [(r.latency - r.ttft) / (r.output_tokens - 1) for _, r in good if r.output_tokens > 1],
              "e2el": [r.latency for _, r in good]}
    percentiles = [float(q) for q in ns.metric_percentiles.split(",")]
    result = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"), "endpoint": ns.endpoint, "base_url": ns.base_url,
        "model_id": model, "dataset_name": ns.dataset_name, "num_prompts": len(requests),
        "request_rate": ns.request_rate, "max_concurrency": ns.max_concurrency, "duration": duration,
        "completed": len(good), "failed": len(results) - len(good),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "total_input_tokens": inputs, "total_output_tokens": outputs,
        "request_throughput": len(good) / duration, "output_throughput": outputs / duration,
        "total_token_throughput": (inputs + outputs) / duration,
    }
    for name in ns.percentile_metrics.split(","):
        if name not in values:
            raise ValueError(f"--percentile-metrics takes ttft, tpot, itl, e2el; got {name!r}")
        result.update(_metrics(name, values[name], percentiles))
    return result


def add_serve_bench_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--base-url", default="http://127.0.0.1:8000")
    s.add_argument("--endpoint", choices=ENDPOINTS, default="/v1/completions")
    s.add_argument("--model", default=None, help="the served model name (default: the server's first)")
    s.add_argument("--api-key", default=None)
    s.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (default: all)")
    s.add_argument("--request-rate", type=float, default=float("inf"),
                   help="Poisson arrivals per second (default: inf, all at once)")
    s.add_argument("--percentile-metrics", default="ttft,tpot,itl", help="of ttft, tpot, itl, e2el")
    s.add_argument("--metric-percentiles", default="99", help="e.g. 50,90,99")
    s.add_argument("--save-result", action="store_true", help="write the result JSON")
    s.add_argument("--result-dir", default=".")
    s.add_argument("--result-filename", default=None)
    s.add_argument("--disable-tqdm", action="store_true")


def cmd_serve_bench(ns: argparse.Namespace) -> None:
    r = asyncio.run(_run(ns))
    print(f"\n============ Serving Benchmark Result ============\n"
          f"Successful requests: {r['completed']} of {r['num_prompts']}\n"
          f"Benchmark duration (s): {r['duration']:.2f}\n"
          f"Total input tokens: {r['total_input_tokens']} | total generated tokens: {r['total_output_tokens']}\n"
          f"Request throughput (req/s): {r['request_throughput']:.2f}\n"
          f"Output token throughput (tok/s): {r['output_throughput']:.2f}\n"
          f"Total token throughput (tok/s): {r['total_token_throughput']:.2f}")
    for key, value in r.items():
        if key.endswith("_ms"):
            print(f"{key}: {value:.2f}")
    if r["errors"]:
        print("errors: " + "; ".join(r["errors"]))
    if ns.save_result:
        name = ns.result_filename or f"openai-{ns.request_rate}qps-{os.path.basename(str(r['model_id']))}-{r['date']}.json"
        os.makedirs(ns.result_dir, exist_ok=True)
        with open(os.path.join(ns.result_dir, name), "w") as f:
            json.dump({"benchmark": "serve", **r}, f, indent=2)
