"""GGUF's quantized tensors as pagedllm's grouped format (layers/quantization.py), so that the engine runs a
GGUF file in its own quantization, as llama.cpp does.

Q4_0, Q4_1 and Q8_0 are copied byte for byte (their 4-bit layout is the kernels'). The k-quants keep their values
and move the super-block's scale into each group's: Q4_K as 4-bit groups of 32, Q5_K as 8-bit groups of 32, Q6_K as
8-bit groups of 16; those group scales (d * sub-scale, a 17-bit product) are rounded to fp16, a relative 2^-11.
Other types (Q5_0, Q5_1, Q2_K, Q3_K, IQ*) are dequantized to floats.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import Q4_K

from pagedllm.layers.quantization import pack_int4, unpack_int4
from pagedllm.quant_config import QuantFormat

Grouped = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, QuantFormat]  # values, scale, offset, format
Q = GGMLQuantizationType


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _k_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: each sub-block's scale and offset (d * sc, -dmin * m) as [blocks, 8]."""
    sc, m = Q4_K.get_scale_min(blocks[:, 4:16])
    return _f16(blocks[:, 0:2]) * sc.astype(np.float32), -_f16(blocks[:, 2:4]) * m.astype(np.float32)


def _nibbles(qs: np.ndarray, chunk: int) -> np.ndarray:
    """k-quant low bits: per `chunk` bytes, the low nibbles are `chunk` values, then the high nibbles the next."""
    q = qs.reshape(qs.shape[0], -1, 1, chunk) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(qs.shape[0], -1)


def _parse(blocks: np.ndarray, qtype) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, QuantFormat] | None:
    """Per block: values (uint8 packed 4-bit or int8), scales and offsets (fp32, one per group), the format."""
    if qtype in (Q.Q4_0, Q.Q4_1):
        d = _f16(blocks[:, 0:2])
        offset = -8 * d if qtype == Q.Q4_0 else _f16(blocks[:, 2:4])
        return blocks[:, 2 if qtype == Q.Q4_0 else 4:], d, offset, QuantFormat(4, 32, True)
    if qtype == Q.Q8_0:
        return blocks[:, 2:].view(np.int8), _f16(blocks[:, 0:2]), None, QuantFormat(8, 32, False)
    if qtype == Q.Q4_K:
        scale, offset = _k_scales(blocks)
        values = _nibbles(blocks[:, 16:], 32)  # [blocks, 256] in order
        packed = pack_int4(torch.from_numpy(values.reshape(-1, 32))).numpy()
        return packed.reshape(blocks.shape[0], -1), scale, offset, QuantFormat(4, 32, True)
    if qtype == Q.Q5_K:
        scale, offset = _k_scales(blocks)
        high = blocks[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
        values = _nibbles(blocks[:, 48:], 32) | ((high & 1).reshape(blocks.shape[0], -1) << 4)
        return values.astype(np.int8), scale, offset, QuantFormat(8, 32, True)
    if qtype == Q.Q6_K:
        low = _nibbles(blocks[:, :128], 64)
        high = blocks[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
        values = (low | ((high & 3).reshape(blocks.shape[0], -1) << 4)).astype(np.int8) - np.int8(32)
        scale = _f16(blocks[:, 208:210]) * blocks[:, 192:208].view(np.int8).astype(np.float32)
        return values, scale, None, QuantFormat(8, 16, False)
    return None


def to_grouped(data: np.ndarray, qtype, rows: int, k: int) -> Grouped | None:
    """A GGUF tensor's raw blocks [rows, bytes per row] as (values, fp16 scale, fp16 offset, format), or None for a
    type that is not run quantized."""
    size = GGML_QUANT_SIZES.get(qtype)
    if size is None or size[0] == 1:
        return None
    blocks = np.ascontiguousarray(data).reshape(-1, size[1])
    parsed = _parse(blocks, qtype)
    if parsed is None:
        return None
    values, scale, offset, fmt = parsed
    half = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).reshape(rows, -1).half()  # noqa: E731
    return (torch.from_numpy(np.ascontiguousarray(values)).reshape(rows, -1), half(scale),
            None if offset is None else half(offset), fmt)


def common_format(parts: list[Grouped]) -> list[Grouped]:
    """The parts of one fused layer (q / k / v, gate / up) in one format: the widest values, the smallest groups,
    offsets if any part has them. Every widening is exact (nibbles become int8, scales repeat per smaller group)."""
    bits = max(p[3].bits for p in parts)
    group = min(p[3].group_size for p in parts)
    offset = any(p[3].offset for p in parts)
    out = []
    for values, scale, off, fmt in parts:
        if fmt.bits < bits:
            values = unpack_int4(values).to(torch.int8)
        repeat = fmt.group_size // group
        scale = scale.repeat_interleave(repeat, dim=1)
        off = off.repeat_interleave(repeat, dim=1) if off is not None else (torch.zeros_like(scale) if offset else None)
        out.append((values, scale, off, QuantFormat(bits, group, offset)))
    return out
