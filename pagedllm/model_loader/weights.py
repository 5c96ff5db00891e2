"""Build the model and fill it from a checkpoint folder's safetensors, shard by shard."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re

import torch
from safetensors import safe_open
from torch import nn

from pagedllm.config import EngineConfig
from pagedllm.layers import quantization as quant_layer
from pagedllm.model_loader import awq_gptq
from pagedllm.models.decoder import DecoderForCausalLM, Stage
from pagedllm.quant_config import CHECKPOINT_METHODS, RTN_SCHEMES


def _safetensors_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return sorted({os.path.join(folder, name) for name in json.load(f)["weight_map"].values()})
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors weights in {folder}")
    return files


def _default_loader(param: nn.Parameter, loaded, shard_id=None) -> None:
    param.data.copy_(loaded if isinstance(loaded, torch.Tensor) else loaded[:])


def _layer_pattern(name: str) -> str:
    return re.sub(r"\.layers\.\d+\.", ".layers.#.", name)


_QUANT_SUFFIXES = (".weight_scale", ".weight_offset", ".weight_perm")


def _tensors(files: dict, quant: dict, dequantize_to: torch.dtype | None):
    """(name, tensor or lazy slice) of a checkpoint (`files`: tensor name -> its open safetensors file). Quantized
    layers come as pagedllm's tensors (AWQ / GPTQ converted); with dequantize_to, as one float weight each (their
    scales and offsets folded in) for a model built unquantized."""
    def get(name: str) -> torch.Tensor | None:
        return files[name].get_tensor(name) if name in files else None

    awq_gptq_layers = quant.get("quant_method") in ("awq", "gptq")
    for name, f in files.items():
        base = name.removesuffix(".weight")
        if awq_gptq_layers and name.endswith(".qweight"):
            base = name.removesuffix(".qweight")
            parts = awq_gptq.to_grouped(get, base, quant)
        elif name.endswith(".weight") and f"{base}.weight_scale" in files:
            parts = {s: get(base + s) for s in (".weight", *_QUANT_SUFFIXES) if base + s in files}
        elif name.endswith(_QUANT_SUFFIXES) or (awq_gptq_layers and name.endswith(awq_gptq.COMPANIONS)):
            continue  # read with their weight
        else:
            yield name, f.get_slice(name)
            continue
        if dequantize_to is None:
            yield from ((base + suffix, t) for suffix, t in parts.items())
        else:
            w = quant_layer.dequantize(parts[".weight"], parts[".weight_scale"], parts.get(".weight_offset"),
                                       dequantize_to)
            if ".weight_perm" in parts:  # act-order: the columns back in input order
                w = w[:, torch.argsort(parts[".weight_perm"].long())]
            yield f"{base}.weight", w


def load_weights(model: DecoderForCausalLM, folder: str, dequantize_to: torch.dtype | None = None) -> None:
    """Every tensor of the checkpoint must be one the model knows (any stage's, any layer's): a tensor it does not
    know (an FP8 checkpoint's weight_scale_inv, say) would otherwise be dropped and the model run wrong."""
    params = dict(model.named_parameters())
    heads = {f"{m}.{s}" for m in ("model.embed_tokens", "lm_head") for s in ("weight", *(x[1:] for x in _QUANT_SUFFIXES))}
    known = {_layer_pattern(n) for n in params} | heads | {"model.norm.weight"}
    unknown: list[str] = []
    tied = model.config.tie_word_embeddings
    # a tied LM head on a pipeline's last stage, apart from the embedding, loads the embedding's weights
    own_tied_head = tied and model.lm_head is not None and model.model.embed_tokens is None
    loaded_names: set[str] = set()
    with contextlib.ExitStack() as stack:
        files = {}  # every tensor's file: a layer's quantized parts may lie in different shards
        for path in _safetensors_files(folder):
            f = stack.enter_context(safe_open(path, framework="pt"))
            files.update(dict.fromkeys(f.keys(), f))
        for name, tensor in _tensors(files, model.config.quant, dequantize_to):
            if tied and name.startswith("lm_head."):
                continue
            target, shard_id = model.checkpoint_target(name)
            if own_tied_head and name.startswith("model.embed_tokens."):
                target = name.replace("model.embed_tokens.", "lm_head.")
            param = params.get(target)
            if param is None:  # another pipeline stage's, a rotary inv_freq buffer some checkpoints carry, or not ours
                if _layer_pattern(target) not in known and not name.endswith("rotary_emb.inv_freq"):
                    unknown.append(name)
                continue
            loader = getattr(param, "weight_loader", _default_loader)
            loader(param, tensor, shard_id)
            loaded_names.add(target)
    if unknown:
        raise ValueError(f"checkpoint {folder} has tensors pagedllm does not know how to use: {', '.join(unknown[:5])}"
                         f"{' ...' if len(unknown) > 5 else ''} (a quantized checkpoint without its quantization_config?)")
    shared_head = tied and model.lm_head is not None and model.model.embed_tokens is not None
    missing = sorted(n for n in set(params) - loaded_names if not (shared_head and n.startswith("lm_head.")))
    if missing:
        raise ValueError(f"checkpoint {folder} lacks weights for: {', '.join(missing[:5])}")


def init_dummy_weights(model: nn.Module, seed: int, low: float = -1e-3, high: float = 1e-3) -> None:
    """Random weights (uniform in [low, high], as vLLM's dummy format), the same for the same seed and shapes."""
    for name, param in model.named_parameters():
        g = torch.Generator(device=param.device)
        g.manual_seed(seed + sum(map(ord, name)))
        param.data.uniform_(low, high, generator=g)


def build_model(config: EngineConfig, device: torch.device, stage: Stage | None = None) -> DecoderForCausalLM:
    """Allocate the model (or one pipeline stage of it) directly in the run dtype and on its device, then load its
    weights in place (or, with load_format "dummy", fill them with random values)."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(config.dtype)
    try:
        with torch.device(device):
            model = DecoderForCausalLM(config.model, stage)
    finally:
        torch.set_default_dtype(default_dtype)
    quantization = config.load.quantization
    if quantization in CHECKPOINT_METHODS:
        model.make_quantized_(config.model.quant_formats)
    if config.load.load_format == "dummy":
        init_dummy_weights(model, config.load.seed)
    else:
        checkpoint_quantized = bool(config.model.quantization_config)
        load_weights(model, config.load.model_path,
                     config.dtype if checkpoint_quantized and quantization not in CHECKPOINT_METHODS else None)
    if quantization in RTN_SCHEMES:
        model.quantize_(quantization)
    return model.eval()
