"""Layers with two implementations: plain torch ops (any device) and a fused native kernel (pagedllm/kernels,
CPU). As vLLM's CustomOp, the choice is made once when the model is loaded, not per call."""

from __future__ import annotations

from torch import nn


class CustomOp(nn.Module):
    native = False  # set by enable_native_ops

    def forward(self, *args, **kwargs):
        return self.forward_native(*args, **kwargs) if self.native else self.forward_torch(*args, **kwargs)

    def forward_torch(self, *args, **kwargs):
        raise NotImplementedError

    def forward_native(self, *args, **kwargs):
        raise NotImplementedError


def enable_native_ops(model: nn.Module) -> None:
    """Every CustomOp, and every other layer with a `native` switch (linear layers, the LM head)."""
    for module in model.modules():
        if hasattr(type(module), "native"):
            module.native = True
