"""The benchmark commands run end to end on a tiny model and write the results the report reads (speed is
never asserted: the benchmarks measure it)."""

import json
import subprocess
import sys

CLI = [sys.executable, "-m", "pagedllm.entrypoints.cli"]
SMALL = ["--num-prompts", "4", "--input-len", "8", "24", "--output-len", "3", "6", "--max-model-len", "64"]


def _bench(args: list[str], tmp_path) -> dict:
    out = tmp_path / "result.json"
    r = subprocess.run(CLI + ["bench", *args, "--output-json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(out.read_text())


def test_bench_throughput_with_hf_and_roofline(tiny_models, tmp_path):
    r = _bench(["throughput", "--model", tiny_models["qwen3"], *SMALL, "--compare", "hf", "--skip-hf-continuous"],
               tmp_path)
    assert r["num_prompts"] == 4 and 12 <= r["output_tokens"] <= 24 and r["output_tok_s"] > 0
    assert r["limits"]["read_bandwidth"] > 0 and r["limits"]["matmul_flops_1024_tokens"] > 0
    assert 0 < r["roofline"]["fraction"] and 0 < r["roofline_with_kv_reads"]["fraction"]
    assert r["roofline_with_kv_reads"]["max_output_tok_s"] < r["roofline"]["max_output_tok_s"]
    assert r["hf"]["static_batch_16_output_tok_s"] > 0 and r["hf"]["speedup_vs_static_batch_16"] > 0


def test_bench_latency(tiny_models, tmp_path):
    r = _bench(["latency", "--model", tiny_models["llama"], *SMALL, "--num-iters", "2"], tmp_path)
    assert r["tpot_s"] > 0 and r["ttft_s"] > 0 and r["bandwidth_limit_tok_s"] > 0
    # the fraction pairs each decode with the bandwidth measured right after it, so it need not be the ratio of medians
    assert 0 < r["bandwidth_fraction"] and r["read_bandwidth"] > 0


def test_bench_rejects_bad_workload(tiny_models):
    r = subprocess.run(CLI + ["bench", "throughput", "--model", tiny_models["qwen3"], "--input-len", "9", "3"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--input-len" in r.stderr and "Traceback" not in r.stderr
