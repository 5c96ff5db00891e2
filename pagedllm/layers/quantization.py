"""Weight-only quantization in groups: one format for every scheme pagedllm runs.

A quantized layer keeps `weight` as int8 values [N, K] (8-bit) or two 4-bit values per byte [N, K / 2], plus
`weight_scale` and, for asymmetric schemes, `weight_offset`, both fp16 [N, K / group_size]: w = scale * q + offset
per group. 4-bit values sit in blocks of 32 as GGUF stores Q4_0 / Q4_1 (byte j: value j in the low nibble,
value j + 16 in the high one), so those files load by copying bytes; int8 with one scale per row is the case
group_size = K. Decode batches multiply straight from the packed values (kernels/csrc/quant_gemv.h), reading a
quarter (4-bit) or half (8-bit) of bf16's bytes; large batches dequantize once per call for the bf16 matmul.

On CPUs with int8 dot products (AVX512-VNNI) a bf16 model's GGUF weights (kernels.int8_activations says which) are
tiled after loading (`tile_for_int8_dot_`): the same bytes, rows interleaved by 16 for kernels/csrc/quant_gemv_tiled.h,
whose decode GEMV quantizes the activations to int8 per 16 values, as llama.cpp's and vLLM's GGUF kernels do
(they scale per 32).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm import kernels
from pagedllm.quant_config import INT4_BLOCK, QuantFormat

INT8_KERNEL_MAX_ROWS = 16  # above this many tokens, dequantize + bf16 matmul is faster on bf16-capable CPUs


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Values 0..15 [N, K] (uint8) -> [N, K / 2] in 32-value blocks (low nibbles: the block's first 16)."""
    blocks = q.view(q.shape[0], -1, 2, INT4_BLOCK // 2)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(q.shape[0], -1)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    blocks = packed.view(packed.shape[0], -1, INT4_BLOCK // 2)
    return torch.cat([blocks & 15, blocks >> 4], dim=-1).reshape(packed.shape[0], -1)


def _half_scale(s: torch.Tensor) -> torch.Tensor:
    h = s.half()
    return torch.where(h == 0, torch.ones_like(h), h)  # an all-zero group: any scale gives q = 0


def quantize(w: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest: w [N, K] -> (values, fp16 scale [N, groups], fp16 offset or None), each q computed from
    the fp16-rounded scale and offset so that scale * q + offset is the value the kernels multiply by."""
    n, k = w.shape
    fmt.check(k, "quantize")
    g = w.float().view(n, fmt.groups(k), -1)
    if fmt.bits == 8:
        scale = _half_scale(g.abs().amax(-1) / 127)
        q = torch.round(g / scale.float()[..., None]).clamp_(-127, 127).to(torch.int8)
        return q.view(n, k), scale, None
    lo, hi = g.amin(-1), g.amax(-1)
    scale, offset = _half_scale((hi - lo) / 15), lo.half()
    q = torch.round((g - offset.float()[..., None]) / scale.float()[..., None]).clamp_(0, 15).to(torch.uint8)
    return pack_int4(q.view(n, k)), scale, offset


TILE = 16  # output features per tile of the tiled layout


def tile(values: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None) -> tuple:
    """[N, bytes] values and [N, groups] scales / offsets -> the tiled layout: each row's 32-bit words interleaved
    over 16 rows ([N / 16, bytes / 4, 64]; [N / 16, groups, 16])."""
    n = values.shape[0]
    words = values.view(torch.int32).view(n // TILE, TILE, -1).transpose(1, 2).contiguous()
    return (words.view(values.dtype),
            *(None if t is None else t.view(n // TILE, TILE, -1).transpose(1, 2).contiguous() for t in (scale, offset)))


def untile(values: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None) -> tuple:
    """The inverse of `tile` (a no-op on untiled tensors)."""
    if values.dim() == 2:
        return values, scale, offset
    n = values.shape[0] * TILE
    rows = values.view(torch.int32).transpose(1, 2).reshape(n, -1).view(values.dtype)
    return rows, *(None if t is None else t.transpose(1, 2).reshape(n, -1) for t in (scale, offset))


def tileable(module: nn.Module) -> bool:
    """A quantized [N, K] weight the tiled kernels take: N a multiple of 16, groups of a multiple of 32 values."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not is_quantized(module):
        return False
    k = w.shape[1] * (2 if w.dtype == torch.uint8 else 1)
    return w.shape[0] % TILE == 0 and (k // module.weight_scale.shape[1]) % 32 == 0


def tile_for_int8_dot_(model: nn.Module) -> None:
    """Tile, in place, the quantized weights of the layers that run natively (linear layers, the LM head; a tied
    embedding shares the head's tensors and reads its rows through `untile`)."""
    for module in model.modules():
        if hasattr(type(module), "native") and tileable(module):
            params = [module.weight, *scale_and_offset(module)]
            for p, t in zip(params, tile(*(None if p is None else p.data for p in params))):
                if p is not None:
                    p.data = t


def dequantize(values: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
               dtype: torch.dtype) -> torch.Tensor:
    """The float matrix [N, K] (computed in fp32, as the kernels do, then cast), from either layout."""
    values, scale, offset = untile(values, scale, offset)
    q = unpack_int4(values) if values.dtype == torch.uint8 else values
    n, k = q.shape
    w = q.float().view(n, scale.shape[1], -1) * scale.float()[..., None]
    if offset is not None:
        w += offset.float()[..., None]
    return w.view(n, k).to(dtype)


def make_quantized_(module: nn.Module, fmt: QuantFormat, name: str = "weight") -> None:
    """Give a layer empty quantized parameters in place of its float weight `name` ([N, K], or [experts, N, K] for
    stacked experts), for a quantized checkpoint to load into through the weight's own loader: every tensor shards
    along the weight's dimensions."""
    weight = getattr(module, name)
    *lead, n, k = weight.shape
    fmt.check(k, type(module).__name__)
    device = weight.device
    values = torch.empty(*lead, n, k // 2 if fmt.bits == 4 else k, dtype=torch.uint8 if fmt.bits == 4 else torch.int8,
                         device=device)
    groups = torch.empty(*lead, n, fmt.groups(k), dtype=torch.float16, device=device)
    _set(module, name, (values, groups, torch.empty_like(groups) if fmt.offset else None),
         getattr(weight, "weight_loader", None))
    if fmt.act_order:
        perm = nn.Parameter(torch.full((*lead, k), -1, dtype=torch.int32, device=device), requires_grad=False)
        perm.weight_loader = functools.partial(_load_perm, module)
        setattr(module, f"{name}_perm", perm)


def _load_perm(module: nn.Module, param: nn.Parameter, loaded, shard_id=None) -> None:
    """An act-order layer's input permutation (stacked experts: one per expert, shard_id (expert, part)): the input
    feature of each stored column. A row-parallel shard holds its own columns' entries (whole groups: the columns
    are sorted by group), which index the whole input. The parts of a fused layer (q, k and v; gate and up) share
    their input, so they must share it."""
    dest = param.data[shard_id[0]] if isinstance(shard_id, tuple) else param.data
    if getattr(module, "tp_dim", None) == 1:
        loaded = loaded[module.tp.rank * len(dest):(module.tp.rank + 1) * len(dest)]
    loaded = loaded.to(dest.dtype)
    if dest[0] >= 0 and not torch.equal(dest, loaded):
        raise ValueError("GPTQ act-order: the parts of one fused layer (q / k / v or gate / up) permute their shared "
                         "input differently; pagedllm runs them as one matmul and cannot")
    dest.copy_(loaded)


def quantize_module_(module: nn.Module, fmt: QuantFormat, name: str = "weight") -> None:
    """Replace a layer's float weight `name` ([N, K], or [experts, N, K]) by its round-to-nearest quantization."""
    weight = getattr(module, name)
    parts = [quantize(w, fmt) for w in weight.data.view(-1, *weight.shape[-2:])]
    stacked = tuple(None if p[0] is None else torch.stack(p).view(*weight.shape[:-2], *p[0].shape)
                    for p in zip(*parts))
    _set(module, name, stacked, getattr(weight, "weight_loader", None))


def _set(module: nn.Module, name: str, tensors: tuple, loader) -> None:
    """weight, weight_scale and weight_offset (the last may be None: no parameter)."""
    for suffix, t in zip(("", "_scale", "_offset"), tensors):
        if t is None:
            continue
        param = nn.Parameter(t, requires_grad=False)
        if loader is not None:
            param.weight_loader = loader
        setattr(module, name + suffix, param)


def share_weights(dst: nn.Module, src: nn.Module) -> None:
    """dst uses src's weight and its scales (a tied LM head)."""
    for name in ("weight", "weight_scale", "weight_offset"):
        if hasattr(src, name):
            setattr(dst, name, getattr(src, name))


def scale_and_offset(module: nn.Module, name: str = "weight") -> tuple[torch.Tensor | None, torch.Tensor | None]:
    return getattr(module, f"{name}_scale", None), getattr(module, f"{name}_offset", None)


def is_quantized(module: nn.Module) -> bool:
    return module.weight.dtype in (torch.int8, torch.uint8)


def embed(module: nn.Module, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows of an embedding table, dequantized if it is quantized (natively where the module runs natively)."""
    if not is_quantized(module):
        return F.embedding(ids, module.weight)
    if getattr(module, "native", False):
        out = kernels.quantized_embedding(ids.reshape(-1), module.weight, *scale_and_offset(module), dtype)
    else:
        out = dequantize(*_rows(module, ids.reshape(-1)), dtype)
    return out.view(*ids.shape, -1)


def _rows(module: nn.Module, ids: torch.Tensor) -> tuple:
    """Rows `ids` of a quantized weight (values, scale, offset) in the untiled layout, from either layout."""
    w, scale, offset = module.weight, *scale_and_offset(module)
    if w.dim() == 2:
        index = (ids,)
    else:  # row r is lane r % 16 of tile r // 16
        index, w = (ids // TILE, slice(None), ids % TILE), w.view(torch.int32)
    return (w[index].view(module.weight.dtype), scale[index], None if offset is None else offset[index])


def linear(x: torch.Tensor, module: nn.Module, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T for a float or quantized module weight (an act-order one's input permuted to its column order)."""
    perm = getattr(module, "weight_perm", None)
    if perm is not None:
        x = x.index_select(-1, perm)
    return matmul(x, module.weight, *scale_and_offset(module), module.native, bias)


def matmul(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, offset: torch.Tensor | None, native: bool,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w^T for a float or quantized weight w (with its scale and offset), through the native kernel or torch."""
    if native:
        return kernels.linear(x, w, bias, scale, offset)
    if scale is None:
        return F.linear(x, w, bias)
    # torch's int8 kernel: per-row scales, rows of a multiple of 16 values (it crashed on 72)
    if (x.device.type == "cpu" and x.dim() == 2 and x.shape[0] <= INT8_KERNEL_MAX_ROWS and x.shape[1] % 16 == 0
            and w.dtype == torch.int8 and scale.shape[1] == 1):
        y = torch._weight_int8pack_mm(x.contiguous(), w, scale.view(-1).to(x.dtype))
    else:
        y = F.linear(x, dequantize(w, scale, offset, x.dtype))
    return y if bias is None else y + bias
