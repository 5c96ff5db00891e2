"""Speculative decoding, engine side: n-gram proposals (prompt lookup) or a draft model's (draft_proposer.py), which
sequences may speculate, and the counters vLLM reports. The target model verifies proposals inside the normal step
(layers/sampler.py): a speculating sequence computes its last token and its k proposals as one chunk of k + 1
tokens, and each of those positions is a sampled row."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedllm.config import EngineConfig
from pagedllm.engine.draft_proposer import DraftProposer
from pagedllm.engine.scheduler import Scheduler
from pagedllm.engine.sequence import Sequence
from pagedllm.spec_config import SpeculativeConfig


@dataclass
class SpecDecodeStats:
    num_drafts: int = 0  # sequence-steps that carried proposals
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a speculating step produced per sequence on average: the accepted proposals plus the one the
        target model samples itself."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


def ngram_proposal(token_ids: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """The up to k tokens that followed the latest earlier occurrence of the sequence's last n tokens (the longest
    n from n_max down to n_min that occurs); [] if none does. Tensor code: one comparison of every window."""
    if k <= 0 or len(token_ids) <= n_min:
        return []
    ids = torch.tensor(token_ids)
    for n in range(min(n_max, len(ids) - 1), n_min - 1, -1):
        windows = ids[:-1].unfold(0, n, 1)  # windows ending before the last token: each has a token after it
        hits = (windows == ids[-n:]).all(1).nonzero()
        if len(hits):
            start = int(hits[-1]) + n
            return ids[start:start + k].tolist()
    return []


def may_speculate(seq: Sequence) -> bool:
    """Proposals are verified for greedy and plain random sampling (temperature, top-k / top-p / min-p) with the
    target model's logprobs; anything whose next-token distribution depends on the tokens before it within the
    step (penalties, structured output, min_tokens' bans) or that draws from its own seeded noise does not
    speculate."""
    p = seq.params
    return (seq.guide is None and seq.generator is None and not p.logit_bias and not p.allowed_token_ids
            and not p.presence_penalty and not p.frequency_penalty and p.repetition_penalty == 1.0
            and seq.num_output_tokens >= p.min_tokens)


def _proposal_length(config: SpeculativeConfig, seq: Sequence, max_model_len: int) -> int:
    """How many tokens a decoding sequence may propose: num_speculative_tokens, within max_tokens and the context
    (a verifying step emits up to one more than it proposes)."""
    limit = max_model_len - seq.num_tokens - 1
    if seq.params.max_tokens is not None:
        limit = min(limit, seq.params.max_tokens - seq.num_output_tokens - 1)
    return min(config.num_speculative_tokens, limit)


class Speculator:
    """The engine's side of speculative decoding: proposals before a step is scheduled (n-gram ones, or slots for a
    draft model's, which it fills once the step's blocks are allocated), the draft's distributions for the
    sampler, and the accounting after verification."""

    def __init__(self, config: EngineConfig, eos_ids: tuple[int, ...]):
        self.config, self.max_model_len = config.speculative, config.max_model_len
        self.vocab_size, self.max_batch = config.model.vocab_size, config.speculative.disable_by_batch_size
        self.stats = SpecDecodeStats()
        self.draft = DraftProposer(config, eos_ids) if self.config.method == "draft_model" else None

    @property
    def kv_bytes_per_token(self) -> int:
        """What a draft model's KV pool adds per token (0 for n-gram proposals)."""
        return self.draft.kv_bytes_per_token if self.draft is not None else 0

    def allocate(self, num_blocks: int) -> None:
        if self.draft is not None:
            self.draft.allocate(num_blocks)

    def prepare(self, running: list[Sequence]) -> None:
        """Set spec_token_ids on the decoding sequences that may speculate this step (none when more than
        disable_by_batch_size sequences run)."""
        if self.max_batch is not None and len(running) > self.max_batch:
            return
        for seq in running:
            if seq.in_flight or seq.num_computed_tokens != seq.num_tokens - 1 or not may_speculate(seq):
                continue
            k = _proposal_length(self.config, seq, self.max_model_len)
            if self.draft is None:
                seq.spec_token_ids = ngram_proposal(seq.token_ids, k, self.config.prompt_lookup_min,
                                                    self.config.prompt_lookup_max)
            else:
                seq.spec_token_ids = [0] * max(k, 0)  # slots the scheduler allocates; the draft fills them

    def fill(self, seqs: list[Sequence], copies: list[tuple[int, int]]) -> dict[Sequence, torch.Tensor]:
        """After scheduling: a draft model's proposals for the scheduled speculating sequences, and its
        distributions (for those that sample at random)."""
        return self.draft.propose(seqs, copies) if self.draft is not None and seqs else {}

    def row_probs(self, speculating: list[tuple[Sequence, int, list[int]]], rows: int,
                  dists: dict[Sequence, torch.Tensor], device: torch.device) -> torch.Tensor | None:
        """The draft's distribution behind each sampled row's proposal ([rows, vocab], zero elsewhere), or None."""
        if not dists:
            return None
        probs = torch.zeros(rows, self.vocab_size, device=device)
        for seq, first, drafts in speculating:
            if seq in dists:
                probs[first:first + len(drafts)] = dists[seq].to(device)
        return probs

    def settle(self, scheduler: Scheduler, speculating: list[tuple[Sequence, int, list[int]]], tokens: list[int]) -> None:
        """Count each speculating sequence's accepted proposals (its leading rows that emitted their proposal) and
        give back the slots of the rest."""
        for seq, first, drafts in speculating:
            accepted = next((j for j, d in enumerate(drafts) if tokens[first + j] != d), len(drafts))
            self.stats.num_drafts += 1
            self.stats.num_draft_tokens += len(drafts)
            self.stats.num_accepted_tokens += accepted
            scheduler.settle_speculation(seq, accepted)

    def shutdown(self) -> None:
        if self.draft is not None:
            self.draft.shutdown()
