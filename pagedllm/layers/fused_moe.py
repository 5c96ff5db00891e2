"""Routed experts (Qwen3-MoE): a router picks each token's top-k experts; the experts' SwiGLU MLPs run grouped by
expert, each over all of its tokens at once, and their outputs are summed back weighted by the routing
probabilities (renormalised over the top k where the model says so).

The experts' weights are two stacked tensors, [experts, 2 x intermediate, hidden] (gate and up) and [experts,
hidden, intermediate] (down), float or quantized (layers/quantization.py's format, each stacked with its scales and
offsets: an AWQ / GPTQ checkpoint's experts, or --quantization int4 / int8). Tensor parallelism splits every
expert's intermediate dimension, so each rank holds a slice of all experts and an all-reduce sums the partial
outputs, as a row-parallel layer does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.distributed.parallel_state import get_tp_group
from pagedllm.layers import quantization as quant
from pagedllm.layers.linear import narrow
from pagedllm.quant_config import QuantFormat

WEIGHTS = ("w13_weight", "w2_weight")


class FusedMoE(nn.Module):
    native = False  # the native linear kernel for each expert's matmuls (set by layers.custom_op.enable_native_ops)

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, norm_topk_prob: bool):
        super().__init__()
        self.tp = get_tp_group()
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, top_k, norm_topk_prob
        self.intermediate = intermediate_size // self.tp.size
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * self.intermediate, hidden_size), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, self.intermediate), requires_grad=False)
        for p in (self.w13_weight, self.w2_weight):
            p.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: tuple[int, str]) -> None:
        """One expert's gate_proj / up_proj / down_proj (its values, scales or offsets) from the checkpoint: this
        rank's slice of its intermediate dimension, sized by the parameter (a quantized one is narrower)."""
        expert, kind = shard_id
        if kind == "down":
            size = param.shape[2]
            param.data[expert].copy_(narrow(loaded, 1, self.tp.rank * size, size))
        else:
            size = param.shape[1] // 2
            offset = 0 if kind == "gate" else size
            param.data[expert, offset:offset + size].copy_(narrow(loaded, 0, self.tp.rank * size, size))

    def make_quantized_(self, formats: dict[str, QuantFormat | None]) -> None:
        """Quantized parameters for a checkpoint's experts: a format per stacked weight (None: it stays float)."""
        for name, fmt in formats.items():
            if fmt is not None:
                quant.make_quantized_(self, fmt, name)

    def quantize_(self, fmt: QuantFormat) -> None:
        for name in WEIGHTS:
            quant.quantize_module_(self, fmt, name)

    def _matmul(self, x: torch.Tensor, name: str, expert: int) -> torch.Tensor:
        perm = getattr(self, f"{name}_perm", None)  # GPTQ act-order: each expert's input in its columns' order
        if perm is not None:
            x = x.index_select(-1, perm[expert])
        scale, offset = quant.scale_and_offset(self, name)
        return quant.matmul(x, getattr(self, name)[expert], None if scale is None else scale[expert],
                            None if offset is None else offset[expert], self.native)

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden], router_logits: [T, experts] -> [T, hidden]."""
        weights, experts = router_logits.float().softmax(-1).topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        weights, experts = weights.to(x.dtype).flatten(), experts.flatten()  # [T * k]: pair p is token p // k's
        order = experts.argsort(stable=True)  # pairs grouped by expert
        counts = torch.bincount(experts, minlength=self.num_experts).tolist()
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):  # a loop over experts (tens to a hundred), never over tokens
            if n:
                pairs = order[start:start + n]
                tokens = pairs // self.top_k
                gate, up = self._matmul(x[tokens], "w13_weight", e).chunk(2, dim=-1)
                y = self._matmul(F.silu(gate) * up, "w2_weight", e)
                out.index_add_(0, tokens, y * weights[pairs, None])
                start += n
        return self.tp.all_reduce(out)
