"""A scheduled batch as a few compact tensors (StepInputs), and from those the step's model inputs:
token ids, positions, slots and attention buckets.

StepInputs is all a tensor-parallel worker needs to run the step, so it travels as one flat int64
tensor. Per-token quantities are computed with tensor ops from per-sequence starts and lengths;
Python only walks the (few dozen) sequences to collect their token ids and block tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedllm.engine.scheduler import ScheduledSeq
from pagedllm.model_executor.context import AttentionMetadata, DecodeBucket, NativeBatch, PrefillBucket

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


@dataclass
class StepInputs:
    token_ids: torch.Tensor  # [T] the tokens to compute, sequence after sequence
    starts: torch.Tensor  # [B] tokens each sequence had computed before this step
    lens: torch.Tensor  # [B] tokens each sequence computes now
    tables: torch.Tensor  # [B, W] block tables, padded with block 0
    copies: torch.Tensor  # [C, 2] (src, dst) block copies to make first (copy-on-write)
    sample_rows: torch.Tensor  # [S] batch rows whose last token is sampled (a row repeats for n samples)

    @classmethod
    def from_batch(cls, batch: list[ScheduledSeq], copies: list[tuple[int, int]], sample_rows: list[int]) -> StepInputs:
        """`batch` holds its decodes (one new token) first, sorted by context length, then its prompt chunks
        sorted by length (see model_executor/context.py)."""
        width = max(len(s.seq.block_table) for s in batch)
        return cls(
            token_ids=torch.tensor([t for s in batch for t in
                                    s.seq.token_ids[s.seq.num_computed_tokens:s.seq.num_computed_tokens + s.num_new_tokens]]),
            starts=torch.tensor([s.seq.num_computed_tokens for s in batch]),
            lens=torch.tensor([s.num_new_tokens for s in batch]),
            tables=torch.tensor([s.seq.block_table + [0] * (width - len(s.seq.block_table)) for s in batch]),
            copies=torch.tensor(copies, dtype=torch.long).view(-1, 2),
            sample_rows=torch.tensor(sample_rows, dtype=torch.long),
        )

    def pack(self) -> torch.Tensor:
        header = torch.tensor([len(self.token_ids), len(self.lens), self.tables.shape[1], len(self.copies),
                               len(self.sample_rows)])
        return torch.cat([header, self.token_ids, self.starts, self.lens, self.tables.reshape(-1), self.copies.reshape(-1),
                          self.sample_rows])

    @classmethod
    def unpack(cls, flat: torch.Tensor) -> StepInputs:
        t, b, w, c, s = flat[:5].tolist()
        parts = flat[5:].split([t, b, b, b * w, 2 * c, s])
        return cls(parts[0], parts[1], parts[2], parts[3].view(b, w), parts[4].view(c, 2), parts[5])


class InputBuilder:
    def __init__(self, block_size: int, kv_heads: int, num_blocks: int, device: torch.device, native: bool):
        self.block_size, self.kv_heads, self.num_blocks, self.device = block_size, kv_heads, num_blocks, device
        self.native = native  # the native kernel reads the pool through the block tables: no buckets

    def _gather_index(self, tables: torch.Tensor) -> torch.Tensor:
        """Block tables -> rows of the pool viewed as [kv_heads * num_blocks, block_size * head_dim]."""
        return (torch.arange(self.kv_heads)[:, None] * self.num_blocks + tables.reshape(1, -1)).reshape(-1)

    def build(self, step: StepInputs) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        dev, bs = self.device, self.block_size
        starts, lens, tables = step.starts, step.lens, step.tables
        row = torch.repeat_interleave(torch.arange(len(lens)), lens)  # batch row of every token
        first = torch.cumsum(lens, 0) - lens  # first token of every row
        offset = torch.arange(len(row)) - first[row]  # index of the token inside its chunk
        positions = starts[row] + offset
        slots = tables[row, positions // bs] * bs + positions % bs
        meta = AttentionMetadata(slot_mapping=slots.to(dev))
        if self.native:
            meta.native = NativeBatch(tables, torch.cat([first, torch.tensor([len(row)])]), starts + lens)
        else:
            self._add_buckets(meta, step, row, first, offset)
        return step.token_ids.to(dev), positions.to(dev), meta

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
