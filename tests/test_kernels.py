"""The native CPU decode-attention kernel against attention computed in float64 from gathered K/V."""

import pytest
import torch

from pagedllm.kernels import load_cpu_ops, paged_decode_attention

pytestmark = pytest.mark.skipif(not load_cpu_ops(), reason="native CPU kernels could not be built here")


def reference(q, k_cache, v_cache, tables, lens, scale):
    kv_heads, _, block_size, head_dim = k_cache.shape
    group = q.shape[1] // kv_heads
    out = []
    for b, n in enumerate(lens.tolist()):
        blocks = tables[b, :-(-n // block_size)]
        k = k_cache[:, blocks].reshape(kv_heads, -1, head_dim)[:, :n].double().repeat_interleave(group, 0)
        v = v_cache[:, blocks].reshape(kv_heads, -1, head_dim)[:, :n].double().repeat_interleave(group, 0)
        probs = (q[b].double()[:, None, :] @ k.transpose(1, 2) * scale).softmax(-1)
        out.append((probs @ v)[:, 0])
    return torch.stack(out)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("head_dim,heads,kv_heads", [(16, 4, 2), (64, 9, 3), (128, 16, 8), (64, 4, 4)])
def test_decode_kernel_matches_reference(dtype, tol, head_dim, heads, kv_heads):
    g = torch.Generator().manual_seed(0)
    block_size, num_blocks = 16, 200
    lens = torch.tensor([1, 15, 16, 17, 100, 333])
    width = -(-int(lens.max()) // block_size)
    tables = torch.randperm(num_blocks, generator=g)[:len(lens) * width].view(len(lens), width)
    k_cache = torch.randn(kv_heads, num_blocks, block_size, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(kv_heads, num_blocks, block_size, head_dim, generator=g).to(dtype)
    q = torch.randn(len(lens), heads, head_dim, generator=g).to(dtype)
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, head_dim ** -0.5)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), reference(q, k_cache, v_cache, tables, lens, head_dim ** -0.5),
                               atol=tol, rtol=tol)


def test_decode_kernel_rejects_bad_input():
    q = torch.randn(2, 4, 24)
    cache = torch.randn(2, 8, 16, 24)
    with pytest.raises(RuntimeError, match="head_dim 24"):
        paged_decode_attention(q, cache, cache, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, dtype=torch.long), 1.0)
    with pytest.raises(RuntimeError, match="int64"):
        paged_decode_attention(q[..., :16], cache[..., :16].contiguous(), cache[..., :16].contiguous(),
                               torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, dtype=torch.long), 1.0)
