"""Exact parameter counts and weight bytes, in total and per device under tensor and pipeline parallelism.

Every tensor of the decoder is listed once with how tensor parallelism treats it: split by output
rows (column-parallel, vocab-parallel), by input columns (row-parallel), split-or-replicated (K/V
heads: replicated once there are more ranks than KV heads), or replicated (norms). Pipeline
parallelism gives each stage its layers; the first stage holds the embedding, the last the final
norm and LM head (a tied LM head then needs its own copy of the embedding on the last stage).
"""

from __future__ import annotations

from dataclasses import dataclass

from pagedllm.config import EngineConfig, ModelConfig, dtype_name, partition_layers
from pagedllm.quant_config import CHECKPOINT_METHODS, LAYER_LINEARS, MOE_EXPERT_LINEARS, RTN_SCHEMES, QuantFormat

FLOAT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# what weights can be stored in: a float dtype, or a quantization scheme (its norms and biases in bf16; a checkpoint's
# own method, CHECKPOINT_METHODS: the formats its quantization_config gives per layer)
WEIGHT_DTYPES = (*FLOAT_BYTES, *RTN_SCHEMES)
# where each tensor of tensor_specs lives in the checkpoint (a layer's under model.layers.<i>.)
_MODULES = {**{m.rsplit(".", 1)[1]: m for m in LAYER_LINEARS}, "router": "mlp.gate",
            "experts.gate_up_proj": MOE_EXPERT_LINEARS[0], "experts.down_proj": MOE_EXPERT_LINEARS[2],
            "embed_tokens": "model.embed_tokens", "lm_head": "lm_head", "lm_head (tied copy)": "model.embed_tokens"}


def weight_dtype_name(config: EngineConfig) -> str:
    """What the weights are stored in: the quantization scheme, else the run dtype."""
    return config.load.quantization or dtype_name(config.dtype)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    rows: int  # output features (or vocabulary rows)
    cols: int  # input features; 1 for vectors
    split: str  # "rows", "cols", "kv", "vocab" or "replicated"
    stage: str  # "first", "last" or "layer"
    quantized: bool = True  # under weight-only quantization (a MoE router stays in the activation dtype, as AWQ / GPTQ keep it)
    experts: int = 0  # of a MoE layer's experts: how many this tensor stacks (the top k of them are active)


def _mlp_specs(cfg: ModelConfig, i: int) -> list[TensorSpec]:
    h = cfg.hidden_size
    if not cfg.is_moe_layer(i):
        inter = cfg.intermediate_size
        return [TensorSpec("gate_proj", inter, h, "rows", "layer"), TensorSpec("up_proj", inter, h, "rows", "layer"),
                TensorSpec("down_proj", h, inter, "cols", "layer")]
    e, inter = cfg.num_experts, cfg.moe_intermediate_size
    return [TensorSpec("router", e, h, "replicated", "layer", quantized=False),
            TensorSpec("experts.gate_up_proj", e * 2 * inter, h, "rows", "layer", experts=e),
            TensorSpec("experts.down_proj", h, e * inter, "cols", "layer", experts=e)]


def tensor_specs(cfg: ModelConfig, i: int = 0) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(global tensors, layer i's tensors)."""
    h, hd, q, kv = cfg.hidden_size, cfg.head_dim, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layer = [
        TensorSpec("q_proj", q, h, "rows", "layer"),
        TensorSpec("k_proj", kv, h, "kv", "layer"),
        TensorSpec("v_proj", kv, h, "kv", "layer"),
        TensorSpec("o_proj", h, q, "cols", "layer"),
        *_mlp_specs(cfg, i),
        TensorSpec("input_layernorm", h, 1, "replicated", "layer"),
        TensorSpec("post_attention_layernorm", h, 1, "replicated", "layer"),
    ]
    if cfg.attention_bias:
        layer += [TensorSpec("q_bias", q, 1, "rows", "layer"), TensorSpec("k_bias", kv, 1, "kv", "layer"),
                  TensorSpec("v_bias", kv, 1, "kv", "layer")]
    if cfg.qk_norm:
        layer += [TensorSpec("q_norm", hd, 1, "replicated", "layer"), TensorSpec("k_norm", hd, 1, "replicated", "layer")]
    glob = [TensorSpec("embed_tokens", cfg.vocab_size, h, "vocab", "first"),
            TensorSpec("norm", h, 1, "replicated", "last")]
    if not cfg.tie_word_embeddings:
        glob.append(TensorSpec("lm_head", cfg.vocab_size, h, "vocab", "last"))
    return glob, layer


def _local_shape(spec: TensorSpec, cfg: ModelConfig, tp: int) -> tuple[int, int]:
    if spec.split == "rows":
        return spec.rows // tp, spec.cols
    if spec.split == "cols":
        return spec.rows, spec.cols // tp
    if spec.split == "kv":
        return cfg.kv_heads_per_rank(tp) * cfg.head_dim, spec.cols
    if spec.split == "vocab":
        return -(-spec.rows // tp), spec.cols
    return spec.rows, spec.cols


def _format(cfg: ModelConfig, dtype: str, spec: TensorSpec, layer: int) -> QuantFormat | None:
    """The quantized format a tensor is stored in, None for floats (vectors, unquantized weights)."""
    if spec.cols == 1 or not spec.quantized or dtype in FLOAT_BYTES:
        return None
    if dtype in CHECKPOINT_METHODS:
        module = _MODULES[spec.name] if spec.stage != "layer" else f"model.layers.{layer}.{_MODULES[spec.name]}"
        return cfg.quant_formats.get(module)
    linear, table = RTN_SCHEMES[dtype]
    return table if spec.split == "vocab" else linear


def _bytes(cfg: ModelConfig, dtype: str, spec: TensorSpec, layer: int, rows: int, cols: int) -> int:
    fmt = _format(cfg, dtype, spec, layer)
    if fmt is None:
        return rows * cols * FLOAT_BYTES.get(dtype, cfg.dtype.itemsize)
    if spec.experts:  # stacked experts: each expert's rows have their own groups
        e = spec.experts
        return e * (fmt.nbytes(rows // e, cols) if spec.split == "rows" else fmt.nbytes(rows, cols // e))
    return fmt.nbytes(rows, cols)


def count_parameters(cfg: ModelConfig, active: bool = False) -> int:
    """Every parameter, or (active=True) those one token uses: a MoE layer's top-k experts of all of them."""
    def size(s: TensorSpec) -> int:
        share = cfg.num_experts_per_tok / s.experts if active and s.experts else 1
        return int(s.rows * s.cols * share)

    glob, _ = tensor_specs(cfg)
    return sum(size(s) for s in glob) + sum(size(s) for i in range(cfg.num_layers) for s in tensor_specs(cfg, i)[1])


@dataclass
class StageWeights:
    """What one device of a pipeline stage holds (every tensor-parallel rank of a stage holds the same amount)."""

    pp_rank: int
    layers: tuple[int, int]
    params: int
    bytes: int
    sharded_bytes: int
    replicated_bytes: int


def weights_per_stage(cfg: ModelConfig, dtype: str, tp: int = 1, pp: int = 1,
                      partition: tuple[int, ...] | None = None) -> list[StageWeights]:
    glob, _ = tensor_specs(cfg)
    if cfg.tie_word_embeddings and pp > 1:  # the last stage needs its own copy for the LM head
        glob = glob + [TensorSpec("lm_head (tied copy)", cfg.vocab_size, cfg.hidden_size, "vocab", "last")]
    stages = []
    for rank, (start, end) in enumerate(partition_layers(cfg.num_layers, pp, partition)):
        held = [(s, -1) for s in glob if (s.stage == "first" and rank == 0) or (s.stage == "last" and rank == pp - 1)]
        held += [(s, i) for i in range(start, end) for s in tensor_specs(cfg, i)[1]]
        params = sharded = replicated = 0
        for spec, layer in held:
            rows, cols = _local_shape(spec, cfg, tp)
            nbytes = _bytes(cfg, dtype, spec, layer, rows, cols)
            params += rows * cols
            if spec.split == "replicated" or (spec.split == "kv" and tp > cfg.num_kv_heads):
                replicated += nbytes
            else:
                sharded += nbytes
        stages.append(StageWeights(rank, (start, end), params, sharded + replicated, sharded, replicated))
    return stages


def replicated_tensors(cfg: ModelConfig, tp: int) -> list[str]:
    specs = tensor_specs(cfg)[0] + [s for i in range(cfg.num_layers) for s in tensor_specs(cfg, i)[1]]
    names = [s.name for s in specs if s.split == "replicated" or (s.split == "kv" and tp > cfg.num_kv_heads)]
    return list(dict.fromkeys(names))
