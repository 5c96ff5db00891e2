"""CUDA graphs for decode steps (vLLM's --cuda-graph-sizes; nano-vllm's capture): a decode step launches a few
hundred small kernels, whose launch costs rival their work on a GPU. Each captured size replays the whole forward
pass from static input buffers; a batch of B decodes runs in the smallest size >= B, its extra rows padded (slot -1:
nothing is written; an empty context: attention over nothing).

Captured at start-up for dense models on one device with the Triton attention backend (its decode launches have
static shapes); prompt chunks, larger batches and everything else run eagerly.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from pagedllm.forward_context import AttentionMetadata, NativeBatch, attention_metadata
from pagedllm.step import StepInputs

logger = logging.getLogger("pagedllm")


def graph_sizes(max_num_seqs: int) -> tuple[int, ...]:
    """vLLM's default ladder: 1, 2, 4, then every 8 up to max_num_seqs (and max_num_seqs itself)."""
    sizes = [s for s in (1, 2, 4, *range(8, max_num_seqs + 1, 8)) if s <= max_num_seqs]
    return tuple(sorted({*sizes, max_num_seqs}))


class CudaGraphs:
    def __init__(self, model: torch.nn.Module, sizes: tuple[int, ...], max_blocks: int, device: torch.device):
        self.model, self.sizes = model, sorted(sizes)
        n = self.sizes[-1]
        long = dict(dtype=torch.long, device=device)
        self.ids, self.positions = torch.zeros(n, **long), torch.zeros(n, **long)
        self.slots = torch.full((n,), -1, **long)
        self.tables = torch.zeros(n, max_blocks, **long)
        self.context = torch.zeros(n, **long)
        self.query_start = torch.arange(n + 1, **long)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        start, pool = time.perf_counter(), None
        for size in reversed(self.sizes):  # largest first: the smaller ones share its memory pool
            meta = AttentionMetadata(self.slots[:size], NativeBatch(self.tables[:size], self.query_start[:size + 1],
                                                                    self.context[:size]))
            with attention_metadata(meta):
                self.model(self.ids[:size], self.positions[:size])  # warm-up: compiles the kernels for this shape
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool):
                    self.outputs[size] = self.model(self.ids[:size], self.positions[:size])
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize(device)
        logger.info("captured CUDA graphs for decode batches of %s in %.1f s", ", ".join(map(str, self.sizes)),
                    time.perf_counter() - start)

    def covers(self, step: StepInputs) -> bool:
        """Whether the step is a batch of decodes that a captured graph covers."""
        return step.decodes_only and len(step.lens) <= self.sizes[-1] and step.tables.shape[1] <= self.tables.shape[1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The hidden states of a covered step, from the inputs the input builder already put on the device."""
        b, batch = len(input_ids), meta.native
        size = self.sizes[bisect.bisect_left(self.sizes, b)]
        self.ids[:b].copy_(input_ids, non_blocking=True)
        self.positions[:b].copy_(positions, non_blocking=True)
        self.context[:b].copy_(batch.context_lens, non_blocking=True)
        self.context[b:size].zero_()
        self.slots[:b].copy_(meta.slot_mapping, non_blocking=True)
        self.slots[b:size].fill_(-1)
        self.tables[:b, :batch.block_tables.shape[1]].copy_(batch.block_tables, non_blocking=True)
        self.graphs[size].replay()
        return self.outputs[size][:b]
