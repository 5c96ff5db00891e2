"""A scheduled batch as the StepInputs the workers take: which tokens each sequence computes, and which prompt
tokens' logprobs are scored."""

from __future__ import annotations

from pagedllm.engine.scheduler import ScheduledSeq
from pagedllm.step import StepInputs


def _chunk(s: ScheduledSeq) -> list[int]:
    """The tokens a scheduled sequence computes: part of its tokens, or its last one and its proposals."""
    start = s.seq.num_computed_tokens
    return (s.seq.token_ids[start:start + s.num_new_tokens] + s.seq.spec_token_ids)[:s.num_new_tokens]


def step_inputs(batch: list[ScheduledSeq], copies: list[tuple[int, int]], sample_positions: list[int],
                prompt_rows: list[tuple[int, int, int]] = ()) -> StepInputs:
    """A scheduled batch as the plain tensors the workers take."""
    return StepInputs.build([_chunk(s) for s in batch], [s.seq.num_computed_tokens for s in batch],
                            [s.seq.block_table for s in batch], copies, sample_positions, prompt_rows)


def prompt_logprob_row(i: int, s: ScheduledSeq) -> tuple[int, int, int] | None:
    """(batch row, top k, the prompt token after the chunk or -1) when this chunk has prompt tokens to score."""
    seq, start, n = s.seq, s.seq.num_computed_tokens, s.num_new_tokens
    if seq.params.prompt_logprobs is None or start >= seq.num_prompt_tokens:
        return None
    following = seq.token_ids[start + n] if start + n < seq.num_prompt_tokens else -1
    return (i, seq.params.prompt_logprobs, following) if n > 1 or following >= 0 else None
