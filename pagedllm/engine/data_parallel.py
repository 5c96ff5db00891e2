"""Data parallelism: N full engine replicas in their own processes behind one engine-shaped front.

The front holds no model. It checks and tokenizes each request (InputProcessor), sends it to the
replica with the least outstanding work (prompt and generation tokens still to do) and collects
the replicas' outputs; `LLM`, the async engine and the server use it like an LLMEngine. Each
replica is pinned to its own share of the CPU cores (and may itself be tensor-parallel). A
replica that dies fails only its in-flight requests; the others keep serving.
"""

from __future__ import annotations

import logging
import multiprocessing.connection as mpc
import os
import time
import weakref
from dataclasses import dataclass, field

import torch.multiprocessing as mp

from pagedllm.config import EngineConfig
from pagedllm.engine.input_processor import InputProcessor, ProcessedPrompt, PromptType, load_tokenizer
from pagedllm.engine.protocol import EngineStats
from pagedllm.outputs import ENGINE_DEAD, CompletionOutput, RequestMetrics, RequestOutput
from pagedllm.platform import available_cores
from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger("pagedllm")
POLL_S = 0.05
AFFINITY_SLACK_TOKENS = 8192  # prefix affinity yields to least-loaded beyond 2x the lightest load plus this


def _cores_for(index: int, replicas: int) -> set[int]:
    cores = available_cores()
    share = max(1, len(cores) // replicas)
    mine = cores[index * share:(index + 1) * share]
    return set(mine or cores[-share:])  # more replicas than cores: they share the last ones


def replica_main(index: int, replicas: int, config: EngineConfig, commands: mpc.Connection,
                 results: mpc.Connection) -> None:
    """One replica: a whole LLMEngine stepping whatever the front sends it."""
    import signal

    from pagedllm.engine.llm_engine import LLMEngine

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front handles Ctrl-C and stops us
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, _cores_for(index, replicas))
    try:
        engine = LLMEngine(config)
    except Exception as exc:
        results.send(("failed", str(exc)))
        return
    results.send(("ready", None))
    while True:
        while commands.poll(0 if engine.has_unfinished_requests() else POLL_S):
            try:
                kind, *rest = commands.recv()
            except EOFError:  # the front is gone: nobody to serve
                kind = "stop"
            if kind == "stop":
                engine.shutdown()
                return
            if kind == "abort":
                engine.abort_request(rest[0])
            elif kind == "reset_prefix_cache":
                engine.reset_prefix_cache()
            else:
                rid, processed = rest
                try:
                    engine.add_request(processed, request_id=rid)
                except ValueError as exc:
                    results.send(("rejected", (rid, str(exc))))
        if engine.has_unfinished_requests():
            outputs = engine.step()
            results.send(("outputs", (outputs, engine.stats()[0][1])))


@dataclass
class _Replica:
    index: int
    proc: mp.Process
    commands: mpc.Connection
    results: mpc.Connection
    alive: bool = True
    stats: EngineStats = field(default_factory=EngineStats)
    requests_sent: int = 0


@dataclass
class _Pending:
    replica: int
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    max_generated: int  # over all n samples
    generated: int = 0

    @property
    def outstanding(self) -> int:
        """Tokens still to compute (the prompt until output starts, then what is left to generate): the
        router's measure of a replica's load."""
        return (0 if self.generated else len(self.prompt_token_ids)) + self.max_generated - self.generated


class DataParallelEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.processor = InputProcessor(config, load_tokenizer(config.load.tokenizer or config.load.model_path))
        self.requests: dict[str, _Pending] = {}
        self.num_prompt_tokens = 0
        replicas = config.parallel.data_parallel_size
        replica_config = config.replace(parallel={"data_parallel_size": 1})
        ctx = mp.get_context("spawn")
        self.replicas: list[_Replica] = []
        for i in range(replicas):
            cmd_recv, cmd_send = ctx.Pipe(duplex=False)
            res_recv, res_send = ctx.Pipe(duplex=False)
            # not a daemon: a replica may spawn tensor-parallel workers of its own; it exits when the front's pipe closes
            proc = ctx.Process(target=replica_main, args=(i, replicas, replica_config, cmd_recv, res_send),
                               name=f"pagedllm-dp{i}")
            proc.start()
            self.replicas.append(_Replica(i, proc, cmd_send, res_recv))
        self._finalizer = weakref.finalize(self, _stop_replicas, self.replicas)
        for r in self.replicas:
            kind, detail = r.results.recv() if r.results.poll(600) else ("failed", "did not start in 600 s")
            if kind != "ready":
                self.shutdown()
                raise ValueError(f"data-parallel replica {r.index} failed to start: {detail}")
        logger.info("data parallel: %d replicas of %s", len(self.replicas), config.model.name)

    # ---- the engine protocol ------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def num_generation_tokens(self) -> int:
        return sum(r.stats.generation_tokens for r in self.replicas)

    def add_request(self, prompt: PromptType | ProcessedPrompt, params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None) -> str:
        p = self.processor.process(prompt, params)
        ids, params = p.prompt_token_ids, p.params
        request_id = self.processor.claim_request_id(request_id, self.requests)
        target = self._route(ids)
        max_new = params.max_tokens or self.config.max_model_len - len(ids)
        self.requests[request_id] = _Pending(target.index, p.prompt, ids, params, max_new * params.n)
        target.commands.send(("add", request_id, p))
        target.requests_sent += 1
        self.num_prompt_tokens += len(ids)
        return request_id

    def _route(self, ids: list[int]) -> _Replica:
        """The replica with the least outstanding work; with prefix affinity, the replica a prompt's first
        block hashes to (so prompts sharing a prefix share one prefix cache), unless it is far busier."""
        live = [r for r in self.replicas if r.alive]
        if not live:
            raise RuntimeError("no data-parallel replica is alive")
        load = {r.index: 0 for r in live}
        for p in self.requests.values():
            if p.replica in load:
                load[p.replica] += p.outstanding
        least = min(live, key=lambda r: (load[r.index], r.index))
        block = self.config.cache.block_size
        if self.config.parallel.data_parallel_routing == "prefix-affinity" and len(ids) > block:
            preferred = live[hash(tuple(ids[:block])) % len(live)]
            if load[preferred.index] <= 2 * load[least.index] + AFFINITY_SLACK_TOKENS:
                return preferred
        return least

    def abort_request(self, request_id: str) -> None:
        pending = self.requests.pop(request_id, None)
        if pending is not None and self.replicas[pending.replica].alive:
            self.replicas[pending.replica].commands.send(("abort", request_id))

    def reset_prefix_cache(self) -> None:
        for r in self.replicas:
            if r.alive:
                r.commands.send(("reset_prefix_cache",))

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        """Whatever the replicas produced since the last call (waits briefly when nothing is ready)."""
        outputs: list[RequestOutput] = []
        live = {r.results: r for r in self.replicas if r.alive}
        for conn in mpc.wait(list(live), timeout=POLL_S):
            replica = live[conn]
            try:
                while conn.poll():
                    outputs += self._receive(replica, *conn.recv())
            except (EOFError, OSError):
                outputs += self._replica_died(replica)
        for r in self.replicas:  # a replica can die between steps with nothing to say
            if r.alive and not r.proc.is_alive():
                outputs += self._replica_died(r)
        return outputs

    def _receive(self, replica: _Replica, kind: str, payload) -> list[RequestOutput]:
        if kind == "rejected":
            rid, message = payload
            pending = self.requests.pop(rid, None)
            return [self._error_output(rid, pending, message)] if pending else []
        outs, replica.stats = payload
        delivered = []
        for out in outs:
            pending = self.requests.get(out.request_id)
            if pending is None:  # aborted meanwhile
                continue
            pending.generated = sum(len(c.token_ids) for c in out.outputs)
            if out.finished:
                del self.requests[out.request_id]
            delivered.append(out)
        return delivered

    def _replica_died(self, replica: _Replica) -> list[RequestOutput]:
        replica.alive = False
        code = replica.proc.exitcode
        logger.error("data-parallel replica %d died (exit code %s); %d replica(s) left", replica.index, code,
                     sum(r.alive for r in self.replicas))
        failed = [rid for rid, p in self.requests.items() if p.replica == replica.index]
        return [self._error_output(rid, self.requests.pop(rid), ENGINE_DEAD) for rid in failed]

    def _error_output(self, rid: str, pending: _Pending, message: str) -> RequestOutput:
        outputs = [CompletionOutput(i, "", [], finish_reason="error") for i in range(pending.params.n)]
        return RequestOutput(rid, pending.prompt, pending.prompt_token_ids, outputs, True,
                             RequestMetrics(arrival_time=time.time()), error=message)

    # ---- health, stats, lifecycle ---------------------------------------------------------------
    def stats(self) -> list[tuple[dict[str, str], EngineStats]]:
        return [({"replica": str(r.index)}, r.stats) for r in self.replicas]

    def health(self) -> dict:
        self.check_health()
        alive = [r.alive for r in self.replicas]
        return {"status": "ok" if all(alive) else "degraded",
                "replicas": [{"replica": r.index, "alive": r.alive, "requests_sent": r.requests_sent}
                             for r in self.replicas]}

    def check_health(self) -> None:
        if not any(r.alive and r.proc.is_alive() for r in self.replicas):
            raise RuntimeError("every data-parallel replica has died")

    def shutdown(self) -> None:
        self._finalizer()
        self.requests.clear()


def _stop_replicas(replicas: list[_Replica]) -> None:
    """Stop every replica (each shuts its engine down); the finalizer's work, so it holds the replicas, not the front."""
    for r in replicas:
        if r.alive and r.proc.is_alive():
            try:
                r.commands.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
    for r in replicas:
        r.proc.join(timeout=15)
        if r.proc.is_alive():
            r.proc.kill()
            r.proc.join()
        r.alive = False
        r.commands.close()
        r.results.close()
