"""Tensor parallelism over two gloo processes: same greedy tokens as one process and as HF, clean lifecycle."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from pagedllm import LLM, SamplingParams
from tests.helpers import (
    HFReference,
    assert_greedy_match,
    assert_pool_empty,
    check_greedy_against_hf,
    free_port,
    plan_for,
    random_prompts,
)

PROMPTS = random_prompts(8, 3, 60, seed=70)
MAX_TOKENS = 16


def _greedy(llm: LLM) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params,
                                                          use_tqdm=False)]


@pytest.mark.parametrize("arch", ["qwen3", "llama", "qwen2"])  # qwen2 has 1 KV head: replicated on both ranks
def test_tp2_matches_tp1_and_hf(tiny_models, arch):
    hf = HFReference(tiny_models[arch])
    refs = [hf.greedy(p, MAX_TOKENS) for p in PROMPTS]
    one = _greedy(LLM(tiny_models[arch], dtype="float32", max_model_len=128))
    llm = LLM(tiny_models[arch], dtype="float32", max_model_len=128, tensor_parallel_size=2)
    try:
        two = _greedy(llm)
        for a, b, (ref, scores) in zip(two, one, refs):
            assert_greedy_match(a, ref, scores)
            assert_greedy_match(b, ref, scores)
        assert_pool_empty(llm)
        ex = llm.engine.executor
        plan = plan_for(tiny_models[arch], dtype="float32", tensor_parallel_size=2, max_model_len=128)
        assert ex.weight_bytes() == [plan["devices"][0]["weight_bytes"]] * 2
        per_block = plan["devices"][0]["kv_bytes_per_block"]
        assert ex.collective_rpc("kv_cache_bytes") == [llm.engine.block_manager.num_blocks * per_block] * 2
    finally:
        llm.engine.shutdown()


def test_int4_weights_shard_along_their_groups(tiny_models):
    """int4 (groups of 32): each rank quantizes its own shard, whose groups are the whole model's (o_proj's 64 inputs
    split into 32 per rank); the same tokens as one process, and each rank holds what the planner says."""
    kwargs = dict(dtype="float32", quantization="int4", max_model_len=128)
    one = _greedy(LLM(tiny_models["qwen3"], **kwargs))
    llm = LLM(tiny_models["qwen3"], tensor_parallel_size=2, **kwargs)
    try:
        assert _greedy(llm) == one
        plan = plan_for(tiny_models["qwen3"], tensor_parallel_size=2, **kwargs)
        assert llm.engine.executor.weight_bytes() == [plan["devices"][0]["weight_bytes"]] * 2
        assert_pool_empty(llm)
    finally:
        llm.engine.shutdown()


def test_tp2_under_preemption_with_multi_step(tiny_models):
    """Both ranks take every step of a multi-step batch (the next step's inputs travel like any other's)."""
    check_greedy_against_hf(tiny_models["qwen3"], PROMPTS, MAX_TOKENS, expect_preemption=True, max_model_len=80,
                            tensor_parallel_size=2, num_gpu_blocks_override=10, block_size=8, num_scheduler_steps=4)


def test_tp_that_does_not_divide_heads_fails_clearly(tiny_models):
    with pytest.raises(ValueError, match="must divide"):
        LLM(tiny_models["qwen3"], dtype="float32", tensor_parallel_size=3)


def _children() -> set[int]:
    out = subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True, text=True).stdout
    return {int(x) for x in out.split()}


def test_killed_worker_gives_a_clear_error_quickly(tiny_models):
    before = _children()
    llm = LLM(tiny_models["llama"], dtype="float32", max_model_len=256, tensor_parallel_size=2)
    worker = llm.engine.executor.procs[0]
    engine = llm.engine
    engine.add_request({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=200, ignore_eos=True))
    engine.step()
    os.kill(worker.pid, signal.SIGKILL)
    start = time.time()
    with pytest.raises(RuntimeError, match="worker"):
        for _ in range(1000):
            engine.step()
    assert time.time() - start < 10
    assert not engine.requests  # its requests were failed, and their blocks returned
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    engine.shutdown()
    assert _children() <= before


def test_server_with_tp2_answers_and_shuts_down(tiny_models):
    port = free_port()
    cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", tiny_models["qwen3"], "--port", str(port),
           "--dtype", "float32", "--max-model-len", "256", "--tensor-parallel-size", "2", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        r = client.completions.create(model=tiny_models["qwen3"], prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
        ref = _greedy_one(tiny_models["qwen3"], PROMPTS[0])
        assert r.choices[0].text == ref
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert workers
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        time.sleep(0.5)
        assert all(not os.path.exists(f"/proc/{w}") or "zombie" in open(f"/proc/{w}/status").read().lower()
                   for w in workers)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _greedy_one(model: str, prompt: list[int]) -> str:
    llm = LLM(model, dtype="float32", max_model_len=256)
    return llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].text
