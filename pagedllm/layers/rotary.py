"""Rotary position embedding (the rotate-half layout HF Llama/Qwen checkpoints use), with RoPE scaling.

The scaled variants (linear, dynamic NTK, YaRN with its attention factor, Llama 3's frequency bands) take their
inverse frequencies from transformers' own RoPE functions, so they are what HF computes; one cos / sin table per
model serves every layer and the native kernels alike.
"""

from __future__ import annotations

import json

import torch

from pagedllm import kernels
from pagedllm.config import ModelConfig
from pagedllm.layers.custom_op import CustomOp


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim / 2], attention factor the cos / sin tables are scaled by)."""
    default = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
    if cfg.rope_type == "default":
        return default, 1.0
    rope = json.loads(cfg.rope_scaling)
    if cfg.rope_type == "freq_factors":  # llama.cpp divides each frequency by its factor
        return default / torch.tensor(rope["factors"], dtype=torch.float32), 1.0
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = AutoConfig.for_model(cfg.model_type, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads,
                              head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
                              rope_theta=cfg.rope_theta, rope_scaling=rope)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[cfg.rope_type](hf, torch.device("cpu"))
    return inv_freq.float(), float(attention_factor)


class RotaryEmbedding(CustomOp):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq, attention_factor = rope_frequencies(cfg)
        positions = torch.arange(cfg.max_context, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq.to(positions.device, torch.float32))
        self.register_buffer("cos", freqs.cos() * attention_factor, persistent=False)
        self.register_buffer("sin", freqs.sin() * attention_factor, persistent=False)

    def forward_torch(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, heads, head_dim], k: [T, kv_heads, head_dim]; positions: [T]."""
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def forward_native(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """In place: q and k are fresh slices of this layer's QKV projection."""
        kernels.rotary_embedding(positions, q, self.cos, self.sin)
        kernels.rotary_embedding(positions, k, self.cos, self.sin)
        return q, k


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

