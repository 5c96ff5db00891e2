"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous slice of the vocabulary."""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.distributed.parallel_state import get_tp_group
from pagedllm.layers import quantization as quant
from pagedllm.layers.linear import narrow


class VocabParallelEmbedding(nn.Module):
    native = False  # a quantized table's rows through the native kernel (set by layers.custom_op.enable_native_ops)

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.tp = get_tp_group()
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // self.tp.size)  # padded so every rank has the same rows
        self.vocab_start = self.tp.rank * self.shard_size
        self.dtype = torch.get_default_dtype()  # the model's; a quantized table's rows are dequantized to it
        self.weight = nn.Parameter(torch.zeros(self.shard_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        rows = max(0, min(self.shard_size, self.vocab_size - self.vocab_start))
        param.data[:rows].copy_(narrow(loaded, 0, self.vocab_start, rows))

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return quant.embed(self, ids, self.dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self._lookup(input_ids)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.shard_size)
        y = self._lookup(local.masked_fill(outside, 0))
        y.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to logits; each rank computes its vocabulary slice, then they are gathered."""

    native = False  # as LinearBase.native

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.tp.all_gather_last_dim(quant.linear(hidden, self))
        return logits[..., : self.vocab_size]
