"""Models users bring: every RoPE scaling type matches HF token for token (Llama 3's bands, YaRN with its attention
factor, linear, dynamic; alone and with tensor parallelism), the context they allow, llama.cpp's rope_freqs, vLLM's
engine arguments, and the refusal of checkpoints whose weights would load wrong."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch

from pagedllm import LLM
from tests.conftest import _save_tiny
from tests.helpers import check_greedy_against_hf, random_prompts

ROPES = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
}


@pytest.fixture(scope="module")
def rope_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("rope")
    models = {name: _save_tiny(str(root / name), "llama", rope_scaling=rope) for name, rope in ROPES.items()}
    models["qwen3-yarn"] = _save_tiny(str(root / "qwen3-yarn"), "qwen3", rope_scaling=ROPES["yarn"])
    return models


@pytest.mark.parametrize("name", [*ROPES, "qwen3-yarn"])
def test_rope_scaling_matches_hf(rope_models, name):
    check_greedy_against_hf(rope_models[name], random_prompts(4, 20, 90, seed=11), 12, max_model_len=256)


def test_rope_scaling_with_tensor_parallelism(rope_models):
    check_greedy_against_hf(rope_models["llama3"], random_prompts(3, 20, 60, seed=12), 8, max_model_len=256,
                            tensor_parallel_size=2)


def test_yarn_extends_the_context_as_vllm_does(rope_models):
    llm = LLM(rope_models["yarn"], dtype="float32", kv_cache_memory=4 << 20)
    assert llm.engine.config.max_model_len == 256 * 4  # original context x factor, beyond max_position_embeddings 512
    llm.shutdown()
    assert LLM(rope_models["llama3"], dtype="float32", kv_cache_memory=4 << 20).engine.config.max_model_len == 512


def test_llama_cpp_frequency_factors_are_llama3_scaling(rope_models):
    """llama.cpp stores Llama 3's scaling as a rope_freqs tensor of divisors; they give HF's frequencies."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from pagedllm.config import ModelConfig
    from pagedllm.layers.rotary import rope_frequencies

    cfg = ModelConfig.from_folder(rope_models["llama3"])
    default, _ = rope_frequencies(ModelConfig.from_hf_dict({**json.load(open(os.path.join(
        rope_models["llama3"], "config.json"))), "rope_scaling": None}))
    hf, _ = ROPE_INIT_FUNCTIONS["llama3"](AutoConfig.from_pretrained(rope_models["llama3"]), torch.device("cpu"))
    factors = (default / hf).tolist()
    gguf_style = ModelConfig.from_hf_dict({**json.load(open(os.path.join(rope_models["llama3"], "config.json"))),
                                           "rope_scaling": {"rope_type": "freq_factors", "factors": factors}})
    assert torch.allclose(rope_frequencies(gguf_style)[0], hf, rtol=1e-6)
    assert torch.allclose(rope_frequencies(cfg)[0], hf)


def _copy(src: str, dst, edit=None) -> str:
    dst = str(dst)
    shutil.copytree(src, dst)
    if edit:
        path = os.path.join(dst, "config.json")
        config = json.load(open(path))
        edit(config)
        json.dump(config, open(path, "w"))
    return dst


@pytest.mark.parametrize("method", ["fp8", "gptq", "awq"])
def test_quantized_checkpoints_are_refused_not_loaded_wrong(tiny_models, tmp_path, method):
    folder = _copy(tiny_models["qwen3"], tmp_path / method,
                   lambda c: c.update(quantization_config={"quant_method": method, "weight_block_size": [128, 128]}))
    with pytest.raises(ValueError, match=f"quantized with '{method}'"):
        LLM(folder, dtype="float32")


def test_a_tensor_the_model_does_not_know_is_an_error(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(tiny_models["qwen3"], tmp_path / "extra")
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.q_proj.weight_scale_inv"] = torch.ones(1, 1)  # an FP8 scale, no config
    save_file(tensors, path)
    with pytest.raises(ValueError, match="weight_scale_inv"):
        LLM(folder, dtype="float32")


def test_vllm_engine_arguments_without_effect_warn(tiny_models, caplog):
    with caplog.at_level(logging.WARNING, logger="pagedllm"):
        llm = LLM(tiny_models["qwen3"], dtype="float32", max_model_len=64, enforce_eager=True, trust_remote_code=True,
                  swap_space=4, disable_log_stats=True, kv_cache_dtype="auto", kv_cache_memory=1 << 20)
    assert "enforce_eager=True has no effect" in caplog.text and "swap_space=4 has no effect" in caplog.text
    llm.shutdown()
    with pytest.raises(ValueError, match="unknown engine argument"):
        LLM(tiny_models["qwen3"], enable_lora=True)
