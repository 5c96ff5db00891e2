"""Paged attention: write this step's K/V into pool slots, read each sequence's K/V through its block table.

One layer's pool is [kv_heads, num_blocks, block_size, head_dim]: gathering a batch's blocks
with one index_select yields [kv_heads, batch, context, head_dim], which batched matmuls use in
place (no per-sequence loop, no transposed copies). Three paths share a step:
- decodes (one query each): two batched matmuls and a softmax over the gathered context;
- fresh prompt chunks (nothing cached before them): causal SDPA on the chunk's own q/k/v;
- other prompt chunks (after a cached prefix or an earlier chunk): SDPA over the gathered
  context with a causal mask offset by what was already computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.model_executor.context import AttentionMetadata, get_attention_metadata


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.group = num_heads // num_kv_heads
        self.scale = head_dim ** -0.5
        self.k_cache = torch.empty(0)  # bound to views of the engine's pool by the model runner
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, heads, head_dim], k/v: [T, kv_heads, head_dim] -> [T, heads * head_dim]."""
        meta = get_attention_metadata()
        kvh, hd = self.num_kv_heads, self.head_dim
        self.k_cache.view(kvh, -1, hd).index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
        self.v_cache.view(kvh, -1, hd).index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
        d = meta.num_decode_tokens
        out = torch.empty_like(q)
        if d:
            out[:d] = self._decode(q[:d], meta)
        if meta.num_prefills:
            qp = q[d:][meta.prefill_query_index]  # [P, max_q, heads, head_dim], right-padded
            if meta.prefill_block_tables is None:
                o = F.scaled_dot_product_attention(
                    qp.transpose(1, 2), k[d:][meta.prefill_query_index].transpose(1, 2),
                    v[d:][meta.prefill_query_index].transpose(1, 2),
                    is_causal=True, scale=self.scale, enable_gqa=self.group > 1)
            else:
                keys, values = self._gather(meta.prefill_block_tables)
                o = F.scaled_dot_product_attention(
                    qp.transpose(1, 2), keys.transpose(0, 1), values.transpose(0, 1),
                    attn_mask=meta.prefill_key_mask, scale=self.scale, enable_gqa=self.group > 1)
            out[d:] = o.transpose(1, 2).reshape(-1, self.num_heads, hd)[meta.prefill_unpad_index]
        return out.view(q.shape[0], -1)

    def _gather(self, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the sequences in `block_tables`: [kv_heads, batch, blocks * block_size, head_dim]."""
        b, idx = block_tables.shape[0], block_tables.reshape(-1)
        shape = (self.num_kv_heads, b, -1, self.head_dim)
        return self.k_cache.index_select(1, idx).view(shape), self.v_cache.index_select(1, idx).view(shape)

    def _decode(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        b = q.shape[0]
        keys, values = self._gather(meta.decode_block_tables)
        qg = q.view(b, self.num_kv_heads, self.group, self.head_dim).transpose(0, 1)  # [kv_heads, b, group, hd]
        scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * self.scale + meta.decode_attn_bias
        probs = scores.softmax(-1).to(q.dtype)
        return torch.matmul(probs, values).transpose(0, 1).reshape(b, self.num_heads, self.head_dim)
