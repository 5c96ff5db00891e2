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


# (queries, context) per sequence: decodes, a fresh prompt, chunks after a cached prefix, tile edges, a chunk
# spanning several key tiles of the prompt path
SEQS = [(1, 1), (1, 17), (1, 333), (40, 40), (16, 16), (17, 50), (5, 100), (33, 33), (130, 300)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("head_dim,heads,kv_heads", [(16, 4, 2), (64, 9, 3), (128, 16, 8), (64, 4, 4)])
@pytest.mark.parametrize("block_size", [16, 8])  # 8: a group of 16 keys spans two blocks
def test_attention_kernel_matches_reference(dtype, tol, head_dim, heads, kv_heads, block_size):
    check_attention(SEQS, dtype, tol, head_dim, heads, kv_heads, block_size)


# a step of few decodes: their keys are split into pieces across the threads and merged (flash-decoding)
@pytest.mark.parametrize("seqs", [[(1, 1000)], [(1, 700), (1, 129)]])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("block_size", [16, 8])
def test_attention_kernel_splits_few_long_decodes(seqs, dtype, tol, block_size):
    check_attention(seqs, dtype, tol, 64, 9, 3, block_size)


# a verifying step's chunk of k + 1 tokens beside other work: each token's row is bitwise the one it gets decoded
# alone, so speculative decoding's greedy tokens are those without it in bf16 too (short contexts, and long ones
# whose keys split into pieces)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (8, 8)])
@pytest.mark.parametrize("context", [40, 300, 1100])
def test_a_chunks_tokens_attend_as_their_decodes(dtype, heads, kv_heads, context):
    g = torch.Generator().manual_seed(context)
    head_dim, block_size, width = 64, 16, 80
    tables = torch.randperm(2 * width, generator=g)[:2 * width].view(2, width)
    k_cache, v_cache = (torch.randn(kv_heads, 2 * width, block_size, head_dim, generator=g).to(dtype) for _ in range(2))
    for tokens in (2, 4, 8):
        q = torch.randn(tokens + 1, heads, head_dim, generator=g).to(dtype)  # a decode of the other sequence first
        step = paged_attention(q, k_cache, v_cache, tables, torch.tensor([0, 1, tokens + 1]),
                               torch.tensor([500, context]), 0.125)
        for i in range(tokens):
            alone = paged_attention(q[1 + i:2 + i], k_cache, v_cache, tables[1:], torch.tensor([0, 1]),
                                    torch.tensor([context - tokens + 1 + i]), 0.125)
            assert torch.equal(step[1 + i], alone[0])


def check_attention(seqs, dtype, tol, head_dim, heads, kv_heads, block_size):
    g = torch.Generator().manual_seed(0)
    queries = torch.tensor([m for m, _ in seqs])
    context_lens = torch.tensor([n for _, n in seqs])
    query_start = torch.cat([torch.zeros(1, dtype=torch.long), queries.cumsum(0)])
    width = -(-int(context_lens.max()) // block_size)
    num_blocks = len(seqs) * width + 7
    tables = torch.randperm(num_blocks, generator=g)[:len(seqs) * width].view(len(seqs), width)
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


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_fused_layers_match_torch_path(dtype, tol, tokens):
    """Each layer's native forward against its torch forward (same module, same inputs); odd sizes test row tails."""
    from pagedllm.config import ModelConfig
    from pagedllm.layers.activation import SiluAndMul
    from pagedllm.layers.layernorm import RMSNorm
    from pagedllm.layers.rotary import RotaryEmbedding

    g = torch.Generator().manual_seed(0)
    x, residual = (torch.randn(tokens, 72, generator=g).to(dtype) for _ in range(2))
    norm = RMSNorm(72, 1e-5).to(dtype)
    norm.weight.data = torch.randn(72, generator=g).to(dtype)
    close = dict(atol=tol, rtol=tol)
    torch.testing.assert_close(norm.forward_native(x), norm.forward_torch(x), **close)
    want_x, want_res = norm.forward_torch(x, residual)
    got_x, got_res = norm.forward_native(x.clone(), residual.clone())
    torch.testing.assert_close(got_x, want_x, **close)
    torch.testing.assert_close(got_res, want_res, **close)

    gate_up = torch.randn(tokens, 2 * 40, generator=g).to(dtype)
    torch.testing.assert_close(SiluAndMul().forward_native(gate_up), SiluAndMul().forward_torch(gate_up), **close)

    rotary = RotaryEmbedding(ModelConfig.from_hf_dict({  # YaRN: scaled frequencies and cos / sin tables
        "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "head_dim": 16, "intermediate_size": 64, "max_position_embeddings": 512,
        "rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 256}}))
    positions = torch.randint(0, 512, (tokens,), generator=g)
    qkv = torch.randn(tokens, 3 * 2 * 16, generator=g).to(dtype)  # q, k, v of 2 heads each, as one projection
    def q_k(t):  # strided views into the projection, as the model passes them
        return t[:, :32].view(tokens, 2, 16), t[:, 32:64].view(tokens, 2, 16)

    want = rotary.forward_torch(positions, *q_k(qkv))
    got = rotary.forward_native(positions, *q_k(qkv.clone()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **close)


FORMATS = {"int8 per row": (8, None, False), "Q8_0": (8, 32, False), "Q6_K": (8, 16, False), "Q5_K": (8, 32, True),
           "Q4_1": (4, 32, True), "4-bit g128": (4, 128, False)}


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 4, 9, 40])
def test_linear_matches_matmul(dtype, tol, rows):
    """Float weights, for no rows, through the GEMV (up to 4 rows) and the matmul; 100 inputs leave a tail after the
    SIMD chunks (64 + 32 + 4 for bf16 dot products)."""
    from pagedllm.kernels import linear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 100, generator=g).to(dtype)
    w, bias = torch.randn(50, 100, generator=g).to(dtype), torch.randn(50, generator=g).to(dtype)
    torch.testing.assert_close(linear(x, w, bias).float(), (x.double() @ w.double().T + bias.double()).float(),
                               atol=tol * 10, rtol=tol)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows", [1, 2, 4, 6, 9, 40])
@pytest.mark.parametrize("k", [128, 160, 384])
def test_quantized_linear_matches_the_dequantized_matmul(fmt, dtype, tol, rows, k):
    """Every grouped format through the GEMVs (up to 4 rows: fp32 vectors, and AVX512-BF16 for 4-bit), torch's int8
    kernel (per-row int8 up to 16 rows) and the dequantized matmul, against the weights dequantized in fp64; 160
    inputs end in a lone 4-bit block."""
    from pagedllm.kernels import linear
    from pagedllm.layers.quantization import QuantFormat, quantize

    bits, group, offset = FORMATS[fmt]
    if group and k % group:
        pytest.skip("rows do not split into these groups")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, generator=g).to(dtype)
    w, bias = torch.randn(48, k, generator=g), torch.randn(48, generator=g).to(dtype)
    q, scale, off = quantize(w, QuantFormat(bits, group, offset))
    values = (q if bits == 8 else _unpack(q)).double().view(48, scale.shape[1], -1) * scale.double()[..., None]
    if off is not None:
        values += off.double()[..., None]
    want = x.double() @ values.view(48, k).T + bias.double()
    torch.testing.assert_close(linear(x, q, bias, scale, off).float(), want.float(), atol=tol * 10, rtol=tol)
    with pytest.raises(RuntimeError, match="need a scale"):
        linear(x, q, None)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [9, 13, 64])
@pytest.mark.parametrize("n", [16, 80, 200])
def test_quantized_matrix_product_matches_the_dequantized_weights(fmt, rows, n):
    """More rows than the GEMVs take, bf16: register tiles of 6 rows and a remainder, panels of 64 features and a
    partial one (80), a single vector (16), and 200 features (not whole vectors: the dequantized matmul)."""
    from pagedllm.kernels import linear
    from pagedllm.layers.quantization import QuantFormat, dequantize, quantize

    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, 256, generator=g).bfloat16()
    bias = torch.randn(n, generator=g).bfloat16()
    q, scale, off = quantize(torch.randn(n, 256, generator=g), QuantFormat(*FORMATS[fmt]))
    want = x.double() @ dequantize(q, scale, off, torch.bfloat16).double().T + bias.double()
    torch.testing.assert_close(linear(x, q, bias, scale, off).float(), want.float(), atol=0.2, rtol=2e-2)


def _unpack(q: torch.Tensor) -> torch.Tensor:
    """4-bit blocks of 32 by hand (byte j: value j low, value j + 16 high), independent of the code under test."""
    out = torch.empty(q.shape[0], q.shape[1] * 2, dtype=torch.uint8)
    for b in range(q.shape[1] // 16):
        block = q[:, 16 * b:16 * (b + 1)]
        out[:, 32 * b:32 * b + 16], out[:, 32 * b + 16:32 * (b + 1)] = block & 15, block >> 4
    return out


def test_reshape_and_cache_writes_each_token_at_its_slot():
    from pagedllm.kernels import reshape_and_cache

    g = torch.Generator().manual_seed(0)
    kv_heads, blocks, block_size, head_dim = 2, 6, 4, 16
    qkv = torch.randn(5, 3 * kv_heads * head_dim, generator=g).bfloat16()  # keys and values sliced from one projection
    key = qkv[:, kv_heads * head_dim:2 * kv_heads * head_dim].view(5, kv_heads, head_dim)
    value = qkv[:, 2 * kv_heads * head_dim:].view(5, kv_heads, head_dim)
    slots = torch.tensor([3, 9, 10, 22, 0])
    k_cache, v_cache = (torch.zeros(kv_heads, blocks, block_size, head_dim, dtype=torch.bfloat16) for _ in range(2))
    reshape_and_cache(key, value, k_cache, v_cache, slots)
    for cache, src in ((k_cache, key), (v_cache, value)):
        want = torch.zeros_like(cache).view(kv_heads, -1, head_dim).index_copy_(1, slots, src.transpose(0, 1))
        assert torch.equal(cache.view(kv_heads, -1, head_dim), want)


def test_kernels_refuse_out_of_range_indices():
    """A bad slot or position is an error, never a write or read outside the pool or the table."""
    from pagedllm.kernels import reshape_and_cache, rotary_embedding

    key, cache = torch.randn(2, 1, 16), torch.zeros(1, 2, 4, 16)
    with pytest.raises(RuntimeError, match="slot 8 outside the pool"):
        reshape_and_cache(key, key, cache, cache.clone(), torch.tensor([0, 8]))
    table = torch.randn(10, 8)
    with pytest.raises(RuntimeError, match="position 10 outside the table"):
        rotary_embedding(torch.tensor([10]), torch.randn(1, 2, 16), table, table)


@pytest.mark.parametrize("arch,dtype,quantization", [("qwen3", "float32", None), ("qwen2", "bfloat16", None),
                                                     ("llama", "bfloat16", "int8"), ("qwen3", "bfloat16", "int4")])
def test_fused_decoder_layers_match_the_module_path(tiny_models, arch, dtype, quantization, monkeypatch):
    """The one-call layer stack runs the same native kernels as the layers' modules do one by one: the same tokens and
    bit-identical log-probabilities, for q/k norms (Qwen3), QKV biases (Qwen2), int8 and int4 weights and tied
    embeddings."""
    from pagedllm import LLM, SamplingParams, kernels
    from pagedllm.models.decoder import DecoderModel
    from tests.helpers import random_prompts

    prompts = [{"prompt_token_ids": p} for p in random_prompts(4, 3, 40)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3)

    def generate():
        llm = LLM(tiny_models[arch], dtype=dtype, quantization=quantization, max_num_batched_tokens=32)
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(prompts, params, use_tqdm=False)]

    calls = []
    monkeypatch.setattr(kernels, "decoder_layers", lambda *args: calls.append(1) or torch.ops.pagedllm.decoder_layers(*args))
    fused = generate()
    assert calls
    monkeypatch.setattr(DecoderModel, "forward_native", DecoderModel.forward_torch)
    assert generate() == fused


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 7, 16, 100, 49157])
def test_argmax_kernel_matches_torch(dtype, n):
    """Greedy sampling's argmax is torch.argmax's: the first index of each row's maximum, with ties inside and across
    vector lanes and chains (integers), a maximum repeated into the tail, a row of -inf, a constant row."""
    from pagedllm import kernels

    x = torch.randn(5, n, generator=torch.Generator().manual_seed(n)).mul(4).to(dtype)
    x[1] = x[1].round()
    x[2, n // 2:] = x[2].max() + 1
    x[3], x[4] = float("-inf"), 0
    assert torch.equal(kernels.argmax(x), x.float().argmax(-1))


@pytest.mark.parametrize("bits,group,offset", [(4, 32, True), (4, 128, False), (8, 32, False), (8, None, False)])
@pytest.mark.parametrize("tiled", [False, True])
def test_quantized_embedding_kernel_gives_the_torch_rows(bits, group, offset, tiled):
    """The native lookup of a quantized table's rows (either layout) is bitwise the torch path's dequantization, in
    each dtype; an id outside the table is an error."""
    from pagedllm.layers import quantization as quant
    from pagedllm.quant_config import QuantFormat

    g = torch.Generator().manual_seed(0)
    tensors = quant.quantize(torch.randn(96, 256, generator=g) * 3, QuantFormat(bits, group, offset))
    table = torch.nn.Module()
    for name, t in zip(("weight", "weight_scale", "weight_offset"), quant.tile(*tensors) if tiled else tensors):
        if t is not None:
            setattr(table, name, torch.nn.Parameter(t, requires_grad=False))
    ids = torch.tensor([[0, 17, 95, 5], [5, 64, 40, 1]])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        table.native = False
        want = quant.embed(table, ids, dtype)
        table.native = True
        assert torch.equal(quant.embed(table, ids, dtype), want)
    with pytest.raises(RuntimeError, match="id 96 outside the table's 96 rows"):
        quant.embed(table, torch.tensor([3, 96]), torch.float32)


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512", reason="this CPU builds AVX2 kernels already")
def test_kernels_built_for_avx2_pass_too():
    """Most desktop CPUs have AVX2 but not AVX-512: the same tests, and the tiled kernels' (on AVX2 they multiply
    batches with int8 activations too), on kernels built for AVX2 (ATen's vector types at 8 lanes, 16 registers; no
    AVX512-BF16 dot products), in a process that torch runs at that capability."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    tiled = str(Path(__file__).with_name("test_tiled_kernels.py"))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, tiled, "-k", "not avx2"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
