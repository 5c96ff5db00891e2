"""The chat API as Qwen3 users call it, with the official `openai` client against a real server on a tiny Qwen3
checkpoint whose chat template follows Qwen3's format: thinking on and off, reasoning output, tool calls (named,
required, auto with the hermes parser), streamed and not; and the model's own sampling defaults."""

from __future__ import annotations

import json
import os
import shutil

import httpx
import openai
import pytest

from pagedllm import LLM
from tests.helpers import running_server

TEMPLATE = os.path.join(os.path.dirname(__file__), "data", "qwen3_chat_template.jinja")
# bounded arguments (enums, booleans): a random-weight model fills them in a few tokens
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo"]},
                                         "celsius": {"type": "boolean"}}, "required": ["city", "celsius"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string", "enum": ["CET", "JST"]}}, "required": ["zone"]}}},
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def qwen3_chat(tiny_models, tmp_path_factory) -> str:
    """The tiny Qwen3 checkpoint with Qwen3's recommended sampling in its generation_config.json."""
    folder = str(tmp_path_factory.mktemp("qwen3chat") / "model")
    shutil.copytree(tiny_models["qwen3"], folder)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": 2, "temperature": 0.6, "top_p": 0.95, "top_k": 20}, f)
    return folder


@pytest.fixture(scope="module")
def server(qwen3_chat):
    with running_server(qwen3_chat, "--dtype", "float32", "--max-model-len", "512", "--served-model-name", "qwen3",
                        "--chat-template", TEMPLATE, "--reasoning-parser", "qwen3", "--enable-auto-tool-choice",
                        "--tool-call-parser", "hermes") as (base, _):
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def _create(client, **kw):
    kw = {"messages": ASK, "temperature": 0, "max_tokens": 48, **kw}
    return client.chat.completions.create(model="qwen3", **kw)


def _stream(client, **kw) -> dict:
    """A streamed answer put together: reasoning, content, and the tool calls from their deltas."""
    out = {"reasoning": "", "content": "", "calls": {}, "finish": None}
    for chunk in _create(client, stream=True, **kw):
        for choice in chunk.choices:
            d = choice.delta
            out["reasoning"] += getattr(d, "reasoning_content", None) or ""
            out["content"] += d.content or ""
            for tc in d.tool_calls or []:
                call = out["calls"].setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = call["id"] or tc.id
                call["name"] += tc.function.name or ""
                call["arguments"] += tc.function.arguments or ""
            out["finish"] = choice.finish_reason or out["finish"]
    return out


def test_named_tool_choice_gives_a_valid_call_streamed_or_not(client):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = _create(client, tools=TOOLS, tool_choice=choice)
    (call,) = r.choices[0].message.tool_calls
    args = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and call.id.startswith("chatcmpl-tool-") and call.type == "function"
    assert args["city"] in ("Paris", "Tokyo") and isinstance(args["celsius"], bool)
    assert r.choices[0].finish_reason == "tool_calls" and not r.choices[0].message.content
    s = _stream(client, tools=TOOLS, tool_choice=choice)
    assert s["calls"][0]["name"] == "get_weather" and json.loads(s["calls"][0]["arguments"]) == args
    assert s["finish"] == "tool_calls"


def test_required_tool_choice_calls_one_of_the_tools(client):
    # one call: a random-weight model would otherwise go on adding calls until max_tokens
    r = _create(client, tools=TOOLS, tool_choice="required", max_tokens=96, parallel_tool_calls=False)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name in ("get_weather", "get_time") and r.choices[0].finish_reason == "tool_calls"
    assert isinstance(json.loads(call.function.arguments), dict)
    s = _stream(client, tools=TOOLS, tool_choice="required", max_tokens=96, parallel_tool_calls=False)
    assert [(c["name"], json.loads(c["arguments"])) for c in s["calls"].values()] == [
        (call.function.name, json.loads(call.function.arguments))]


def test_auto_tool_choice_parses_hermes_calls(client):
    forced = r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "Paris", "celsius": true\}\}\n</tool_call>'
    extra = {"structured_outputs": {"regex": forced}}
    r = _create(client, tools=TOOLS, tool_choice="auto", max_tokens=64, extra_body=extra)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris",
                                                                                            "celsius": True}
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    s = _stream(client, tools=TOOLS, max_tokens=64, extra_body=extra)  # tools given: auto by default
    assert s["content"] == "" and json.loads(s["calls"][0]["arguments"]) == {"city": "Paris", "celsius": True}


def test_reasoning_is_split_from_the_answer(client):
    extra = {"structured_outputs": {"regex": r"<think>\nParis is in France\.\n</think>\n\nParis"}}
    r = _create(client, extra_body=extra)
    message = r.choices[0].message
    assert message.reasoning_content == "Paris is in France.\n" and message.content == "Paris"
    assert message.model_extra["reasoning"] == "Paris is in France.\n"  # vLLM's newer name
    s = _stream(client, extra_body=extra)
    assert s["reasoning"] == "Paris is in France.\n" and s["content"] == "Paris" and s["finish"] == "stop"


def test_thinking_off_through_chat_template_kwargs(client, server):
    no_think = {"chat_template_kwargs": {"enable_thinking": False}}
    ids = httpx.post(f"{server}/tokenize", json={"messages": ASK, **no_think}).json()["tokens"]
    prompt = httpx.post(f"{server}/detokenize", json={"tokens": ids}).json()["prompt"]
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    r = _create(client, extra_body={**no_think, "structured_outputs": {"regex": "Paris"}})
    assert r.choices[0].message.content == "Paris" and r.choices[0].message.reasoning_content is None


def test_a_tool_round_trip_reaches_the_template(client, server):
    messages = ASK + [
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "celsius": true}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "22 degrees and sunny"},
    ]
    ids = httpx.post(f"{server}/tokenize", json={"messages": messages, "tools": TOOLS}).json()["tokens"]
    prompt = httpx.post(f"{server}/detokenize", json={"tokens": ids}).json()["prompt"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "celsius": true}}\n</tool_call>' in prompt
    assert "<tool_response>\n22 degrees and sunny\n</tool_response>" in prompt and '"name": "get_time"' in prompt
    r = _create(client, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=8)
    assert r.choices[0].message.tool_calls == [] and r.choices[0].finish_reason in ("stop", "length")


def test_bad_chat_requests_are_400s(client, qwen3_chat):
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/cat.png"}}]}]
    with pytest.raises(openai.BadRequestError, match="text only"):
        _create(client, messages=image)
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        _create(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    with running_server(qwen3_chat, "--dtype", "float32", "--max-model-len", "256") as (base, _):
        plain = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="--enable-auto-tool-choice and --tool-call-parser"):
            plain.chat.completions.create(model=None, messages=ASK, tools=TOOLS, tool_choice="auto")


def test_the_models_sampling_defaults(qwen3_chat):
    llm = LLM(qwen3_chat, dtype="float32", max_model_len=128, kv_cache_memory=1 << 20)
    d = llm.get_default_sampling_params()
    assert (d.temperature, d.top_p, d.top_k) == (0.6, 0.95, 20)
    out = llm.chat(ASK, chat_template=open(TEMPLATE).read(), chat_template_kwargs={"enable_thinking": False},
                   use_tqdm=False)[0]
    assert out.prompt.endswith("<think>\n\n</think>\n\n")  # and it sampled with the defaults above
    llm.shutdown()
    llm = LLM(qwen3_chat, dtype="float32", max_model_len=128, kv_cache_memory=1 << 20, generation_config="vllm",
              override_generation_config={"temperature": 0.5})
    assert (llm.get_default_sampling_params().temperature, llm.get_default_sampling_params().top_k) == (0.5, 0)
    llm.shutdown()


def test_request_fields_win_over_the_defaults():
    from pagedllm.entrypoints.openai.protocol import ChatCompletionRequest

    defaults = {"temperature": 0.6, "top_k": 20, "max_tokens": 100}
    unset = ChatCompletionRequest(messages=ASK).sampling_params(None, None, defaults)
    assert (unset.temperature, unset.top_k, unset.max_tokens) == (0.6, 20, 100)
    given = ChatCompletionRequest(messages=ASK, temperature=0, top_k=-1).sampling_params(7, None, defaults)
    assert (given.temperature, given.top_k, given.max_tokens) == (0, 0, 7)
    assert ChatCompletionRequest(messages=ASK).sampling_params(None, None, {}).max_tokens is None


def test_each_streamed_choice_finishes_once(client):
    chunks = list(_create(client, n=2, stream=True, max_tokens=4, temperature=1.0, seed=1))
    finished = [ch.index for chunk in chunks for ch in chunk.choices if ch.finish_reason]
    assert sorted(finished) == [0, 1]
