"""The engine's one resolved configuration (vLLM's VllmConfig idea), built once from EngineArgs and frozen.

EngineConfig holds a part per concern: the model's facts, the KV cache, the scheduler, the parallel layout, what
to load, the device and speculative decoding. Every layer of the engine, the workers (it travels to them whole) and
the memory planner read this one object. It imports only other neutral modules, so any module may use it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
from dataclasses import dataclass

import torch

from pagedllm.quant_config import MOE_EXPERTS, QuantFormat, check_checkpoint_quant, checkpoint_formats
from pagedllm.spec_config import SpeculativeConfig

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3_moe")
# computed as HF transformers computes them; "freq_factors" is llama.cpp's way to store Llama 3's (from GGUF files)
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "freq_factors")

# the one table of dtype spellings: every alias -> its canonical name -> its torch dtype
DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "float": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                 "float16": "float16", "fp16": "float16", "half": "float16"}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(name: str | torch.dtype) -> str:
    """The canonical name (float32, bfloat16, float16) of a dtype or any of its spellings."""
    if isinstance(name, torch.dtype):
        return str(name).removeprefix("torch.")
    try:
        return DTYPE_ALIASES[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose from auto, {', '.join(sorted(DTYPE_ALIASES))}") from None


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    return name if isinstance(name, torch.dtype) else TORCH_DTYPES[dtype_name(name)]


def kv_heads_per_rank(num_kv_heads: int, tp: int) -> int:
    """Each tensor-parallel rank keeps its share of KV heads; with more ranks than KV heads each keeps one (replicated)."""
    return max(1, num_kv_heads // tp)


def partition_layers(num_layers: int, pp: int, partition: tuple[int, ...] | list[int] | None = None) -> list[tuple[int, int]]:
    """Contiguous [start, end) layer ranges per pipeline stage; an even split puts any extra layers on the early
    stages (the last one also runs the LM head)."""
    if partition is not None:
        if len(partition) != pp or sum(partition) != num_layers or min(partition) < 1:
            raise ValueError(f"a layer partition must be {pp} positive counts adding up to {num_layers}, "
                             f"got {list(partition)}")
        sizes = list(partition)
    else:
        if pp > num_layers:
            raise ValueError(f"pipeline_parallel_size {pp} exceeds the model's {num_layers} layers")
        sizes = [num_layers // pp + (1 if i < num_layers % pp else 0) for i in range(pp)]
    return [(end - n, end) for n, end in zip(sizes, itertools.accumulate(sizes))]


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
    # sampling defaults for what a request leaves unset (generation_config.json and overrides), as (name, value)
    sampling_defaults: tuple[tuple[str, float | int], ...] = ()
    max_logprobs: int = 20  # the most top-k logprobs (of outputs or prompts) a request may ask for
    rope_type: str = "default"
    quantization_config: str = ""  # a quantized checkpoint's quantization_config as JSON (CHECKPOINT_METHODS)
    rope_scaling: str = ""  # the checkpoint's rope_scaling / rope_parameters as JSON, for transformers' RoPE functions
    # mixture of experts (Qwen3-MoE): routed experts in place of the MLP; 0 experts: a dense model
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True  # renormalise the top-k routing probabilities to sum to 1
    mlp_only_layers: tuple[int, ...] = ()  # layers that keep a dense MLP
    decoder_sparse_step: int = 1  # every this many layers is sparse

    def is_moe_layer(self, i: int) -> bool:
        return self.num_experts > 0 and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0

    @functools.cached_property
    def quant(self) -> dict:
        """The checkpoint's quantization_config ({} for float weights), parsed once."""
        return json.loads(self.quantization_config) if self.quantization_config else {}

    @functools.cached_property
    def quant_formats(self) -> dict[str, QuantFormat]:
        """A quantized checkpoint's format per layer, by its checkpoint module name (empty for float checkpoints)."""
        moe_layers = frozenset(i for i in range(self.num_layers) if self.is_moe_layer(i))
        return checkpoint_formats(self.quant, self.num_layers, self.tie_word_embeddings, moe_layers)

    @property
    def quant_method(self) -> str | None:
        """How the checkpoint's weights are quantized (quant_config.CHECKPOINT_METHODS), None for float weights."""
        return self.quant.get("quant_method")

    @property
    def max_context(self) -> int:
        """The longest context the model takes, as vLLM derives it: scaled by linear and YaRN RoPE scaling (YaRN from
        its original context); Llama 3 and dynamic scaling keep max_position_embeddings."""
        rope = json.loads(self.rope_scaling) if self.rope_scaling else {}
        if self.rope_type == "linear":
            return int(self.max_position_embeddings * rope["factor"])
        if self.rope_type == "yarn":
            original = rope.get("original_max_position_embeddings") or self.max_position_embeddings
            return max(self.max_position_embeddings, int(original * rope["factor"]))
        return self.max_position_embeddings

    @classmethod
    def from_hf_dict(cls, cfg: dict, name: str = "") -> ModelConfig:
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {model_type!r}; pagedllm supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        quant = cfg.get("quantization_config") or {}
        if quant:  # refused unless pagedllm reads its format: cast without their scales, weights would load wrong
            check_checkpoint_quant(quant)
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope type {rope_type!r} is not supported; pagedllm supports {', '.join(ROPE_TYPES)}")
        num_heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        checkpoint_dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
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
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            dtype=parse_dtype(checkpoint_dtype),
            eos_token_ids=eos_ids,
            name=name,
            num_experts=int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0),
            num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 0),
            moe_intermediate_size=int(cfg.get("moe_intermediate_size") or 0),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
            mlp_only_layers=tuple(cfg.get("mlp_only_layers") or ()),
            decoder_sparse_step=int(cfg.get("decoder_sparse_step") or 1),
            rope_type=rope_type,
            quantization_config=json.dumps(quant, sort_keys=True) if quant else "",
            rope_scaling=json.dumps(rope, sort_keys=True) if rope_type != "default" else "",
        )

    def kv_heads_per_rank(self, tp: int) -> int:
        return kv_heads_per_rank(self.num_kv_heads, tp)

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


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    kv_cache_memory: int | None = None  # bytes; the CPU's way to size the pool
    cache_dtype: torch.dtype = torch.bfloat16  # resolved from kv_cache_dtype ("auto": the model's dtype)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    # With chunked prefill, one prompt takes at most this many tokens of a step, so a request arriving
    # behind a long prompt is prefilled beside it instead of after it (vLLM's name; 0: half the budget).
    long_prefill_token_threshold: int = 0
    # Decode steps a batch of decodes runs back to back before the engine schedules again (vLLM's multi-step
    # scheduling): the engine's per-step Python is paid once for them, tokens come out in bursts of this many.
    num_scheduler_steps: int = 1

    @property
    def max_chunk(self) -> int:
        if not self.enable_chunked_prefill:
            return self.max_num_batched_tokens
        return self.long_prefill_token_threshold or max(1, self.max_num_batched_tokens // 2)


@dataclass(frozen=True)
class ParallelConfig:
    """pp stages of tp ranks each (rank = stage * tp + tp_rank), and dp replicas of that whole grid."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    pipeline_partition: tuple[int, ...] | None = None  # layers per stage; None: an even split
    data_parallel_size: int = 1
    data_parallel_routing: str = "least-loaded"  # or "prefix-affinity"

    @property
    def world_size(self) -> int:
        """Processes of one replica."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def stage_layers(self, num_layers: int) -> list[tuple[int, int]]:
        return partition_layers(num_layers, self.pipeline_parallel_size, self.pipeline_partition)

    def check(self, model: ModelConfig) -> None:
        """The one check that this layout can split the model (raises ValueError before any process starts)."""
        tp, heads, kv = self.tensor_parallel_size, model.num_heads, model.num_kv_heads
        if heads % tp or (kv % tp and tp % kv):
            raise ValueError(f"tensor_parallel_size {tp} must divide the model's {heads} attention heads and divide, "
                             f"or be a multiple of, its {kv} KV heads")
        if model.intermediate_size % tp:
            raise ValueError(f"tensor_parallel_size {tp} must divide the MLP size {model.intermediate_size}")
        if model.moe_intermediate_size % tp:
            raise ValueError(f"tensor_parallel_size {tp} must divide the experts' MLP size {model.moe_intermediate_size}")
        if tp > 1 and any(f.act_order for name, f in model.quant_formats.items() if f".{MOE_EXPERTS}." in name):
            raise ValueError("GPTQ act-order (desc_act) MoE experts run without tensor parallelism in pagedllm yet: a "
                             "shard of an expert's down projection would need the other shards' inputs")
        self.stage_layers(model.num_layers)


@dataclass(frozen=True)
class LoadConfig:
    model: str | None = None  # as the user named it
    model_path: str = ""  # the resolved checkpoint folder
    tokenizer: str | None = None
    load_format: str = "auto"  # or "dummy": random weights from the config alone (vLLM's name)
    quantization: str | None = None
    seed: int = 0


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig  # its dtype is the one the engine runs in
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig
    load: LoadConfig
    device: torch.device
    speculative: SpeculativeConfig | None = None
    cuda_graph_sizes: tuple[int, ...] = ()  # decode batch sizes captured as CUDA graphs (empty: eager)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def max_model_len(self) -> int:
        return self.scheduler.max_model_len

    def replace(self, **parts) -> EngineConfig:
        """A copy with some parts' fields changed, e.g. replace(parallel={"data_parallel_size": 1})."""
        return dataclasses.replace(self, **{k: dataclasses.replace(getattr(self, k), **v) for k, v in parts.items()})
