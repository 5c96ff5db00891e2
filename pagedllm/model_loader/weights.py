"""Build the model and fill it from a checkpoint folder's safetensors, shard by shard."""

from __future__ import annotations

import glob
import json
import os
import re

import torch
from safetensors import safe_open
from torch import nn

from pagedllm.config import EngineConfig
from pagedllm.layers import quantization as quant
from pagedllm.models.decoder import DecoderForCausalLM, Stage
from pagedllm.quant_config import RTN_SCHEMES


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


_QUANT_SUFFIXES = (".weight_scale", ".weight_offset")


def _tensors(f, dequantize_to: torch.dtype | None):
    """(name, tensor or lazy slice) of one safetensors file; with dequantize_to, each grouped-quantized weight comes
    as one float tensor (its scales and offsets folded in) for a model built unquantized."""
    names = set(f.keys())
    for name in f.keys():
        base = name.removesuffix(".weight")
        if dequantize_to is None or not (name.endswith(_QUANT_SUFFIXES) or f"{base}.weight_scale" in names):
            yield name, f.get_slice(name)
        elif name.endswith(".weight"):
            offset = f.get_tensor(f"{base}.weight_offset") if f"{base}.weight_offset" in names else None
            yield name, quant.dequantize(f.get_tensor(name), f.get_tensor(f"{base}.weight_scale"), offset, dequantize_to)


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
    for path in _safetensors_files(folder):
        with safe_open(path, framework="pt") as f:
            for name, tensor in _tensors(f, dequantize_to):
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
    if quantization == "gguf":
        model.make_quantized_(config.model.quant_formats)
    if config.load.load_format == "dummy":
        init_dummy_weights(model, config.load.seed)
    else:
        checkpoint_quantized = bool(config.model.quantization_config)
        load_weights(model, config.load.model_path,
                     config.dtype if checkpoint_quantized and quantization != "gguf" else None)
    if quantization in RTN_SCHEMES:
        model.quantize_(quantization)
    return model.eval()
