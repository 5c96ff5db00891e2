"""Pipeline parallelism: contiguous layer stages in their own processes, several micro-batches in flight.

Rank 0 (the engine's process) is stage 0 and holds the scheduler. For each micro-batch it sends the
step's compact tensors to every stage (point-to-point, without waiting), runs its own layers and
sends (hidden, residual) on; each later stage receives them, runs its layers and passes them on;
the last stage sends the sampled rows' logits back to rank 0. Sends never wait, so while a later
stage works on batch k, stage 0 already runs batch k + 1 — the assembly line of the brief. Every
stage records when it was busy, so the pipeline's bubbles can be measured. gloo on CPU, NCCL on
CUDA (which ignores tags; busy-time reports are only asked for with nothing in flight).
"""

from __future__ import annotations

import atexit
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from pagedllm.config import EngineArgs, ModelConfig
from pagedllm.distributed.executor import (
    COLLECTIVE_TIMEOUT,
    SpawnedRanks,
    WorkerDiedError,
    _backend,
    _rank_device,
    prepare_worker,
)
from pagedllm.distributed.parallel_state import TPGroup, set_tp_group
from pagedllm.memory.weights import partition_layers
from pagedllm.model_executor.input_builder import StepInputs
from pagedllm.model_executor.model_runner import ModelRunner
from pagedllm.models.decoder import Stage

CMD_STEP, CMD_ALLOC, CMD_STOP, CMD_TIMES = 0, 1, 2, 3
TAG_DATA, TAG_TIMES = 0, 1


@dataclass(frozen=True)
class Grid:
    """pp stages of tp ranks each: rank = stage * tp + tp_rank. Rank 0 is stage 0's first tensor-parallel rank."""

    tp: int
    pp: int
    partition: tuple[int, ...] | None = None  # layers per stage; None: an even split

    @property
    def world(self) -> int:
        return self.tp * self.pp

    def rank(self, stage: int, tp_rank: int) -> int:
        return stage * self.tp + tp_rank

    def join(self, rank: int, init: str, backend: str) -> None:
        """Join the world and this rank's stage's tensor-parallel group (every rank creates every group)."""
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=self.world, timeout=COLLECTIVE_TIMEOUT)
        groups = [dist.new_group([self.rank(s, i) for i in range(self.tp)]) for s in range(self.pp)]
        stage, tp_rank = divmod(rank, self.tp)
        set_tp_group(TPGroup(tp_rank, self.tp, groups[stage]))

    def stage(self, cfg: ModelConfig, stage: int) -> Stage:
        start, end = partition_layers(cfg.num_layers, self.pp, list(self.partition) if self.partition else None)[stage]
        return Stage(start, end, first=stage == 0, last=stage == self.pp - 1)


@dataclass
class InFlight:
    """A micro-batch sent into the pipeline; its logits arrive later from the last stage."""

    num_rows: int
    sends: list = field(default_factory=list)  # pending isend works (their tensors must stay alive)
    tensors: list = field(default_factory=list)


class PipelineExecutor(SpawnedRanks):
    kind = "pipeline stage"

    def __init__(self, args: EngineArgs, cfg: ModelConfig, folder: str, dtype: torch.dtype, device: torch.device):
        partition = tuple(args.pipeline_partition) if args.pipeline_partition else None
        self.grid = grid = Grid(args.tensor_parallel_size, args.pipeline_parallel_size, partition)
        self.world, self.stages = grid.world, grid.pp
        self.cfg, self.dtype = cfg, dtype
        init = self._start_ranks(grid.world, device, stage_main,
                                 lambda rank, init: (rank, grid, init, args, cfg, folder, dtype, device),
                                 lambda rank: f"pagedllm-pp{rank // grid.tp}-tp{rank % grid.tp}")
        grid.join(0, init, _backend(device))
        self.device = _rank_device(device, 0)  # NCCL sends device tensors; gloo, CPU ones
        self.runner = ModelRunner.for_engine(args, cfg, folder, dtype, self.device, grid.stage(cfg, 0))
        self.times: list[tuple[float, float]] = []  # stage 0's busy intervals
        self.busy = [0.0] * grid.pp  # every stage's busy seconds so far, as the last finished batch reported them
        self.started: float | None = None
        self._alive = True
        atexit.register(self.shutdown)

    # ---- transport ----------------------------------------------------------------------------
    def _send_all(self, cmd: int, payload: torch.Tensor) -> list:
        self.check_health()
        header = torch.tensor([cmd, payload.numel()], device=self.device)
        payload = payload.to(self.device)
        works = []
        try:
            for rank in range(1, self.world):
                works.append(dist.isend(header, rank, tag=TAG_DATA))
                if payload.numel():
                    works.append(dist.isend(payload, rank, tag=TAG_DATA))
        except Exception as exc:
            self._alive = False
            raise WorkerDiedError(f"a pipeline stage is gone: {exc}") from exc
        return [header, payload], works

    def submit(self, step: StepInputs) -> InFlight:
        tensors, works = self._send_all(CMD_STEP, step.pack())
        start = time.time()
        self.started = self.started or start
        hidden, residual = self.runner.run(step)
        self.times.append((start, time.time()))
        # every stage adds its busy seconds to this vector on the way; the last stage returns it with the logits
        busy = torch.zeros(self.stages, dtype=torch.float64, device=self.device)
        busy[0] = sum(b - a for a, b in self.times)
        hidden, residual = hidden.contiguous(), residual.contiguous()
        nxt = self.grid.rank(1, 0)
        works += [dist.isend(t, nxt, tag=TAG_DATA) for t in (hidden, residual, busy)]
        return InFlight(len(step.sample_rows), works, tensors + [hidden, residual, busy])

    def collect(self, flight: InFlight) -> torch.Tensor | None:
        try:
            logits = None
            last = self.grid.rank(self.stages - 1, 0)
            if flight.num_rows:
                logits = torch.empty(flight.num_rows, self.cfg.vocab_size, dtype=self.dtype, device=self.device)
                dist.recv(logits, last, tag=TAG_DATA)
            busy = torch.zeros(self.stages, dtype=torch.float64, device=self.device)
            dist.recv(busy, last, tag=TAG_DATA)
            self.busy = busy.tolist()
            for w in flight.sends:
                w.wait()
        except Exception as exc:
            self._alive = False
            self.check_health()
            raise WorkerDiedError(f"a pipeline stage is gone: {exc}") from exc
        return logits

    def run(self, step: StepInputs) -> torch.Tensor | None:
        return self.collect(self.submit(step))

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        _, works = self._send_all(CMD_ALLOC, torch.tensor([num_blocks, block_size]))
        for w in works:
            w.wait()
        self.runner.allocate_kv_cache(num_blocks, block_size)

    def busy_fractions(self) -> list[float]:
        """Each stage's busy time over the wall time since the first batch (1 - its bubble fraction)."""
        wall = max(time.time() - self.started, 1e-9) if self.started else 0.0
        return [b / wall if wall else 0.0 for b in self.busy]

    def stage_times(self) -> list[list[tuple[float, float]]]:
        """Every stage's busy intervals (wall-clock seconds) since start. Call with nothing in flight."""
        _, works = self._send_all(CMD_TIMES, torch.zeros(0, dtype=torch.long))
        out = [list(self.times)]
        for rank in (self.grid.rank(stage, 0) for stage in range(1, self.stages)):
            n = torch.zeros(1, dtype=torch.long, device=self.device)
            dist.recv(n, rank, tag=TAG_TIMES)
            t = torch.zeros(int(n), 2, dtype=torch.float64, device=self.device)
            if int(n):
                dist.recv(t, rank, tag=TAG_TIMES)
            out.append([tuple(x) for x in t.tolist()])
        for w in works:
            w.wait()
        return out

    def _stop_message(self) -> None:
        _, works = self._send_all(CMD_STOP, torch.zeros(0, dtype=torch.long))
        for w in works:
            w.wait()


def stage_main(rank: int, grid: Grid, init: str, args: EngineArgs, cfg: ModelConfig, folder: str,
               dtype: torch.dtype, device: torch.device) -> None:
    """Any rank but 0: receive a step (and, after the first stage, its input activations from the same
    tensor-parallel rank of the previous stage), run this stage's layers, pass the result on."""
    prepare_worker(grid.world, device)
    grid.join(rank, init, _backend(device))
    dev = _rank_device(device, rank)
    stage_index, tp_rank = divmod(rank, grid.tp)
    stage = grid.stage(cfg, stage_index)
    prev = grid.rank(stage_index - 1, tp_rank) if not stage.first else None
    nxt = grid.rank(stage_index + 1, tp_rank) if not stage.last else None
    reports = tp_rank == 0  # one rank per stage reports busy times and returns the logits
    runner = ModelRunner.for_engine(args, cfg, folder, dtype, dev, stage)
    times: list[tuple[float, float]] = []
    try:
        while True:
            header = torch.zeros(2, dtype=torch.long, device=dev)
            dist.recv(header, 0, tag=TAG_DATA)
            cmd, n = header.tolist()
            payload = torch.zeros(n, dtype=torch.long, device=dev)
            if n:
                dist.recv(payload, 0, tag=TAG_DATA)
            payload = payload.cpu()
            if cmd == CMD_STOP:
                break
            if cmd == CMD_ALLOC:
                runner.allocate_kv_cache(*payload.tolist())
            elif cmd == CMD_TIMES:
                if reports:
                    dist.send(torch.tensor([len(times)], device=dev), 0, tag=TAG_TIMES)
                    if times:
                        dist.send(torch.tensor(times, dtype=torch.float64, device=dev), 0, tag=TAG_TIMES)
            else:
                step = StepInputs.unpack(payload)
                shape = (len(step.token_ids), cfg.hidden_size)
                hidden = residual = None
                busy = torch.zeros(grid.pp, dtype=torch.float64, device=dev)
                if prev is not None:
                    hidden, residual = torch.empty(shape, dtype=dtype, device=dev), torch.empty(shape, dtype=dtype, device=dev)
                    for t in (hidden, residual, busy):
                        dist.recv(t, prev, tag=TAG_DATA)
                start = time.time()
                out = runner.run(step, hidden, residual)
                times.append((start, time.time()))
                busy[stage_index] = sum(b - a for a, b in times)
                if nxt is not None:
                    for t in (out[0].contiguous(), out[1].contiguous(), busy):
                        dist.send(t, nxt, tag=TAG_DATA)
                elif reports:
                    if out is not None:
                        dist.send(out.contiguous(), 0, tag=TAG_DATA)
                    dist.send(busy, 0, tag=TAG_DATA)
    finally:
        dist.destroy_process_group()


def bubble_report(times: list[list[tuple[float, float]]], micro_batches: int) -> dict:
    """Per-stage busy fraction over the span from the first stage's first start to the last stage's last end,
    beside the ideal bubble (N - 1) / (M + N - 1) for M micro-batches on N stages."""
    start = min(t[0][0] for t in times if t)
    end = max(t[-1][1] for t in times if t)
    wall = max(end - start, 1e-9)
    busy = [sum(b - a for a, b in t) / wall for t in times]
    n = len(times)
    return {"stages": n, "micro_batches": micro_batches, "busy_fraction": busy,
            "bubble_fraction": [1 - b for b in busy], "ideal_bubble_fraction": (n - 1) / (micro_batches + n - 1)}
