"""`pagedllm bench serve`: load a running OpenAI-compatible server and measure what its users feel.

Requests stream through /v1/completions at a fixed concurrency or a Poisson arrival rate; for each
we record time to first token, inter-token latencies and the end-to-end time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import httpx
from tqdm import tqdm

from pagedllm.benchmarks.workloads import make_workload


@dataclass
class RequestResult:
    ok: bool = False
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str = ""


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
                if not chunk.get("choices") or not chunk["choices"][0].get("text"):
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


def _stats(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, int(q * len(v)))]  # noqa: E731
    return {"mean": sum(v) / len(v), "p50": pick(0.5), "p99": pick(0.99)}


async def _run(ns: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {ns.api_key}"} if ns.api_key else {}
    async with httpx.AsyncClient(base_url=ns.base_url, timeout=None) as client:
        models = (await client.get("/v1/models", headers=headers)).json()["data"]
        model = models[0]["id"]
        vocab = ns.vocab_size
        w = make_workload(ns, vocab)
        bodies = [{"model": model, "prompt": p, "max_tokens": n, "ignore_eos": True, "temperature": 0, "stream": True,
                   "stream_options": {"include_usage": True}} for p, n in zip(w.prompts, w.output_lens)]
        sem = asyncio.Semaphore(ns.max_concurrency or len(bodies))
        bar = tqdm(total=len(bodies), desc="requests")
        rng = random.Random(ns.workload_seed)

        async def limited(body):
            async with sem:
                res = await _one(client, "/v1/completions", body, headers)
                bar.update(1)
                return res

        start = time.perf_counter()
        tasks = []
        for body in bodies:
            tasks.append(asyncio.create_task(limited(body)))
            if ns.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(ns.request_rate))
        results = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
        bar.close()
    good = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in good)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in good if r.output_tokens > 1]
    return {
        "benchmark": "serve", "base_url": ns.base_url, "model": model, "num_prompts": len(bodies),
        "completed": len(good), "failed": len(results) - len(good),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "max_concurrency": ns.max_concurrency, "request_rate": ns.request_rate, "elapsed_s": elapsed,
        "request_throughput": len(good) / elapsed, "output_tok_s": out_tokens / elapsed,
        "total_tok_s": (out_tokens + sum(len(p) for p in w.prompts)) / elapsed,
        "ttft_s": _stats([r.ttft for r in good]), "tpot_s": _stats(tpots),
        "itl_s": _stats([x for r in good for x in r.itl]), "e2e_s": _stats([r.latency for r in good]),
    }


def cmd_serve_bench(ns: argparse.Namespace) -> None:
    result = asyncio.run(_run(ns))
    ms = lambda d: " / ".join("-" if d[k] is None else f"{1000 * d[k]:.1f}" for k in ("mean", "p50", "p99"))  # noqa: E731
    print(f"\n{result['completed']}/{result['num_prompts']} requests in {result['elapsed_s']:.1f} s "
          f"(concurrency {result['max_concurrency'] or 'unbounded'}, rate {result['request_rate']}/s)")
    print(f"  {result['request_throughput']:.2f} req/s | output {result['output_tok_s']:.1f} tok/s | "
          f"total {result['total_tok_s']:.1f} tok/s")
    print(f"  TTFT ms (mean / p50 / p99): {ms(result['ttft_s'])}")
    print(f"  TPOT ms: {ms(result['tpot_s'])} | ITL ms: {ms(result['itl_s'])} | E2E ms: {ms(result['e2e_s'])}")
    if result["errors"]:
        print("  errors: " + "; ".join(result["errors"]))
    if ns.output_json:
        with open(ns.output_json, "w") as f:
            json.dump(result, f, indent=2)
