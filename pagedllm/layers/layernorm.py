"""RMSNorm, with the residual add fused in so each decoder layer carries one residual stream."""

from __future__ import annotations

import torch
from torch import nn

from pagedllm import kernels
from pagedllm.layers.custom_op import CustomOp


class RMSNorm(CustomOp):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward_torch(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def forward_native(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """With a residual, both are updated in place: the layer's output x is not needed after this."""
        if residual is None:
            return kernels.rms_norm(x.contiguous(), self.weight, self.eps)
        kernels.fused_add_rms_norm(x, residual, self.weight, self.eps)
        return x, residual
