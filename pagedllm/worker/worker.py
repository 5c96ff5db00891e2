"""One rank of an engine replica: its pipeline stage's layers (its tensor-parallel shard of them), its KV pool, and
the operations every executor calls on it, by name or as a step.

Rank 0 lives in the engine's process; every other rank runs `worker_main`, one command loop for
tensor-parallel ranks and pipeline stages alike: it receives each command from rank 0, runs it,
and (for calls that want one) replies. Within a step, a pipeline stage after the first receives
(hidden, residual) from the same tensor-parallel rank of the previous stage, and the last stage's
first rank returns the sampled rows' logits to rank 0.
"""

from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist

from pagedllm.config import EngineConfig
from pagedllm.distributed.messaging import (
    CMD_STEP,
    CMD_STOP,
    TAG_DATA,
    Pending,
    recv_command,
    send_object,
    unpickled,
)
from pagedllm.distributed.parallel_state import destroy_parallel_groups, init_parallel_groups, rank_device
from pagedllm.layers.sampler import Sampler
from pagedllm.memory.kv_sizing import kv_bytes_per_token
from pagedllm.models.decoder import Stage
from pagedllm.platform import available_cores, tune_cpu
from pagedllm.step import SamplerOutput, SamplingMetadata, StepInputs
from pagedllm.worker.model_runner import ModelRunner


def threads_per_rank(world: int) -> int:
    """Each rank of a replica takes its share of this process's cores."""
    return max(1, len(available_cores()) // world)


class Worker:
    def __init__(self, config: EngineConfig, rank: int = 0):
        self.config, self.rank = config, rank
        par = config.parallel
        self.tp = par.tensor_parallel_size
        self.stage_index, self.tp_rank = divmod(rank, self.tp)
        start, end = par.stage_layers(config.model.num_layers)[self.stage_index]
        self.stage = Stage(start, end, first=self.stage_index == 0, last=self.stage_index == par.pipeline_parallel_size - 1)
        self.device = rank_device(config.device, rank)
        if self.device.type == "cpu":
            tune_cpu()
        self.runner = ModelRunner(config, self.device, self.stage)
        self.sampler = Sampler(config.load.seed)
        self.busy: list[tuple[float, float]] = []  # (start, end) wall-clock seconds of every step this rank ran
        self._profile_base = 0

    # ---- a step ---------------------------------------------------------------------------------
    def execute_step(self, step: StepInputs, pending: Pending | None = None):
        """Run this rank's part of a step; on the last stage return (logits of the sampled rows or None, prompt
        logprobs or None), elsewhere None. A stage before the last passes (hidden, residual) on, rank 0 without waiting (the sends
        join `pending`). Every stage adds its busy seconds to a vector that travels with the activations and returns
        to rank 0 with the logits, so the pipeline's bubbles can be measured."""
        pp = self.config.parallel.pipeline_parallel_size
        hidden = residual = None
        busy = torch.zeros(pp, dtype=torch.float64, device=self.device)
        if not self.stage.first:
            shape = (len(step.token_ids), self.config.model.hidden_size)
            hidden = torch.empty(shape, dtype=self.config.dtype, device=self.device)
            residual = torch.empty_like(hidden)
            for t in (hidden, residual, busy):
                dist.recv(t, self.rank - self.tp, tag=TAG_DATA)
        start = time.time()
        out = self.runner.run(step, hidden, residual)
        self.busy.append((start, time.time()))
        if pp == 1:
            return out
        busy[self.stage_index] = sum(b - a for a, b in self.busy)
        if not self.stage.last:
            for t in (out[0].contiguous(), out[1].contiguous(), busy):
                if pending is not None:
                    pending.isend(t, self.rank + self.tp)
                else:
                    dist.send(t, self.rank + self.tp, tag=TAG_DATA)
            return None
        if self.tp_rank == 0:
            if out[0] is not None:
                dist.send(out[0].contiguous(), 0, tag=TAG_DATA)
            dist.send(busy, 0, tag=TAG_DATA)
        return out

    def sample(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        with torch.inference_mode():
            return self.sampler(logits, metadata)

    # ---- operations called by name on every rank (Executor.collective_rpc) --------------------------
    def weight_bytes(self) -> int:
        return self.runner.weight_bytes

    def allocate_kv_cache(self, num_blocks: int) -> int:
        self.runner.allocate_kv_cache(num_blocks)
        return self.runner.kv_cache_bytes

    def kv_cache_bytes(self) -> int:
        return self.runner.kv_cache_bytes

    def score(self, step: StepInputs) -> torch.Tensor:
        return self.runner.score(step)

    def stage_times(self) -> list[tuple[float, float]]:
        return list(self.busy)

    def begin_profile(self, num_blocks: int) -> None:
        """Before a profiling step: a scratch pool for it, and CUDA's peak-memory counter from here."""
        self.runner.allocate_kv_cache(num_blocks)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._profile_base = torch.cuda.memory_allocated(self.device)

    def end_profile(self) -> tuple[int, int]:
        """After the profiling step: (peak activation bytes, KV blocks that fit in what this device has left of
        total x gpu_memory_utilization after its weights and that peak)."""
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - self._profile_base
        self.runner.free_kv_cache()
        self.busy.clear()
        torch.cuda.empty_cache()
        cache = self.config.cache
        total = torch.cuda.mem_get_info(self.device)[1]
        free = int(total * cache.gpu_memory_utilization) - self.runner.weight_bytes - peak
        per_block = cache.block_size * kv_bytes_per_token(self.config.model, cache.cache_dtype.itemsize, self.tp,
                                                          self.stage.end - self.stage.start)
        return peak, max(0, free) // per_block

    # ---- ranks > 0 --------------------------------------------------------------------------------
    def serve(self) -> None:
        """Run rank 0's commands until it says stop."""
        while True:
            kind, payload = recv_command(self.device)
            if kind == CMD_STOP:
                return
            if kind == CMD_STEP:
                self.execute_step(StepInputs.unpack(payload))
                continue
            method, args, reply = unpickled(payload)
            result = getattr(self, method)(*args)
            if reply:
                send_object(result, 0, self.device)


def worker_main(rank: int, config: EngineConfig, init_method: str) -> None:
    """A rank > 0, spawned by the executor or launched by torchrun: join the groups, build its shard, serve."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle; it stops us
    if config.device.type == "cpu":
        torch.set_num_threads(threads_per_rank(config.parallel.world_size))
    init_parallel_groups(rank, config.parallel, init_method, rank_device(config.device, rank))
    try:
        Worker(config, rank).serve()
    finally:
        destroy_parallel_groups()
