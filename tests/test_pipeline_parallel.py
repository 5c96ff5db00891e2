"""Pipeline parallelism over two gloo processes: same greedy tokens as one process and HF, batches overlap."""

from __future__ import annotations

import os
import signal
import time

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.executor.multiproc import bubble_report
from tests.conftest import _save_tiny
from tests.helpers import HFReference, assert_greedy_match, check_greedy_against_hf, random_prompts

PROMPTS = random_prompts(10, 3, 60, seed=90)
MAX_TOKENS = 16


def _greedy(llm: LLM, prompts=PROMPTS) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                          use_tqdm=False)]


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_pp2_matches_hf(tiny_models, arch):
    check_greedy_against_hf(tiny_models[arch], PROMPTS, MAX_TOKENS, max_model_len=128, pipeline_parallel_size=2,
                            max_num_seqs=4)


def test_pp2_under_preemption(tiny_models):
    check_greedy_against_hf(tiny_models["qwen3"], PROMPTS, MAX_TOKENS, expect_preemption=True, max_model_len=80,
                            pipeline_parallel_size=2, num_gpu_blocks_override=12, block_size=8)


def test_two_batches_in_flight_overlap_across_stages(tmp_path):
    # wide enough that a stage's share of a prefill (tens of ms) outlasts passing activations between processes: with
    # the 64-wide tiny model stage 0's work took 0.3-2 ms and on a loaded machine never met stage 1's (CI, 3 runs)
    path = _save_tiny(str(tmp_path / "llama"), "llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                      head_dim=64)
    # eight sequences: the first two micro-batches are each half the prompts' prefill
    llm = LLM(path, dtype="float32", max_model_len=256, pipeline_parallel_size=2, max_num_seqs=8)
    try:
        _greedy(llm, random_prompts(8, 100, 200, seed=91))
        stage0, stage1 = llm.engine.executor.stage_times()
        # stage 0 runs a later micro-batch while stage 1 runs an earlier one
        assert any(a0 < b1 and a1 < b0 for a0, b0 in stage0 for a1, b1 in stage1)
        report = bubble_report([stage0, stage1], micro_batches=len(stage0))
        assert 0 < report["busy_fraction"][0] <= 1 and 0 < report["busy_fraction"][1] <= 1
        busy = llm.engine.executor.busy_fractions()  # what /metrics exports, carried back with every batch
        assert len(busy) == 2 and all(0 < b <= 1 for b in busy)

        from prometheus_client import generate_latest

        from pagedllm.entrypoints.openai.metrics import Metrics

        text = generate_latest(Metrics(llm.engine, "llama", "pagedllm").registry).decode()
        assert 'pagedllm:pipeline_stage_busy_fraction{model_name="llama",stage="1"}' in text
    finally:
        llm.engine.shutdown()


def test_custom_partition(tiny_models):
    hf = HFReference(tiny_models["llama"])
    refs = [hf.greedy(p, MAX_TOKENS) for p in PROMPTS[:3]]
    with pytest.raises(ValueError, match="partition"):
        LLM(tiny_models["llama"], dtype="float32", max_model_len=128, pipeline_parallel_size=2, pipeline_partition=[2, 1])
    llm = LLM(tiny_models["llama"], dtype="float32", max_model_len=128, pipeline_parallel_size=2,
              pipeline_partition=[1, 1])
    try:
        assert llm.engine.executor.driver.runner.model.stage.end == 1
        for out, (ref, scores) in zip(_greedy(llm, PROMPTS[:3]), refs):
            assert_greedy_match(out, ref, scores)
    finally:
        llm.engine.shutdown()


def test_killed_stage_gives_a_clear_error_quickly(tiny_models):
    llm = LLM(tiny_models["llama"], dtype="float32", max_model_len=256, pipeline_parallel_size=2)
    engine = llm.engine
    engine.add_request({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=200, ignore_eos=True))
    engine.step()
    os.kill(engine.executor.procs[0].pid, signal.SIGKILL)
    start = time.time()
    with pytest.raises(RuntimeError, match="stage|worker"):
        for _ in range(1000):
            engine.step()
    assert time.time() - start < 10
    assert not engine.requests
    engine.shutdown()
    assert not any(p.is_alive() for p in engine.executor.procs)


def test_tp2_x_pp2_grid_matches_hf_under_preemption(tiny_models):
    def four_ranks(llm: LLM) -> None:
        assert len(llm.engine.executor.procs) == 3

    check_greedy_against_hf(tiny_models["qwen3"], PROMPTS[:6], MAX_TOKENS, expect_preemption=True, also=four_ranks,
                            max_model_len=80, pipeline_parallel_size=2, tensor_parallel_size=2,
                            num_gpu_blocks_override=12, block_size=8)
