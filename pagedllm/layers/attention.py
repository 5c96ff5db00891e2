"""Paged attention: write this step's K/V into pool slots, read each sequence's K/V through its block table.

One layer's pool is [kv_heads, num_blocks, block_size, head_dim]: one index_select of whole
block rows yields a bucket's K/V as [kv_heads, batch, context, head_dim], which batched matmuls
use in place.

On the CPU the native kernel (pagedllm/kernels) computes the whole step's attention in one call,
reading each sequence's keys and values through its block table. Elsewhere (or with
PAGEDLLM_ATTENTION_BACKEND=torch), per bucket of similar-length sequences (see forward_context.py):
- decodes (one query each): two batched matmuls and a softmax over the gathered context;
- fresh prompt chunks (nothing cached before them): causal SDPA on the chunks' own q/k/v;
- other prompt chunks (after a cached prefix or an earlier chunk): SDPA over the gathered
  context with a causal mask offset by what was already computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.forward_context import DecodeBucket, PrefillBucket, get_attention_metadata
from pagedllm.kernels import paged_attention, reshape_and_cache


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
        if meta.native is not None:
            n = meta.native
            reshape_and_cache(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
            return paged_attention(q, self.k_cache, self.v_cache, n.block_tables, n.query_start, n.context_lens,
                                   self.scale, n.max_context).view(q.shape[0], -1)
        kvh, hd = self.num_kv_heads, self.head_dim
        self.k_cache.view(kvh, -1, hd).index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
        self.v_cache.view(kvh, -1, hd).index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
        out = torch.empty_like(q)
        for bucket in meta.decode:
            out[bucket.tokens] = self._decode(q[bucket.tokens], bucket)
        for bucket in meta.prefill:
            t = bucket.tokens
            out[t] = self._prefill(q[t], k[t], v[t], bucket)
        return out.view(q.shape[0], -1)

    def _gather(self, index: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `batch` sequences as [kv_heads, batch, context, head_dim]; `index` addresses the pool
        viewed as [kv_heads * num_blocks] rows, so one contiguous-row index_select serves every head."""
        shape = (self.num_kv_heads, batch, -1, self.head_dim)
        row = self.k_cache.shape[2] * self.head_dim
        return (self.k_cache.view(-1, row).index_select(0, index).view(shape),
                self.v_cache.view(-1, row).index_select(0, index).view(shape))

    def _decode(self, q: torch.Tensor, bucket: DecodeBucket) -> torch.Tensor:
        b = q.shape[0]
        keys, values = self._gather(bucket.gather_index, b)
        qg = q.view(b, self.num_kv_heads, self.group, self.head_dim).transpose(0, 1)  # [kv_heads, b, group, hd]
        scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * self.scale + bucket.attn_bias
        probs = scores.softmax(-1).to(q.dtype)
        return torch.matmul(probs, values).transpose(0, 1).reshape(b, self.num_heads, self.head_dim)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bucket: PrefillBucket) -> torch.Tensor:
        qp = q[bucket.query_index].transpose(1, 2)  # [B, heads, max_q, hd]
        if bucket.gather_index is None:
            kp, vp = k[bucket.query_index].transpose(1, 2), v[bucket.query_index].transpose(1, 2)
            o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=self.scale, enable_gqa=self.group > 1)
        else:
            keys, values = self._gather(bucket.gather_index, qp.shape[0])
            o = F.scaled_dot_product_attention(qp, keys.transpose(0, 1), values.transpose(0, 1), attn_mask=bucket.key_mask,
                                               scale=self.scale, enable_gqa=self.group > 1)
        return o.transpose(1, 2).reshape(-1, self.num_heads, self.head_dim)[bucket.unpad_index]
