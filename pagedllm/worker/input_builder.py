"""A step's compact tensors (StepInputs) into the model's inputs: token ids, positions, slots and attention metadata.

Per-token quantities are computed with tensor ops from per-sequence starts and lengths.
"""

from __future__ import annotations

import torch

from pagedllm.forward_context import AttentionMetadata, DecodeBucket, NativeBatch, PrefillBucket
from pagedllm.step import StepInputs

MAX_PADDING = 0.25  # a bucket may pad its members by at most this fraction of their real size


def buckets(sizes: list[int], max_padding: float = MAX_PADDING) -> list[tuple[int, int]]:
    """Split ascending `sizes` into runs [a, b) whose padding to the run's largest stays small."""
    runs, a, total = [], 0, 0
    for i, n in enumerate(sizes):
        if i > a and n * (i + 1 - a) > (1 + max_padding) * (total + n):
            runs.append((a, i))
            a, total = i, 0
        total += n
    if sizes:
        runs.append((a, len(sizes)))
    return runs


class InputBuilder:
    def __init__(self, block_size: int, kv_heads: int, num_blocks: int, device: torch.device, native: bool):
        self.block_size, self.kv_heads, self.num_blocks, self.device = block_size, kv_heads, num_blocks, device
        self.native = native  # a kernel (native CPU, Triton) reads the pool through the block tables: no buckets
        self._aranges: dict[int, torch.Tensor] = {}

    def _gather_index(self, tables: torch.Tensor) -> torch.Tensor:
        """Block tables -> rows of the pool viewed as [kv_heads * num_blocks, block_size * head_dim]."""
        return (torch.arange(self.kv_heads)[:, None] * self.num_blocks + tables.reshape(1, -1)).reshape(-1)

    def build(self, step: StepInputs) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        bs = self.block_size
        starts, lens, tables = step.starts, step.lens, step.tables
        if step.decodes_only:  # a token per row: a third of the general form's ops
            row = first = self._arange(len(lens))
            offset, positions, query_start = None, starts, self._arange(len(lens) + 1)
        else:
            row = torch.repeat_interleave(torch.arange(len(lens)), lens)  # batch row of every token
            first = torch.cumsum(lens, 0) - lens  # first token of every row
            offset = torch.arange(len(row)) - first[row]  # index of the token inside its chunk
            positions = starts[row] + offset
            query_start = torch.cat([first, torch.tensor([len(row)])])
        slots = tables[row, positions // bs] * bs + positions % bs
        meta = AttentionMetadata(slot_mapping=self._to_device(slots))
        if self.native:
            ctx = starts + lens
            meta.native = NativeBatch(self._to_device(tables), self._to_device(query_start), self._to_device(ctx),
                                      int(ctx.max()) if len(ctx) else 0)
        else:
            self._add_buckets(meta, step, row, first, torch.zeros_like(row) if offset is None else offset)
        return self._to_device(step.token_ids), self._to_device(positions), meta

    def _arange(self, n: int) -> torch.Tensor:
        """0 .. n-1, kept per n (a decode step needs two; they are only read)."""
        if n not in self._aranges:
            self._aranges[n] = torch.arange(n)
        return self._aranges[n]

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """On a GPU, from pinned memory without waiting for the copy (the step's kernels queue behind it)."""
        if self.device.type != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def _add_buckets(self, meta: AttentionMetadata, step: StepInputs, row: torch.Tensor, first: torch.Tensor,
                     offset: torch.Tensor) -> None:
        """The torch path's padded buckets: decodes by context length, then prompt chunks by length."""
        dev, bs = self.device, self.block_size
        starts, lens, tables = step.starts, step.lens, step.tables
        ctx = starts + lens
        d = int((lens != 1).int().argmax()) if bool((lens != 1).any()) else len(lens)  # leading decodes
        for a, b in buckets(ctx[:d].tolist()):
            nb = -(-int(ctx[a:b].max()) // bs)
            past = torch.arange(nb * bs)[None, :] >= ctx[a:b, None]
            meta.decode.append(DecodeBucket(
                tokens=slice(a, b), gather_index=self._gather_index(tables[a:b, :nb]).to(dev),
                attn_bias=torch.zeros(past.shape).masked_fill_(past, float("-inf")).view(1, b - a, 1, -1).to(dev)))
        for a, b in buckets(lens[d:].tolist()):
            a, b = a + d, b + d
            t0, t1 = int(first[a]), int(first[b - 1] + lens[b - 1])
            max_q = int(lens[a:b].max())
            q_rows = (first[a:b] - t0)[:, None] + torch.arange(max_q)[None, :]
            bucket = PrefillBucket(
                tokens=slice(t0, t1), query_index=q_rows.clamp_(max=t1 - t0 - 1).to(dev),
                unpad_index=((row[t0:t1] - a) * max_q + offset[t0:t1]).to(dev))
            if bool((starts[a:b] > 0).any()):
                nb = -(-int(ctx[a:b].max()) // bs)
                visible = torch.arange(nb * bs)[None, None, :] <= (starts[a:b, None, None] + torch.arange(max_q)[None, :, None])
                bucket.gather_index = self._gather_index(tables[a:b, :nb]).to(dev)
                bucket.key_mask = visible.unsqueeze(1).to(dev)
            meta.prefill.append(bucket)
