"""The engine loop: admit requests, schedule a step, run it through the executor, turn sampled tokens into outputs."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from pagedllm.config import EngineConfig
from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.engine.batch_inputs import prompt_logprob_row, step_inputs
from pagedllm.engine.block_manager import BlockManager
from pagedllm.engine.input_processor import InputProcessor, ProcessedPrompt, PromptType, load_tokenizer
from pagedllm.engine.kv_cache_budget import determine_num_blocks
from pagedllm.engine.output_processor import OutputProcessor
from pagedllm.engine.protocol import EngineStats
from pagedllm.engine.sampling_metadata import build_sampling_metadata
from pagedllm.engine.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from pagedllm.engine.sequence import Request, Sequence
from pagedllm.engine.spec_decode import SpecDecodeStats, Speculator
from pagedllm.executor.abstract import Executor, WorkerDiedError
from pagedllm.executor.multiproc import MultiprocExecutor
from pagedllm.executor.uniproc import UniProcExecutor
from pagedllm.outputs import ENGINE_DEAD, REQUEST_FAILED, RequestOutput
from pagedllm.sampling_params import SamplingParams
from pagedllm.step import SamplerOutput, SamplingMetadata, StepInputs, StepOutput

logger = logging.getLogger("pagedllm")


@dataclass
class _Launched:
    """A batch handed to the executor and not yet finished."""

    out: SchedulerOutput
    batch: list[ScheduledSeq]
    rows: list[tuple[int, Sequence]]  # (the token position whose next token is sampled, the sequence it samples for)
    forks: list[tuple[Sequence, Sequence]]
    speculating: list[tuple[Sequence, int, list[int]]] = field(default_factory=list)  # (seq, first row, proposals)
    prompt_rows: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, chunk start): prompt logprobs
    sampling: SamplingMetadata | None = None
    inputs: StepInputs | None = None
    flight: object = None  # the executor's handle for collect()
    error: Exception | None = None


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        if config.cache.cache_dtype != config.dtype:
            raise ValueError(f"a KV cache in {config.cache.cache_dtype} beside {config.dtype} activations is not supported "
                             "yet: leave kv_cache_dtype at auto")
        self.tokenizer = load_tokenizer(config.load.tokenizer or config.load.model_path)
        self.processor = InputProcessor(config, self.tokenizer)
        if config.model.sampling_defaults:
            logger.info("Default sampling parameters have been overridden by the model's generation config: %s",
                        dict(config.model.sampling_defaults))
        self.executor: Executor = (MultiprocExecutor if config.parallel.world_size > 1 else UniProcExecutor)(config)
        try:
            # a draft model loads first: its weights are in use when the target's pool is sized, its pool shares the budget
            self.speculator = Speculator(config, self.processor.eos_token_ids) if config.speculative else None
            num_blocks = determine_num_blocks(config, self.executor,
                                              self.speculator.kv_bytes_per_token if self.speculator else 0)
            self.executor.allocate_kv_cache(num_blocks)
            if self.speculator:
                self.speculator.allocate(num_blocks)
        except BaseException:
            self.executor.shutdown()
            raise
        self.block_manager = BlockManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.output_processor = OutputProcessor(self.tokenizer, self.processor.eos_token_ids, config.max_model_len,
                                                self.scheduler.finish)
        self.requests: dict[str, Request] = {}
        self.in_flight: deque[_Launched] = deque()
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.closed = False

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args.create_engine_config())

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, prompt: PromptType | ProcessedPrompt, params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None) -> str:
        if self.closed:
            raise RuntimeError("the engine has been shut down")
        p = self.processor.process(prompt, params)
        params = p.params
        request_id = self.processor.claim_request_id(request_id, self.requests)
        req = Request(request_id, p.prompt, p.prompt_token_ids, params)
        req.seqs[0].guide = self.processor.guide(params)
        if arrival_time is not None:
            req.metrics.arrival_time = arrival_time
        self.requests[request_id] = req
        self.scheduler.add(req.seqs[0])
        self.num_prompt_tokens += len(p.prompt_token_ids)
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
    def score(self, token_ids: list[int], step_tokens: int | None = None) -> torch.Tensor:
        """Logits at every position of one prompt (teacher forcing), e.g. to compare precisions: in one step, or
        `step_tokens` positions per step (1: each computed as a decode step computes it). Runs alone: call it between
        steps, not while requests are in flight."""
        seq = Request("score", None, list(token_ids), SamplingParams(max_tokens=1)).seqs[0]
        if not self.block_manager.can_allocate(seq, seq.num_tokens):
            raise ValueError("the prompt does not fit in the free KV blocks")
        self.block_manager.allocate(seq, seq.num_tokens)
        n, parts = seq.num_tokens, []
        try:
            for seq.num_computed_tokens in range(0, n, step_tokens or n):
                chunk = ScheduledSeq(seq, min(n - seq.num_computed_tokens, step_tokens or n))
                parts.append(self.executor.score(step_inputs([chunk], [], [])))
            return torch.cat(parts)
        finally:
            self.block_manager.free(seq)

    def stats(self) -> list[tuple[dict[str, str], EngineStats]]:
        """One (labels, stats) pair per engine replica; a single engine has no extra labels."""
        s = self.scheduler
        spec = self.speculator.stats if self.speculator else SpecDecodeStats()
        return [({}, EngineStats(len(s.running), len(s.waiting), self.block_manager.usage, s.num_preemptions,
                                 self.num_prompt_tokens, self.num_generation_tokens, s.prefix_queries, s.prefix_hits,
                                 spec.num_drafts, spec.num_draft_tokens, spec.num_accepted_tokens))]

    def health(self) -> dict:
        self.check_health()
        return {"status": "ok"}

    def check_health(self) -> None:
        self.executor.check_health()

    def shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        for rid in list(self.requests):
            self.abort_request(rid)
        try:
            while self.in_flight:  # let the pipeline drain so no stage is left sending to us
                self._finish(self.in_flight.popleft())
        except RuntimeError:
            pass
        if self.speculator is not None:
            self.speculator.shutdown()
        self.executor.shutdown()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one batch (with pipeline parallelism: keep up to one micro-batch per stage in flight and finish
        the oldest); outputs of the requests it touched."""
        depth = self.config.parallel.pipeline_parallel_size
        while len(self.in_flight) < depth:
            launched = self._launch(depth - len(self.in_flight))
            if launched is None:
                break
            self.in_flight.append(launched)
        if not self.in_flight:
            return []
        return self._finish(self.in_flight.popleft())

    def _launch(self, share: int = 1) -> _Launched | None:
        if self.speculator is not None:
            self.speculator.prepare(self.scheduler.running)
        out = self.scheduler.schedule(share)
        if not out.scheduled:
            return None
        dists = self.speculator.fill([s.seq for s in out.scheduled if s.seq.spec_token_ids],
                                     out.blocks_to_copy) if self.speculator else {}
        # decodes first, by context length; then prompt chunks, by length (see forward_context.py)
        batch = sorted(out.scheduled, key=lambda s: (s.num_new_tokens != 1, s.num_new_tokens, s.seq.num_computed_tokens))
        launched = _Launched(out, batch, [], [])
        drafts: list[int] = []  # per sampled row: the proposal it verifies, or -1
        firsts: list[int] = []  # per sampled row: its sequence's first row
        now, end = time.time(), 0
        for s in batch:
            seq, end = s.seq, end + s.num_new_tokens
            seq.in_flight = True
            if seq.request.metrics.first_scheduled_time is None:
                seq.request.metrics.first_scheduled_time = now
            if seq.num_computed_tokens + s.num_new_tokens < seq.num_tokens + len(seq.spec_token_ids):
                continue  # a prompt chunk before the last: nothing to sample
            if seq.spec_token_ids:
                launched.speculating.append((seq, len(launched.rows), list(seq.spec_token_ids)))
            for j, draft in enumerate([*seq.spec_token_ids, -1]):  # a speculating sequence's last k + 1 positions
                firsts.append(len(launched.rows) - j)
                launched.rows.append((end - 1 - len(seq.spec_token_ids) + j, seq))
                drafts.append(draft)
            for k in range(1, s.num_samples):
                child = seq.fork(k)
                child.guide = self.processor.guide(child.params)  # forked before any output: a fresh state
                launched.forks.append((seq, child))
                firsts.append(len(launched.rows))
                launched.rows.append((end - 1, child))
                drafts.append(-1)
        prompt_rows = [r for i, s in enumerate(batch) if (r := prompt_logprob_row(i, s)) is not None]
        launched.prompt_rows = [(batch[r[0]].seq, batch[r[0]].seq.num_computed_tokens) for r in prompt_rows]
        rows = launched.rows
        try:
            if rows:
                device = self.executor.driver.device
                launched.sampling = build_sampling_metadata(
                    [seq for _, seq in rows], self.config.model.vocab_size, self.processor.eos_token_ids, device,
                    (drafts, firsts) if launched.speculating else None)
                if dists:
                    launched.sampling.spec_probs = self.speculator.row_probs(launched.speculating, len(rows), dists, device)
            launched.inputs = step_inputs(batch, out.blocks_to_copy, [p for p, _ in rows], prompt_rows)
            launched.flight = self.executor.submit(launched.inputs)
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
            result = self.executor.collect(launched.flight, launched.sampling)
            self._settle(launched, result)
            for _ in range(1, out.num_steps):
                if (result := self._next_decode(launched, result.sampled)) is None:
                    break
        except WorkerDiedError:  # the group is broken: nothing can run any more
            logger.exception("a tensor- or pipeline-parallel worker died")
            self._fail(set(self.requests.values()), ENGINE_DEAD)
            raise
        except Exception:  # a failing step fails only the requests in it
            logger.exception("engine step failed")
            self.block_manager.reset_prefix_cache()  # blocks registered for this step may hold no K/V
            return self._fail({s.seq.request for s in batch}, REQUEST_FAILED)
        # as in vLLM, a step reports the requests it gave a token (or finished), not those still mid-prefill
        touched = {seq.request for _, seq in rows} | {s.seq.request for s in batch if s.seq.request.is_finished}
        return [self._output(req) for req in touched if req.request_id in self.requests]

    def _settle(self, launched: _Launched, result: StepOutput) -> None:
        """A step's results into its sequences: computed tokens, forks, prompt logprobs, sampled tokens."""
        self.scheduler.update_after_step(launched.out)
        for parent, child in launched.forks:
            if parent.is_finished:  # aborted while its batch was in flight
                continue
            child.num_computed_tokens = parent.num_computed_tokens
            self.scheduler.fork(parent, child)
            parent.request.seqs.append(child)
        if result.prompt_logprobs is not None:
            self.output_processor.append_prompt_logprobs(launched.prompt_rows, result.prompt_logprobs)
        if result.sampled is not None:
            self.num_generation_tokens += self.output_processor.append_tokens([s for _, s in launched.rows], result.sampled)
        if launched.speculating:
            self.speculator.settle(self.scheduler, launched.speculating, result.sampled.token_ids.tolist())

    def _next_decode(self, launched: _Launched, sampled: SamplerOutput) -> StepOutput | None:
        """One more step of a multi-step batch, each row feeding back its sampled token; None once every sequence
        has finished. A row whose sequence finished still computes (the batch keeps its shape) into slots nobody
        else holds until the next schedule; its tokens are dropped."""
        seqs = [seq for _, seq in launched.rows]
        if all(seq.is_finished for seq in seqs):
            return None
        self.scheduler.advance(seqs)
        launched.inputs = launched.inputs.next_decode(sampled.token_ids)
        result = self.executor.collect(self.executor.submit(launched.inputs), launched.sampling)
        self.num_generation_tokens += self.output_processor.append_tokens(seqs, result.sampled)
        return result

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
