"""Build benchmarks/RESULTS.md (tables) and benchmarks/*.png (plots) from benchmarks/results/*.json.

    .venv/bin/python benchmarks/report.py

Each JSON file is the --output-json of one `pagedllm bench ...` run and records the command that made it.
"""

from __future__ import annotations

import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
HAND_MEASURED = "<!-- measured by hand: report.py keeps everything from here on -->"


def _load() -> dict[str, dict]:
    return {os.path.basename(p)[:-5]: json.load(open(p)) for p in sorted(glob.glob(os.path.join(HERE, "results", "*.json")))}


def _table(title: str, columns: list[str], rows: list[str]) -> list[str]:
    """A markdown section: its table's separator follows from the columns; no rows, no section."""
    if not rows:
        return []
    return [f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns), *rows, ""]


def _runs(results: dict[str, dict], kind: str) -> dict[str, dict]:
    return {k: v for k, v in results.items() if v.get("benchmark") == kind}


def _throughput_row(name: str, r: dict) -> str:
    hf, kv, nan = r.get("hf", {}), r.get("roofline_with_kv_reads", {}), float("nan")
    return (f"| {name} | {r['num_prompts']} | {r['prompt_tokens']} / {r['output_tokens']} | {r['output_tok_s']:.1f} | "
            f"{r['total_tok_s']:.1f} | {r['roofline']['max_output_tok_s']:.0f} | {100 * r['roofline']['fraction']:.0f} % | "
            f"{kv.get('max_output_tok_s', nan):.0f} | {100 * kv.get('fraction', nan):.0f} % | "
            f"{hf.get('static_batch_16_output_tok_s', nan):.1f} | {hf.get('generate_batch_output_tok_s', nan):.1f} | "
            f"`{r.get('command')}` |")


def _latency_row(name: str, r: dict) -> str:
    return (f"| {name} | {1000 * r['ttft_s']:.1f} | {1000 * r['tpot_s']:.2f} | {r['decode_tok_s']:.1f} | "
            f"{r['bandwidth_limit_tok_s']:.1f} | {100 * r['bandwidth_fraction']:.0f} % | "
            f"{r.get('hf', {}).get('decode_tok_s', float('nan')):.1f} | `{r.get('command')}` |")


def _serve_row(name: str, r: dict) -> str:
    ms = lambda metric, *stats: " / ".join(f"{r[f'{s}_{metric}_ms']:.1f}" for s in stats)  # noqa: E731
    return (f"| {name} | {r['max_concurrency']} | {r['request_throughput']:.2f} | {r['output_throughput']:.1f} | "
            f"{ms('ttft', 'mean', 'median', 'p99')} | {ms('tpot', 'mean', 'median', 'p99')} | "
            f"{ms('itl', 'median', 'p99')} |")


def _tables(results: dict[str, dict]) -> list[str]:
    serve = sorted(_runs(results, "serve").items(), key=lambda kv: kv[1].get("max_concurrency") or 0)
    return (
        _table("Offline throughput",
               ["run", "requests", "prompt / output tokens", "output tok/s", "total tok/s", "roofline tok/s",
                "of roofline", "roofline with KV reads", "of it", "HF static (16) tok/s", "HF generate_batch tok/s",
                "command"],
               [_throughput_row(n, r) for n, r in _runs(results, "throughput").items()])
        + _table("Single request",
                 ["run", "TTFT ms", "TPOT ms", "decode tok/s", "bandwidth limit tok/s", "of limit", "HF decode tok/s",
                  "command"],
                 [_latency_row(n, r) for n, r in _runs(results, "latency").items()])
        + _table("Serving (OpenAI API, streaming)",
                 ["run", "concurrency", "req/s", "output tok/s", "TTFT ms mean/median/p99", "TPOT ms mean/median/p99",
                  "ITL ms p50/p99"],
                 [_serve_row(n, r) for n, r in serve]))


def _plots(results: dict[str, dict]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["(plots need matplotlib: `.venv/bin/pip install matplotlib`)", ""]
    out = []
    srv = sorted((v for v in results.values() if v.get("benchmark") == "serve" and v.get("max_concurrency")),
                 key=lambda r: r["max_concurrency"])
    if srv:
        conc = [r["max_concurrency"] for r in srv]
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        a.plot(conc, [r["output_throughput"] for r in srv], marker="o")
        a.set(xlabel="concurrent requests", ylabel="output tok/s", title="Throughput vs concurrency", xscale="log")
        b.plot(conc, [r["median_ttft_ms"] for r in srv], marker="o", label="TTFT median")
        b.plot(conc, [r["median_tpot_ms"] for r in srv], marker="o", label="TPOT median")
        b.set(xlabel="concurrent requests", ylabel="ms", title="Latency vs load", xscale="log", yscale="log")
        b.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(HERE, "serving.png"))
        out += ["![serving](serving.png)", ""]
    thr = [v for v in results.values() if v.get("benchmark") == "throughput" and "hf" in v]
    if thr:
        r = thr[0]
        names = ["pagedllm", "HF static (16)", "HF generate_batch", "roofline"]
        vals = [r["output_tok_s"], r["hf"].get("static_batch_16_output_tok_s", 0),
                r["hf"].get("generate_batch_output_tok_s", 0), r["roofline"]["max_output_tok_s"]]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.bar(names, vals, color=["C0", "C1", "C1", "C7"])
        ax.set(ylabel="output tok/s", title="W1 offline throughput")
        fig.tight_layout()
        fig.savefig(os.path.join(HERE, "throughput.png"))
        out += ["![throughput](throughput.png)", ""]
    return out


def main() -> None:
    results = _load()
    header = ["# pagedllm benchmark results", "",
              "Generated by `benchmarks/report.py` from `benchmarks/results/*.json`; each row names the command that "
              "produced it. Machine: 2 cores of an AMD EPYC (AVX-512 with BF16 dot products; no AMX), torch 2.13 CPU "
              "build; the embedded SmolLM2-135M-Instruct in bf16 unless a run's name says otherwise (qwen3_0.6b_dummy: "
              "Qwen3-0.6B shapes with random weights, `--load-format dummy`).", ""]
    path = os.path.join(HERE, "RESULTS.md")
    # the sections measured by hand (alternating runs in one sitting) follow the marker; regenerating keeps them
    kept = ""
    if os.path.exists(path):
        text = open(path).read()
        kept = text[text.index(HAND_MEASURED):] if HAND_MEASURED in text else ""
    with open(path, "w") as f:
        f.write("\n".join(header + _tables(results) + _plots(results)) + ("\n" + kept if kept else ""))


if __name__ == "__main__":
    main()
