"""EngineArgs: everything `LLM(...)` and the CLI accept, with vLLM's names; resolved once into an EngineConfig."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass

import torch

from pagedllm.config import (
    CacheConfig,
    EngineConfig,
    LoadConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    parse_dtype,
)
from pagedllm.kernels import ATTENTION_BACKENDS
from pagedllm.model_loader.resolve import resolve_model
from pagedllm.platform import resolve_device
from pagedllm.quant_config import CHECKPOINT_METHODS, QUANTIZATION_METHODS, RTN_SCHEMES
from pagedllm.spec_config import SpeculativeConfig
from pagedllm.worker.cuda_graphs import graph_sizes

logger = logging.getLogger("pagedllm")

# generation_config.json's sampling fields -> SamplingParams' (vLLM applies the same ones)
GENERATION_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                     "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def read_generation_defaults(folder: str) -> dict:
    """The sampling defaults a checkpoint's generation_config.json recommends (Qwen3: temperature 0.6, top_p 0.95,
    top_k 20), under SamplingParams' names; {} when it has none."""
    path = os.path.join(folder, "generation_config.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        gen = json.load(f)
    return {ours: gen[hf] for hf, ours in GENERATION_FIELDS.items() if gen.get(hf) is not None}


DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048

# vLLM engine arguments that scripts commonly pass and that change nothing here: accepted with a warning
NO_EFFECT_ARGS = {
    "trust_remote_code": "pagedllm runs its own model code, never a checkpoint's",
    "swap_space": "preemption recomputes instead of swapping to the CPU",
    "cpu_offload_gb": "weights are not offloaded",
    "disable_log_stats": "statistics are only logged on request",
    "disable_log_requests": "requests are not logged",
    "tokenizer_mode": "the checkpoint's fast tokenizer is always used",
    "revision": "nothing is downloaded",
    "tokenizer_revision": "nothing is downloaded",
    "code_revision": "nothing is downloaded",
    "download_dir": "nothing is downloaded",
    "max_seq_len_to_capture": "CUDA graphs cover decode steps, whatever their context length",
    "disable_custom_all_reduce": "all-reduces are torch.distributed's",
    "distributed_executor_backend": "workers are always processes (spawned or torchrun)",
    "max_parallel_loading_workers": "each rank loads its own shard",
    "compilation_config": "the model is not compiled",
    "task": "pagedllm generates text",
    "structured_outputs_config": "structured outputs always use llguidance",
    "guided_decoding_backend": "structured outputs always use llguidance",
}


def engine_kwargs(kwargs: dict) -> dict:
    """The EngineArgs among `kwargs`; vLLM arguments with no effect here are dropped with a warning, anything else
    is an error."""
    unknown = sorted(set(kwargs) - EngineArgs.names() - set(NO_EFFECT_ARGS))
    if unknown:
        raise ValueError(f"unknown engine argument(s): {', '.join(unknown)}")
    for name in sorted(set(kwargs) & set(NO_EFFECT_ARGS)):
        logger.warning("engine argument %s=%r has no effect in pagedllm: %s", name, kwargs[name], NO_EFFECT_ARGS[name])
    return {k: v for k, v in kwargs.items() if k in EngineArgs.names()}


@dataclass
class EngineArgs:
    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    seed: int = 0
    device: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    num_scheduler_steps: int = 1  # decode steps run back to back per schedule (vLLM's multi-step scheduling)
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
    generation_config: str = "auto"  # "auto": the checkpoint's generation_config.json; "vllm": none; or a folder
    override_generation_config: dict | None = None  # e.g. {"temperature": 0.5}, over the above
    max_logprobs: int = 20
    speculative_config: dict | str | None = None  # vLLM's: {"method": "ngram", "num_speculative_tokens": 3, ...}
    enforce_eager: bool = False  # no CUDA graphs for decode steps
    cuda_graph_sizes: list[int] | None = None  # decode batch sizes to capture (default: 1, 2, 4, 8, 16, ... max_num_seqs)
    attention_backend: str | None = None  # kernels.ATTENTION_BACKENDS; sets PAGEDLLM_ATTENTION_BACKEND for every process

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def validate(self) -> None:
        positive = {
            "max_num_seqs": self.max_num_seqs, "block_size": self.block_size,
            "num_scheduler_steps": self.num_scheduler_steps,
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
        if self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization {self.quantization!r} is not supported; use "
                             f"{', '.join(m for m in QUANTIZATION_METHODS if m)} or leave it unset")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto or dummy, got {self.load_format!r}")
        if self.data_parallel_routing not in ("least-loaded", "prefix-affinity"):
            raise ValueError(f"data_parallel_routing must be least-loaded or prefix-affinity, got {self.data_parallel_routing!r}")
        for name in ("dtype", "kv_cache_dtype"):
            if getattr(self, name) != "auto":
                parse_dtype(getattr(self, name))
        SpeculativeConfig.parse(self.speculative_config)
        if self.num_scheduler_steps > 1 and (self.speculative_config or self.pipeline_parallel_size > 1):
            raise ValueError("num_scheduler_steps > 1 (multi-step scheduling) cannot be combined with speculative "
                             "decoding or pipeline parallelism")
        if self.attention_backend is not None and self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention_backend!r}")

    def create_engine_config(self, model_config: ModelConfig | None = None) -> EngineConfig:
        """Check every argument and resolve it once: the checkpoint folder (a GGUF file is converted here), the
        model's facts, dtypes, limits, the parallel layout and the device. With `model_config` given (the memory
        planner), nothing is resolved or converted."""
        self.validate()
        if self.attention_backend is not None:  # read by the kernels of this process and of the workers it starts
            os.environ["PAGEDLLM_ATTENTION_BACKEND"] = self.attention_backend
        if model_config is None:
            model_path = resolve_model(self.model, self.load_format)
            model_config = ModelConfig.from_folder(model_path)
        else:
            model_path = self.model or ""
        dtype = model_config.dtype if self.dtype == "auto" else parse_dtype(self.dtype)
        quantization = self._quantization(model_config)
        if quantization in (*RTN_SCHEMES, "awq", "gptq") and self.dtype == "auto":
            dtype = torch.bfloat16  # quantized weights, bf16 activations and KV cache
        parallel = ParallelConfig(self.tensor_parallel_size, self.pipeline_parallel_size,
                                  tuple(self.pipeline_partition) if self.pipeline_partition else None,
                                  self.data_parallel_size, self.data_parallel_routing)
        parallel.check(model_config)
        speculative = SpeculativeConfig.parse(self.speculative_config)
        defaults = tuple(sorted(self._sampling_defaults(model_path).items()))
        return EngineConfig(
            model=dataclasses.replace(model_config, dtype=dtype, sampling_defaults=defaults,
                                      max_logprobs=self.max_logprobs),
            cache=CacheConfig(self.block_size, self.enable_prefix_caching, self.gpu_memory_utilization,
                              self.num_gpu_blocks_override, self.kv_cache_memory,
                              dtype if self.kv_cache_dtype == "auto" else parse_dtype(self.kv_cache_dtype)),
            scheduler=self._scheduler_config(model_config),
            parallel=parallel,
            load=LoadConfig(self.model, model_path, self.tokenizer, self.load_format, quantization, self.seed),
            device=resolve_device(self.device),
            speculative=speculative,
            cuda_graph_sizes=self._cuda_graph_sizes(model_config, parallel),
        )

    def _cuda_graph_sizes(self, model: ModelConfig, parallel: ParallelConfig) -> tuple[int, ...]:
        """Decode batch sizes to capture: on one CUDA device, for dense models (a MoE layer syncs with the host to
        group its tokens by expert), unless enforce_eager."""
        if self.enforce_eager or resolve_device(self.device).type != "cuda" or parallel.world_size > 1 or model.num_experts:
            return ()
        sizes = tuple(sorted(set(self.cuda_graph_sizes))) if self.cuda_graph_sizes else graph_sizes(self.max_num_seqs)
        if any(not isinstance(s, int) or s < 1 for s in sizes):
            raise ValueError(f"cuda_graph_sizes must be positive integers, got {self.cuda_graph_sizes!r}")
        return sizes

    def _quantization(self, model_config: ModelConfig) -> str | None:
        """A quantized checkpoint runs in its own quantization (as vLLM detects the method), unless another
        --quantization requantizes it or, for a GGUF file, --dtype asks for dequantized weights."""
        method = model_config.quant_method if self.load_format != "dummy" else None
        if self.quantization in CHECKPOINT_METHODS and self.quantization != method:
            raise ValueError(f"quantization {self.quantization!r} needs a checkpoint quantized with it "
                             f"(this one is {method or 'not quantized'}"
                             f"{'; GGUF: a .gguf file, or none for the embedded model' if self.quantization == 'gguf' else ''})")
        if self.quantization is None and method and (self.dtype == "auto" or method != "gguf"):
            return method
        return self.quantization

    def _sampling_defaults(self, model_path: str) -> dict:
        """What requests that leave sampling fields unset get: the model's recommendations (vLLM's
        --generation-config auto), none (vllm), or another folder's; then --override-generation-config."""
        if self.generation_config == "vllm":
            defaults = {}
        else:
            folder = model_path if self.generation_config == "auto" else self.generation_config
            if self.generation_config != "auto" and not os.path.isdir(folder):
                raise ValueError(f"generation_config must be auto, vllm or a folder, got {folder!r}")
            defaults = read_generation_defaults(folder) if os.path.isdir(folder) else {}
        for name, value in (self.override_generation_config or {}).items():
            ours = GENERATION_FIELDS.get(name, name)
            if ours not in GENERATION_FIELDS.values():
                raise ValueError(f"override_generation_config: {name!r} is not one of {', '.join(GENERATION_FIELDS)}")
            defaults[ours] = value
        return defaults

    def _scheduler_config(self, model: ModelConfig) -> SchedulerConfig:
        """max_model_len and the step's token budget, checked against each other and the model."""
        max_model_len = self.max_model_len or model.max_context
        if max_model_len > model.max_context:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's context of {model.max_context} "
                             "(max_position_embeddings, scaled by its RoPE scaling)")
        budget = self.max_num_batched_tokens or (
            DEFAULT_MAX_NUM_BATCHED_TOKENS if self.enable_chunked_prefill else max(DEFAULT_MAX_NUM_BATCHED_TOKENS, max_model_len))
        if not self.enable_chunked_prefill and budget < max_model_len:
            raise ValueError(f"without chunked prefill max_num_batched_tokens ({budget}) must be at least "
                             f"max_model_len ({max_model_len})")
        return SchedulerConfig(self.max_num_seqs, budget, max_model_len, self.enable_chunked_prefill,
                               num_scheduler_steps=self.num_scheduler_steps)
