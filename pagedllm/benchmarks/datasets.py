"""The request sets of `bench serve`, as vLLM's `vllm bench serve` builds them: random prompts of set token counts,
conversations from a ShareGPT-format JSON file, or a custom JSON / JSONL file of prompts. Prompts are text, so any
OpenAI-compatible server can be loaded with them, through completions or chat."""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass


@dataclass
class SampleRequest:
    prompt: str
    prompt_len: int  # tokens, as this benchmark's tokenizer counts them
    output_len: int


def add_dataset_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dataset (vLLM's bench serve flags)")
    g.add_argument("--dataset-name", choices=["random", "sharegpt", "custom"], default="random")
    g.add_argument("--dataset-path", default=None, help="ShareGPT JSON, or custom JSON / JSONL ({'prompt': ...} rows)")
    g.add_argument("--num-prompts", type=int, default=1000)
    g.add_argument("--random-input-len", type=int, default=1024)
    g.add_argument("--random-output-len", type=int, default=128)
    g.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len x (1 - r), len x (1 + r)]")
    g.add_argument("--random-prefix-len", type=int, default=0, help="a shared random prefix of this many tokens")
    g.add_argument("--sharegpt-output-len", type=int, default=None, help="output length (default: the reply's)")
    g.add_argument("--custom-output-len", type=int, default=256)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--tokenizer", default=None, help="to make and count prompts (default: the embedded model's)")


def _tokenizer(name: str | None):
    from transformers import AutoTokenizer

    from pagedllm.model_loader.resolve import resolve_model

    return AutoTokenizer.from_pretrained(name or resolve_model(None))


def _lens(rng: random.Random, length: int, ratio: float, n: int) -> list[int]:
    lo, hi = max(1, int(length * (1 - ratio))), max(1, int(length * (1 + ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


def _random(ns, tok, rng: random.Random) -> list[SampleRequest]:
    vocab = [i for i in range(tok.vocab_size) if i not in set(tok.all_special_ids)]
    prefix = [rng.choice(vocab) for _ in range(ns.random_prefix_len)]
    requests = []
    for n, out in zip(_lens(rng, ns.random_input_len, ns.random_range_ratio, ns.num_prompts),
                      _lens(rng, ns.random_output_len, ns.random_range_ratio, ns.num_prompts)):
        text = tok.decode(prefix + [rng.choice(vocab) for _ in range(n)])
        requests.append(SampleRequest(text, len(tok.encode(text, add_special_tokens=False)), out))
    return requests


def _read(path: str) -> list:
    with open(path) as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        return json.load(f)


def _sharegpt(ns, tok, rng: random.Random) -> list[SampleRequest]:
    """The first human turn of each conversation as the prompt, the reply's length as the output length."""
    requests = []
    rows = _read(ns.dataset_path)
    rng.shuffle(rows)
    for row in rows:
        turns = row.get("conversations") or row.get("conversation") or []
        if len(turns) < 2:
            continue
        prompt, reply = turns[0].get("value", ""), turns[1].get("value", "")
        out = ns.sharegpt_output_len or len(tok.encode(reply, add_special_tokens=False))
        if prompt and out >= 1:
            requests.append(SampleRequest(prompt, len(tok.encode(prompt, add_special_tokens=False)), out))
        if len(requests) == ns.num_prompts:
            break
    return requests


def _custom(ns, tok, rng: random.Random) -> list[SampleRequest]:
    rows = [r for r in _read(ns.dataset_path) if isinstance(r, dict) and r.get("prompt")]
    rng.shuffle(rows)
    return [SampleRequest(r["prompt"], len(tok.encode(r["prompt"], add_special_tokens=False)),
                          int(r.get("output_tokens") or ns.custom_output_len)) for r in rows[:ns.num_prompts]]


def sample_requests(ns: argparse.Namespace) -> list[SampleRequest]:
    if ns.num_prompts < 1:
        raise ValueError("--num-prompts must be positive")
    if ns.dataset_name != "random" and not ns.dataset_path:
        raise ValueError(f"--dataset-name {ns.dataset_name} needs --dataset-path")
    if not 0 <= ns.random_range_ratio < 1:
        raise ValueError("--random-range-ratio must be in [0, 1)")
    make = {"random": _random, "sharegpt": _sharegpt, "custom": _custom}[ns.dataset_name]
    requests = make(ns, _tokenizer(ns.tokenizer), random.Random(ns.seed))
    if not requests:
        raise ValueError(f"no usable requests in {ns.dataset_path}")
    return requests
