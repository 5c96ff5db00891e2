"""`pagedllm bench int8`: what int8 weight-only quantization costs in accuracy, against bf16 on the same text."""

from __future__ import annotations

import argparse
import json

import torch

from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.engine.llm_engine import LLMEngine

TEXTS = [
    "The capital of France is Paris. It is known for the Eiffel Tower, the Louvre museum and its cafés.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Photosynthesis is the process by which green plants use sunlight to synthesize foods from carbon dioxide and water.",
    "In 1969, Apollo 11 landed on the Moon. Neil Armstrong and Buzz Aldrin walked on its surface while Michael Collins orbited.",
]


def compare_int8(model: str | None, max_model_len: int = 512) -> dict:
    logits = {}
    for quant in (None, "int8"):
        engine = LLMEngine.from_engine_args(EngineArgs(model=model, dtype="bfloat16", quantization=quant,
                                                       max_model_len=max_model_len, kv_cache_memory=64 << 20))
        ids = [engine.tokenizer.encode(t) for t in TEXTS]
        logits[quant] = [engine.score(x) for x in ids]
        weights = engine.executor.weight_bytes()[0]
        logits[f"{quant}_bytes"] = weights
        engine.shutdown()
    ref, q = torch.cat(logits[None]), torch.cat(logits["int8"])
    return {
        "positions": ref.shape[0],
        "top1_agreement": (ref.argmax(-1) == q.argmax(-1)).float().mean().item(),
        "max_logit_diff": (ref - q).abs().max().item(),
        "mean_logit_diff": (ref - q).abs().mean().item(),
        "bf16_weight_bytes": logits["None_bytes"],
        "int8_weight_bytes": logits["int8_bytes"],
    }


def cmd_int8(ns: argparse.Namespace) -> None:
    r = compare_int8(ns.model)
    print(f"int8 vs bf16 over {r['positions']} positions of real text: top-1 agreement {100 * r['top1_agreement']:.1f} %, "
          f"max |logit diff| {r['max_logit_diff']:.3f} (mean {r['mean_logit_diff']:.4f}); weights "
          f"{r['int8_weight_bytes'] / 1e6:.1f} MB vs {r['bf16_weight_bytes'] / 1e6:.1f} MB "
          f"({r['int8_weight_bytes'] / r['bf16_weight_bytes']:.3f}x)")
    if ns.output_json:
        with open(ns.output_json, "w") as f:
            json.dump(r, f, indent=2)
