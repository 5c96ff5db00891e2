"""Turn a GGUF file into a Hugging Face-style checkpoint folder, once, so every later start reads safetensors.

Quantized weights stay quantized (model_loader/gguf_quants.py): each layer's values, group scales and offsets
are stored as `<name>.weight`, `.weight_scale` and `.weight_offset`, and config.json's quantization_config
(quant_method "gguf") lists each layer's format; the engine runs them natively or dequantizes them at load
(`--dtype`). Float tensors, and quantized types the kernels do not take, are stored as fp32. transformers builds
the tokenizer (with its chat template) from the GGUF metadata. llama.cpp stores Llama's Q and K weights permuted
for its rotary layout, so they are un-permuted back to the HF layout here (whole rows: quantized ones too). A
Qwen3-MoE file's stacked experts are stored one by one under the HF checkpoint's names, in one format per layer
for gate / up and one for down.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import numpy as np
import torch
from safetensors.torch import save_file

from pagedllm.layers.quantization import dequantize
from pagedllm.model_loader.gguf_quants import Grouped, common_format, to_grouped
from pagedllm.models.decoder import DecoderForCausalLM

_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",  # a MoE layer's router
}
# a MoE layer's experts, stacked [experts, N, K] in GGUF; stored as the HF checkpoint's mlp.experts.<e>.<part>
_EXPERT_TENSORS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
_ARCHITECTURES = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM"),
                  "qwen3": ("qwen3", "Qwen3ForCausalLM"), "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM")}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _rope_scaling(reader, g) -> dict | None:
    """llama.cpp's RoPE scaling: a `rope_freqs` tensor of per-frequency divisors (how it stores Llama 3.x's scaling;
    kept as pagedllm's "freq_factors" type), or linear / YaRN metadata."""
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        return {"rope_type": "freq_factors", "factors": [float(x) for x in np.asarray(freqs.data, dtype=np.float32)]}
    kind = g("rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind not in ("linear", "yarn"):
        raise ValueError(f"GGUF RoPE scaling {kind!r} is not supported; pagedllm reads linear, yarn and rope_freqs")
    scaling = {"rope_type": kind, "factor": float(g("rope.scaling.factor"))}
    if g("rope.scaling.original_context_length"):
        scaling["original_max_position_embeddings"] = int(g("rope.scaling.original_context_length"))
    return scaling


def hf_config_from_gguf(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; pagedllm reads {', '.join(_ARCHITECTURES)}")
    g = lambda key, default=None: _field(reader, f"{arch}.{key}", default)  # noqa: E731
    hidden, heads = g("embedding_length"), g("attention.head_count")
    names = {t.name for t in reader.tensors}
    vocab = g("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    moe = {  # llama.cpp's Qwen3-MoE renormalises the top-k routing weights
        "num_experts": int(g("expert_count")), "num_experts_per_tok": int(g("expert_used_count")),
        "moe_intermediate_size": int(g("expert_feed_forward_length")),
        "norm_topk_prob": bool(g("expert_weights_norm", True)),
    } if g("expert_count") else {}
    return {
        "model_type": _ARCHITECTURES[arch][0],
        "architectures": [_ARCHITECTURES[arch][1]],
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "intermediate_size": int(g("feed_forward_length") or moe["moe_intermediate_size"]),
        **moe,
        "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": int(heads),
        "num_key_value_heads": int(g("attention.head_count_kv", heads)),
        "head_dim": int(g("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(g("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "hidden_act": "silu",
        "rope_scaling": _rope_scaling(reader, g),
        "_name_or_path": _field(reader, "general.name", ""),
        "dtype": "bfloat16",  # the activations' dtype by default
    }


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str) -> str | None:
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{suffix}"
    return None


def _tensors(reader, config: dict) -> dict[str, torch.Tensor | Grouped]:
    """Every GGUF tensor by its HF checkpoint name (a MoE layer's stacked experts one by one); raises on tensors
    pagedllm does not know, since dropping them would run the model wrong."""
    out, unknown = {}, []
    for t in reader.tensors:
        parts = t.name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in _EXPERT_TENSORS:
            for e, expert in enumerate(_grouped_or_float(t)):
                out[f"model.layers.{parts[1]}.mlp.experts.{e}.{_EXPERT_TENSORS[parts[2]]}.weight"] = expert
        elif (name := _hf_name(t.name)) is not None:
            out[name] = _tensor(t, name, config)
        elif t.name != "rope_freqs.weight":
            unknown.append(t.name)
    if unknown:
        raise ValueError(f"GGUF tensors pagedllm does not know how to use: {', '.join(unknown[:5])}")
    return out


def _grouped_or_float(t) -> list[torch.Tensor | Grouped]:
    """A GGUF tensor as grouped-quantized matrices where its type allows, else fp32: a vector or matrix as one, a
    stack of experts [E, N, K] as E."""
    shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
    rows = int(np.prod(shape[:-1]))
    grouped = to_grouped(t.data.reshape(rows, -1), t.tensor_type, rows, shape[-1]) if len(shape) > 1 else None
    if grouped is None:
        from gguf.quants import dequantize

        floats = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)).reshape(shape)
        return list(floats) if len(shape) == 3 else [floats]
    n, (values, scale, offset, fmt) = shape[-2], grouped
    return [(values[i:i + n], scale[i:i + n], None if offset is None else offset[i:i + n], fmt)
            for i in range(0, rows, n)]


def _tensor(t, name: str, config: dict) -> torch.Tensor | Grouped:
    """One GGUF tensor in HF layout."""
    grouped = _grouped_or_float(t)[0]
    if config["model_type"] == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = config["num_attention_heads" if name.endswith("q_proj.weight") else "num_key_value_heads"]
        if isinstance(grouped, torch.Tensor):
            return _unpermute(grouped, heads)
        values, scale, offset, fmt = grouped
        return (_unpermute(values, heads), _unpermute(scale, heads),
                None if offset is None else _unpermute(offset, heads), fmt)
    return grouped


def _in_one_format(tensors: dict[str, torch.Tensor | Grouped], names: list[str]) -> None:
    """tensors[names] in one grouped format (common_format), or all dequantized if any is a float tensor."""
    group = [tensors[n] for n in names]
    if all(isinstance(g, tuple) for g in group):
        fused = common_format(group)
    else:
        fused = [g if isinstance(g, torch.Tensor) else dequantize(*g[:3], torch.float32) for g in group]
    tensors.update(zip(names, fused))


def _fuse_formats(tensors: dict[str, torch.Tensor | Grouped]) -> None:
    """The parts of a fused layer (the model's packed_modules: q / k / v, gate / up) in one format."""
    fused_layers: dict[str, list[str]] = {}
    for part, (fused, _) in DecoderForCausalLM.packed_modules.items():
        fused_layers.setdefault(fused, []).append(part)
    for parts in fused_layers.values():
        for name in [n for n in tensors if f".{parts[0]}." in n]:
            _in_one_format(tensors, [n for n in (name.replace(parts[0], p) for p in parts) if n in tensors])


def _fuse_experts(tensors: dict[str, torch.Tensor | Grouped]) -> None:
    """A MoE layer's experts in one format per stacked weight (every expert's gate and up; every expert's down), as
    FusedMoE holds them: a Q4_K_M file's Q4_K gate / up stay 4-bit beside its Q6_K down."""
    stacks: dict[tuple[str, str], list[str]] = {}
    for name in tensors:
        if (m := re.match(r"(.*\.experts)\.\d+\.(\w+)\.", name)) is not None:
            stacks.setdefault((m.group(1), DecoderForCausalLM.expert_modules[m.group(2)][0]), []).append(name)
    for names in stacks.values():
        _in_one_format(tensors, names)


def convert_gguf(gguf_path: str, out_dir: str) -> None:
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    reader = GGUFReader(gguf_path)
    config = hf_config_from_gguf(reader)
    tensors = _tensors(reader, config)
    _fuse_formats(tensors)
    _fuse_experts(tensors)
    formats, flat = {}, {}
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor):
            flat[name] = t.contiguous()
            continue
        values, scale, offset, fmt = t
        base = name.removesuffix(".weight")
        # an expert's projection under its name without the expert's index (one format for every expert's)
        formats[re.sub(r"\.experts\.\d+\.", ".experts.", base)] = {"bits": fmt.bits, "group_size": fmt.group_size,
                                                                   "offset": fmt.offset}
        flat.update({name: values.contiguous(), f"{base}.weight_scale": scale.contiguous()})
        if offset is not None:
            flat[f"{base}.weight_offset"] = offset.contiguous()
    if formats:
        config["quantization_config"] = {"quant_method": "gguf", "formats": formats}

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".convert-")
    try:
        save_file(flat, os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not os.path.exists(os.path.join(out_dir, "config.json")):  # not a concurrent converter's win
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
