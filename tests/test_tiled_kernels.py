"""Quantized weights tiled for int8 dot products (kernels/csrc/quant_gemv_tiled.h): the decode GEMV on int8
activations against the same arithmetic in float64, batches against the untiled kernels, and a model that runs so."""

import pytest
import torch

from pagedllm import kernels
from pagedllm.layers import quantization as quant
from pagedllm.quant_config import QuantFormat

pytestmark = pytest.mark.skipif(not (kernels.load_cpu_ops() and kernels.tiled_weights_supported()),
                                reason="this CPU has no int8 dot products (AVX512-VNNI, or AVX2) for the tiled kernels")

# AVX2 builds multiply tiled weights with int8 activations at every batch size; AVX-512 ones up to 8 rows (then in bf16)
INT8_BATCHES = torch.backends.cpu.get_cpu_capability() == "AVX2"
FORMATS = {"int8 per row": (8, None, False), "Q8_0": (8, 32, False), "Q5_K": (8, 32, True), "Q4_1": (4, 32, True),
           "4-bit g128": (4, 128, False)}


def quantized(fmt: str, n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return quant.quantize(torch.randn(n, k, generator=g), QuantFormat(*FORMATS[fmt]))


def int8_activations_reference(x: torch.Tensor, values, scale, offset) -> torch.Tensor:
    """x quantized per 16 values (d = max |x| / 127, q = x * (127 / max |x|) rounded to even, in fp32) times the
    dequantized weights in float64; the offsets take x's exact group sums."""
    m, k = x.shape
    blocks = x.float().view(m, k // 16, 16)
    amax = blocks.abs().amax(-1, keepdim=True)
    q = torch.round(blocks * torch.where(amax > 0, 127 / amax, torch.zeros(()))).clamp(-127, 127)
    xq = (q.double() * (amax / 127).double()).view(m, k)
    y = xq @ quant.dequantize(values, scale, None, torch.float64).T
    if offset is not None:
        y += x.double().view(m, scale.shape[1], -1).sum(-1) @ offset.double().T
    return y


def test_tiling_is_a_permutation_of_words():
    values, scale, offset = quantized("Q4_1", 48, 128)
    tiled = quant.tile(values, scale, offset)
    assert tiled[0].shape == (3, 16, 64) and tiled[1].shape == (3, 4, 16)
    assert tiled[0].view(torch.int32)[1, 5, 7] == values.view(torch.int32)[16 + 7, 5]  # word 5 of row 23
    for a, b in zip(quant.untile(*tiled), (values, scale, offset)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [1, 3, 8, 21])
@pytest.mark.parametrize("k", [128, 384])
def test_the_gemv_is_int8_activations_times_the_weights(fmt, rows, k):
    """fp32 activations, so that only the kernel's fp32 sums differ from float64; with bias."""
    if rows > 8 and not INT8_BATCHES:
        pytest.skip("AVX-512 builds multiply over 8 rows in bf16")
    values, scale, offset = quantized(fmt, 48, k)
    g = torch.Generator().manual_seed(1)
    x, bias = torch.randn(rows, k, generator=g), torch.randn(48, generator=g)
    v, s, o = quant.tile(values, scale, offset)
    got = kernels.linear(x, v, bias, s, o)
    want = int8_activations_reference(x, values, scale, offset) + bias.double()
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["Q4_1", "Q8_0"])
def test_each_row_is_computed_alone(fmt):
    """A row's result does not depend on the rows beside it (a verifying step's tokens equal their decodes)."""
    values, scale, offset = quantized(fmt, 96, 256)
    v, s, o = quant.tile(values, scale, offset)
    rows = 19 if INT8_BATCHES else 8
    x = torch.randn(rows, 256).bfloat16()
    together = kernels.linear(x, v, None, s, o)
    for r in range(rows):
        assert torch.equal(kernels.linear(x[r:r + 1], v, None, s, o), together[r:r + 1])


@pytest.mark.skipif(INT8_BATCHES, reason="AVX2 builds multiply batches with int8 activations (tested above)")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [9, 40])
def test_batches_multiply_as_with_untiled_weights(fmt, rows):
    """Over 8 rows the tiled weights are dequantized for the matrix product exactly as untiled ones are (bf16 rows,
    and fp32 ones through the generic dequantization)."""
    values, scale, offset = quantized(fmt, 80, 256)
    x, bias = torch.randn(rows, 256).bfloat16(), torch.randn(80).bfloat16()
    v, s, o = quant.tile(values, scale, offset)
    assert torch.equal(kernels.linear(x, v, bias, s, o), kernels.linear(x, values, bias, scale, offset))
    assert torch.equal(kernels.linear(x.float(), v, None, s, o), kernels.linear(x.float(), values, None, scale, offset))


def test_embedding_rows_read_from_tiled_tables():
    values, scale, offset = quantized("Q8_0", 64, 128)
    table, tiled = torch.nn.Module(), torch.nn.Module()
    for module, tensors in ((table, (values, scale, offset)), (tiled, quant.tile(values, scale, offset))):
        for name, t in zip(("weight", "weight_scale", "weight_offset"), tensors):
            if t is not None:
                setattr(module, name, torch.nn.Parameter(t, requires_grad=False))
    ids = torch.tensor([[0, 17, 63], [5, 5, 40]])
    assert torch.equal(quant.embed(tiled, ids, torch.bfloat16), quant.embed(table, ids, torch.bfloat16))


def test_a_quantized_bf16_model_runs_tiled(tiny_models, monkeypatch):
    """With PAGEDLLM_INT8_ACTIVATIONS=1, int4 linear layers and the int8 embedding / LM head are tiled in a bf16
    model; a prompt computed in one step gives the logits of the untiled model (the default for round-to-nearest
    weights) exactly where batches multiply in bf16 (AVX-512 builds), nearly where in int8 (AVX2), and decode steps
    nearly."""
    from pagedllm import LLM

    monkeypatch.setenv("PAGEDLLM_INT8_ACTIVATIONS", "1")
    tokens = list(range(3, 40))

    def scores():
        llm = LLM(tiny_models["qwen3"], dtype="bfloat16", quantization="int4", max_model_len=256)
        model = llm.engine.executor.driver.runner.model
        out = (llm.engine.score(tokens), llm.engine.score(tokens, step_tokens=1), model)
        llm.shutdown()
        return out

    prefill, decode, model = scores()
    assert model.model.layers[0].mlp.gate_up_proj.weight.dim() == 3 and model.lm_head.weight.dim() == 3
    monkeypatch.delenv("PAGEDLLM_INT8_ACTIVATIONS")
    plain_prefill, plain_decode, plain = scores()
    assert plain.lm_head.weight.dim() == 2
    monkeypatch.setenv("PAGEDLLM_INT8_ACTIVATIONS", "yes")
    with pytest.raises(ValueError, match="PAGEDLLM_INT8_ACTIVATIONS must be one of auto, 1, 0"):
        scores()
    assert INT8_BATCHES or torch.equal(prefill, plain_prefill)
    for tiled_scores, plain_scores in ((prefill, plain_prefill), (decode, plain_decode)):
        assert torch.nn.functional.cosine_similarity(tiled_scores.float(), plain_scores.float(), dim=-1).min() > 0.99


def test_gguf_checkpoints_take_int8_activations_by_default(monkeypatch):
    """The embedded GGUF model, as vLLM's GGUF kernels and llama.cpp run such files (AWQ / GPTQ / RTN weights do not,
    above); its decode steps on real text stay close to bf16 activations' (`bench quantization` measures the
    accuracy against bf16 weights)."""
    from pagedllm import LLM

    text = ("A library is more than a room full of books. For many towns it is the one warm place where anyone may "
            "sit for an afternoon without buying anything.")
    scores = []
    for setting in ("auto", "0"):
        monkeypatch.setenv("PAGEDLLM_INT8_ACTIVATIONS", setting)
        with LLM(max_model_len=256) as llm:
            model = llm.engine.executor.driver.runner.model
            assert (model.lm_head.weight.dim() == 3) == (setting == "auto")
            assert (model.model.layers[0].self_attn.qkv_proj.weight.dim() == 3) == (setting == "auto")
            scores.append(llm.engine.score(llm.get_tokenizer().encode(text), step_tokens=1).float())
    int8, bf16 = scores
    # measured on these 31 positions: top-1 agreement 97 %, cosine mean 0.998, min 0.983 (with activation scales
    # per 32 values instead of 16: 81 %, 0.9965, 0.949)
    assert (int8.argmax(-1) == bf16.argmax(-1)).float().mean() > 0.85
    cosine = torch.nn.functional.cosine_similarity(int8, bf16, dim=-1)
    assert cosine.mean() > 0.99 and cosine.min() > 0.95


def test_a_gguf_file_requantized_keeps_bf16_activations():
    """What decides is the method the engine runs (round-to-nearest here), not the checkpoint's."""
    from pagedllm import LLM

    with LLM(quantization="int8", max_model_len=256) as llm:
        assert llm.engine.executor.driver.runner.model.lm_head.weight.dim() == 2
