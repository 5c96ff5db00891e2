"""int8 weight-only quantization: one symmetric scale per output channel (the brief's int8 row).

Weights are stored as int8 plus a scale per row in the activation dtype. Small batches (decode)
multiply straight from int8, reading half the bytes of bf16 (the native kernel's GEMV up to 4 tokens,
torch's int8-weight kernel up to 16); large batches dequantize the weight once per call and use the
fast bf16 matmul. The native linear op (kernels/csrc/linear_cpu.cpp) makes the same choices in C++.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm import kernels

INT8_KERNEL_MAX_ROWS = 16  # above this many tokens, dequantize + bf16 matmul is faster on bf16-capable CPUs


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (int8 [out, in], scale [out]) with w ≈ q * scale[:, None]."""
    wf = w.float()
    scale = wf.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(wf / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale.to(w.dtype)


def quantize_module_(module: nn.Module) -> None:
    """Swap a module's float `weight` for an int8 one and a `weight_scale` (in place)."""
    q, scale = quantize_rows(module.weight.data)
    module.weight = nn.Parameter(q, requires_grad=False)
    module.weight_scale = nn.Parameter(scale, requires_grad=False)


def dequantize(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    return module.weight.to(dtype) * module.weight_scale[:, None]


def linear(x: torch.Tensor, module: nn.Module, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T for a float or int8-quantized module weight."""
    w = module.weight
    scale = module.weight_scale if w.dtype == torch.int8 else None
    if module.native:
        return kernels.linear(x, w, bias, scale)
    if scale is None:
        return F.linear(x, w, bias)
    # torch's int8 kernel needs rows of a multiple of 16 values (it crashed on 72)
    if x.device.type == "cpu" and x.dim() == 2 and x.shape[0] <= INT8_KERNEL_MAX_ROWS and x.shape[1] % 16 == 0:
        y = torch._weight_int8pack_mm(x.contiguous(), w, scale)
    else:
        y = F.linear(x, dequantize(module, x.dtype))
    return y if bias is None else y + bias
