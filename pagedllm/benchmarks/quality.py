"""`pagedllm bench quantization`: what each weight-only quantization costs in accuracy against bf16 weights of the
same model, on fixed English text (and a little code): top-1 agreement of the next-token predictions, logit
differences and perplexity, beside the weight bytes each format takes. Each text is scored twice: in one step (as
a prompt is computed: the matrix products multiply bf16 activations) and one position per step (as decode steps
compute it: on CPUs with int8 dot products the GEMVs quantize the activations to int8 too)."""

from __future__ import annotations

import argparse
import json

import torch

from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.model_loader.resolve import model_config_for

TEXTS = [
    "The capital of France is Paris. It is known for the Eiffel Tower, the Louvre museum and its cafés.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Photosynthesis is the process by which green plants use sunlight to synthesize foods from carbon dioxide and water.",
    "In 1969, Apollo 11 landed on the Moon. Neil Armstrong and Buzz Aldrin walked on its surface while Michael Collins orbited.",
    "A library is more than a room full of books. For many towns it is the one warm place where anyone may sit for "
    "an afternoon without buying anything, read the news, use a computer, or ask a question and get a patient answer. "
    "Librarians help children learn to read, help job seekers write their first letters, and keep records of local "
    "history that would otherwise be lost. When budgets are cut, these quiet services are often the first to go, "
    "although they cost little compared with what they return to the community.",
    "To make bread, mix flour, water, salt and a little yeast into a soft dough. Knead it for ten minutes until it is "
    "smooth, then leave it covered in a warm place until it has doubled in size. Shape the loaf, let it rise again, "
    "and bake it in a hot oven for about forty minutes, until the crust is brown and the bottom sounds hollow.",
]


MODES = ("prefill", "decode")


def _measure(model: str | None, quantization: str | None, max_model_len: int) -> dict:
    engine = LLMEngine.from_engine_args(EngineArgs(model=model, dtype="bfloat16", quantization=quantization,
                                                   max_model_len=max_model_len, kv_cache_memory=64 << 20))
    try:
        ids = [engine.tokenizer.encode(t) for t in TEXTS]
        out = {"weight_bytes": engine.executor.weight_bytes()[0]}
        for mode, step_tokens in (("prefill", None), ("decode", 1)):
            logits = [engine.score(x, step_tokens).float() for x in ids]
            nll = torch.cat([-torch.log_softmax(lg[:-1], -1).gather(-1, torch.tensor(x[1:])[:, None]).squeeze(-1)
                             for lg, x in zip(logits, ids)])
            out[mode] = {"logits": torch.cat(logits), "perplexity": nll.mean().exp().item()}
        return out
    finally:
        engine.shutdown()


def compare(model: str | None, methods: list[str], max_model_len: int = 512) -> dict:
    """Each method's top-1 agreement with bf16 weights, logit differences, perplexity and weight bytes."""
    ref = _measure(model, None, max_model_len)
    report = {"positions": ref["prefill"]["logits"].shape[0], "texts": len(TEXTS),
              "bf16": {"weight_bytes": ref["weight_bytes"], **{m: {"perplexity": ref[m]["perplexity"]} for m in MODES}}}
    for method in methods:
        r = _measure(model, method, max_model_len)
        report[method] = {"weight_bytes": r["weight_bytes"]}
        for mode in MODES:
            a, b = ref[mode]["logits"], r[mode]["logits"]
            diff = (a - b).abs()
            report[method][mode] = {"top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
                                    "max_logit_diff": diff.max().item(), "mean_logit_diff": diff.mean().item(),
                                    "perplexity": r[mode]["perplexity"]}
    return report


def cmd_quantization(ns: argparse.Namespace) -> None:
    own = model_config_for(ns.model).quant_method  # a quantized checkpoint's own format is measured too
    methods = ns.methods or ["int8", "int4", *([own] if own else [])]
    r = compare(ns.model, methods)
    bf16 = r["bf16"]
    print(f"against bf16 weights over {r['positions']} positions of {r['texts']} fixed texts (bf16: perplexity "
          f"{bf16['prefill']['perplexity']:.3f} in one step, {bf16['decode']['perplexity']:.3f} a position per step; "
          f"weights {bf16['weight_bytes'] / 1e6:.1f} MB)")
    for m in methods:
        print(f"  {m:>5}: weights {r[m]['weight_bytes'] / 1e6:.1f} MB ({r[m]['weight_bytes'] / bf16['weight_bytes']:.3f}x)")
        for mode in MODES:
            q, p = r[m][mode], bf16[mode]["perplexity"]
            print(f"    {mode:>7}: top-1 agreement {100 * q['top1_agreement']:.1f} %, perplexity {q['perplexity']:.3f} "
                  f"({100 * (q['perplexity'] / p - 1):+.1f} %), max |logit diff| {q['max_logit_diff']:.3f} "
                  f"(mean {q['mean_logit_diff']:.4f})")
    if ns.output_json:
        with open(ns.output_json, "w") as f:
            json.dump(r, f, indent=2)
