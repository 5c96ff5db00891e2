"""Continuous batching with one token budget per step (vLLM V1's scheduler, no prefill/decode phases).

Every sequence's computed-token count catches up with its token count: running sequences are
served first (decodes and unfinished prompt chunks), then waiting ones are admitted FCFS with
what is left of `max_num_batched_tokens`. When blocks run out, the newest running sequence is
preempted: its blocks are freed and it is recomputed later (its output so far is kept).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pagedllm.config import SchedulerConfig
from pagedllm.engine.block_manager import BlockManager
from pagedllm.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    num_samples: int = 1  # > 1 when a request's prompt completes and its n samples are drawn


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    num_steps: int = 1  # decode steps to run back to back (multi-step scheduling); slots are held for all of them

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = seq.num_draft_computed = 0
        seq.spec_token_ids = []
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        self.num_preemptions += 1

    def schedule(self, share: int = 1) -> SchedulerOutput:
        """The next batch. With `share` > 1 (micro-batches still to launch into a pipeline) it takes only its
        share of the sequences that could run, so the remaining micro-batches get theirs."""
        out = SchedulerOutput()
        ready = sum(1 for s in self.running if not s.in_flight) + len(self.waiting)
        max_seqs = -(-ready // share) if share > 1 else len(self.running) + len(self.waiting)
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager
        i = 0
        while i < len(self.running) and budget > 0 and len(out.scheduled) < max_seqs:
            seq = self.running[i]
            if seq.in_flight:  # its previous micro-batch has not come back yet
                i += 1
                continue
            # a speculating sequence computes its proposals too (as many as the budget leaves room for)
            num_new = min(seq.num_tokens + len(seq.spec_token_ids) - seq.num_computed_tokens, budget, self.config.max_chunk)
            del seq.spec_token_ids[max(0, seq.num_computed_tokens + num_new - seq.num_tokens):]
            while not bm.can_allocate(seq, num_new):
                victim = next(s for s in reversed(self.running) if not s.in_flight)  # the newest that can stop
                self.running.remove(victim)
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.WAITING:  # preempted itself: nobody left to make room
                break
            out.blocks_to_copy += bm.allocate(seq, num_new)
            bm.cache_full_blocks(seq, min(seq.num_computed_tokens + num_new, seq.num_tokens))  # never proposals
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
            i += 1

        while (self.waiting and not out.preempted and budget > 0 and len(self.running) < self.config.max_num_seqs
               and len(out.scheduled) < max_seqs):
            seq = self.waiting[0]
            # a cached prefix has no logits to score: requests for prompt logprobs compute theirs (as vLLM)
            cached = bm.find_cached_prefix(seq) if seq.params.prompt_logprobs is None else []
            num_new = seq.num_tokens - len(cached) * bm.block_size
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    break
                num_new = budget
            num_new = min(num_new, self.config.max_chunk)
            if not bm.can_allocate(seq, num_new, cached):
                break
            self.waiting.popleft()
            out.blocks_to_copy += bm.allocate(seq, num_new, cached)
            bm.cache_full_blocks(seq, seq.num_computed_tokens + num_new)
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += len(cached) * bm.block_size
            if seq.request.num_cached_tokens == 0:
                seq.request.num_cached_tokens = len(cached) * bm.block_size
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new

        for s in out.scheduled:
            req = s.seq.request
            if len(req.seqs) == 1 and req.params.n > 1 and s.seq.num_computed_tokens + s.num_new_tokens == s.seq.num_tokens:
                s.num_samples = req.params.n
        out.num_steps = self._lookahead(out)
        return out

    def _lookahead(self, out: SchedulerOutput) -> int:
        """How many decode steps the batch runs back to back (SchedulerConfig.num_scheduler_steps), its sequences'
        slots for all of them allocated. Only a batch of plain decodes whose sampling does not read their output so
        far (no penalties, structured output or pending min_tokens), with nobody waiting to be admitted and the
        blocks to spare; no sequence may pass its max_tokens or max_model_len on the way."""
        k, max_len, bm = self.config.num_scheduler_steps, self.config.max_model_len, self.block_manager
        if k == 1 or self.waiting or out.preempted:
            return 1
        for s in out.scheduled:
            seq, p = s.seq, s.seq.params
            if (s.num_new_tokens != 1 or s.num_samples != 1 or seq.spec_token_ids or seq.guide is not None
                    or seq.num_computed_tokens < seq.num_prompt_tokens or p.penalized
                    or seq.num_output_tokens < p.min_tokens):
                return 1
            k = min(k, (p.max_tokens or max_len) - seq.num_output_tokens, max_len - seq.num_tokens)
        need = sum(max(0, bm.blocks_needed(s.seq.num_computed_tokens + k) - len(s.seq.block_table)) for s in out.scheduled)
        if k <= 1 or need > bm.num_free_blocks:
            return 1
        for s in out.scheduled:
            bm.allocate(s.seq, k)
        return k

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Account for the tokens just computed (their K/V are now in the pool); proposals count once verified
        (settle_speculation)."""
        for s in out.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens - len(s.seq.spec_token_ids)

    def advance(self, seqs: list[Sequence]) -> None:
        """Before a further step of a multi-step batch: each running sequence computes its last token, and the blocks
        that completes are registered for prefix caching, as schedule() registers a step's."""
        for seq in seqs:
            if not seq.is_finished:
                self.block_manager.cache_full_blocks(seq, seq.num_tokens)
                seq.num_computed_tokens += 1

    def settle_speculation(self, seq: Sequence, num_accepted: int) -> None:
        """After a speculating step: the accepted proposals' K/V are valid (they are the tokens now appended), the
        rest of the proposals' slots are given back."""
        if not seq.is_finished:
            seq.num_computed_tokens += num_accepted
            seq.num_draft_computed = min(seq.num_draft_computed, seq.num_computed_tokens)  # a draft's K/V of rejects
            self.block_manager.trim(seq, seq.num_tokens)
        seq.spec_token_ids = []

    def fork(self, parent: Sequence, child: Sequence) -> None:
        self.block_manager.share_blocks(child)
        self.running.insert(self.running.index(parent) + 1, child)

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out of the queues for good and return its blocks."""
        seq.status = SequenceStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
