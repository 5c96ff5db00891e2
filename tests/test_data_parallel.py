"""Data parallelism: replicas behind one front give the same greedy results, share the load, survive a death."""

from __future__ import annotations

import os
import signal
import time

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.outputs import ENGINE_DEAD
from pagedllm.sampling_params import GuidedDecodingParams
from tests.helpers import random_prompts

PROMPTS = random_prompts(12, 3, 50, seed=80)
PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def dp_llm(tiny_models):
    llm = LLM(tiny_models["llama"], dtype="float32", max_model_len=128, data_parallel_size=2)
    yield llm
    llm.engine.shutdown()


def test_dp2_equals_dp1_and_uses_both_replicas(tiny_models, dp_llm):
    one = LLM(tiny_models["llama"], dtype="float32", max_model_len=128)
    ref = [o.outputs[0].token_ids for o in one.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS,
                                                         use_tqdm=False)]
    outs = dp_llm.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == ref
    assert [o.prompt_token_ids for o in outs] == PROMPTS  # input order
    assert all(r.requests_sent > 0 for r in dp_llm.engine.replicas)
    assert dp_llm.engine.health()["status"] == "ok"
    labels = [labels["replica"] for labels, _ in dp_llm.engine.stats()]
    assert labels == ["0", "1"]
    with pytest.raises(ValueError, match="max_model_len"):
        dp_llm.generate({"prompt_token_ids": [5] * 200}, use_tqdm=False)
    # structured outputs: the front checks the constraint (a 400 behind the server), the replica guides
    with pytest.raises(ValueError, match="invalid structured-output constraint"):
        dp_llm.generate("hi", SamplingParams(guided_decoding=GuidedDecodingParams(regex="(unclosed")), use_tqdm=False)
    out = dp_llm.generate("hi", SamplingParams(max_tokens=5, guided_decoding=GuidedDecodingParams(choice=["yes", "no"])),
                          use_tqdm=False)[0]
    assert out.outputs[0].text in ("yes", "no")


def test_killed_replica_fails_only_its_requests(tiny_models):
    llm = LLM(tiny_models["qwen3"], dtype="float32", max_model_len=256, data_parallel_size=2)
    engine = llm.engine
    try:
        ids = [engine.add_request({"prompt_token_ids": p}, SamplingParams(max_tokens=200, ignore_eos=True))
               for p in PROMPTS[:6]]
        on_victim = {rid for rid in ids if engine.requests[rid].replica == 0}
        assert on_victim and len(on_victim) < len(ids)
        engine.step()
        os.kill(engine.replicas[0].proc.pid, signal.SIGKILL)
        finished, deadline = {}, time.time() + 60
        while engine.has_unfinished_requests() and time.time() < deadline:
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out
        assert set(finished) == set(ids)
        assert {rid for rid, o in finished.items() if o.error} == on_victim
        assert all(finished[rid].error == ENGINE_DEAD for rid in on_victim)  # 503 over HTTP; the log says which
        assert engine.health()["status"] == "degraded"
        later = llm.generate({"prompt_token_ids": PROMPTS[7]}, PARAMS, use_tqdm=False)[0]
        assert later.error is None and len(later.outputs[0].token_ids) == 12
    finally:
        engine.shutdown()
    assert not any(r.proc.is_alive() for r in engine.replicas)


def test_server_in_front_of_replicas(tiny_models):
    from fastapi.testclient import TestClient

    from pagedllm.engine.arg_utils import EngineArgs
    from pagedllm.engine.factory import create_engine
    from pagedllm.entrypoints.openai.api_server import build_app

    engine = create_engine(EngineArgs(model=tiny_models["qwen3"], dtype="float32", max_model_len=128,
                                      data_parallel_size=2))
    with TestClient(build_app(engine, served_model_name="tiny")) as http:
        for p in PROMPTS[:4]:
            r = http.post("/v1/completions", json={"model": "tiny", "prompt": p, "max_tokens": 4})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        metrics = http.get("/metrics").text
        assert 'replica="0"' in metrics and 'replica="1"' in metrics
        assert http.get("/health").json()["status"] == "ok"
        assert http.post("/v1/completions", json={"prompt": [5] * 200}).status_code == 400
    assert not any(r.proc.is_alive() for r in engine.replicas)


def test_prefix_affinity_keeps_a_shared_prefix_on_one_replica_and_dp_combines_with_tp(tiny_models):
    prefix = random_prompts(1, 40, 40, seed=81)[0]
    prompts = [prefix + tail for tail in random_prompts(6, 2, 10, seed=82)]
    llm = LLM(tiny_models["qwen3"], dtype="float32", max_model_len=128, data_parallel_size=2,
              tensor_parallel_size=2, data_parallel_routing="prefix-affinity")
    try:
        ids = [llm.engine.add_request({"prompt_token_ids": p}, PARAMS) for p in prompts]
        assert len({llm.engine.requests[rid].replica for rid in ids}) == 1
        while llm.engine.has_unfinished_requests():
            llm.engine.step()
        assert sum(stats.prefix_cache_hits for _, stats in llm.get_stats()) > 0
        assert llm.generate([{"prompt_token_ids": prompts[0]}], PARAMS, use_tqdm=False)[0].num_cached_tokens > 0
        llm.reset_prefix_cache()  # on every replica
        assert llm.generate([{"prompt_token_ids": prompts[0]}], PARAMS, use_tqdm=False)[0].num_cached_tokens == 0
    finally:
        llm.engine.shutdown()
