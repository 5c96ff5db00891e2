"""Multi-step scheduling (--num-scheduler-steps): a batch of decodes runs several steps per schedule with the same
tokens, logprobs and stops as one step at a time, never past a request's limits, and gives every block back."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pagedllm.config import SchedulerConfig
from pagedllm.engine.block_manager import BlockManager
from pagedllm.engine.scheduler import Scheduler
from pagedllm.engine.sequence import Request
from pagedllm.sampling_params import SamplingParams
from tests.helpers import assert_pool_empty, random_prompts


def _decoding(params: SamplingParams, num_blocks: int = 64, prompt: int = 6, max_seqs: int = 8):
    """A scheduler (8 steps per schedule, blocks of 4) with one sequence past its prompt and its first token out."""
    s = Scheduler(SchedulerConfig(max_seqs, 32, 64, num_scheduler_steps=8), BlockManager(num_blocks, 4, False))
    seq = Request("r", None, list(range(10, 10 + prompt)), params).seqs[0]
    s.add(seq)
    while seq.num_computed_tokens < prompt:
        s.update_after_step(s.schedule())
    seq.token_ids.append(1)
    return s, seq


@pytest.mark.parametrize("params, expected", [
    (SamplingParams(max_tokens=100), 8),
    (SamplingParams(max_tokens=5), 4),  # one token out, four to go
    (SamplingParams(max_tokens=None), 8),
    (SamplingParams(max_tokens=100, presence_penalty=0.5), 1),  # sampling reads the output so far
    (SamplingParams(max_tokens=100, repetition_penalty=1.2), 1),
    (SamplingParams(max_tokens=100, min_tokens=3), 1),  # EOS is banned for two more tokens only
    (SamplingParams(max_tokens=100, min_tokens=1), 8),
])
def test_lookahead_follows_what_sampling_reads_and_the_request_limits(params, expected):
    s, seq = _decoding(params)
    out = s.schedule()
    assert out.num_steps == expected
    assert len(seq.block_table) == -(-(seq.num_computed_tokens + expected) // 4)  # slots for every step


def test_lookahead_stops_at_max_model_len_and_when_blocks_run_out_or_a_request_waits():
    s, _ = _decoding(SamplingParams(max_tokens=None), prompt=56)  # 57 tokens of max_model_len 64
    assert s.schedule().num_steps == 7
    s, _ = _decoding(SamplingParams(max_tokens=100), num_blocks=3)  # 8 more tokens need a fourth block
    assert s.schedule().num_steps == 1
    s, _ = _decoding(SamplingParams(max_tokens=100), max_seqs=1)
    s.add(Request("w", None, [5] * 4, SamplingParams()).seqs[0])  # no seat for it yet: the next schedule may admit it
    assert s.schedule().num_steps == 1


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=24, logprobs=2),
    SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=24),  # forked samples: copy-on-write, then lookahead
    SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=24),
    SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[int(t) for t in range(3, 49152, 7)]),
])
def test_multi_step_gives_the_single_step_outputs(tiny_models, params):
    """Requests of different lengths in one batch (some end at a stop token or their max_tokens between two
    schedules) get the tokens, logprobs and finish reasons of one step at a time, and the pool empties."""
    from pagedllm import LLM

    prompts = [{"prompt_token_ids": p} for p in random_prompts(5, 3, 30, seed=4)]
    per_request = [dataclasses.replace(params, max_tokens=m) for m in (3, 24, 9, 17, 1)]
    results = {}
    for steps in (1, 5):
        llm = LLM(tiny_models["qwen3"], dtype="float32", num_scheduler_steps=steps)
        try:
            outs = llm.generate(prompts, per_request, use_tqdm=False)
            results[steps] = [(c.token_ids, c.logprobs, c.finish_reason) for o in outs for c in o.outputs]
            assert_pool_empty(llm)
        finally:
            llm.engine.shutdown()
    assert results[5] == results[1]
    assert ("stop" in [r for _, _, r in results[1]]) == bool(params.stop_token_ids)


def test_a_step_failing_inside_a_multi_step_batch_fails_its_requests_and_frees_their_blocks(tiny_models):
    """The third step of the batch raises: its requests end with an error (their tokens so far kept), the pool
    empties, and the engine goes on serving."""
    from pagedllm import LLM

    llm = LLM(tiny_models["llama"], dtype="float32", num_scheduler_steps=8)
    try:
        engine, submit, calls = llm.engine, llm.engine.executor.submit, []

        def failing(step):
            calls.append(step)
            if len(calls) == 4:  # the prefill, then the batch's first, second and third steps
                raise RuntimeError("injected")
            return submit(step)

        engine.executor.submit = failing
        params = SamplingParams(max_tokens=50, ignore_eos=True)
        rids = [engine.add_request({"prompt_token_ids": p}, params) for p in ([5, 6, 7], [8, 9])]
        outs = {o.request_id: o for _ in range(2) for o in engine.step()}
        assert all(outs[r].finished and outs[r].error for r in rids)
        assert [len(outs[r].outputs[0].token_ids) for r in rids] == [3, 3]
        assert_pool_empty(llm)
        engine.executor.submit = submit
        assert len(llm.generate([{"prompt_token_ids": [5, 6]}], params, use_tqdm=False)[0].outputs[0].token_ids) == 50
    finally:
        llm.engine.shutdown()


def test_next_decode_feeds_back_the_sampled_tokens():
    from pagedllm.step import StepInputs

    step = StepInputs.build([[4], [9]], [3, 10], [[0], [1, 2, 3]], sample_positions=[0, 1])
    nxt = step.next_decode(torch.tensor([7, 8]))
    assert nxt.token_ids.tolist() == [7, 8] and nxt.starts.tolist() == [4, 11] and nxt.lens.tolist() == [1, 1]
    assert torch.equal(nxt.tables, step.tables) and nxt.sample_positions.tolist() == [0, 1] and nxt.decodes_only


def test_blocks_a_multi_step_batch_fills_serve_later_prompts(tiny_models):
    """Blocks completed inside a multi-step batch are registered for prefix caching as one step at a time registers
    them: a prompt that repeats a finished request's prompt and output finds as many cached tokens either way."""
    from pagedllm import LLM

    prompt = random_prompts(1, 20, 20, seed=9)[0]
    cached = {}
    for steps in (1, 8):
        llm = LLM(tiny_models["qwen3"], dtype="float32", num_scheduler_steps=steps, block_size=4)
        try:
            params = SamplingParams(temperature=0, max_tokens=23, ignore_eos=True)
            out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0].token_ids
            again = llm.generate([{"prompt_token_ids": prompt + out}], params, use_tqdm=False)[0]
            cached[steps] = again.num_cached_tokens
        finally:
            llm.engine.shutdown()
    assert cached[8] == cached[1] == 40  # 43 tokens, their K/V computed for the first 42: ten full blocks
