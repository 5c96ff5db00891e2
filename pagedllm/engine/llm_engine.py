"""The engine loop: admit requests, schedule a step, run it, turn sampled tokens into outputs."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

import torch

from pagedllm.config import EngineArgs, ModelConfig, parse_dtype
from pagedllm.distributed.executor import LocalExecutor, WorkerDiedError, check_tensor_parallel, make_executor
from pagedllm.engine.block_manager import BlockManager
from pagedllm.engine.input_processor import InputProcessor, PromptType, load_tokenizer, model_limits
from pagedllm.engine.output_processor import OutputProcessor
from pagedllm.engine.scheduler import ScheduledSeq, Scheduler, SchedulerConfig, SchedulerOutput
from pagedllm.engine.sequence import Request, Sequence
from pagedllm.memory.kv_sizing import cpu_default_kv_budget, kv_bytes_per_token
from pagedllm.memory.units import format_bytes
from pagedllm.memory.weights import partition_layers
from pagedllm.model_executor.input_builder import StepInputs
from pagedllm.model_loader.resolve import resolve_model
from pagedllm.outputs import RequestOutput
from pagedllm.platform import resolve_device, tune_cpu
from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger("pagedllm")


def engine_setup(args: EngineArgs) -> tuple[ModelConfig, str, torch.dtype, torch.device]:
    """What every rank derives from the engine arguments: model facts, checkpoint folder, dtype, device."""
    args.validate()
    folder = resolve_model(args.model, args.load_format)
    cfg = ModelConfig.from_folder(folder)
    check_tensor_parallel(cfg, args.tensor_parallel_size)
    partition_layers(cfg.num_layers, args.pipeline_parallel_size, args.pipeline_partition)  # raises if it cannot split
    device = resolve_device(args.device)
    if device.type == "cpu":
        tune_cpu()
    dtype = cfg.dtype if args.dtype == "auto" else parse_dtype(args.dtype)
    if args.quantization == "int8" and args.dtype == "auto":
        dtype = torch.bfloat16  # int8 weights, bf16 activations, scales and KV cache
    return cfg, folder, dtype, device


@dataclass
class _Launched:
    """A batch handed to the executor and not yet finished."""

    out: SchedulerOutput
    batch: list[ScheduledSeq]
    rows: list[tuple[int, Sequence]]
    forks: list[tuple[Sequence, Sequence]]
    flight: object = None  # the executor's handle for collect()
    error: Exception | None = None


@dataclass
class EngineStats:
    """A snapshot for metrics and the offline API (counters are totals since start)."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int
    prefix_cache_queries: int
    prefix_cache_hits: int


class LLMEngine:
    def __init__(self, args: EngineArgs):
        self.args = args
        cfg, self.model_path, self.dtype, self.device = engine_setup(args)
        self.model_config = cfg
        self.max_model_len, budget = model_limits(args, cfg)
        self.tokenizer = load_tokenizer(args.tokenizer or self.model_path)
        self.processor = InputProcessor(cfg, self.tokenizer, self.max_model_len)

        self.executor = make_executor(args, cfg, self.model_path, self.dtype, self.device)
        self.runner = self.executor.runner  # rank 0's shard; it also samples
        try:
            num_blocks = self._num_kv_blocks(args, budget)
            self.executor.allocate_kv_cache(num_blocks, args.block_size)
        except BaseException:
            self.executor.shutdown()
            raise
        self.block_manager = BlockManager(num_blocks, args.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(args.max_num_seqs, budget, self.max_model_len, args.enable_chunked_prefill),
            self.block_manager,
        )
        self.output_processor = OutputProcessor(self.tokenizer, self.processor.eos_token_ids, self.max_model_len,
                                                self.scheduler.finish)
        self.requests: dict[str, Request] = {}
        self.in_flight: deque[_Launched] = deque()
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0

    # ---- start-up ---------------------------------------------------------------------------
    def _num_kv_blocks(self, args: EngineArgs, budget_tokens: int) -> int:
        """Size the pool: an explicit block count; on CUDA what is left of device memory · utilisation
        after the loaded weights and the peak activations of a profiled forward pass; on the CPU
        --kv-cache-memory or the documented default."""
        stages = partition_layers(self.model_config.num_layers, args.pipeline_parallel_size, args.pipeline_partition)
        per_token = kv_bytes_per_token(self.model_config, self.dtype.itemsize, args.tensor_parallel_size,
                                       max(end - start for start, end in stages))  # every stage holds as many blocks
        per_block = per_token * args.block_size
        weights = self.runner.weight_bytes
        if args.num_gpu_blocks_override is not None:
            num_blocks, source = args.num_gpu_blocks_override, "--num-gpu-blocks-override"
        elif self.device.type == "cuda":
            peak = self.runner.profile_peak_activations(budget_tokens, self.max_model_len, args.block_size)
            total = torch.cuda.mem_get_info(self.device)[1]
            free = int(total * args.gpu_memory_utilization) - weights - peak
            num_blocks = max(0, free) // per_block
            source = (f"{format_bytes(total)} x {args.gpu_memory_utilization} - weights {format_bytes(weights)} "
                      f"- peak activations {format_bytes(peak)}")
        else:
            wanted = args.max_num_seqs * self.max_model_len * per_token
            budget = args.kv_cache_memory or cpu_default_kv_budget(wanted)
            num_blocks = budget // per_block
            source = "--kv-cache-memory" if args.kv_cache_memory else \
                "CPU default: min(4 GiB, 40% of free RAM, what max_num_seqs x max_model_len need)"
        tokens = num_blocks * args.block_size
        logger.info("KV cache: %d blocks x %d tokens = %d tokens, %s (%s per token; weights %s; from %s); "
                    "max concurrency at max_model_len %d: %.2f", num_blocks, args.block_size, tokens,
                    format_bytes(num_blocks * per_block), format_bytes(per_token), format_bytes(weights), source,
                    self.max_model_len, tokens / self.max_model_len)
        if tokens < self.max_model_len:
            need = -(-self.max_model_len // args.block_size)
            if args.num_gpu_blocks_override is not None:
                more = f"--num-gpu-blocks-override {need}"
            elif self.device.type == "cuda":
                more = "a higher --gpu-memory-utilization, a smaller --max-num-batched-tokens, or --tensor-parallel-size 2"
            else:
                more = f"--kv-cache-memory {format_bytes(need * per_block).replace(' ', '')} or more"
            raise ValueError(
                f"the KV cache holds {tokens} tokens ({num_blocks} blocks of {args.block_size}, "
                f"{format_bytes(num_blocks * per_block)}) but one sequence of max_model_len={self.max_model_len} "
                f"needs {need} blocks ({format_bytes(need * per_block)} at {format_bytes(per_token)} per token). "
                f"Fix: lower --max-model-len to at most {tokens}, or give the cache more room: {more}"
            )
        return num_blocks

    # ---- requests ---------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.processor.apply_chat_template(messages, add_generation_prompt)

    def add_request(self, prompt: PromptType, params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None) -> str:
        text, ids, params = self.processor.process(prompt, params)
        request_id = self.processor.claim_request_id(request_id, self.requests)
        req = Request(request_id, text, ids, params)
        req.seqs[0].guide = self.processor.guide(params)
        if arrival_time is not None:
            req.metrics.arrival_time = arrival_time
        self.requests[request_id] = req
        self.scheduler.add(req.seqs[0])
        self.num_prompt_tokens += len(ids)
        return request_id

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix: later requests compute their prompts in full (benchmarks measure prefill so)."""
        self.block_manager.reset_prefix_cache()

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None:
            for seq in req.seqs:
                if not seq.is_finished:
                    seq.finish_reason = "abort"
                    self.scheduler.finish(seq)

    @torch.inference_mode()
    def score(self, token_ids: list[int]) -> torch.Tensor:
        """Logits at every position of one prompt (teacher forcing), e.g. to compare precisions. Runs alone:
        call it between steps, not while requests are in flight."""
        if not isinstance(self.executor, LocalExecutor):  # the other ranks would wait for a step that never comes
            raise ValueError("score() needs a single-process engine (no tensor or pipeline parallelism)")
        seq = Request("score", None, list(token_ids), SamplingParams(max_tokens=1)).seqs[0]
        if not self.block_manager.can_allocate(seq, seq.num_tokens):
            raise ValueError("the prompt does not fit in the free KV blocks")
        self.block_manager.allocate(seq, seq.num_tokens)
        try:
            hidden = self.runner.forward(StepInputs.from_batch([ScheduledSeq(seq, seq.num_tokens)], [], []))
            return self.runner.model.compute_logits(hidden).float()
        finally:
            self.block_manager.free(seq)

    def stats(self) -> list[tuple[dict[str, str], EngineStats]]:
        """One (labels, stats) pair per engine replica; a single engine has no extra labels."""
        s = self.scheduler
        return [({}, EngineStats(len(s.running), len(s.waiting), self.block_manager.usage, s.num_preemptions,
                                 self.num_prompt_tokens, self.num_generation_tokens, s.prefix_queries, s.prefix_hits))]

    def health(self) -> dict:
        self.check_health()
        return {"status": "ok"}

    def check_health(self) -> None:
        self.executor.check_health()

    def shutdown(self) -> None:
        for rid in list(self.requests):
            self.abort_request(rid)
        try:
            while self.in_flight:  # let the pipeline drain so no stage is left sending to us
                self._finish(self.in_flight.popleft())
        except RuntimeError:
            pass
        self.executor.shutdown()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one batch (with pipeline parallelism: keep up to one micro-batch per stage in flight and finish
        the oldest); outputs of the requests it touched."""
        depth = self.args.pipeline_parallel_size
        while len(self.in_flight) < depth:
            launched = self._launch(depth - len(self.in_flight))
            if launched is None:
                break
            self.in_flight.append(launched)
        if not self.in_flight:
            return []
        return self._finish(self.in_flight.popleft())

    def _launch(self, share: int = 1) -> _Launched | None:
        out = self.scheduler.schedule(share)
        if not out.scheduled:
            return None
        # decodes first, by context length; then prompt chunks, by length (see model_executor/context.py)
        batch = sorted(out.scheduled, key=lambda s: (s.num_new_tokens != 1, s.num_new_tokens, s.seq.num_computed_tokens))
        rows: list[tuple[int, Sequence]] = []  # (batch row whose last token is sampled, the sequence it samples for)
        forks = []
        now = time.time()
        for i, s in enumerate(batch):
            s.seq.in_flight = True
            if s.seq.request.metrics.first_scheduled_time is None:
                s.seq.request.metrics.first_scheduled_time = now
            if s.seq.num_computed_tokens + s.num_new_tokens == s.seq.num_tokens:
                rows.append((i, s.seq))
                for k in range(1, s.num_samples):
                    child = s.seq.fork(k)
                    child.guide = self.processor.guide(child.params)  # forked before any output: a fresh state
                    forks.append((s.seq, child))
                    rows.append((i, child))
        launched = _Launched(out, batch, rows, forks)
        try:
            step = StepInputs.from_batch(batch, out.blocks_to_copy, [i for i, _ in rows])
            launched.flight = self.executor.submit(step)
        except Exception as exc:
            launched.error = exc
        return launched

    def _finish(self, launched: _Launched) -> list[RequestOutput]:
        out, batch, rows = launched.out, launched.batch, launched.rows
        for s in batch:
            s.seq.in_flight = False
        try:
            if launched.error is not None:
                raise launched.error
            logits = self.executor.collect(launched.flight)
            result = self.runner.sample(logits, [seq for _, seq in rows]) if rows else None
        except WorkerDiedError:  # the group is broken: nothing can run any more
            self._fail(set(self.requests.values()), "engine error: a tensor- or pipeline-parallel worker died")
            raise
        except Exception as exc:  # a failing step fails only the requests in it
            logger.exception("engine step failed")
            self.block_manager.reset_prefix_cache()  # blocks registered for this step may hold no K/V
            return self._fail({s.seq.request for s in batch}, f"engine error: {exc}")
        self.scheduler.update_after_step(out)
        for parent, child in launched.forks:
            if parent.is_finished:  # aborted while its batch was in flight
                continue
            child.num_computed_tokens = parent.num_computed_tokens
            self.scheduler.fork(parent, child)
            parent.request.seqs.append(child)
        if result is not None:
            self.num_generation_tokens += self.output_processor.append_tokens([seq for _, seq in rows], result)
        # as in vLLM, a step reports the requests it gave a token (or finished), not those still mid-prefill
        touched = {seq.request for _, seq in rows} | {s.seq.request for s in batch if s.seq.request.is_finished}
        return [self._output(req) for req in touched if req.request_id in self.requests]

    def _fail(self, requests: set[Request], message: str) -> list[RequestOutput]:
        outputs = []
        for req in requests:
            for seq in req.seqs:
                if not seq.is_finished:
                    seq.finish_reason = "error"
                    self.scheduler.finish(seq)
            req.error = message
            outputs.append(self._output(req))
        return outputs

    def _output(self, req: Request) -> RequestOutput:
        if req.is_finished or req.error is not None:
            self.requests.pop(req.request_id, None)
            req.metrics.finished_time = time.time()
        return self.output_processor.make_output(req)
