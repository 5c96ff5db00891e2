"""Paged attention: write this step's K/V into pool slots, read each sequence's K/V through its block table.

The pool of one layer is [num_blocks, block_size, kv_heads, head_dim]. Decodes (one query each)
and prefill chunks (many queries, maybe after a cached prefix) are two batched SDPA calls over
K/V gathered by block table; grouped-query heads are handled by SDPA itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.model_executor.context import get_attention_metadata


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.k_cache = torch.empty(0)  # bound to views of the engine's pool by the model runner
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, heads, head_dim], k/v: [T, kv_heads, head_dim] -> [T, heads * head_dim]."""
        meta = get_attention_metadata()
        self.k_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, meta.slot_mapping, k)
        self.v_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, meta.slot_mapping, v)
        d = meta.num_decode_tokens
        out = torch.empty_like(q)
        if d:
            out[:d] = self._attend(q[:d].unsqueeze(1), meta.decode_block_tables, meta.decode_key_mask).squeeze(1)
        if meta.prefill_block_tables is not None:
            qp = q[d:][meta.prefill_query_index]  # [P, max_q, heads, head_dim]
            o = self._attend(qp, meta.prefill_block_tables, meta.prefill_key_mask)
            out[d:] = o.reshape(-1, self.num_heads, self.head_dim)[meta.prefill_unpad_index]
        return out.view(q.shape[0], -1)

    def _attend(self, q: torch.Tensor, block_tables: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """q: [B, Q, heads, head_dim] against the K/V of `block_tables` -> [B, Q, heads, head_dim]."""
        b = block_tables.shape[0]
        k = self.k_cache[block_tables].view(b, -1, self.num_kv_heads, self.head_dim)
        v = self.v_cache[block_tables].view(b, -1, self.num_kv_heads, self.head_dim)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=key_mask, scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return o.transpose(1, 2)
