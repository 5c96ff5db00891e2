"""Block manager: ref counts, copy-on-write, prefix-cache hits, collision guard, eviction order."""

from __future__ import annotations

from pagedllm.engine import block_manager as bm_mod
from pagedllm.engine.block_manager import BlockManager
from pagedllm.engine.sequence import Request
from pagedllm.sampling_params import SamplingParams


def _seq(tokens: list[int]):
    return Request("r", None, tokens, SamplingParams(), 1000).seqs[0]


def _run_prefill(bm: BlockManager, seq) -> None:
    cached = bm.find_cached_prefix(seq)
    bm.allocate(seq, seq.num_tokens - len(cached) * bm.block_size, cached)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq, seq.num_tokens)


def test_prefix_hit_reuses_full_blocks_but_not_the_last_token():
    bm = BlockManager(8, 4)
    a = _seq(list(range(10)))
    _run_prefill(bm, a)
    b = _seq(list(range(10)))
    assert bm.find_cached_prefix(b) == a.block_table[:2]  # 2 full blocks; the partial one is not cached
    c = _seq(list(range(8)))  # exactly 2 blocks: the last token must be computed, so only 1 block hits
    assert bm.find_cached_prefix(c) == a.block_table[:1]


def test_refcounts_and_pool_empty_after_free():
    bm = BlockManager(8, 4)
    a, b = _seq(list(range(10))), _seq(list(range(10)))
    _run_prefill(bm, a)
    _run_prefill(bm, b)
    assert [bm.blocks[i].ref_count for i in a.block_table[:2]] == [2, 2]
    assert a.block_table[2] != b.block_table[2]
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8 and all(blk.ref_count == 0 for blk in bm.blocks)


def test_hash_collision_is_caught_by_token_comparison(monkeypatch):
    monkeypatch.setattr(bm_mod, "chain_hash", lambda parent, tokens: 42)  # every block collides
    bm = BlockManager(8, 4)
    a = _seq([1, 2, 3, 4, 5])
    _run_prefill(bm, a)
    assert bm.find_cached_prefix(_seq([9, 9, 9, 9, 5])) == []
    assert bm.find_cached_prefix(_seq([1, 2, 3, 4, 6])) == a.block_table[:1]


def test_eviction_is_least_recently_freed_and_tail_first():
    bm = BlockManager(4, 2)
    a = _seq([1, 2, 3, 4, 5])  # blocks: [1,2] [3,4] and a partial [5]
    _run_prefill(bm, a)
    head, mid, tail = a.block_table
    never_used = ({0, 1, 2, 3} - set(a.block_table)).pop()
    bm.free(a)
    # the uncached partial block is reused first, then never-used blocks, then the cached chain tail first
    assert list(bm.free_queue) == [tail, never_used, mid, head]
    b = _seq([7] * 6)
    bm.allocate(b, 6)
    assert b.block_table == [tail, never_used, mid]
    assert bm.find_cached_prefix(_seq([1, 2, 3, 4, 5])) == [head]  # the head survived eviction


def test_copy_on_write_for_shared_partial_block():
    bm = BlockManager(8, 4)
    parent = _seq([1, 2, 3, 4, 5, 6])
    _run_prefill(bm, parent)
    child = parent.fork(1)
    bm.share_blocks(child)
    assert bm.blocks[parent.block_table[1]].ref_count == 2
    copies = bm.allocate(child, 1)
    assert copies == [(parent.block_table[1], child.block_table[1])]
    assert bm.blocks[parent.block_table[1]].ref_count == 1 and bm.blocks[child.block_table[0]].ref_count == 2
    assert bm.allocate(parent, 1) == []  # the parent is now the only owner: writes in place
