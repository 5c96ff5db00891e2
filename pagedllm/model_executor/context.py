"""Per-step attention metadata, set once by the model runner and read by every attention layer.

A step's tokens are laid out flat: first one token per decoding sequence, then the prompt chunks
of the prefilling sequences, each contiguous. Decodes and prefill chunks run in one forward pass.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each token's K/V goes in the flattened pool
    num_decode_tokens: int = 0
    decode_block_tables: torch.Tensor | None = None  # [D, max_blocks]
    decode_attn_bias: torch.Tensor | None = None  # [1, D, 1, max_blocks*block_size]: 0 in the context, -inf past it
    num_prefills: int = 0
    prefill_query_index: torch.Tensor | None = None  # [P, max_q] flat prefill token of each padded query row
    prefill_unpad_index: torch.Tensor | None = None  # [num_prefill_tokens] row in the padded [P*max_q] output
    # Only when some prompt chunk follows cached tokens (else attention stays within each chunk):
    prefill_block_tables: torch.Tensor | None = None  # [P, max_blocks]
    prefill_key_mask: torch.Tensor | None = None  # [P, 1, max_q, max_blocks*block_size] causal, offset by the cache


_CONTEXT: AttentionMetadata | None = None


def get_attention_metadata() -> AttentionMetadata:
    assert _CONTEXT is not None, "attention metadata is only set during a model runner step"
    return _CONTEXT


@contextmanager
def attention_metadata(meta: AttentionMetadata):
    global _CONTEXT
    _CONTEXT = meta
    try:
        yield meta
    finally:
        _CONTEXT = None
