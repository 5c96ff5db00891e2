"""Command-line flags spelled as vLLM spells them, turned into EngineArgs and SamplingParams."""

from __future__ import annotations

import argparse
import json

from pagedllm.engine.arg_utils import NO_EFFECT_ARGS, EngineArgs, engine_kwargs
from pagedllm.kernels import ATTENTION_BACKENDS
from pagedllm.memory.units import parse_bytes
from pagedllm.quant_config import QUANTIZATION_METHODS
from pagedllm.sampling_params import SamplingParams


def _size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def layer_counts(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer counts such as 16,14, got {text!r}") from None


def add_engine_args(p: argparse.ArgumentParser, model_flag: bool = True) -> None:
    g = p.add_argument_group("engine")
    if model_flag:
        g.add_argument("--model", default=None,
                       help="HF checkpoint folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--tokenizer", default=None)
    g.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16, float16")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--num-scheduler-steps", type=int, default=1,
                   help="decode steps a batch runs back to back per schedule (multi-step scheduling): less engine "
                        "overhead per token, tokens streamed in bursts of this many")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--num-gpu-blocks-override", type=int, default=None)
    g.add_argument("--kv-cache-memory", type=_size, default=None, help="KV pool size on the CPU, e.g. 4GiB")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="shard every layer over this many processes (gloo on CPU, NCCL on CUDA)")
    g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                   help="split the layers into this many stages in their own processes, micro-batches in flight")
    g.add_argument("--pipeline-partition", type=layer_counts, default=None,
                   help="layers per pipeline stage, e.g. 16,14 (default: an even split)")
    g.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                   help="full model replicas in their own processes, requests spread over them")
    g.add_argument("--data-parallel-routing", choices=["least-loaded", "prefix-affinity"], default="least-loaded",
                   help="how requests are spread over data-parallel replicas")
    g.add_argument("--quantization", "-q", choices=[m for m in QUANTIZATION_METHODS if m], default=None,
                   help="weight-only: int8 (a scale per row), int4 (groups of 32, round-to-nearest); a checkpoint's "
                        "own, detected: gguf (unless --dtype is given: then dequantized), awq, gptq")
    g.add_argument("--generation-config", default="auto",
                   help="sampling defaults for what a request leaves unset: auto (the model's generation_config.json), "
                        "vllm (vLLM's own defaults) or a folder holding a generation_config.json")
    g.add_argument("--override-generation-config", type=json_object, default=None,
                   help="JSON object over those defaults, e.g. '{\"temperature\": 0.5}'")
    g.add_argument("--max-logprobs", type=int, default=20, help="the most logprobs / prompt_logprobs a request may ask for")
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    g.add_argument("--cuda-graph-sizes", type=int, nargs="+", default=None,
                   help="decode batch sizes captured as CUDA graphs (default: 1 2 4 8 16 ... --max-num-seqs)")
    g.add_argument("--attention-backend", choices=list(ATTENTION_BACKENDS), default=None,
                   help="auto: Triton on CUDA, the native kernel on the CPU; triton on the CPU needs TRITON_INTERPRET=1 "
                        "(testing); torch: plain torch ops (default: $PAGEDLLM_ATTENTION_BACKEND or auto)")
    g.add_argument("--speculative-config", type=json_object, default=None,
                   help="speculative decoding as JSON, e.g. '{\"method\": \"ngram\", \"num_speculative_tokens\": 3, "
                        "\"prompt_lookup_max\": 5, \"prompt_lookup_min\": 2, \"disable_by_batch_size\": 4}' "
                        "(disable_by_batch_size by default: 4)")
    compat = p.add_argument_group("vLLM flags accepted for compatibility (no effect here; a warning says why)")
    for name in NO_EFFECT_ARGS:
        flag = "--" + name.replace("_", "-")
        if name in ("trust_remote_code", "disable_log_stats", "disable_log_requests",
                    "disable_custom_all_reduce"):
            compat.add_argument(flag, action="store_true", help=NO_EFFECT_ARGS[name])
        else:
            compat.add_argument(flag, default=None, help=NO_EFFECT_ARGS[name])
    g.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                   help="dummy: random weights from the model's config alone (a checkpoint folder, or a built-in "
                        "name such as qwen3-0.6b), for benchmarks of model shapes with no weights at hand")


def add_serve_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="HF folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    s.add_argument("--served-model-name", default=None)
    s.add_argument("--log-level", default="info")
    s.add_argument("--metrics-namespace", choices=["vllm", "pagedllm"], default="vllm",
                   help="prefix of the /metrics series: vllm (vLLM's names, for its dashboards and autoscalers) or "
                        "pagedllm")
    s.add_argument("--chat-template", default=None, help="a chat template file (or the template itself) instead of the "
                                                          "model's")
    s.add_argument("--default-chat-template-kwargs", type=json_object, default=None,
                   help="JSON object of template variables for every chat request, e.g. '{\"enable_thinking\": false}'")
    s.add_argument("--reasoning-parser", choices=["qwen3", "deepseek_r1"], default=None,
                   help="split the thinking into message.reasoning_content")
    s.add_argument("--enable-auto-tool-choice", action="store_true", help='allow tool_choice "auto" (needs a parser)')
    s.add_argument("--tool-call-parser", choices=["hermes", "llama3_json"], default=None,
                   help="how the model writes tool calls: hermes (Qwen, Hermes), llama3_json (Llama 3.x)")
    add_engine_args(s)


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    """Every engine flag has its EngineArgs field's name; vLLM flags with no effect here warn when given."""
    given = {name: getattr(ns, name) for name in NO_EFFECT_ARGS if getattr(ns, name, None) not in (None, False)}
    return EngineArgs(**engine_kwargs(given), **{name: getattr(ns, name) for name in EngineArgs.names()
                                                 if hasattr(ns, name)})


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 128) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--min-tokens", type=int, default=0)
    g.add_argument("--sampling-seed", type=int, default=None, help="per-request seed (reproducible sampling)")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("-n", type=int, default=1, help="samples per prompt")


def sampling_params_from(ns: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        n=ns.n, temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k, min_p=ns.min_p,
        presence_penalty=ns.presence_penalty, frequency_penalty=ns.frequency_penalty,
        repetition_penalty=ns.repetition_penalty, max_tokens=ns.max_tokens, min_tokens=ns.min_tokens,
        seed=ns.sampling_seed, stop=ns.stop, ignore_eos=ns.ignore_eos,
    )
