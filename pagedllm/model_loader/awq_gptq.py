"""AWQ and GPTQ checkpoints read into pagedllm's grouped format (layers/quantization.py), as vLLM detects them
from config.json's quantization_config.

Both store w[k, n] = scale[g, n] * (q[k, n] - zero[g, n]) for input feature k in group g = k // group_size, with
int32 words of 32 / bits values: GPTQ packs qweight [K / pack, N] along the input features and qzeros
[groups, N / pack] along the outputs, in order, and its original format ("gptq", v1) stores each zero minus one;
AutoAWQ's GEMM layout packs both qweight [K, N / 8] and qzeros along the outputs, in the order 0 2 4 6 1 3 5 7.
The values and fp16 scales are kept as they are; the zeros become offsets -zero * scale, rounded to fp16 (within
2^-11 of each weight's zero point: the one rounding this conversion adds). GPTQ's act-order (desc_act) assigns
input features to groups out of order (g_idx): their columns are sorted by group, and the layer permutes its input
to match (the permutation comes with the layer as .weight_perm), as vLLM's GPTQ kernels do.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pagedllm.layers.quantization import pack_int4
from pagedllm.quant_config import awq_gptq_format

Getter = Callable[[str], "torch.Tensor | None"]
COMPANIONS = (".qzeros", ".scales", ".g_idx")  # read with their module's .qweight
AWQ_COLUMN_NIBBLE = (0, 4, 1, 5, 2, 6, 3, 7)  # output column j of a word sits in nibble AWQ_COLUMN_NIBBLE[j]


def _unpack(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] -> [R, C, 32 / bits], lowest bits first."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    return (words[..., None] >> shifts) & ((1 << bits) - 1)


def _awq(get: Getter, base: str, quant: dict) -> tuple[torch.Tensor, torch.Tensor, None]:
    """(q [K, N], zeros [groups, N], no permutation) of an AutoAWQ GEMM layer."""
    order = list(AWQ_COLUMN_NIBBLE)
    q = _unpack(get(f"{base}.qweight"), 4)[..., order].flatten(1)
    zeros = _unpack(get(f"{base}.qzeros"), 4)[..., order].flatten(1)
    return q, zeros, None


def _gptq(get: Getter, base: str, quant: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(q [K, N] with its rows sorted by group, zeros [groups, N], and with desc_act the input features in that
    order)."""
    bits = quant["bits"]
    q = _unpack(get(f"{base}.qweight"), bits).transpose(1, 2).flatten(0, 1)  # word [i, n]: inputs pack * i ...
    zeros = _unpack(get(f"{base}.qzeros"), bits).flatten(1)
    if quant.get("checkpoint_format", "gptq") == "gptq":
        zeros = zeros + 1  # v1 stored zero - 1 (its loaders add the one back without wrapping: so do we)
    k, groups = q.shape[0], zeros.shape[0]
    in_order, act_order = torch.arange(k) // (k // groups), awq_gptq_format(quant).act_order
    g_idx = get(f"{base}.g_idx")
    if g_idx is None or torch.equal(g_idx.long(), in_order):
        return q, zeros, torch.arange(k) if act_order else None
    if not act_order:
        raise ValueError(f"{base}: GPTQ groups out of input order, but the checkpoint's desc_act is false")
    perm = torch.sort(g_idx.long(), stable=True).indices
    if not torch.equal(g_idx.long()[perm], in_order):
        raise ValueError(f"{base}: GPTQ act-order groups of unequal sizes")
    return q[perm], zeros, perm


def to_grouped(get: Getter, base: str, quant: dict) -> dict[str, torch.Tensor]:
    """The layer `base` of an AWQ / GPTQ checkpoint as pagedllm's tensors: {".weight": values, ".weight_scale":
    fp16 [N, groups], ".weight_offset": fp16 [N, groups]}, and under act-order ".weight_perm" (the input feature of
    each column, int32 [K]); `get` returns a checkpoint tensor by name, or None."""
    bits = quant.get("bits", quant.get("w_bit"))
    q, zeros, perm = (_awq if quant["quant_method"] == "awq" else _gptq)(get, base, quant)
    scales = get(f"{base}.scales")
    k, groups = q.shape[0], scales.shape[0]
    scale = scales.t().contiguous().half()
    offset = (-(zeros - (128 if bits == 8 else 0)).float() * scales.float()).t().half()
    # one group per row becomes groups of 32 for 4-bit (quant_config.awq_gptq_format): the same scale repeated
    repeat = awq_gptq_format(quant).groups(k) // groups
    scale, offset = (t.repeat_interleave(repeat, dim=1) for t in (scale, offset))
    if bits == 4:
        values = pack_int4(q.t().to(torch.uint8).contiguous())
    else:
        values = (q.t() - 128).to(torch.int8).contiguous()
    parts = {".weight": values, ".weight_scale": scale, ".weight_offset": offset.contiguous()}
    return parts if perm is None else {**parts, ".weight_perm": perm.to(torch.int32)}
