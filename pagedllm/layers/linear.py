"""Linear layers that know which shard of a weight they hold (Megatron-style tensor parallelism).

Column-parallel layers split the output features over ranks, row-parallel layers split the input
features and all-reduce the partial products. Each parameter carries a `weight_loader` that
takes a full checkpoint tensor (or a lazy safetensors slice) and copies in only its own shard.
"""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.config import kv_heads_per_rank
from pagedllm.distributed.parallel_state import get_tp_group
from pagedllm.layers import quantization as quant


def narrow(loaded, dim: int, start: int, size: int) -> torch.Tensor:
    """Slice a tensor or a safetensors slice along dim 0 or 1 (only that shard is read)."""
    if dim == 0:
        return loaded[start:start + size]
    return loaded[:, start:start + size]


def _full(loaded) -> torch.Tensor:
    return loaded if isinstance(loaded, torch.Tensor) else loaded[:]


class LinearBase(nn.Module):
    tp_dim: int | None = None  # which weight dim is sharded (0: output, 1: input), None: replicated
    native = False  # use the native CPU linear op (set by layers.custom_op.enable_native_ops)

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.tp = get_tp_group()
        local_out = out_features // self.tp.size if self.tp_dim == 0 else out_features
        local_in = in_features // self.tp.size if self.tp_dim == 1 else in_features
        self.weight = nn.Parameter(torch.empty(local_out, local_in), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(local_out), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        if self.tp_dim is None or (self.tp_dim == 1 and param.dim() == 1):
            param.data.copy_(_full(loaded))
            return
        size = param.shape[self.tp_dim]
        param.data.copy_(narrow(loaded, self.tp_dim, self.tp.rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant.linear(x, self, self.bias)


class ReplicatedLinear(LinearBase):
    """The whole weight on every rank (a MoE router)."""


class ColumnParallelLinear(LinearBase):
    tp_dim = 0


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections fused into one matmul (gate_proj + up_proj)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: int) -> None:
        size = self.output_sizes[shard_id] // self.tp.size
        offset = sum(self.output_sizes[:shard_id]) // self.tp.size
        param.data[offset:offset + size].copy_(narrow(loaded, 0, self.tp.rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v in one matmul. Query heads are split over ranks; KV heads too, or replicated
    when there are more ranks than KV heads (each rank then holds the KV head its queries use)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool):
        tp = get_tp_group()
        self.head_dim = head_dim
        self.num_heads = num_heads // tp.size
        self.num_kv_heads = kv_heads_per_rank(num_kv_heads, tp.size)
        self.kv_replicas = max(1, tp.size // num_kv_heads)
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp.size
        super().__init__(hidden_size, out, bias)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: str) -> None:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, start = 0, q_size, self.tp.rank * q_size
        else:
            offset = q_size if shard_id == "k" else q_size + kv_size
            size, start = kv_size, (self.tp.rank // self.kv_replicas) * kv_size
        param.data[offset:offset + size].copy_(narrow(loaded, 0, start, size))


class RowParallelLinear(LinearBase):
    tp_dim = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size > 1 and getattr(self, "weight_perm", None) is not None:
            # GPTQ act-order: this shard's columns (whole groups, sorted by group) take their input features from
            # every rank's shard of x, so the shards are gathered first (as vLLM does for act-order row-parallel layers)
            x = self.tp.all_gather_last_dim(x)
        y = self.tp.all_reduce(quant.linear(x, self))
        return y if self.bias is None else y + self.bias
