"""Reasoning and tool-call parsers on model-like outputs, whole and streamed token by token (tags split across
tokens, blocks that never close), and the messages that reach a chat template."""

from __future__ import annotations

import json

import pytest

from pagedllm.engine.chat_template import ChatOptions, normalize_messages
from pagedllm.entrypoints.openai.reasoning_parsers import (
    DeepSeekR1ReasoningParser,
    Qwen3ReasoningParser,
    ReasoningStream,
)
from pagedllm.entrypoints.openai.tool_parsers import (
    HermesToolParser,
    Llama3JsonToolParser,
    ToolStream,
    calls_from_required,
    named_tool_constraint,
    required_tools_constraint,
)

QWEN3_THINKING = "<think>\nThe user wants the capital.\nIt is Paris.\n</think>\n\nThe capital of France is Paris."


def _pieces(text: str, size: int) -> list[str]:
    """The text as a model might produce it: cumulative outputs growing by a few characters (tags cut anywhere)."""
    return [text[:i] for i in range(size, len(text), size)] + [text]


def _streamed(stream, text: str, size: int):
    outs = [stream.update(t, final=t == text) for t in _pieces(text, size)]
    return outs


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7])
def test_qwen3_reasoning_whole_and_streamed_agree(size):
    split = Qwen3ReasoningParser().split(QWEN3_THINKING)
    assert split.reasoning == "The user wants the capital.\nIt is Paris.\n"
    assert split.content == "The capital of France is Paris."
    deltas = _streamed(ReasoningStream(Qwen3ReasoningParser()), QWEN3_THINKING, size)
    assert "".join(r for r, _ in deltas) == split.reasoning and "".join(c for _, c in deltas) == split.content
    assert not any("<" in r or "<" in c for r, c in deltas)  # no piece of a tag leaks out


def test_qwen3_without_thinking_is_all_content():
    assert Qwen3ReasoningParser().split("Paris.").content == "Paris."
    assert Qwen3ReasoningParser().split("Paris.").reasoning is None
    # enable_thinking=False pre-fills an empty block in the prompt: the output is the answer
    assert Qwen3ReasoningParser("<|im_start|>assistant\n<think>\n\n</think>\n\n").split("Paris.").content == "Paris."


def test_a_thinking_block_that_never_closes_is_all_reasoning():
    split = Qwen3ReasoningParser().split("<think>\nStill thinking about it")
    assert split.reasoning == "Still thinking about it" and split.content is None
    split = DeepSeekR1ReasoningParser().split("Hmm, let me see")  # its template opened the block
    assert split.reasoning == "Hmm, let me see" and split.content is None


def test_a_template_that_prefills_the_start_tag():
    parser = Qwen3ReasoningParser("<|im_start|>assistant\n<think>\n")
    split = parser.split("Let me think.\n</think>\n\nParis.")
    assert split.reasoning == "Let me think.\n" and split.content == "Paris."
    deltas = _streamed(ReasoningStream(DeepSeekR1ReasoningParser()), "Let me think.\n</think>\n\nParis.", 2)
    assert "".join(c for _, c in deltas) == "Paris."


HERMES = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')


@pytest.mark.parametrize("size", [1, 3, 8])
def test_hermes_calls_whole_and_streamed(size):
    content, calls = HermesToolParser().extract(HERMES)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                   ("get_time", {"zone": "CET"})]
    deltas = _streamed(ToolStream(HermesToolParser()), HERMES, size)
    assert "".join(c for c, _ in deltas).rstrip() == "Let me check."
    assert not any("<" in c for c, _ in deltas)
    streamed = [call for _, new in deltas for call in new]
    assert [(c.name, c.arguments) for c in streamed] == [(c.name, c.arguments) for c in calls]
    assert len({c.id for c in streamed}) == 2


def test_hermes_edge_cases():
    assert HermesToolParser().extract("Just an answer.") == ("Just an answer.", [])
    unclosed = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}'  # the model stopped before the closing tag
    assert [(c.name, c.arguments) for c in HermesToolParser().extract(unclosed)[1]] == [("f", '{"x": 1}')]
    broken = "<tool_call>\nnot json\n</tool_call>"
    assert HermesToolParser().extract(broken) == (broken, [])  # not a call after all: the text stands


def test_llama3_json_calls():
    text = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "f", "parameters": {}}'
    content, calls = Llama3JsonToolParser().extract(text)
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("f", {})]
    assert Llama3JsonToolParser().extract("Paris is the capital.") == ("Paris is the capital.", [])
    deltas = _streamed(ToolStream(Llama3JsonToolParser()), text, 4)
    assert "".join(c for c, _ in deltas) == "" and len([x for _, new in deltas for x in new]) == 2


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "time now"}}]


def test_tool_choice_constraints():
    assert named_tool_constraint(TOOLS, "get_weather").json == TOOLS[0]["function"]["parameters"]
    with pytest.raises(ValueError, match="not in tools"):
        named_tool_constraint(TOOLS, "nope")
    schema = required_tools_constraint(TOOLS, parallel=False).json
    assert schema["minItems"] == schema["maxItems"] == 1 and len(schema["items"]["anyOf"]) == 2
    calls = calls_from_required('[{"name": "get_time", "parameters": {}}]')
    assert [(c.name, c.arguments) for c in calls] == [("get_time", "{}")]


def test_messages_reach_the_template_whole():
    messages = normalize_messages([
        {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "22 C"},
    ])
    assert messages[0]["content"] == "Weather in Paris?"
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert messages[2] == {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "22 C"}
    with pytest.raises(ValueError, match="image_url.*text only"):
        normalize_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(ValueError, match="cannot both be true"):
        ChatOptions(add_generation_prompt=True, continue_final_message=True)
