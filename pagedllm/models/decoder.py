"""One decoder-only transformer for the Llama family and Qwen2/Qwen3.

The architectures differ only in small switches read from `ModelConfig`: QKV biases (Qwen2),
per-head RMSNorm on q and k before rotary (Qwen3), tied embeddings. Parameter names match the
HF checkpoints so weights load by name.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch
from torch import nn

from pagedllm import kernels
from pagedllm.config import ModelConfig
from pagedllm.distributed.parallel_state import get_tp_group
from pagedllm.forward_context import get_attention_metadata
from pagedllm.layers import quantization as quant
from pagedllm.layers.activation import SiluAndMul
from pagedllm.layers.attention import PagedAttention
from pagedllm.layers.custom_op import CustomOp
from pagedllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from pagedllm.layers.fused_moe import WEIGHTS as MOE_WEIGHTS
from pagedllm.layers.fused_moe import FusedMoE
from pagedllm.layers.layernorm import RMSNorm
from pagedllm.layers.linear import (
    LinearBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from pagedllm.layers.rotary import RotaryEmbedding
from pagedllm.quant_config import RTN_SCHEMES, QuantFormat


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.attention_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = cfg.head_dim
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.rotary = rotary
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class SparseMoeBlock(nn.Module):
    """Qwen3-MoE's MLP: a router (replicated on every rank) and the routed experts."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = ReplicatedLinear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = FusedMoE(cfg.num_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size,
                                cfg.norm_topk_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x, self.gate(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, index: int):
        super().__init__()
        self.self_attn = Attention(cfg, rotary)
        self.mlp = SparseMoeBlock(cfg) if cfg.is_moe_layer(index) else MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual

    def native_params(self) -> list[torch.Tensor | None]:
        """This layer's weights in the order the native kernel takes them (kernels/csrc/decoder_layer_cpu.cpp): the
        norms and rotary tables, then each linear layer's weight, bias, scale, offset and input permutation."""
        attn, mlp = self.self_attn, self.mlp
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        return [self.input_layernorm.weight, attn.q_norm.weight if attn.qk_norm else None,
                attn.k_norm.weight if attn.qk_norm else None, self.post_attention_layernorm.weight, attn.rotary.cos,
                attn.rotary.sin, *(p for m in linears for p in (m.weight, m.bias, *quant.scale_and_offset(m),
                                                                  getattr(m, "weight_perm", None)))]


@dataclass(frozen=True)
class Stage:
    """The layers [start, end) one pipeline stage holds; the first also embeds, the last also norms and
    projects to logits. The default is the whole model."""

    start: int
    end: int
    first: bool = True
    last: bool = True


class MissingLayer(nn.Module):
    """Stands in for another stage's layer so parameter names keep their global layer index."""


class DecoderModel(CustomOp):
    """The native forward runs the stage's layers in one kernel call (kernels/csrc/decoder_layer_cpu.cpp) on the
    same parameters: at one token per step, a layer's dozen operators called from Python cost about a third of its
    time. It applies where attention runs natively and layers are not tensor-parallel (their all-reduces stay in
    Python)."""

    def __init__(self, cfg: ModelConfig, stage: Stage):
        super().__init__()
        self.stage = stage
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size) if stage.first else None
        rotary = RotaryEmbedding(cfg)  # one table, shared
        self.layers = nn.ModuleList(DecoderLayer(cfg, rotary, i) if stage.start <= i < stage.end else MissingLayer()
                                    for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if stage.last else None
        self.stage_layers: tuple[DecoderLayer, ...] = tuple(self.layers[stage.start:stage.end])
        self.fusable = get_tp_group().size == 1 and not cfg.num_experts  # the fused kernel has a dense MLP
        self._kv_caches: list[torch.Tensor] = []

    def forward_torch(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor | None = None,
                      residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The first stage starts from token ids, later ones from the previous stage's (hidden, residual).
        The last stage returns normed hidden states, the others (hidden, residual) for the next stage."""
        x = self._first(input_ids, hidden)
        for layer in self.stage_layers:
            x, residual = layer(positions, x, residual)
        return self._last(x, residual)

    def forward_native(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor | None = None,
                       residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        meta = get_attention_metadata()
        if meta.native is None or not self.fusable:
            return self.forward_torch(input_ids, positions, hidden, residual)
        x = self._first(input_ids, hidden)
        if residual is None:  # the kernel starts each layer with residual += x
            x, residual = None, x
        batch = meta.native
        x = kernels.decoder_layers(x, residual, positions, meta.slot_mapping, batch.block_tables, batch.query_start,
                                   batch.context_lens, self.kv_caches(), self._native_stack)
        return self._last(x, residual)

    def kv_caches(self) -> list[torch.Tensor]:
        """Each stage layer's key and value pool, collected again only when the model runner has bound new ones."""
        first = self.stage_layers[0].self_attn.attn
        if not self._kv_caches or self._kv_caches[0] is not first.k_cache:
            self._kv_caches = [c for layer in self.stage_layers
                               for c in (layer.self_attn.attn.k_cache, layer.self_attn.attn.v_cache)]
        return self._kv_caches

    @functools.cached_property
    def _native_stack(self):
        """Every stage layer's weights, gathered and handed to the kernel once (per call, the module lookups would cost
        as much as the norms, the list's conversion several times that)."""
        first = self.stage_layers[0]
        return kernels.decoder_stack([p for layer in self.stage_layers for p in layer.native_params()],
                                     first.self_attn.num_heads, first.input_layernorm.eps, first.self_attn.attn.scale)

    def _first(self, input_ids: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
        return self.embed_tokens(input_ids) if self.embed_tokens is not None else hidden

    def _last(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.norm is None:
            return x, residual
        x, _ = self.norm(x, residual)
        return x


class DecoderForCausalLM(nn.Module):
    # checkpoint name -> (our fused parameter, shard id)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }
    # an expert's projection -> (the stacked parameter, its part); the expert's index completes the shard id
    expert_modules = {"gate_proj": ("w13_weight", "gate"), "up_proj": ("w13_weight", "up"), "down_proj": ("w2_weight", "down")}

    def checkpoint_target(self, name: str) -> tuple[str, object]:
        """The parameter a checkpoint tensor loads into, and the shard id its weight_loader takes."""
        expert = re.match(r"(.*\.experts)(?:\.(\d+))?\.(\w+)\.weight(_scale|_offset|_perm)?$", name)
        if expert and expert.group(3) in self.expert_modules:  # an expert's projection (no index: every expert's)
            param, part = self.expert_modules[expert.group(3)]
            index = None if expert.group(2) is None else int(expert.group(2))
            return f"{expert.group(1)}.{param}{expert.group(4) or ''}", (index, part)
        for ckpt_part, (ours, shard_id) in self.packed_modules.items():
            if f".{ckpt_part}." in name:
                return name.replace(ckpt_part, ours), shard_id
        return name, None

    def __init__(self, cfg: ModelConfig, stage: Stage | None = None):
        super().__init__()
        self.config = cfg
        self.stage = stage or Stage(0, cfg.num_layers)
        self.model = DecoderModel(cfg, self.stage)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size) if self.stage.last else None
        if cfg.tie_word_embeddings and self.stage.first and self.stage.last:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor | None = None,
                residual: torch.Tensor | None = None):
        return self.model(input_ids, positions, hidden, residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def _tied_head(self) -> bool:
        return self.lm_head is not None and self.model.embed_tokens is not None and \
            self.lm_head.weight is self.model.embed_tokens.weight

    def _quantizable(self) -> dict[str, nn.Module]:
        """The layers weight-only quantization applies to: linear layers but a MoE router (it makes a discrete top-k
        choice; AWQ / GPTQ keep it in floats too), the routed experts, the embedding and an LM head of its own, by
        name."""
        tied = self._tied_head()
        return {name: m for name, m in self.named_modules()
                if (isinstance(m, (LinearBase, FusedMoE)) and not isinstance(m, ReplicatedLinear))
                or (m is not None and m is self.model.embed_tokens) or (m is not None and m is self.lm_head and not tied)}

    def quantize_(self, scheme: str) -> None:
        """Round-to-nearest weight-only quantization of the loaded weights (config.RTN_SCHEMES: linear layers in one
        format, the embedding / LM head in another, shared when tied on one stage)."""
        tied = self._tied_head()
        linear_format, table_format = RTN_SCHEMES[scheme]
        for m in self._quantizable().values():
            if isinstance(m, FusedMoE):
                m.quantize_(linear_format)
            else:
                quant.quantize_module_(m, linear_format if isinstance(m, LinearBase) else table_format)
        if tied:
            quant.share_weights(self.lm_head, self.model.embed_tokens)

    def make_quantized_(self, formats: dict[str, QuantFormat]) -> None:
        """Quantized parameters, empty, for a quantized checkpoint to load into; `formats` maps checkpoint module
        names (q_proj, ..., a MoE layer's mlp.experts.gate_proj, ...) to formats, which the parts of one fused layer
        (or stacked expert weight) must share."""
        tied = self._tied_head()
        ours: dict[str, QuantFormat] = {}
        for ckpt_name, fmt in formats.items():
            target = self.checkpoint_target(f"{ckpt_name}.weight")[0].removesuffix(".weight")
            if ours.setdefault(target, fmt) != fmt:
                raise ValueError(f"the parts of {target} are stored in different formats")
        for name, m in self._quantizable().items():
            if isinstance(m, FusedMoE):
                m.make_quantized_({w: ours.get(f"{name}.{w}") for w in MOE_WEIGHTS})
                continue
            fmt = ours.get(name) or (ours.get("model.embed_tokens") if m is self.lm_head and
                                     self.model.embed_tokens is None else None)
            if fmt is not None:
                quant.make_quantized_(m, fmt)
        if tied:
            quant.share_weights(self.lm_head, self.model.embed_tokens)
