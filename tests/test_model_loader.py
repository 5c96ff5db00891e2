"""Finding a model's files (GGUF conversions cached by content) and load_format="dummy" (vLLM's name): random
weights from a config alone, for benchmarks of model shapes."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.memory.catalog import builtin_config
from pagedllm.model_loader.resolve import _cache_folder, resolve_model
from tests.helpers import assert_pool_empty


def _config_only(src: str, dst: str) -> str:
    os.makedirs(dst)
    shutil.copy(os.path.join(src, "config.json"), dst)
    return dst


def test_dummy_weights_need_no_checkpoint_and_follow_the_seed(tiny_models, tmp_path):
    folder = _config_only(tiny_models["qwen3"], str(tmp_path / "config-only"))
    with pytest.raises(ValueError, match="safetensors"):
        LLM(folder, dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engines = [LLM(folder, load_format="dummy", dtype="float32", seed=seed, max_model_len=128) for seed in (0, 0, 1)]
    weights = [next(e.engine.executor.driver.runner.model.parameters()) for e in engines]
    assert weights[0].abs().max() <= 1e-3 and weights[0].equal(weights[1]) and not weights[0].equal(weights[2])
    out = engines[0].generate({"prompt_token_ids": [3, 4, 5]}, params, use_tqdm=False)[0].outputs[0].token_ids
    assert len(out) == 8
    assert_pool_empty(engines[0])

def test_builtin_name_resolves_to_its_config(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDLLM_CACHE", str(tmp_path))
    folder = resolve_model("qwen3-0.6b", "dummy")
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f) == builtin_config("qwen3-0.6b")
    with pytest.raises(ValueError, match="load-format dummy"):
        resolve_model("qwen3-0.6b")  # real weights of a built-in name are nowhere on disk
    with pytest.raises(ValueError, match="load_format"):
        EngineArgs(load_format="npcache").validate()


def test_gguf_conversion_is_cached_by_content(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDLLM_CACHE", str(tmp_path / "cache"))
    data = os.urandom(3 << 20)
    a, b, c = (tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf", tmp_path / "c" / "m.gguf")
    for path, content in ((a, data), (b, data), (c, data[:-1] + bytes([data[-1] ^ 1]))):
        path.parent.mkdir()
        path.write_bytes(content)
    assert _cache_folder(str(a)) == _cache_folder(str(b))  # a reinstall or a copy reuses the conversion
    assert _cache_folder(str(a)) != _cache_folder(str(c))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_gguf_quantized_types_keep_their_values(qtype):
    """Each GGUF type pagedllm runs quantized, as its grouped format, dequantizes to what gguf-py's reference
    dequantizer gives: exactly for Q4_0 / Q4_1 / Q8_0 (bytes copied), within the fp16 rounding of the group scales
    for the k-quants. Random blocks (with finite fp16 super-scales) cover every bit of the layouts."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    from pagedllm.layers.quantization import dequantize
    from pagedllm.model_loader.gguf_quants import to_grouped

    t = GGMLQuantizationType[qtype]
    block, size = GGML_QUANT_SIZES[t]
    rows, k = 6, 512
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (rows, k // block * size), dtype=np.uint8)
    blocks = data.reshape(-1, size)
    halves = {"Q6_K": [size - 2]}.get(qtype, [0] if qtype in ("Q4_0", "Q8_0") else [0, 2])
    for at in halves:  # fp16 scales in a sane range (random bits would be inf / NaN)
        blocks[:, at:at + 2] = np.frombuffer(rng.uniform(0.001, 0.1, len(blocks)).astype(np.float16).tobytes(),
                                             np.uint8).reshape(-1, 2)
    want = torch.from_numpy(np.asarray(gguf_dequantize(data, t), dtype=np.float32)).reshape(rows, k)
    values, scale, offset, fmt = to_grouped(data, t, rows, k)
    got = dequantize(values, scale, offset, torch.float32)
    exact = qtype in ("Q4_0", "Q4_1", "Q8_0")
    # k-quants: each value off by at most the fp16 rounding (2^-11, relative) of its group's scale and offset
    torch.testing.assert_close(got, want, rtol=0, atol=0 if exact else 2 ** -10 * float(want.abs().max()))
    assert (fmt.bits, values.dtype) in ((4, torch.uint8), (8, torch.int8))
