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


def test_bench_throughput_against_a_second_configuration(tiny_models, tmp_path):
    r = _bench(["throughput", "--model", tiny_models["qwen3"], *SMALL, "--against", '{"dtype": "float32"}'], tmp_path)
    assert len(r["output_tok_s_each"]) == 2 and len(r["against"]["output_tok_s_each"]) == 2
    assert r["against"]["overrides"] == {"dtype": "float32"} and all(x > 0 for x in r["speedups"])


def test_bench_latency_against_a_second_configuration_in_alternation(tiny_models, tmp_path):
    spec = '{"method": "ngram", "num_speculative_tokens": 2}'
    r = _bench(["latency", "--model", tiny_models["llama"], *SMALL, "--num-iters", "2", "--speculative-config", spec,
                "--against", '{"speculative_config": null, "dtype": "float32"}'], tmp_path)
    assert r["speculative"]["num_drafts"] >= 0 and "speculative" not in r["against"]
    assert r["against"]["dtype"] == "float32" and r["against"]["overrides"]["speculative_config"] is None
    assert len(r["speedups"]) == 2 and all(x > 0 for x in r["speedups"]) and len(r["decode_tok_s_each"]) == 2


def test_bench_rejects_bad_workload(tiny_models):
    r = subprocess.run(CLI + ["bench", "throughput", "--model", tiny_models["qwen3"], "--input-len", "9", "3"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--input-len" in r.stderr and "Traceback" not in r.stderr


def test_bench_serve_takes_vllm_flags_and_reports_vllms_fields(tiny_models, tmp_path):
    from tests.helpers import running_server

    sharegpt = tmp_path / "sharegpt.json"
    sharegpt.write_text(json.dumps([{"conversations": [{"from": "human", "value": "Tell me about Paris."},
                                                       {"from": "gpt", "value": "Paris is a city in France."}]}] * 3))
    custom = tmp_path / "custom.jsonl"
    custom.write_text("\n".join(json.dumps({"prompt": f"Question {i}?", "output_tokens": 3}) for i in range(3)))
    with running_server(tiny_models["qwen3"], "--dtype", "float32", "--max-model-len", "128") as (base, _):
        for endpoint, dataset in (("/v1/completions", ["--dataset-name", "random", "--random-input-len", "16",
                                                       "--random-output-len", "4", "--random-range-ratio", "0.5"]),
                                  ("/v1/chat/completions", ["--dataset-name", "sharegpt", "--dataset-path",
                                                            str(sharegpt), "--sharegpt-output-len", "4"]),
                                  ("/v1/completions", ["--dataset-name", "custom", "--dataset-path", str(custom)])):
            r = subprocess.run(CLI + ["bench", "serve", "--base-url", base, "--endpoint", endpoint, *dataset,
                                      "--num-prompts", "3", "--max-concurrency", "2", "--request-rate", "50",
                                      "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
                                      "--save-result", "--result-dir", str(tmp_path), "--result-filename", "s.json"],
                               capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr[-2000:]
            res = json.loads((tmp_path / "s.json").read_text())
            assert res["completed"] == 3 and res["failed"] == 0 and res["total_output_tokens"] > 0
            for key in ("request_throughput", "output_throughput", "total_token_throughput", "mean_ttft_ms",
                        "median_tpot_ms", "p99_itl_ms", "p50_e2el_ms", "std_ttft_ms"):
                assert res[key] >= 0, key
