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


@pytest.mark.parametrize("method", ["fp8", "bitsandbytes", "compressed-tensors"])  # AWQ / GPTQ: test_awq_gptq.py
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
        llm = LLM(tiny_models["qwen3"], dtype="float32", max_model_len=64, max_seq_len_to_capture=8, trust_remote_code=True,
                  swap_space=4, disable_log_stats=True, kv_cache_dtype="auto", kv_cache_memory=1 << 20)
    assert "max_seq_len_to_capture=8 has no effect" in caplog.text and "swap_space=4 has no effect" in caplog.text
    llm.shutdown()
    with pytest.raises(ValueError, match="unknown engine argument"):
        LLM(tiny_models["qwen3"], enable_lora=True)


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory) -> str:
    """A tiny Qwen3-MoE: 8 experts, 2 per token, renormalised routing, no shared expert."""
    return _save_tiny(str(tmp_path_factory.mktemp("moe") / "qwen3_moe"), "qwen3_moe", num_experts=8,
                      num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)


@pytest.mark.parametrize("tp", [1, 2])
def test_qwen3_moe_matches_hf(moe_model, tp):
    check_greedy_against_hf(moe_model, random_prompts(5, 10, 70, seed=13), 10, max_model_len=256,
                            tensor_parallel_size=tp, max_num_seqs=3)


def test_qwen3_moe_plan_counts_total_and_active_parameters(moe_model):
    from tests.helpers import plan_for

    llm = LLM(moe_model, dtype="float32", max_model_len=128, kv_cache_memory=1 << 20)
    plan = plan_for(moe_model, dtype="float32", max_model_len=128)
    assert plan["devices"][0]["weight_bytes"] == llm.engine.executor.weight_bytes()[0]  # what the engine holds
    per_layer_experts = 8 * 3 * 32 * 64
    assert plan["parameters"] - plan["active_parameters"] == 2 * per_layer_experts * 6 // 8  # 6 of 8 experts idle
    assert plan["kv_cache"]["bytes_per_token"] == 2 * 2 * 2 * 16 * 4  # K and V x layers x kv heads x dim x fp32
    llm.shutdown()


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_qwen3_moe_experts_quantize_too(moe_model, quantization):
    """--quantization stores the routed experts quantized as well (the planner counts them so; the router stays in
    floats), and computes what a float model of the dequantized weights computes."""
    from pagedllm.layers.quantization import dequantize, quantize
    from pagedllm.quant_config import RTN_SCHEMES
    from tests.helpers import plan_for

    llm = LLM(moe_model, dtype="float32", quantization=quantization, max_model_len=128, kv_cache_memory=1 << 20)
    mlp = llm.engine.executor.driver.runner.model.model.layers[0].mlp
    assert mlp.experts.w13_weight.dtype == mlp.experts.w2_weight.dtype == (torch.int8 if quantization == "int8" else torch.uint8)
    assert mlp.gate.weight.dtype == torch.float32
    plan = plan_for(moe_model, quantization=quantization, dtype="float32", max_model_len=128)
    assert plan["devices"][0]["weight_bytes"] == llm.engine.executor.weight_bytes()[0]
    ref = LLM(moe_model, dtype="float32", max_model_len=128, kv_cache_memory=1 << 20)
    linear, table = RTN_SCHEMES[quantization]
    for name, param in ref.engine.executor.driver.runner.model.named_parameters():
        if param.dim() < 2 or name.endswith("mlp.gate.weight"):
            continue
        fmt = table if "embed_tokens" in name or "lm_head" in name else linear
        rows = [dequantize(*quantize(w, fmt), torch.float32) for w in param.data.view(-1, *param.shape[-2:])]
        param.data.copy_(torch.stack(rows).view(param.shape))
    tokens = [5, 17, 300, 4000, 22, 9]
    torch.testing.assert_close(llm.engine.score(tokens), ref.engine.score(tokens), atol=1e-3, rtol=1e-3)
    for engine in (llm, ref):
        engine.shutdown()


def _gguf_writer(hf_folder: str, path: str, arch: str):
    """A GGUFWriter holding the checkpoint's metadata as llama.cpp's converter writes it, and the embedded model's
    tokenizer (the tiny checkpoints borrow it); and the checkpoint's config."""
    from gguf import GGUFReader, GGUFWriter

    from pagedllm.model_loader.resolve import embedded_gguf_path

    config = json.load(open(os.path.join(hf_folder, "config.json")))
    tok = GGUFReader(embedded_gguf_path()).fields
    w = GGUFWriter(path, arch)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_key_length(config["head_dim"])
    w.add_rope_freq_base(config.get("rope_theta") or config.get("rope_parameters", {}).get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_vocab_size(config["vocab_size"])
    if config.get("num_local_experts"):  # transformers' name for num_experts
        w.add_expert_count(config["num_local_experts"])
        w.add_expert_used_count(config["num_experts_per_tok"])
        w.add_expert_feed_forward_length(config["moe_intermediate_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tok["tokenizer.ggml.tokens"].contents())
    w.add_token_types(tok["tokenizer.ggml.token_type"].contents())
    w.add_token_merges(tok["tokenizer.ggml.merges"].contents())
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    return w, config


def _gguf_name(name: str) -> str:
    from pagedllm.model_loader.gguf_convert import _GLOBAL_TENSORS, _LAYER_TENSORS

    to_gguf = {v: k for k, v in {**_LAYER_TENSORS, **_GLOBAL_TENSORS}.items()}
    base, suffix = name.rsplit(".", 1)
    if base.startswith("model.layers."):
        _, _, i, part = base.split(".", 3)
        return f"blk.{i}.{to_gguf[part]}.{suffix}"
    return f"{to_gguf[base]}.{suffix}"


def _close(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _write_llama_gguf(hf_folder: str, path: str, factors: list[float]) -> None:
    """Llama as llama.cpp's converter writes it: Q and K rows permuted for its rotary layout, Llama 3's scaling as a
    rope_freqs tensor."""
    import numpy as np
    from safetensors.torch import load_file

    w, config = _gguf_writer(hf_folder, path, "llama")
    for name, t in load_file(os.path.join(hf_folder, "model.safetensors")).items():
        heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
        n = next((h for key, h in heads.items() if key in name), None)
        if n is not None:  # llama.cpp's layout: each head's rotary halves interleaved
            t = t.reshape(n, 2, t.shape[0] // n // 2, -1).transpose(1, 2).reshape(t.shape)
        w.add_tensor(_gguf_name(name), t.float().numpy())
    w.add_tensor("rope_freqs.weight", np.asarray(factors, dtype=np.float32))
    _close(w)


def _write_qwen3_moe_gguf(hf_folder: str, path: str, ref_folder: str, expert_types: dict[str, object]) -> None:
    """Qwen3-MoE as llama.cpp writes it: each layer's experts stacked [experts, N, K] per part (quantized to
    expert_types[part]), the router as ffn_gate_inp; and, in ref_folder, the HF checkpoint of the weights it encodes."""
    import re
    import shutil

    import numpy as np
    from gguf.quants import dequantize, quantize
    from safetensors.torch import load_file, save_file

    w, config = _gguf_writer(hf_folder, path, "qwen3moe")
    tensors = load_file(os.path.join(hf_folder, "model.safetensors"))
    stacks: dict[tuple[str, str], list] = {}
    for name, t in tensors.items():
        if (m := re.match(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight", name)) is not None:
            stacks.setdefault((m.group(1), m.group(3)), []).append((int(m.group(2)), name))
        else:
            w.add_tensor(_gguf_name(name), t.float().numpy())
    for (layer, part), experts in stacks.items():
        names = [name for _, name in sorted(experts)]
        qtype = expert_types[part]
        data = quantize(torch.stack([tensors[n] for n in names]).float().numpy(), qtype)
        gguf_part = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}[part]
        w.add_tensor(f"blk.{layer}.{gguf_part}.weight", data, raw_shape=data.shape, raw_dtype=qtype)
        for n, values in zip(names, np.asarray(dequantize(data, qtype), dtype=np.float32)):
            tensors[n] = torch.from_numpy(values.copy())
    _close(w)
    shutil.copytree(hf_folder, ref_folder)
    save_file(tensors, os.path.join(ref_folder, "model.safetensors"))


def test_a_llama3_gguf_with_rope_freqs_matches_hf(rope_models, tmp_path, monkeypatch):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    monkeypatch.setenv("PAGEDLLM_CACHE", str(tmp_path / "cache"))  # its conversion lands here
    folder = rope_models["llama3"]
    hf_freqs, _ = ROPE_INIT_FUNCTIONS["llama3"](AutoConfig.from_pretrained(folder), torch.device("cpu"))
    default = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    path = str(tmp_path / "llama3.gguf")
    _write_llama_gguf(folder, path, (default / hf_freqs).tolist())
    prompts = random_prompts(3, 20, 80, seed=14)
    from tests.helpers import HFReference, assert_greedy_match

    hf = HFReference(folder)
    with LLM(path, dtype="float32", max_model_len=256) as llm:
        assert llm.engine.config.model.rope_type == "freq_factors"
        from pagedllm import SamplingParams

        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
        for out, p in zip(outs, prompts):
            assert_greedy_match(out.outputs[0].token_ids, *hf.greedy(p, 10))


@pytest.mark.parametrize("down", ["Q4_0", "Q8_0"])
def test_a_qwen3_moe_gguf_runs_its_experts_quantized(moe_model, tmp_path, monkeypatch, down):
    """A Qwen3-MoE GGUF file (qwen3moe: stacked experts, the router as ffn_gate_inp): the experts load in their own
    values, gate / up in one format and down in its own (Q4_1 gate / up stay 4-bit beside a Q4_0 down, and beside a
    Q8_0 one in int8, as a Q4_K_M file's Q4_K gate / up beside its Q6_K down), the router stays in floats, HF's
    greedy tokens of the weights the file encodes, and planner bytes = engine bytes."""
    from gguf import GGMLQuantizationType

    from pagedllm import SamplingParams
    from tests.helpers import HFReference, assert_greedy_match, plan_for

    monkeypatch.setenv("PAGEDLLM_CACHE", str(tmp_path / "cache"))
    path, ref = str(tmp_path / "moe.gguf"), str(tmp_path / "ref")
    q = GGMLQuantizationType
    _write_qwen3_moe_gguf(moe_model, path, ref, {"gate_proj": q.Q4_1, "up_proj": q.Q4_1, "down_proj": q[down]})
    prompts = random_prompts(3, 10, 40, seed=15)
    hf = HFReference(ref)
    # fp32 activations beside the GGUF's own quantization (--dtype alone would dequantize it at load)
    with LLM(path, dtype="float32", quantization="gguf", max_model_len=256, kv_cache_memory=2 << 20) as llm:
        mlp = llm.engine.executor.driver.runner.model.model.layers[1].mlp
        assert mlp.experts.w13_weight.dtype == torch.uint8
        assert mlp.experts.w2_weight.dtype == (torch.uint8 if down == "Q4_0" else torch.int8)
        assert mlp.gate.weight.dtype == torch.float32
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
        for out, p in zip(outs, prompts):
            assert_greedy_match(out.outputs[0].token_ids, *hf.greedy(p, 10), tie_tol=1e-2)  # scales rounded to fp16
        plan = plan_for(path, dtype="float32", quantization="gguf", max_model_len=256)
        assert plan["devices"][0]["weight_bytes"] == llm.engine.executor.weight_bytes()[0]
