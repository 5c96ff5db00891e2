"""`pagedllm bench {throughput,latency,serve}`."""

from __future__ import annotations

from pagedllm.benchmarks.datasets import add_dataset_args
from pagedllm.benchmarks.latency import cmd_latency
from pagedllm.benchmarks.offline import cmd_interference, cmd_throughput
from pagedllm.benchmarks.quality import cmd_quantization
from pagedllm.benchmarks.serving import add_serve_bench_args, cmd_serve_bench
from pagedllm.benchmarks.workloads import add_workload_args
from pagedllm.entrypoints.cli_args import add_engine_args, json_object
from pagedllm.quant_config import QUANTIZATION_METHODS


def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks: throughput, latency, serve").add_subparsers(dest="bench", required=True)

    t = bench.add_parser("throughput", help="offline throughput on a workload (default W1)")
    add_engine_args(t)
    add_workload_args(t)
    t.add_argument("--compare", choices=["hf"], default=None, help="run the workload through HF transformers too")
    t.add_argument("--skip-hf-continuous", action="store_true", help="with --compare hf: skip HF's generate_batch")
    t.add_argument("--against", type=json_object, default=None, metavar="JSON",
                   help="a second configuration (these engine arguments changed), run beside the first in this "
                        "process: first, second, second, first")
    t.add_argument("--output-json", default=None)
    t.set_defaults(func=cmd_throughput)

    lat = bench.add_parser("latency", help="one request: time to first token and per output token")
    add_engine_args(lat)
    add_workload_args(lat, num_prompts=1)
    lat.set_defaults(input_len=[128, 128])
    lat.add_argument("--num-iters", type=int, default=3)
    lat.add_argument("--chat", default=None, metavar="TEXT",
                     help="a user message instead of random tokens, answered until the model ends it (at most the "
                          "output length): for speculative decoding on text it can quote")
    lat.add_argument("--against", type=json_object, default=None, metavar="JSON",
                     help="a second configuration, the same engine arguments but these, e.g. '{\"dtype\": \"bfloat16\"}' or "
                          "'{\"speculative_config\": null}': run in alternation with the first in this process")
    lat.add_argument("--compare", choices=["hf"], default=None)
    lat.add_argument("--output-json", default=None)
    lat.set_defaults(func=cmd_latency)

    s = bench.add_parser("serve", help="load a running OpenAI-compatible server (vLLM's bench serve flags)")
    add_serve_bench_args(s)
    add_dataset_args(s)
    s.set_defaults(func=cmd_serve_bench)

    i = bench.add_parser("interference", help="TTFT of a short request sent while a long prompt is prefilled, "
                                               "chunked prefill on vs off")
    add_engine_args(i)
    i.add_argument("--long-prompt-len", type=int, default=4000)
    i.add_argument("--short-prompt-len", type=int, default=16)
    i.add_argument("--delay", type=float, default=0.2, help="seconds between the long and the short request")
    i.add_argument("--workload-seed", type=int, default=0)
    i.add_argument("--output-json", default=None)
    i.set_defaults(func=cmd_interference)

    q = bench.add_parser("quantization", aliases=["int8"], help="weight-only quantization vs bf16 weights: top-1 "
                         "agreement, logit differences, perplexity and bytes on fixed text")
    q.add_argument("--model", default=None)
    q.add_argument("--methods", nargs="+", choices=[m for m in QUANTIZATION_METHODS if m], default=None,
                   help="default: int8, int4 and a quantized checkpoint's own method")
    q.add_argument("--output-json", default=None)
    q.set_defaults(func=cmd_quantization)
