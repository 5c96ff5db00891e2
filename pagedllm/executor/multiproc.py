"""A replica over tp x pp processes: tensor parallelism, pipeline parallelism, or both.

Rank 0 (the engine's process) holds stage 0's first tensor-parallel shard. For each step it posts
the step's compact tensors to every other rank without waiting and runs its own part; the layers'
collectives combine the tensor-parallel shards, and each pipeline stage passes its activations on.
With a pipeline, submit() returns as soon as stage 0 is done, so while later stages work on
micro-batch k, stage 0 already runs k + 1 (the assembly line of the brief); collect() receives the
last stage's logits. The other ranks are spawned here, or launched by torchrun (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, LOCAL_RANK) and started with the same flags as rank 0.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pagedllm.config import EngineConfig
from pagedllm.distributed.messaging import (
    CMD_CALL,
    CMD_STEP,
    CMD_STOP,
    TAG_DATA,
    Pending,
    pickled,
    post_command,
    recv_object,
)
from pagedllm.distributed.parallel_state import (
    destroy_parallel_groups,
    init_parallel_groups,
    launched_by_torchrun,
    local_init_method,
)
from pagedllm.executor.abstract import Executor, WorkerDiedError
from pagedllm.step import StepInputs
from pagedllm.worker.worker import Worker, threads_per_rank, worker_main

logger = logging.getLogger("pagedllm")


class _Ranks:
    """The other ranks' processes and the groups: what must be released when the executor goes, whether by
    shutdown(), garbage collection or interpreter exit (a weakref finalizer holds this, not the executor)."""

    def __init__(self, world: int, device: torch.device):
        self.world, self.device = world, device
        self.procs: list[mp.Process] = []
        self.alive = True

    def dead(self) -> list[mp.Process]:
        return [p for p in self.procs if not p.is_alive()]

    def close(self) -> None:
        if self.alive and dist.is_initialized() and not self.dead():
            try:
                post_command(CMD_STOP, torch.zeros(0, dtype=torch.long), range(1, self.world), self.device).wait()
            except RuntimeError:
                pass
        self.alive = False
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        destroy_parallel_groups()


@dataclass
class _Flight:
    results: tuple | None  # without a pipeline the step is done at submit: (logits, prompt logprobs)
    pending: Pending
    num_rows: int  # with a pipeline: sampled rows whose logits the last stage sends back


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig):
        par = config.parallel
        self.config, self.world, self.stages = config, par.world_size, par.pipeline_parallel_size
        if dist.is_initialized():
            raise ValueError("another tensor- or pipeline-parallel engine is running in this process: shut it down first "
                             "(llm.shutdown(), or build it in a `with LLM(...) as llm:` block)")
        self.ranks = _Ranks(self.world, config.device)
        if launched_by_torchrun():
            if int(os.environ["WORLD_SIZE"]) != self.world:
                raise ValueError(f"torchrun started {os.environ['WORLD_SIZE']} processes but this engine needs "
                                 f"{self.world} (tensor x pipeline parallel size)")
            init = "env://"
        else:
            init = local_init_method()
            ctx = mp.get_context("spawn")
            for rank in range(1, self.world):
                stage, tp_rank = divmod(rank, par.tensor_parallel_size)
                p = ctx.Process(target=worker_main, args=(rank, config, init), daemon=True,
                                name=f"pagedllm-pp{stage}-tp{tp_rank}" if self.stages > 1 else f"pagedllm-tp{rank}")
                p.start()
                self.ranks.procs.append(p)
        self._finalizer = weakref.finalize(self, self.ranks.close)
        if config.device.type == "cpu":
            torch.set_num_threads(threads_per_rank(self.world))
        try:
            init_parallel_groups(0, par, init, config.device)
            self.driver = Worker(config, 0)
        except BaseException:
            self._finalizer()
            raise
        self.device = self.driver.device  # gloo sends CPU tensors, NCCL device ones
        self.last_stage_rank = (self.stages - 1) * par.tensor_parallel_size
        self.busy = [0.0] * self.stages  # every stage's busy seconds, as the last finished micro-batch reported them
        self.started: float | None = None

    @property
    def procs(self) -> list[mp.Process]:
        return self.ranks.procs

    def _gone(self, exc: Exception) -> WorkerDiedError:
        """A failed send, receive or collective: the group is broken. The detail goes to the log."""
        logger.error("tensor- or pipeline-parallel step failed: %s", exc)
        try:
            self.check_health()
        except WorkerDiedError as died:
            return died
        self.ranks.alive = False
        return WorkerDiedError("a tensor- or pipeline-parallel worker failed; restart the engine")

    def check_health(self) -> None:
        dead = self.ranks.dead()
        if dead or not self.ranks.alive:
            self.ranks.alive = False
            names = ", ".join(f"{p.name} (exit code {p.exitcode})" for p in dead) or "a peer"
            raise WorkerDiedError(f"a tensor- or pipeline-parallel worker died: {names}; restart the engine")

    # ---- steps ------------------------------------------------------------------------------------
    def submit(self, step: StepInputs) -> _Flight:
        self.check_health()
        self.started = self.started or time.time()
        try:
            pending = post_command(CMD_STEP, step.pack(), range(1, self.world), self.device)
            results = self.driver.execute_step(step, pending)
            if self.stages == 1:
                pending.wait()
        except Exception as exc:
            raise self._gone(exc) from exc
        return _Flight(results, pending, len(step.sample_positions))

    def _results(self, flight: _Flight) -> tuple:
        if self.stages == 1:
            return flight.results
        try:
            logits = None
            if flight.num_rows:
                logits = torch.empty(flight.num_rows, self.config.model.vocab_size, dtype=self.config.dtype,
                                     device=self.device)
                dist.recv(logits, self.last_stage_rank, tag=TAG_DATA)
            busy = torch.zeros(self.stages, dtype=torch.float64, device=self.device)
            dist.recv(busy, self.last_stage_rank, tag=TAG_DATA)
            self.busy = busy.tolist()
            flight.pending.wait()
        except Exception as exc:
            self.check_health()
            raise self._gone(exc) from exc
        return logits, None  # prompt logprobs are refused under pipeline parallelism (InputProcessor)

    def collective_rpc(self, method: str, *args, reply: bool = True) -> list:
        self.check_health()
        try:
            pending = post_command(CMD_CALL, pickled((method, args, reply)), range(1, self.world), self.device)
            results = [getattr(self.driver, method)(*args)]
            if reply:
                results += [recv_object(rank, self.device) for rank in range(1, self.world)]
            pending.wait()
        except Exception as exc:
            raise self._gone(exc) from exc
        return results

    def score(self, step: StepInputs) -> torch.Tensor:
        if self.stages > 1:  # rank 0 holds only the first stage
            raise ValueError("score() needs pipeline_parallel_size 1")
        return super().score(step)

    # ---- pipeline measurements -----------------------------------------------------------------------
    def busy_fractions(self) -> list[float]:
        """Each stage's busy time over the wall time since the first step (1 - its bubble fraction)."""
        wall = max(time.time() - self.started, 1e-9) if self.started else 0.0
        return [b / wall if wall else 0.0 for b in self.busy]

    def stage_times(self) -> list[list[tuple[float, float]]]:
        """Every stage's busy intervals (wall-clock seconds) since start. Call with nothing in flight."""
        times = self.collective_rpc("stage_times")
        return [times[stage * self.config.parallel.tensor_parallel_size] for stage in range(self.stages)]

    def shutdown(self) -> None:
        self._finalizer()
        self.driver = None  # rank 0's shard and KV pool go with it


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


def run_torchrun_worker(config: EngineConfig) -> None:
    """Ranks > 0 under torchrun: the same flags as rank 0, no server of their own."""
    worker_main(int(os.environ["RANK"]), config, "env://")
