"""AWQ and GPTQ checkpoints run in their own 4-bit (and GPTQ 8-bit) values: written here from a tiny model in each
format's packing (independently of the loader's unpacking), they give HF's greedy tokens on the float weights they
encode, tensor parallelism included, and the memory planner's bytes."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagedllm import LLM, SamplingParams
from pagedllm.quant_config import LAYER_LINEARS
from tests.conftest import _save_tiny
from tests.helpers import HFReference, assert_greedy_match, assert_pool_empty, plan_for, random_prompts

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's packing: nibble i of a word holds output column AWQ_ORDER[i]


def _pack(values: torch.Tensor, bits: int, order: list[int] | None = None) -> torch.Tensor:
    """[R, C] ints -> int32 [R, C * bits / 32], packing along C (value j of a word in bits j * bits, or the column
    order[j] of its 32 / bits)."""
    per = 32 // bits
    v = values.to(torch.int64).view(values.shape[0], -1, per)
    if order is not None:
        v = v[..., order]
    words = sum(v[..., j] << (bits * j) for j in range(per))
    return ((words + 2**31) % 2**32 - 2**31).to(torch.int32).contiguous()  # the same bits, as int32


def _quantize(w: torch.Tensor, bits: int, group: int, sym: bool):
    """w [N, K] -> q [K, N], zeros [groups, N], scales fp16 [groups, N], and the float weight they encode [N, K]."""
    n, k = w.shape
    g = w.t().reshape(-1, group, n)  # [groups, group, N]
    top = (1 << bits) - 1
    if sym:
        scales = (g.abs().amax(1) * 2 / top).half()
        zeros = torch.full_like(scales, 1 << (bits - 1), dtype=torch.int64)
    else:
        lo, hi = g.amin(1), g.amax(1)
        scales = ((hi - lo) / top).half()
        zeros = torch.round(-lo / scales.float()).clamp(1, top).to(torch.int64)
    q = torch.round(g / scales.float()[:, None]).to(torch.int64) + zeros[:, None]
    q = q.clamp(0, top)
    dequant = (scales.float()[:, None] * (q - zeros[:, None])).reshape(k, n).t()
    return q.reshape(k, n), zeros, scales, dequant.contiguous()


def _input_order(base: str, k: int, act_order: bool) -> torch.Tensor:
    """The order GPTQ quantized a layer's input features in: a random one under act-order, the same for the layers
    that share an input (q, k and v; gate and up)."""
    if not act_order:
        return torch.arange(k)
    module, proj = base.rsplit(".", 1)
    shared = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}
    return torch.randperm(k, generator=torch.Generator().manual_seed(sum(map(ord, module + shared.get(proj, proj)))))


def _write(src: str, dst: str, method: str, bits: int = 4, group: int = 32, sym: bool = False,
           checkpoint_format: str = "gptq", act_order: bool = False) -> str:
    """A copy of the float checkpoint at src quantized with `method` at dst, and at dst + "-ref" the float weights
    it encodes (for HF). With act_order, GPTQ's groups take the input features in a random order (g_idx says which
    group each feature is in)."""
    for folder in (dst, dst + "-ref"):
        shutil.copytree(src, folder)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    quantized, ref = {}, {}
    for name, t in tensors.items():
        base = name.removesuffix(".weight")
        if not any(base.endswith(m) for m in LAYER_LINEARS) and not re.search(r"experts\.\d+\.\w+_proj$", base):
            quantized[name] = ref[name] = t
            continue
        n, k = t.shape
        order = _input_order(base, k, act_order)
        back = torch.argsort(order)  # feature j is the back[j]-th quantized
        q, zeros, scales, ref_t = _quantize(t.float()[:, order], bits, group, sym)
        q, ref[name] = q[back], ref_t[:, back].contiguous()
        quantized[f"{base}.scales"] = scales
        if method == "awq":
            quantized[f"{base}.qweight"] = _pack(q, bits, AWQ_ORDER)
            quantized[f"{base}.qzeros"] = _pack(zeros, bits, AWQ_ORDER)
        else:
            quantized[f"{base}.qweight"] = _pack(q.t(), bits).t().contiguous()  # packed along the inputs
            stored = zeros - 1 if checkpoint_format == "gptq" else zeros
            quantized[f"{base}.qzeros"] = _pack(stored & ((1 << bits) - 1), bits)
            quantized[f"{base}.g_idx"] = (back // group).to(torch.int32)
    save_file(quantized, os.path.join(dst, "model.safetensors"))
    save_file(ref, os.path.join(dst + "-ref", "model.safetensors"))
    config_path = os.path.join(dst, "config.json")
    config = json.load(open(config_path))
    if method == "awq":
        config["quantization_config"] = {"quant_method": "awq", "bits": bits, "group_size": group,
                                         "zero_point": True, "version": "gemm"}
    else:
        config["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": sym,
                                         "desc_act": act_order, "checkpoint_format": checkpoint_format}
    json.dump(config, open(config_path, "w"))
    return dst


CASES = {  # name: (architecture, _write arguments)
    "awq": ("qwen3", dict(method="awq")),
    "awq-llama-tied": ("llama", dict(method="awq", group=64)),
    "gptq-sym": ("qwen3", dict(method="gptq", sym=True)),
    "gptq-v2-asym": ("llama", dict(method="gptq", checkpoint_format="gptq_v2")),
    "gptq-8bit": ("qwen3", dict(method="gptq", bits=8, sym=True)),
    "gptq-act-order": ("qwen3", dict(method="gptq", act_order=True)),
    "gptq-act-order-8bit-llama": ("llama", dict(method="gptq", bits=8, sym=True, act_order=True, group=64)),
    "gptq-moe": ("qwen3_moe", dict(method="gptq", sym=True)),  # every expert quantized, the router not
    "gptq-moe-act-order": ("qwen3_moe", dict(method="gptq", act_order=True)),  # a permutation per expert
    "awq-moe": ("qwen3_moe", dict(method="awq")),
}


@pytest.fixture(scope="module")
def quantized(tiny_models, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("awq_gptq")
    # experts of 64: two tensor-parallel shards of whole groups of 32
    sources = {**tiny_models, "qwen3_moe": _save_tiny(str(root / "moe-float"), "qwen3_moe", num_experts=8,
                                                      num_experts_per_tok=2, moe_intermediate_size=64)}
    return {name: _write(sources[arch], str(root / name), **args) for name, (arch, args) in CASES.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_checkpoint_gives_hf_tokens_of_the_weights_it_encodes(quantized, name):
    prompts = random_prompts(3, 10, 40, seed=5)
    hf = HFReference(quantized[name] + "-ref")
    llm = LLM(quantized[name], dtype="float32", max_model_len=256, kv_cache_memory=2 << 20)
    method = CASES[name][1]["method"]
    assert llm.engine.config.load.quantization == method  # detected, as vLLM does
    decoder = llm.engine.executor.driver.runner.model.model
    assert decoder.native and decoder.fusable == ("moe" not in name)  # act-order too runs the fused CPU kernel
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    for out, p in zip(outs, prompts):
        ref, scores = hf.greedy(p, 10)
        assert_greedy_match(out.outputs[0].token_ids, ref, scores, tie_tol=1e-2)  # offsets rounded to fp16
    assert_pool_empty(llm)
    plan = plan_for(quantized[name], max_model_len=256, dtype="float32")
    assert plan["devices"][0]["weight_bytes"] == llm.engine.executor.driver.runner.weight_bytes
    llm.shutdown()


@pytest.mark.parametrize("name", ["gptq-sym", "awq-moe", "gptq-act-order"])
def test_tensor_parallel_shards_along_groups(quantized, name):
    """Two tensor-parallel ranks give one rank's greedy tokens: every shard whole groups (an act-order row-parallel
    layer's of its columns sorted by group, its input gathered from both ranks)."""
    prompts = [{"prompt_token_ids": p} for p in random_prompts(2, 10, 30, seed=6)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(quantized[name], dtype="float32", kv_cache_memory=2 << 20,
                                                max_model_len=256).generate(prompts, params, use_tqdm=False)]
    llm = LLM(quantized[name], dtype="float32", kv_cache_memory=2 << 20, max_model_len=256,
              tensor_parallel_size=2)
    try:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == want
    finally:
        llm.shutdown()


def test_act_order_checkpoint_requantized_keeps_its_input_order(quantized):
    """Requantizing an act-order checkpoint (--quantization int8) dequantizes it at load: its columns go back to the
    input order, so it scores as the float weights it encodes do."""
    tokens = [5, 17, 300, 4000, 22, 9]
    scores = []
    for folder, quantization in ((quantized["gptq-act-order"], "int8"), (quantized["gptq-act-order"] + "-ref", None)):
        with LLM(folder, dtype="float32", quantization=quantization, kv_cache_memory=2 << 20, max_model_len=256) as llm:
            scores.append(llm.engine.score(tokens))
    assert torch.nn.functional.cosine_similarity(*scores, dim=-1).min() > 0.99


def test_act_order_and_other_variants_are_refused(quantized, tmp_path):
    with pytest.raises(ValueError, match="act-order"):
        LLM(quantized["gptq-moe-act-order"], dtype="float32", kv_cache_memory=2 << 20, tensor_parallel_size=2)
    folder = str(tmp_path / "act-order-k")  # k_proj quantized in input order, q_proj and v_proj in another
    shutil.copytree(quantized["gptq-act-order"], folder)
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    name = "model.layers.0.self_attn.k_proj.g_idx"
    tensors[name] = tensors[name].sort().values.contiguous()
    save_file(tensors, path)
    with pytest.raises(ValueError, match="permute their shared input differently"):
        LLM(folder, dtype="float32", kv_cache_memory=2 << 20)
    folder = str(tmp_path / "act-order")
    shutil.copytree(quantized["gptq-sym"], folder)
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    name = "model.layers.0.self_attn.q_proj.g_idx"
    tensors[name] = tensors[name].flip(0).contiguous()
    save_file(tensors, path)
    with pytest.raises(ValueError, match="out of input order, but the checkpoint's desc_act is false"):
        LLM(folder, dtype="float32", kv_cache_memory=2 << 20)
    config = json.load(open(os.path.join(folder, "config.json")))
    for edit, message in [({"bits": 3}, "3-bit GPTQ")]:
        json.dump({**config, "quantization_config": {**config["quantization_config"], **edit}},
                  open(os.path.join(folder, "config.json"), "w"))
        with pytest.raises(ValueError, match=message):
            LLM(folder, dtype="float32", kv_cache_memory=2 << 20)
    with pytest.raises(ValueError, match="needs a checkpoint quantized with it"):
        LLM(quantized["awq"], quantization="gptq", dtype="float32", kv_cache_memory=2 << 20)
