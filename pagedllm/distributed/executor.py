"""Executors run each step on one process or on a tensor-parallel group of processes.

With tensor parallelism, rank 0 (the engine's process) holds the scheduler; every step it
broadcasts the step's compact tensors (StepInputs, one flat int64 tensor) to the workers and
runs its own shard; the layers' collectives combine the shards. Workers are spawned here, or
launched by torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pagedllm.config import EngineArgs, ModelConfig
from pagedllm.distributed.parallel_state import TPGroup, set_tp_group
from pagedllm.model_executor.input_builder import StepInputs
from pagedllm.model_executor.model_runner import ModelRunner
from pagedllm.platform import available_cores, tune_cpu

logger = logging.getLogger("pagedllm")

CMD_STEP, CMD_ALLOC, CMD_STOP = 0, 1, 2
COLLECTIVE_TIMEOUT = timedelta(seconds=120)  # upper bound; a dead peer's closed socket fails a collective at once


class WorkerDiedError(RuntimeError):
    pass


class LocalExecutor:
    """One process holds the whole model."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        self.runner.allocate_kv_cache(num_blocks, block_size)

    def run(self, step: StepInputs) -> torch.Tensor | None:
        return self.runner.run(step)

    def submit(self, step: StepInputs) -> torch.Tensor | None:
        """Start a step; without a pipeline it runs to the end, and its handle is its logits."""
        return self.run(step)

    def collect(self, flight: torch.Tensor | None) -> torch.Tensor | None:
        return flight

    def check_health(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _rank_device(device: torch.device, rank: int) -> torch.device:
    if device.type != "cuda":
        return device
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _threads_per_rank(world: int) -> int:
    return max(1, len(available_cores()) // world)


def prepare_worker(world: int, device: torch.device) -> None:
    """What every rank > 0 does first: leave Ctrl-C to rank 0 (which stops it) and take its share of the cores."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if device.type == "cpu":
        tune_cpu()
        torch.set_num_threads(_threads_per_rank(world))


class SpawnedRanks:
    """Lifecycle shared by executors whose other ranks are child processes: start-up, health and shutdown."""

    kind = "worker"
    procs: list[mp.Process]
    _alive: bool

    def _start_ranks(self, world: int, device: torch.device, target, rank_args, name) -> str:
        """Spawn ranks 1 .. world - 1 running `target(*rank_args(rank, init))`, or find them launched by
        torchrun; give rank 0 its share of the cores; return the process group's init method."""
        self.procs = []
        if launched_by_torchrun():
            if int(os.environ["WORLD_SIZE"]) != world:
                raise ValueError(f"torchrun started {os.environ['WORLD_SIZE']} processes but this engine needs "
                                 f"{world} (tensor x pipeline parallel size)")
            init = "env://"
        else:
            init = f"tcp://127.0.0.1:{_free_port()}"
            ctx = mp.get_context("spawn")
            for rank in range(1, world):
                p = ctx.Process(target=target, args=rank_args(rank, init), name=name(rank), daemon=True)
                p.start()
                self.procs.append(p)
        if device.type == "cpu":
            torch.set_num_threads(_threads_per_rank(world))
        return init

    def _stop_message(self) -> None:
        raise NotImplementedError

    def check_health(self) -> None:
        dead = [p for p in self.procs if not p.is_alive()]
        if dead or not self._alive:
            self._alive = False
            names = ", ".join(f"{p.name} (exit code {p.exitcode})" for p in dead) or "a peer"
            raise WorkerDiedError(f"{self.kind} died: {names}; restart the engine")

    def shutdown(self) -> None:
        if not dist.is_initialized():
            return
        if self._alive and all(p.is_alive() for p in self.procs):
            try:
                self._stop_message()
            except (WorkerDiedError, RuntimeError):
                pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        self._alive = False
        dist.destroy_process_group()
        set_tp_group(TPGroup())


class TensorParallelExecutor(SpawnedRanks):
    """Rank 0 of a tensor-parallel group."""

    kind = "tensor-parallel worker"

    def __init__(self, args: EngineArgs, cfg: ModelConfig, folder: str, dtype: torch.dtype, device: torch.device):
        world = args.tensor_parallel_size
        self.device = _rank_device(device, 0)
        init = self._start_ranks(world, device, worker_main,
                                 lambda rank, init: (rank, world, init, args, cfg, folder, dtype, device),
                                 lambda rank: f"pagedllm-tp{rank}")
        dist.init_process_group(_backend(device), init_method=init, rank=0, world_size=world, timeout=COLLECTIVE_TIMEOUT)
        set_tp_group(TPGroup(0, world, dist.group.WORLD))
        self.runner = ModelRunner.for_engine(args, cfg, folder, dtype, self.device)
        self.rank_weight_bytes = self._gather_int(self.runner.weight_bytes)
        self._alive = True
        atexit.register(self.shutdown)

    def _gather_int(self, value: int) -> list[int]:
        out = [torch.zeros(1, dtype=torch.long, device=self._comm_device) for _ in range(dist.get_world_size())]
        dist.all_gather(out, torch.tensor([value], device=self._comm_device))
        return [int(t.item()) for t in out]

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def _send(self, cmd: int, payload: torch.Tensor) -> None:
        self.check_health()
        header = torch.tensor([cmd, payload.numel()], device=self._comm_device)
        try:
            dist.broadcast(header, src=0)
            if payload.numel():
                dist.broadcast(payload.to(self._comm_device), src=0)
        except Exception as exc:
            self._alive = False
            raise WorkerDiedError(f"a tensor-parallel worker is gone: {exc}") from exc

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        self._send(CMD_ALLOC, torch.tensor([num_blocks, block_size]))
        self.runner.allocate_kv_cache(num_blocks, block_size)
        self.rank_kv_bytes = self._gather_int(self.runner.kv_cache.numel() * self.runner.kv_cache.element_size())

    def run(self, step: StepInputs) -> torch.Tensor | None:
        self._send(CMD_STEP, step.pack())
        try:
            return self.runner.run(step)
        except Exception as exc:
            self.check_health()
            raise WorkerDiedError(f"tensor-parallel step failed: {exc}") from exc

    submit = run

    def collect(self, flight: torch.Tensor | None) -> torch.Tensor | None:
        return flight

    def _stop_message(self) -> None:
        self._send(CMD_STOP, torch.zeros(0, dtype=torch.long))


def worker_main(rank: int, world: int, init: str, args: EngineArgs, cfg: ModelConfig, folder: str,
                dtype: torch.dtype, device: torch.device) -> None:
    """A tensor-parallel worker: build its shard, then run whatever rank 0 broadcasts until told to stop."""
    prepare_worker(world, device)
    dist.init_process_group(_backend(device), init_method=init, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    set_tp_group(TPGroup(rank, world, dist.group.WORLD))
    local = _rank_device(device, rank)
    comm = local if local.type == "cuda" else torch.device("cpu")
    runner = ModelRunner.for_engine(args, cfg, folder, dtype, local)
    sizes = [torch.zeros(1, dtype=torch.long, device=comm) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([runner.weight_bytes], device=comm))
    try:
        while True:
            header = torch.zeros(2, dtype=torch.long, device=comm)
            dist.broadcast(header, src=0)
            cmd, n = header.tolist()
            payload = torch.zeros(n, dtype=torch.long, device=comm)
            if n:
                dist.broadcast(payload, src=0)
            payload = payload.cpu()
            if cmd == CMD_STOP:
                break
            if cmd == CMD_ALLOC:
                runner.allocate_kv_cache(*payload.tolist())
                kv = runner.kv_cache
                dist.all_gather(sizes, torch.tensor([kv.numel() * kv.element_size()], device=comm))
            else:
                runner.run(StepInputs.unpack(payload))
    finally:
        dist.destroy_process_group()


def run_torchrun_worker(args: EngineArgs) -> None:
    """Entry for ranks > 0 under torchrun: the same flags as rank 0, no server of its own."""
    from pagedllm.engine.llm_engine import engine_setup

    cfg, folder, dtype, device = engine_setup(args)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.pipeline_parallel_size > 1:
        from pagedllm.distributed.pipeline import Grid, stage_main

        partition = tuple(args.pipeline_partition) if args.pipeline_partition else None
        grid = Grid(args.tensor_parallel_size, args.pipeline_parallel_size, partition)
        stage_main(rank, grid, "env://", args, cfg, folder, dtype, device)
    else:
        worker_main(rank, world, "env://", args, cfg, folder, dtype, device)


def check_tensor_parallel(cfg: ModelConfig, tp: int) -> None:
    """Every rank checks this before joining the group, so a bad size fails at once everywhere."""
    heads, kv = cfg.num_heads, cfg.num_kv_heads
    if heads % tp or (kv % tp and tp % kv):
        raise ValueError(f"tensor_parallel_size {tp} must divide the model's {heads} attention heads and divide, "
                         f"or be a multiple of, its {kv} KV heads")
    if cfg.intermediate_size % tp:
        raise ValueError(f"tensor_parallel_size {tp} must divide the MLP size {cfg.intermediate_size}")


def make_executor(args: EngineArgs, cfg: ModelConfig, folder: str, dtype: torch.dtype, device: torch.device):
    if args.pipeline_parallel_size > 1:
        from pagedllm.distributed.pipeline import PipelineExecutor

        return PipelineExecutor(args, cfg, folder, dtype, device)
    if args.tensor_parallel_size == 1:
        return LocalExecutor(ModelRunner.for_engine(args, cfg, folder, dtype, device))
    return TensorParallelExecutor(args, cfg, folder, dtype, device)
