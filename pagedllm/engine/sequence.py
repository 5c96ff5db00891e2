"""A sequence is one sample being generated; a request groups the `n` samples of one prompt."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from pagedllm.outputs import Logprob, RequestMetrics
from pagedllm.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class DetokState:
    """Incremental detokenization offsets (see engine/detokenizer.py)."""

    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0


@dataclass(eq=False)
class Sequence:
    request: Request
    index: int  # which of the request's n samples
    token_ids: list[int]
    num_prompt_tokens: int
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    in_flight: bool = False  # in a pipeline micro-batch not yet finished: not schedulable again until it is
    block_table: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0  # leading blocks already registered in the prefix cache
    block_hashes: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    detok: DetokState = field(default_factory=DetokState)
    guide: object | None = None  # its structured-output matcher (engine/structured_outputs.py), if constrained
    spec_token_ids: list[int] = field(default_factory=list)  # proposals its next step verifies (engine/spec_decode.py)
    num_draft_computed: int = 0  # leading tokens whose K/V a draft model holds (engine/draft_proposer.py)

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def fork(self, index: int) -> Sequence:
        """A sibling sample sharing everything computed so far (its blocks are shared by the block manager)."""
        child = Sequence(self.request, index, list(self.token_ids), self.num_prompt_tokens,
                         status=self.status, num_computed_tokens=self.num_computed_tokens,
                         block_table=list(self.block_table), num_hashed_blocks=self.num_hashed_blocks,
                         block_hashes=list(self.block_hashes))
        child.generator = _make_generator(self.params.seed, index)
        return child


def _make_generator(seed: int | None, index: int) -> torch.Generator | None:
    """Seeded samples draw their noise on the CPU from their own generator: same output in any batch."""
    if seed is None:
        return None
    g = torch.Generator()
    g.manual_seed(seed + index * 1_000_003)  # distinct, reproducible stream per sample
    return g


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival_time=time.time()))
    seqs: list[Sequence] = field(default_factory=list)
    num_cached_tokens: int = 0
    error: str | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # [None] (the first token), then one per token

    def __post_init__(self) -> None:
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]
        seq = Sequence(self, 0, list(self.prompt_token_ids), len(self.prompt_token_ids))
        seq.generator = _make_generator(self.params.seed, 0)
        self.seqs.append(seq)

    @property
    def is_finished(self) -> bool:
        return len(self.seqs) == self.params.n and all(s.is_finished for s in self.seqs)
