"""The native CPU attention kernel against attention computed in float64 from gathered K/V."""

import pytest
import torch

from pagedllm.kernels import load_cpu_ops, paged_attention

pytestmark = pytest.mark.skipif(not load_cpu_ops(), reason="native CPU kernels could not be built here")


def reference(q, k_cache, v_cache, tables, query_start, context_lens, scale):
    """Each sequence's queries attend causally over its context, gathered from the pool."""
    kv_heads, _, block_size, head_dim = k_cache.shape
    group = q.shape[1] // kv_heads
    out = []
    for b, n in enumerate(context_lens.tolist()):
        blocks = tables[b, :-(-n // block_size)]
        k = k_cache[:, blocks].reshape(kv_heads, -1, head_dim)[:, :n].double().repeat_interleave(group, 0)
        v = v_cache[:, blocks].reshape(kv_heads, -1, head_dim)[:, :n].double().repeat_interleave(group, 0)
        qb = q[query_start[b]:query_start[b + 1]].double().transpose(0, 1)  # [heads, m, D]
        m = qb.shape[1]
        visible = torch.arange(n)[None, :] <= torch.arange(n - m, n)[:, None]
        scores = (qb @ k.transpose(1, 2) * scale).masked_fill(~visible, float("-inf"))
        out.append((scores.softmax(-1) @ v).transpose(0, 1))
    return torch.cat(out)


# (queries, context) per sequence: decodes, a fresh prompt, chunks after a cached prefix, tile edges
SEQS = [(1, 1), (1, 17), (1, 333), (40, 40), (16, 16), (17, 50), (5, 100), (33, 33)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("head_dim,heads,kv_heads", [(16, 4, 2), (64, 9, 3), (128, 16, 8), (64, 4, 4)])
def test_attention_kernel_matches_reference(dtype, tol, head_dim, heads, kv_heads):
    g = torch.Generator().manual_seed(0)
    block_size, num_blocks = 16, 200
    queries = torch.tensor([m for m, _ in SEQS])
    context_lens = torch.tensor([n for _, n in SEQS])
    query_start = torch.cat([torch.zeros(1, dtype=torch.long), queries.cumsum(0)])
    width = -(-int(context_lens.max()) // block_size)
    tables = torch.randperm(num_blocks, generator=g)[:len(SEQS) * width].view(len(SEQS), width)
    k_cache = torch.randn(kv_heads, num_blocks, block_size, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(kv_heads, num_blocks, block_size, head_dim, generator=g).to(dtype)
    q = torch.randn(int(queries.sum()), heads, head_dim, generator=g).to(dtype)
    scale = head_dim ** -0.5
    out = paged_attention(q, k_cache, v_cache, tables, query_start, context_lens, scale)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), reference(q, k_cache, v_cache, tables, query_start, context_lens, scale),
                               atol=tol, rtol=tol)


def test_attention_kernel_rejects_bad_input():
    q = torch.randn(2, 4, 24)
    cache = torch.randn(2, 8, 16, 24)
    tables, starts, lens = torch.zeros(2, 1, dtype=torch.long), torch.arange(3), torch.ones(2, dtype=torch.long)
    with pytest.raises(RuntimeError, match="head_dim 24"):
        paged_attention(q, cache, cache, tables, starts, lens, 1.0)
    small = cache[..., :16].contiguous()
    with pytest.raises(RuntimeError, match="int64"):
        paged_attention(q[..., :16], small, small, tables.int(), starts, lens, 1.0)
    with pytest.raises(RuntimeError, match="one more query start"):
        paged_attention(q[..., :16], small, small, tables, starts[:2], lens, 1.0)
