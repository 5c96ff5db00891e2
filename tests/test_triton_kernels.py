"""The Triton kernels (GPU attention backend) against the torch reference, on the CPU under TRITON_INTERPRET=1
(conftest sets it where there is no GPU) and natively on CUDA: fp32 and bf16, GQA ratios 1, 2, 3 and 8, block sizes
16 and 32, prompt chunks after a cached prefix beside decodes, decodes of 1 to 4,000 tokens, split-KV."""

from __future__ import annotations

import pytest
import torch

triton_attention = pytest.importorskip("pagedllm.kernels.triton_attention")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _pool(kv_heads: int, num_blocks: int, block_size: int, d: int, dtype, g):
    shape = (kv_heads, num_blocks, block_size, d)
    return (torch.randn(shape, generator=g).to(dtype).to(DEVICE), torch.randn(shape, generator=g).to(dtype).to(DEVICE))


def _reference(q, k_cache, v_cache, tables, query_start, context_lens, scale):
    """Each sequence's keys and values gathered through its table; causal, in fp32."""
    out = torch.empty_like(q)
    group = q.shape[1] // k_cache.shape[0]
    bs = k_cache.shape[2]
    for b in range(len(context_lens)):
        a, e, ctx = int(query_start[b]), int(query_start[b + 1]), int(context_lens[b])
        blocks = tables[b, :-(-ctx // bs)]
        k = k_cache[:, blocks].reshape(k_cache.shape[0], -1, k_cache.shape[3])[:, :ctx].float()
        v = v_cache[:, blocks].reshape(v_cache.shape[0], -1, v_cache.shape[3])[:, :ctx].float()
        qs = q[a:e].float().transpose(0, 1)  # [heads, n, D]
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        scores = qs @ k.transpose(1, 2) * scale
        pos = torch.arange(ctx - (e - a), ctx, device=q.device)
        scores = scores.masked_fill(torch.arange(ctx, device=q.device)[None, :] > pos[:, None], float("-inf"))
        out[a:e] = (scores.softmax(-1) @ v).transpose(0, 1).to(q.dtype)
    return out


def _batch(q_lens, ctx_lens, heads, kv_heads, d, block_size, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-c // block_size) for c in ctx_lens) + 3
    k_cache, v_cache = _pool(kv_heads, num_blocks, block_size, d, dtype, g)
    perm = torch.randperm(num_blocks, generator=g)  # scattered blocks, as after a while of serving
    width = max(-(-c // block_size) for c in ctx_lens)
    tables, used = torch.zeros(len(ctx_lens), width, dtype=torch.int32), 0
    for i, c in enumerate(ctx_lens):
        n = -(-c // block_size)
        tables[i, :n] = perm[used:used + n]
        used += n
    q = torch.randn(sum(q_lens), heads, d, generator=g).to(dtype).to(DEVICE)
    query_start = torch.tensor([0, *torch.cumsum(torch.tensor(q_lens), 0).tolist()], dtype=torch.int32)
    return q, k_cache, v_cache, tables.to(DEVICE), query_start.to(DEVICE), torch.tensor(ctx_lens, dtype=torch.int32).to(DEVICE)


CASES = {  # name: (query tokens per sequence, context lengths)
    "decodes": ([1, 1, 1], [1, 17, 40]),
    "chunk_after_prefix_beside_decodes": ([1, 1, 7, 20], [9, 33, 30, 20]),
    "long_decode": ([1], [4000]),
}


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2), (6, 2), (8, 1)])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("case", list(CASES))
def test_paged_attention_matches_torch(case, block_size, heads, kv_heads, dtype, tol):
    if case == "long_decode" and (dtype != torch.float32 or heads != 8 or block_size != 16):
        pytest.skip("one long case: the interpreter runs each block's loop iteration in numpy")
    q_lens, ctx_lens = CASES[case]
    args = _batch(q_lens, ctx_lens, heads, kv_heads, 16, block_size, dtype)
    want = _reference(*args, scale=0.25)
    for splits in (1, 4):
        got = triton_attention.paged_attention(*args, scale=0.25, splits=splits)
        assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol), (splits, (got.float() - want.float()).abs().max())


def test_reshape_and_cache_writes_the_slots():
    g = torch.Generator().manual_seed(1)
    k_cache, v_cache = (torch.zeros(2, 5, 16, 16, device=DEVICE) for _ in range(2))
    key, value = (torch.randn(4, 2, 16, generator=g).to(DEVICE) for _ in range(2))
    slots = torch.tensor([3, 17, 18, 79], device=DEVICE)
    triton_attention.reshape_and_cache(key, value, k_cache, v_cache, slots)
    for i, s in enumerate(slots.tolist()):
        assert torch.equal(k_cache[:, s // 16, s % 16], key[i]) and torch.equal(v_cache[:, s // 16, s % 16], value[i])
    assert int((k_cache != 0).any(-1).sum()) == 4 * 2


def test_engine_on_the_triton_backend_gives_hf_tokens(tiny_models, monkeypatch):
    """The whole engine with attention in the Triton kernels (interpreted on the CPU): prompts sharing a cached
    prefix, chunked prefill beside decodes."""
    from tests.helpers import check_greedy_against_hf, random_prompts

    monkeypatch.setenv("PAGEDLLM_ATTENTION_BACKEND", "triton")
    prefix = random_prompts(1, 40, 41, seed=7)[0]
    prompts = [prefix + p for p in random_prompts(3, 5, 30, seed=8)]
    calls = []
    monkeypatch.setattr(triton_attention, "paged_attention", lambda *a, _f=triton_attention.paged_attention, **k:
                        calls.append(1) or _f(*a, **k))
    check_greedy_against_hf(tiny_models["qwen3"], prompts, 6, max_model_len=128, kv_cache_memory=1 << 20,
                            max_num_batched_tokens=32)
    assert calls  # attention ran in the Triton kernel


def test_the_triton_backend_explains_where_it_runs(tiny_models, monkeypatch):
    from pagedllm import LLM

    monkeypatch.setenv("PAGEDLLM_ATTENTION_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="runs on CUDA"):
        LLM(tiny_models["qwen3"], kv_cache_memory=1 << 20)


def test_long_contexts_with_few_queries_are_split():
    assert triton_attention.kv_splits(programs=4, max_context=4000) == 4  # keys of 500+ each, 16 programs
    assert triton_attention.kv_splits(programs=4, max_context=600) == 1  # too short to split
    assert triton_attention.kv_splits(programs=512, max_context=100_000) == 1  # the GPU is busy already


def test_padded_rows_write_nothing():
    """A CUDA graph's padded rows carry slot -1."""
    k_cache, v_cache = (torch.zeros(1, 2, 16, 16, device=DEVICE) for _ in range(2))
    key = torch.ones(2, 1, 16, device=DEVICE)
    triton_attention.reshape_and_cache(key, key, k_cache, v_cache, torch.tensor([5, -1], device=DEVICE))
    assert int((k_cache != 0).any(-1).sum()) == 1 and bool((k_cache[0, 0, 5] == 1).all())


def test_cuda_graph_sizes_follow_vllm_and_stay_off_elsewhere(tiny_models):
    from pagedllm.engine.arg_utils import EngineArgs
    from pagedllm.worker.cuda_graphs import graph_sizes

    assert graph_sizes(20) == (1, 2, 4, 8, 16, 20) and graph_sizes(3) == (1, 2, 3)
    assert EngineArgs(model=tiny_models["qwen3"], device="cpu").create_engine_config().cuda_graph_sizes == ()
