"""Model facts (from a HF config dict) and the engine's settings, with vLLM's argument names."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose from auto, {', '.join(sorted(set(DTYPES)))}") from None


@dataclass(frozen=True)
class ModelConfig:
    """The architecture facts every other part (layers, memory planner, KV cache) reads."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # biases on q/k/v (Qwen2 style)
    qk_norm: bool  # per-head RMSNorm on q and k (Qwen3 style)
    dtype: torch.dtype = torch.float32
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""

    @classmethod
    def from_hf_dict(cls, cfg: dict, name: str = "") -> ModelConfig:
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {model_type!r}; pagedllm supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope type {rope_type!r} is not supported yet (only the default rotary embedding)")
        num_heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        dtype_name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            intermediate_size=cfg["intermediate_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            dtype=parse_dtype(dtype_name),
            eos_token_ids=eos_ids,
            name=name,
        )

    @classmethod
    def from_folder(cls, path: str) -> ModelConfig:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        gen_path = os.path.join(path, "generation_config.json")
        if os.path.exists(gen_path):
            with open(gen_path) as f:
                gen = json.load(f)
            if gen.get("eos_token_id") is not None:  # generation_config's EOS list wins (Qwen, Llama 3)
                cfg["eos_token_id"] = gen["eos_token_id"]
        return cls.from_hf_dict(cfg, name=cfg.get("_name_or_path") or os.path.basename(os.path.normpath(path)))


@dataclass
class EngineArgs:
    """Everything `LLM(...)` and the CLI accept; names follow vLLM's engine arguments."""

    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    seed: int = 0
    device: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    kv_cache_memory: int | None = None  # bytes; the CPU's way to size the pool
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    pipeline_partition: list[int] | None = None  # layers per stage; default: an even split
    data_parallel_size: int = 1
    data_parallel_routing: str = "least-loaded"  # or "prefix-affinity"
    quantization: str | None = None
    load_format: str = "auto"  # or "dummy": random weights, only the config is read (vLLM's name)

    def validate(self) -> None:
        positive = {
            "max_num_seqs": self.max_num_seqs, "block_size": self.block_size,
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "data_parallel_size": self.data_parallel_size,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_model_len", "max_num_batched_tokens", "num_gpu_blocks_override", "kv_cache_memory"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.quantization not in (None, "int8"):
            raise ValueError(f"quantization {self.quantization!r} is not supported; use int8 or leave it unset")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto or dummy, got {self.load_format!r}")
        if self.data_parallel_routing not in ("least-loaded", "prefix-affinity"):
            raise ValueError(f"data_parallel_routing must be least-loaded or prefix-affinity, got {self.data_parallel_routing!r}")
        if self.dtype != "auto":
            parse_dtype(self.dtype)
