"""Per-step attention metadata, set once by the model runner and read by every attention layer.

A step's tokens are laid out flat: first one token per decoding sequence, then the prompt chunks
of the prefilling sequences, each contiguous. The native CPU kernel takes the whole step in one
call, reading the pool through the block tables (NativeBatch). The torch path groups sequences of
similar length into buckets so that padding to a bucket's longest member wastes little; each
bucket is one batched attention call.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class DecodeBucket:
    tokens: slice  # this bucket's tokens in the step's flat layout (one per sequence)
    gather_index: torch.Tensor  # [kv_heads * B * max_blocks] rows of the head-major pool
    attn_bias: torch.Tensor  # [1, B, 1, max_blocks * block_size]: 0 inside each context, -inf past it


@dataclass
class PrefillBucket:
    tokens: slice  # this bucket's prompt chunks, contiguous in the flat layout
    query_index: torch.Tensor  # [B, max_q] token (within `tokens`) of each padded query row, right-padded
    unpad_index: torch.Tensor  # [n tokens] row of each token in the padded [B * max_q] output
    # Only when some chunk follows cached tokens; otherwise attention stays within each chunk:
    gather_index: torch.Tensor | None = None  # [kv_heads * B * max_blocks]
    key_mask: torch.Tensor | None = None  # [B, 1, max_q, max_blocks * block_size] causal, offset by the cache


@dataclass
class NativeBatch:
    """For the kernels that take the whole step through the block tables (native CPU, Triton on the GPU)."""

    block_tables: torch.Tensor  # [B, W]
    query_start: torch.Tensor  # [B + 1] each sequence's first token in the flat layout, then the total
    context_lens: torch.Tensor  # [B] tokens each sequence has once this step's are written
    max_context: int = 0  # the largest of context_lens, known on the host (no device sync to read it)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each token's K/V goes in the flattened pool
    native: NativeBatch | None = None  # set for the native kernel; the buckets are for the torch path
    decode: list[DecodeBucket] = field(default_factory=list)
    prefill: list[PrefillBucket] = field(default_factory=list)


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
