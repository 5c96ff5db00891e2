"""Sequences' sampling parameters into SamplingMetadata, the tensors the sampler reads (built engine-side)."""

from __future__ import annotations

import torch

from pagedllm.engine.sequence import Sequence
from pagedllm.engine.structured_outputs import allowed_mask
from pagedllm.step import SamplingMetadata


def _pad(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


def build_sampling_metadata(seqs: list[Sequence], vocab_size: int, eos_ids: tuple[int, ...], device: torch.device,
                            spec: tuple[list[int], list[int]] | None = None) -> SamplingMetadata:
    """The rows' sampling settings as tensors (row i samples for seqs[i]); parts no row uses stay None. `spec`:
    the proposal each row verifies and its sequence's first row (SamplingMetadata.spec)."""
    ps = [s.params for s in seqs]
    f32 = dict(dtype=torch.float32, device=device)
    greedy = [p.greedy for p in ps]
    any_pen = any(p.penalized for p in ps)
    banned_rows, banned_ids = [], []
    for i, (s, p) in enumerate(zip(seqs, ps)):
        if s.num_output_tokens < p.min_tokens:
            ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_ids))
            banned_rows += [i] * len(ids)
            banned_ids += sorted(ids)
    bias = [(i, t, b) for i, p in enumerate(ps) for t, b in (p.logit_bias or {}).items()]
    allowed = [(i, t) for i, p in enumerate(ps) for t in (p.allowed_token_ids or [])]
    guided = [(i, s.guide) for i, s in enumerate(seqs) if s.guide is not None]
    return SamplingMetadata(
        temperature=torch.tensor([1.0 if g else p.temperature for g, p in zip(greedy, ps)], **f32),
        greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
        all_greedy=all(greedy),
        top_k=torch.tensor([p.top_k or vocab_size for p in ps], device=device) if any(p.top_k for p in ps) else None,
        top_p=torch.tensor([p.top_p for p in ps], **f32) if any(p.top_p < 1.0 for p in ps) else None,
        min_p=torch.tensor([p.min_p for p in ps], **f32) if any(p.min_p > 0 for p in ps) else None,
        presence=torch.tensor([p.presence_penalty for p in ps], **f32) if any_pen else None,
        frequency=torch.tensor([p.frequency_penalty for p in ps], **f32) if any_pen else None,
        repetition=torch.tensor([p.repetition_penalty for p in ps], **f32) if any_pen else None,
        output_tokens=_pad([s.output_token_ids for s in seqs], vocab_size, device) if any_pen else None,
        prompt_tokens=_pad([s.token_ids[:s.num_prompt_tokens] for s in seqs], vocab_size, device) if any_pen else None,
        banned=(torch.tensor(banned_rows, device=device), torch.tensor(banned_ids, device=device)) if banned_rows else None,
        bias=tuple(torch.tensor(c, device=device) for c in zip(*bias)) if bias else None,
        allowed=tuple(torch.tensor(c, device=device) for c in zip(*allowed)) if allowed else None,
        guided=(torch.tensor([i for i, _ in guided], device=device),
                allowed_mask([g for _, g in guided], vocab_size).to(device)) if guided else None,
        generators={i: s.generator for i, s in enumerate(seqs) if s.generator is not None and not s.params.greedy},
        num_logprobs=max((p.logprobs for p in ps if p.logprobs is not None), default=-1),
        spec=tuple(torch.tensor(c, dtype=torch.long, device=device) for c in spec) if spec else None,
    )
