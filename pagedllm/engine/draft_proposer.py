"""Draft-model proposals for speculative decoding: a smaller model with the target's vocabulary runs in the
engine's process and proposes k tokens per speculating sequence, one forward per token, batched over sequences.

Its KV pool has as many blocks as the target's and is addressed by the same block tables, so the scheduler's
allocations (which already hold slots for the proposals), prefix-cached blocks and copy-on-write serve both models;
each sequence remembers how many of its tokens the draft holds K/V for and catches up from there (its whole prompt
on its first proposal, the tokens accepted since after that).
"""

from __future__ import annotations

import logging

import torch

from pagedllm.config import EngineConfig
from pagedllm.distributed.parallel_state import single_rank_group
from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.engine.sampling_metadata import build_sampling_metadata
from pagedllm.engine.sequence import Sequence
from pagedllm.executor.uniproc import UniProcExecutor
from pagedllm.memory.kv_sizing import kv_bytes_per_token
from pagedllm.memory.units import format_bytes
from pagedllm.step import StepInputs

logger = logging.getLogger("pagedllm")


class DraftProposer:
    def __init__(self, config: EngineConfig, eos_ids: tuple[int, ...]):
        # the draft runs in its checkpoint's own dtype or quantization (a GGUF file natively): only token ids and
        # its fp32 distributions meet the target's
        args = EngineArgs(model=config.speculative.model, max_model_len=config.max_model_len,
                          block_size=config.cache.block_size,
                          load_format=config.load.load_format, seed=config.load.seed, device=str(config.device),
                          enable_prefix_caching=False)
        self.config = args.create_engine_config()
        if self.config.model.vocab_size != config.model.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({self.config.model.vocab_size} tokens) differs from the "
                             f"target's ({config.model.vocab_size}): proposals must be the target's token ids")
        with single_rank_group():  # whole in this process, beside a tensor- or pipeline-parallel target's rank 0
            self.executor = UniProcExecutor(self.config)
        self.vocab_size, self.eos_ids = config.model.vocab_size, eos_ids
        self.name = self.config.model.name or config.speculative.model
        self.kv_bytes_per_token = kv_bytes_per_token(self.config.model, self.config.cache.cache_dtype.itemsize)

    def allocate(self, num_blocks: int) -> None:
        """Its KV pool: as many blocks as the target's (the engine sized both together)."""
        pool = self.executor.allocate_kv_cache(num_blocks)[0]
        logger.info("draft model %s: weights %s, KV pool %s (%d blocks, beside the target's)", self.name,
                    format_bytes(self.executor.weight_bytes()[0]), format_bytes(pool), num_blocks)

    def propose(self, seqs: list[Sequence], copies: list[tuple[int, int]]) -> dict[Sequence, torch.Tensor]:
        """Fill each sequence's spec_token_ids (placeholders, as many as it was scheduled for) with the draft's
        proposals. Returns, for sequences that sample at random, the draft's distribution behind each proposal
        [k, vocab]; `copies` are the step's copy-on-write block copies, which the draft's pool needs as well."""
        counts = [len(s.spec_token_ids) for s in seqs]
        dists: dict[Sequence, list[torch.Tensor]] = {}
        for r in range(max(counts, default=0)):
            active = [s for s, k in zip(seqs, counts) if r < k]
            # round 0 catches up to the sequence's last token; later rounds feed the previous proposal
            chunks = [s.token_ids[s.num_draft_computed:] if r == 0 else [s.spec_token_ids[r - 1]] for s in active]
            starts = [s.num_draft_computed if r == 0 else s.num_tokens + r - 1 for s in active]
            ends = torch.cumsum(torch.tensor([len(c) for c in chunks]), 0) - 1
            step = StepInputs.build(chunks, starts, [s.block_table for s in active], copies if r == 0 else (),
                                    ends.tolist())
            sampling = build_sampling_metadata(active, self.vocab_size, self.eos_ids, self.executor.driver.device)
            tokens, q = self.executor.propose(step, sampling)
            for i, (s, token) in enumerate(zip(active, tokens.tolist())):
                s.spec_token_ids[r] = token
                if q is not None and not s.params.greedy:
                    dists.setdefault(s, []).append(q[i])
        for s, k in zip(seqs, counts):
            s.num_draft_computed = s.num_tokens + k - 1  # its last proposal's K/V is never computed
        return {s: torch.stack(qs) for s, qs in dists.items()}

    def shutdown(self) -> None:
        self.executor.shutdown()
