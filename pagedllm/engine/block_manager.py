"""Ref-counted KV blocks with a free list and automatic prefix caching.

A full block is identified by a hash chain over (parent block's hash, the block's token ids);
a lookup also compares the stored token ids, so a hash collision can never serve wrong K/V.
Blocks whose sequences ended stay in the cache (and in the free list) until they are needed
again, then the least recently freed is evicted first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from pagedllm.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()


def chain_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # front: evict first
        self.cached: dict[int, int] = {}  # hash -> block id

    # ---- accounting -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free_queue) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache ---------------------------------------------------------------------
    def _hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        """Extend the sequence's memoised hash chain to `num_blocks` full blocks."""
        bs, hashes = self.block_size, seq.block_hashes
        for i in range(len(hashes), num_blocks):
            hashes.append(chain_hash(hashes[i - 1] if i else None, tuple(seq.token_ids[i * bs:(i + 1) * bs])))
        return hashes[:num_blocks]

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix; never the last token, which must be computed."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        hits: list[int] = []
        for i, h in enumerate(self._hashes(seq, (seq.num_tokens - 1) // bs)):
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tuple(seq.token_ids[i * bs:(i + 1) * bs]):
                break
            hits.append(block_id)
        return hits

    def cache_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Register the sequence's blocks that the first `num_tokens` tokens fill. Called when they are
        scheduled: every layer writes a step's K/V before it attends, so a request admitted in the same
        step may already read them."""
        if not self.enable_prefix_caching:
            return
        bs, num_full = self.block_size, num_tokens // self.block_size
        for i, h in enumerate(self._hashes(seq, num_full)[seq.num_hashed_blocks:], start=seq.num_hashed_blocks):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                block.hash, block.token_ids = h, tuple(seq.token_ids[i * bs:(i + 1) * bs])
                self.cached.setdefault(h, block.block_id)
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, num_full)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (after a failed step whose K/V may never have been written, or when asked)."""
        self.cached.clear()
        for block in self.blocks:
            block.hash, block.token_ids = None, ()

    # ---- allocation -----------------------------------------------------------------------
    def _take_free(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict from the prefix cache
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash, block.token_ids = None, ()
        block.ref_count = 1
        return block_id

    def _share(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def _needs_copy(self, seq: Sequence) -> bool:
        """Is the block the next token writes into shared with a sibling (copy-on-write)?"""
        idx = seq.num_computed_tokens // self.block_size
        return idx < len(seq.block_table) and self.blocks[seq.block_table[idx]].ref_count > 1

    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int] = ()) -> bool:
        computed = max(seq.num_computed_tokens, len(cached) * self.block_size)
        new = self.blocks_needed(computed + num_new_tokens) - max(len(seq.block_table), len(cached))
        reusable_free = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        return max(new, 0) + self._needs_copy(seq) <= len(self.free_queue) - reusable_free

    def allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int] = ()) -> list[tuple[int, int]]:
        """Give `seq` slots for `num_new_tokens` more tokens; returns (src, dst) block copies to perform."""
        for block_id in cached:
            self._share(block_id)
        if cached:
            seq.block_table = list(cached)
            seq.num_computed_tokens = len(cached) * self.block_size
            seq.num_hashed_blocks = len(cached)
        copies = []
        if self._needs_copy(seq):
            idx = seq.num_computed_tokens // self.block_size
            src = seq.block_table[idx]
            self.blocks[src].ref_count -= 1
            seq.block_table[idx] = self._take_free()
            copies.append((src, seq.block_table[idx]))
        while len(seq.block_table) < self.blocks_needed(seq.num_computed_tokens + num_new_tokens):
            seq.block_table.append(self._take_free())
        return copies

    def share_blocks(self, forked: Sequence) -> None:
        """A forked sequence holds references to the blocks it copied from its parent's table."""
        for block_id in forked.block_table:
            self._share(block_id)

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Give back the blocks past the first `num_tokens` tokens' (rejected proposals' slots)."""
        keep = self.blocks_needed(num_tokens)
        for block_id in reversed(seq.block_table[keep:]):
            self._release(block_id)
        del seq.block_table[keep:]

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_queue[block_id] = None
            if block.hash is None:  # holds nothing reusable: hand it out first
                self.free_queue.move_to_end(block_id, last=False)

    def free(self, seq: Sequence) -> None:
        # Tail blocks go to the front of the eviction order: a prefix outlives its continuations.
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table = []
        seq.num_hashed_blocks = 0
