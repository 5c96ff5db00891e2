"""The OpenAI server, driven by the official `openai` client against a real `pagedllm serve` process."""

from __future__ import annotations

import concurrent.futures
import json
import re
import signal
import time

import httpx
import openai
import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.outputs import ENGINE_DEAD, REQUEST_FAILED
from tests.helpers import random_prompts, running_server

API_KEY = "test-key"
MAX_MODEL_LEN = 512


@pytest.fixture(scope="module")
def server(tiny_models):
    # several decode steps per schedule: every answer below is checked against the one-step offline engine
    with running_server(tiny_models["qwen3"], "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
                        "--api-key", API_KEY, "--served-model-name", "tiny", "--num-scheduler-steps", "4") as started:
        yield started


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def offline(tiny_models):
    return LLM(tiny_models["qwen3"], dtype="float32", max_model_len=MAX_MODEL_LEN)


def _metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics").text
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


PROMPTS = random_prompts(32, 4, 40, seed=21)


def test_completion_greedy_equals_offline_and_stream_equals_non_stream(client, offline):
    prompt = PROMPTS[0]
    ref = offline.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0].text
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == ref and r.usage.completion_tokens == 20
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=prompt, max_tokens=20, temperature=0, stream=True, extra_body={"ignore_eos": True})
        if c.choices)
    assert streamed == ref


def test_chat_streamed_equals_non_streamed_with_usage(client):
    msgs = [{"role": "user", "content": "Hello there"}]
    full = client.chat.completions.create(model="tiny", messages=msgs, max_completion_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_completion_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[0].choices[0].delta.role == "assistant"


def test_32_concurrent_streams_each_get_their_solo_text(client, offline):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    refs = [o.outputs[0].text for o in offline.generate([{"prompt_token_ids": p} for p in PROMPTS], params,
                                                         use_tqdm=False)]

    def run(prompt):
        stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        return "".join(c.choices[0].text for c in stream if c.choices)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        texts = list(pool.map(run, PROMPTS))
    assert texts == refs


def test_stop_n_logprobs_seed_as_offline(client, offline):
    prompt = PROMPTS[1]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 12 and len(lp.top_logprobs[0]) == 2 and lp.token_logprobs[0] <= 0
    text = r.choices[0].text
    stop = text[4:7]
    cut = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
    sampled = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=1.0, seed=7, n=3,
                                        extra_body={"ignore_eos": True})
    ref = offline.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=1.0, seed=7, n=3, max_tokens=10,
                                                                       ignore_eos=True), use_tqdm=False)[0]
    assert [c.text for c in sorted(sampled.choices, key=lambda c: c.index)] == [c.text for c in ref.outputs]
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=3)
    assert len(chat.choices[0].logprobs.content[0].top_logprobs) == 3


@pytest.mark.parametrize("body, status", [
    ({"prompt": "hi", "max_tokens": -3}, 400),
    ({"prompt": "hi", "temperature": -0.5}, 400),
    ({"prompt": "hi", "top_p": 1.5}, 400),
    ({"prompt": "hi", "top_p": 0}, 400),
    ({"prompt": "hi", "n": "many"}, 400),
    ({"prompt": [5] * (MAX_MODEL_LEN + 10)}, 400),
    ({"prompt": [5] * 20, "max_tokens": MAX_MODEL_LEN - 19}, 400),  # vLLM: "'max_tokens' ... is too large"
    ({"prompt": "hi", "logit_bias": {"not-a-token": 1}}, 400),
    ({"prompt": "hi", "logit_bias": {"1000000000": 1}}, 400),
    ({"prompt": "hi", "guided_regex": "a+", "guided_choice": ["b"]}, 400),
    ({"prompt": "hi", "guided_regex": "(unclosed"}, 400),
    ({"prompt": "hi", "response_format": {"type": "json_schema"}}, 400),
    ({"prompt": "hi", "model": "gpt-4"}, 404),
])
def test_bad_input_gets_status_and_openai_error_body(server, client, body, status):
    base, _ = server
    r = httpx.post(f"{base}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == status
    err = r.json()["error"]
    assert err["message"] and err["type"]
    ok = client.completions.create(model="tiny", prompt="hello", max_tokens=3)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_logit_bias_and_allowed_token_ids_over_http(client, offline):
    params = dict(temperature=0, max_tokens=6, ignore_eos=True)
    ref = offline.generate({"prompt_token_ids": PROMPTS[0]}, SamplingParams(**params, logit_bias={42: 100.0}),
                           use_tqdm=False)[0].outputs[0]
    assert set(ref.token_ids) == {42}
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=6, temperature=0, logit_bias={"42": 100},
                                  logprobs=0, extra_body={"ignore_eos": True})
    assert r.choices[0].text == ref.text
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=6, temperature=1.0, logprobs=0,
                                  extra_body={"ignore_eos": True, "allowed_token_ids": [7, 9]})
    allowed = {offline.get_tokenizer().decode([t]) for t in (7, 9)}
    assert set(r.choices[0].logprobs.tokens) <= allowed


def test_structured_outputs_over_http(client):
    r = client.completions.create(model="tiny", prompt="hello", max_tokens=10, temperature=1.0, n=3, seed=5,
                                  extra_body={"guided_choice": ["yes", "no"]})
    assert {c.text for c in r.choices} <= {"yes", "no"} and all(c.finish_reason == "stop" for c in r.choices)
    r = client.completions.create(model="tiny", prompt="hello", max_tokens=10, extra_body={"guided_regex": "[0-9]{4}"})
    assert re.fullmatch("[0-9]{4}", r.choices[0].text)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=30,
                                       response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    assert isinstance(json.loads(r.choices[0].message.content)["ok"], bool)


def test_max_tokens_that_cannot_fit_is_rejected_as_in_vllm(server):
    base, _ = server
    r = httpx.post(f"{base}/v1/completions", json={"prompt": [5] * 20, "max_tokens": MAX_MODEL_LEN},
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == (f"'max_tokens' or 'max_completion_tokens' is too large: {MAX_MODEL_LEN}. "
                                            f"This model's maximum context length is {MAX_MODEL_LEN} tokens and your "
                                            f"request has 20 input tokens ({MAX_MODEL_LEN} > {MAX_MODEL_LEN} - 20)")


def test_malformed_json_and_api_key(server):
    base, _ = server
    r = httpx.post(f"{base}/v1/completions", content=b"{not json", headers={
        "Authorization": f"Bearer {API_KEY}", "content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert httpx.post(f"{base}/v1/completions", json={"prompt": "hi"}).status_code == 401
    assert httpx.post(f"{base}/v1/completions", json={"prompt": "hi"},
                      headers={"Authorization": "Bearer wrong"}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()


def test_echo_prepends_the_prompt(client):
    plain = client.completions.create(model="tiny", prompt="Hello world", max_tokens=5, temperature=0)
    echoed = client.completions.create(model="tiny", prompt="Hello world", max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == "Hello world" + plain.choices[0].text


def test_echo_with_logprobs_scores_the_prompt(client):
    r = client.completions.create(model="tiny", prompt="Hello world, how are you", max_tokens=3, temperature=0,
                                  echo=True, logprobs=2, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    n_prompt = r.usage.prompt_tokens
    assert len(lp.tokens) == n_prompt + 3 and "".join(lp.tokens[:n_prompt]) == "Hello world, how are you"
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(x, float) and x <= 0 for x in lp.token_logprobs[1:])
    assert all(len(t) >= 1 for t in lp.top_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset)
    r = client.completions.create(model="tiny", prompt="Hello world", max_tokens=1, extra_body={"prompt_logprobs": 1})
    prompt_lps = r.choices[0].model_extra["prompt_logprobs"]
    assert prompt_lps[0] is None and all(e for e in prompt_lps[1:])
    with pytest.raises(openai.BadRequestError, match="max-logprobs"):
        client.completions.create(model="tiny", prompt="Hello", max_tokens=1, logprobs=25)



def test_models_tokenize_detokenize(server, client):
    base, _ = server
    assert [m.id for m in client.models.list().data] == ["tiny"]
    tok = httpx.post(f"{base}/tokenize", json={"prompt": "Hello world"}).json()
    assert tok["count"] == len(tok["tokens"]) > 0
    assert httpx.post(f"{base}/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"] == "Hello world"


def _wait_idle(base: str) -> None:
    deadline = time.time() + 10
    while time.time() < deadline:
        if _metric(base, "vllm:kv_cache_usage_perc") == 0 and _metric(base, "vllm:num_requests_running") == 0:
            return
        time.sleep(0.1)
    pytest.fail("blocks still in use after the client left")


def test_disconnect_mid_stream_frees_blocks(server):
    base, _ = server
    body = {"prompt": PROMPTS[2], "max_tokens": 400, "stream": True, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert _metric(base, "vllm:kv_cache_usage_perc") > 0
    _wait_idle(base)


def test_disconnect_while_waiting_for_non_streamed_answer_frees_blocks(server):
    base, _ = server
    body = {"prompt": PROMPTS[3], "max_tokens": 450, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=0.5)
    _wait_idle(base)


def test_metrics_exposed(server, client):
    base, _ = server
    client.completions.create(model="tiny", prompt="hello", max_tokens=4)
    text = httpx.get(f"{base}/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:num_preemptions_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:time_per_output_token_seconds_count",
                 "vllm:e2e_request_latency_seconds_sum", "vllm:request_queue_time_seconds_bucket",
                 "vllm:request_prefill_time_seconds_count", "vllm:request_decode_time_seconds_sum",
                 "vllm:request_generation_tokens_bucket", "vllm:request_success_total",
                 "vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_draft_tokens_total",
                 "vllm:spec_decode_num_accepted_tokens_total"):
        assert name in text, name
    assert _metric(base, "vllm:generation_tokens_total") > 0
    assert _metric(base, "vllm:request_prompt_tokens_count") > 0
    assert 'finished_reason="length"' in text  # vllm:request_success_total, by finish reason
    assert 'vllm:num_requests_running{model_name="tiny"}' in text  # the served name, as vLLM labels it
    assert "pagedllm:" not in text


def test_the_grafana_dashboard_reads_series_the_server_exports(server):
    """docs/monitoring/grafana-dashboard.json: a dashboard Grafana imports (its schema's required parts) whose every
    query names a series /metrics has."""
    import os

    base, _ = server
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "monitoring", "grafana-dashboard.json")
    dash = json.load(open(path))
    assert dash["title"] and dash["uid"] and isinstance(dash["schemaVersion"], int) and dash["panels"]
    exported = {line.split("{")[0].split(" ")[0] for line in httpx.get(f"{base}/metrics").text.splitlines()
                if line and not line.startswith("#")}
    for panel in dash["panels"]:
        assert {"id", "type", "title", "gridPos", "targets"} <= set(panel)
        for target in panel["targets"]:
            for series in re.findall(r"vllm:[a-z0-9_]+", target["expr"]):
                assert series in exported, (panel["title"], series)


def test_text_that_utf8_cannot_encode_is_a_client_error(client, server):
    base, _ = server
    body = '{"model": "tiny", "messages": [{"role": "user\\udb60", "content": "hi \\udb60\\udf05 \\ud859"}]}'
    r = httpx.post(f"{base}/v1/chat/completions", content=body, headers={"Authorization": f"Bearer {API_KEY}",
                                                                             "Content-Type": "application/json"})
    assert r.status_code in (200, 400), r.text  # never a 500
    r = httpx.post(f"{base}/v1/completions", content='{"prompt": "a \\udb60 b", "max_tokens": 2}',
                   headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert r.status_code in (200, 400), r.text


def test_sigterm_shuts_down_gracefully(server):
    base, proc = server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0  # stopped by its own handler, not killed by the signal
    assert "shutting down: aborting" in proc.stdout.read()


def test_engine_error_fails_only_its_requests(tiny_models, monkeypatch, caplog):
    from fastapi.testclient import TestClient

    from pagedllm.engine.arg_utils import EngineArgs
    from pagedllm.engine.llm_engine import LLMEngine
    from pagedllm.entrypoints.openai.api_server import build_app

    engine = LLMEngine.from_engine_args(EngineArgs(model=tiny_models["llama"], dtype="float32", max_model_len=256))
    real, calls = engine.executor.submit, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated device fault")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.executor, "submit", flaky)
    with TestClient(build_app(engine)) as http:
        bad = http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 4})
        assert bad.status_code == 500 and bad.json()["error"]["message"] == REQUEST_FAILED  # the detail: in the log
        assert "simulated" not in bad.text and "simulated device fault" in caplog.text
        good = http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 4})
        assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] > 0
        assert http.get("/health").status_code == 200
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_embedded_model_chat_through_server():
    from fastapi.testclient import TestClient

    from pagedllm.engine.arg_utils import EngineArgs
    from pagedllm.engine.llm_engine import LLMEngine
    from pagedllm.entrypoints.openai.api_server import build_app

    engine = LLMEngine.from_engine_args(EngineArgs(max_model_len=512, dtype="float32"))
    with TestClient(build_app(engine)) as http:
        r = http.post("/v1/chat/completions", json={"messages": [
            {"role": "user", "content": "What is the capital of France?"}], "temperature": 0})
        assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]


def test_a_dead_worker_is_a_503_that_leaks_nothing(tiny_models):
    """A tensor-parallel worker killed under the server: clients get vLLM's 503 with a fixed message; gloo's
    source paths and messages stay in the log."""
    import os

    from fastapi.testclient import TestClient

    from pagedllm.engine.arg_utils import EngineArgs
    from pagedllm.engine.llm_engine import LLMEngine
    from pagedllm.entrypoints.openai.api_server import build_app

    engine = LLMEngine.from_engine_args(EngineArgs(model=tiny_models["llama"], dtype="float32", max_model_len=128,
                                                   tensor_parallel_size=2))
    with TestClient(build_app(engine)) as http:
        assert http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2}).status_code == 200
        os.kill(engine.executor.procs[0].pid, signal.SIGKILL)
        engine.executor.procs[0].join(10)
        for _ in range(2):  # the request that finds the worker gone, then one to an engine known dead
            r = http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2})
            assert r.status_code == 503 and r.json()["error"]["message"] == ENGINE_DEAD, r.text
            assert "pair.cc" not in r.text and "/" not in r.json()["error"]["message"]
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["error"] == ENGINE_DEAD
