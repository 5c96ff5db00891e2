"""SwiGLU on the fused gate/up projection output."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedllm import kernels
from pagedllm.layers.custom_op import CustomOp


class SiluAndMul(CustomOp):
    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.silu_and_mul(x)
