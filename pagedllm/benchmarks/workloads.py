"""Reproducible benchmark workloads: random token-id prompts, fixed or variable output lengths, shared prefixes.

W1 (the default): 64 requests, prompt lengths uniform in [32, 512], exactly 128 output tokens, seed 0.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


def add_workload_args(p: argparse.ArgumentParser, num_prompts: int = 64) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--num-prompts", type=int, default=num_prompts)
    g.add_argument("--input-len", type=int, nargs=2, default=[32, 512], metavar=("MIN", "MAX"),
                   help="prompt lengths, uniform in [MIN, MAX]")
    g.add_argument("--output-len", type=int, nargs=2, default=[128, 128], metavar=("MIN", "MAX"),
                   help="output lengths, uniform in [MIN, MAX] (EOS ignored)")
    g.add_argument("--shared-prefix-len", type=int, default=0, help="a common prefix of this many tokens on every prompt")
    g.add_argument("--workload-seed", type=int, default=0)


def make_workload(ns: argparse.Namespace, vocab_size: int) -> Workload:
    for name in ("input_len", "output_len"):
        lo, hi = getattr(ns, name)
        if not 1 <= lo <= hi:
            raise ValueError(f"--{name.replace('_', '-')} needs 1 <= MIN <= MAX, got {lo} {hi}")
    if ns.num_prompts < 1 or ns.shared_prefix_len < 0:
        raise ValueError("--num-prompts must be positive and --shared-prefix-len not negative")
    g = torch.Generator().manual_seed(ns.workload_seed)
    lens = torch.randint(ns.input_len[0], ns.input_len[1] + 1, (ns.num_prompts,), generator=g).tolist()
    outs = torch.randint(ns.output_len[0], ns.output_len[1] + 1, (ns.num_prompts,), generator=g).tolist()
    low = 100 if vocab_size > 1000 else 0  # skip the special tokens at the start of real vocabularies
    prefix = torch.randint(low, vocab_size, (ns.shared_prefix_len,), generator=g).tolist()
    prompts = [prefix + torch.randint(low, vocab_size, (n,), generator=g).tolist() for n in lens]
    return Workload(prompts, outs)
