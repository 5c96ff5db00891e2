"""Triton kernels for the GPU: writing a step's K/V into the paged pool, and one paged-attention kernel for a whole
step (decodes and prompt chunks after a cached prefix alike, grouped-query attention, causal within each chunk), with
a split-KV variant for long contexts whose few queries would otherwise leave most of the GPU idle.

They run anywhere Triton does: natively on CUDA, and on CPU tensors under TRITON_INTERPRET=1, which is how the test
suite checks them against the torch reference without a GPU.

The attention kernel takes one tile of BLOCK_Q query tokens of one sequence and one KV head per program: the tile's
rows are its tokens times the KV head's query heads (padded to a power of two), so each K/V block is read once for
the whole group. It walks the sequence's blocks through its block table with an online softmax (flash attention),
each query seeing the keys up to its own position.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _reshape_and_cache(key, value, k_cache, v_cache, slots, stride_kt, stride_kh, stride_ch, stride_cb, stride_cs,
                       BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr):
    t, h = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slots + t)
    d = tl.arange(0, HEAD_DIM)
    keep = d * 0 + slot >= 0  # slot -1: a padded row of a CUDA graph's batch, nothing to write
    dst = h * stride_ch + (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + d
    tl.store(k_cache + dst, tl.load(key + t * stride_kt + h * stride_kh + d), mask=keep)
    tl.store(v_cache + dst, tl.load(value + t * stride_kt + h * stride_kh + d), mask=keep)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """Write keys and values [T, kv_heads, D] into the pool [kv_heads, blocks, block_size, D] at their slots."""
    key, value = key.contiguous(), value.contiguous()
    t, kv_heads, d = key.shape
    if t == 0:
        return
    _reshape_and_cache[(t, kv_heads)](key, value, k_cache, v_cache, slot_mapping, key.stride(0), key.stride(1),
                                      k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                                      BLOCK_SIZE=k_cache.shape[2], HEAD_DIM=d)


@triton.jit
def _dot(a, b, FP32: tl.constexpr):
    """a @ b with fp32 accumulation; FP32: in fp32 throughout (fp32 models: no TF32 rounding; and the interpreter,
    whose 16-bit dot products are wrong in triton 3.9)."""
    if FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _attention(q, k_cache, v_cache, out, m_out, l_out, block_tables, query_start, context_lens, tile_seq, tile_q0,
               scale, stride_qt, stride_qh, stride_ch, stride_cb, stride_cs, stride_bt, stride_ot, stride_oh,
               stride_os, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
               BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr, DOT_FP32: tl.constexpr):
    tile, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq, q0 = tl.load(tile_seq + tile), tl.load(tile_q0 + tile)
    first = tl.load(query_start + seq)
    q_len = tl.load(query_start + seq + 1) - first
    ctx = tl.load(context_lens + seq)
    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
    token = q0 + rows // GROUP_PAD  # within the sequence's chunk
    head = kv_head * GROUP + rows % GROUP_PAD
    valid = (token < q_len) & (rows % GROUP_PAD < GROUP)
    pos = ctx - q_len + token  # each query's position: it sees keys 0..pos
    d = tl.arange(0, HEAD_DIM)
    qv = tl.load(q + (first + token)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                 mask=valid[:, None], other=0.0)
    # this split's share of the blocks the tile's last query sees
    num_blocks = tl.cdiv(ctx - q_len + tl.minimum(q0 + BLOCK_Q, q_len), BLOCK_SIZE)
    per_split = tl.cdiv(num_blocks, SPLITS)
    m_i = tl.full([BLOCK_Q * GROUP_PAD], -1e30, tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_DIM], tl.float32)
    offs = tl.arange(0, BLOCK_SIZE)
    for b in range(split * per_split, tl.minimum(num_blocks, (split + 1) * per_split)):
        block = tl.load(block_tables + seq * stride_bt + b)
        at = kv_head * stride_ch + block * stride_cb + offs[:, None] * stride_cs + d[None, :]
        k = tl.load(k_cache + at)
        v = tl.load(v_cache + at)
        s = _dot(qv, tl.trans(k), DOT_FP32) * scale
        s = tl.where((b * BLOCK_SIZE + offs)[None, :] <= pos[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_FP32)
        m_i = m_new
    where = (first + token)[:, None] * stride_ot + head[:, None] * stride_oh + split * stride_os + d[None, :]
    if SPLITS == 1:
        tl.store(out + where, (acc / tl.maximum(l_i, 1e-30)[:, None]).to(out.dtype.element_ty), mask=valid[:, None])
    else:  # partial results: the reduction below combines the splits
        tl.store(out + where, acc, mask=valid[:, None])
        stat = ((first + token) * (tl.num_programs(1) * GROUP) + head) * SPLITS + split  # [T, heads, splits]
        tl.store(m_out + stat, m_i, mask=valid)
        tl.store(l_out + stat, l_i, mask=valid)


@triton.jit
def _combine_splits(partial, m_in, l_in, out, stride_ot, stride_oh, SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr):
    t, h = tl.program_id(0), tl.program_id(1)
    heads = tl.num_programs(1)
    s = tl.arange(0, SPLITS)
    m = tl.load(m_in + (t * heads + h) * SPLITS + s)
    l_s = tl.load(l_in + (t * heads + h) * SPLITS + s)
    weight = tl.exp(m - tl.max(m, 0))
    d = tl.arange(0, HEAD_DIM)
    acc = tl.load(partial + ((t * heads + h) * SPLITS + s)[:, None] * HEAD_DIM + d[None, :])
    total = tl.sum(acc * weight[:, None], 0) / tl.maximum(tl.sum(l_s * weight, 0), 1e-30)
    tl.store(out + t * stride_ot + h * stride_oh + d, total.to(out.dtype.element_ty))


def kv_splits(programs: int, max_context: int, target_programs: int = 128, min_keys: int = 512) -> int:
    """How many programs share each tile's keys: enough to give the GPU about `target_programs` programs when a step
    has few queries (a batch of long decodes), never fewer than `min_keys` keys each; a power of two up to 16."""
    splits = 1
    while splits < 16 and programs * splits < target_programs and max_context // (2 * splits) >= min_keys:
        splits *= 2
    return splits


def _tiles(query_start: torch.Tensor, block_q: int, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence, first query of the tile) for every tile of block_q query tokens. A batch of decodes (as many
    tokens as sequences) is known from the shapes alone: no wait for the device (CUDA graphs capture it)."""
    if num_tokens == len(query_start) - 1:
        seq = torch.arange(num_tokens, dtype=torch.int32, device=query_start.device)
        return seq, torch.zeros_like(seq)
    q_lens = query_start[1:] - query_start[:-1]
    counts = (q_lens + block_q - 1) // block_q
    seq = torch.repeat_interleave(torch.arange(len(q_lens), device=q_lens.device), counts)
    first_tile = torch.cumsum(counts, 0) - counts
    q0 = (torch.arange(len(seq), device=seq.device) - first_tile[seq]) * block_q
    return seq.to(torch.int32), q0.to(torch.int32)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    query_start: torch.Tensor, context_lens: torch.Tensor, scale: float, splits: int = 1) -> torch.Tensor:
    """Causal attention of a step's queries q [T, heads, D] over each sequence's cached keys and values (the same
    contract as the native CPU kernel, kernels.paged_attention). `splits` > 1 divides each tile's blocks among that
    many programs (a power of two) and combines their partial softmaxes afterwards (for long contexts with few
    queries)."""
    assert splits & (splits - 1) == 0, "splits is a power of two"
    t, heads, d = q.shape
    kv_heads, _, block_size, _ = k_cache.shape
    group = heads // kv_heads
    group_pad = triton.next_power_of_2(group)
    block_q = max(1, 16 // group_pad)  # tl.dot wants at least 16 rows
    q = q.contiguous()
    out = torch.empty_like(q)
    if t == 0:
        return out
    tile_seq, tile_q0 = _tiles(query_start, block_q, t)
    common = dict(GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_SIZE=block_size, HEAD_DIM=d, SPLITS=splits,
                  DOT_FP32=q.dtype == torch.float32 or INTERPRETED)
    grid = (len(tile_seq), kv_heads, splits)
    args = (block_tables, query_start, context_lens, tile_seq, tile_q0, scale, q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0))
    if splits == 1:
        _attention[grid](q, k_cache, v_cache, out, out, out, *args, out.stride(0), out.stride(1), 0, **common)
        return out
    partial = torch.empty(t, heads, splits, d, dtype=torch.float32, device=q.device)
    m = torch.empty(t, heads, splits, dtype=torch.float32, device=q.device)
    l_sum = torch.empty_like(m)
    _attention[grid](q, k_cache, v_cache, partial, m, l_sum, *args, partial.stride(0), partial.stride(1),
                     partial.stride(2), **common)
    _combine_splits[(t, heads)](partial, m, l_sum, out, out.stride(0), out.stride(1), SPLITS=splits, HEAD_DIM=d)
    return out
