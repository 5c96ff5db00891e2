"""Tool calls: parsers for what models write when they call a tool (vLLM's --tool-call-parser), and the structured-
output constraints that make tool_choice "required" or a named function always produce a valid call.

A parser splits the answer into content and complete calls. Like the reasoning parsers it works on the text so
far: while streaming, content is sent up to a possible start of a call, and each call once it is complete.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from pagedllm.entrypoints.openai.reasoning_parsers import partial_suffix
from pagedllm.sampling_params import StructuredOutputsParams


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI's format)
    id: str = ""

    @classmethod
    def of(cls, name: str, arguments) -> ToolCall:
        text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        return cls(name, text, f"chatcmpl-tool-{uuid.uuid4().hex}")


def _call_from_json(obj) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return ToolCall.of(obj["name"], args if isinstance(args, (dict, str)) else {})


class ToolParser:
    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """The final answer: content (None when the answer is only calls) and the calls."""
        raise NotImplementedError

    def partial(self, text: str) -> tuple[str, list[ToolCall]]:
        """While streaming: how much of `text` is surely content, and the calls complete so far."""
        raise NotImplementedError


class HermesToolParser(ToolParser):
    """Hermes / Qwen: calls in `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks after any content."""

    start, end = "<tool_call>", "</tool_call>"
    block = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)$", re.S)

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if self.start not in text:
            return text, []
        calls = []
        for closed, unclosed in self.block.findall(text):
            try:
                call = _call_from_json(json.loads(closed or unclosed))
            except json.JSONDecodeError:
                call = None
            if call is None:
                return text, []  # not a call after all: the model's text stands
            calls.append(call)
        content = text[:text.index(self.start)].rstrip()
        return content or None, calls

    def partial(self, text: str) -> tuple[str, list[ToolCall]]:
        if self.start not in text:
            return text[:len(text) - partial_suffix(text, self.start)], []
        closed = text[:text.rindex(self.end) + len(self.end)] if self.end in text else ""
        return text[:text.index(self.start)].rstrip(), self.extract(closed)[1] if closed else []


class Llama3JsonToolParser(ToolParser):
    """Llama 3.x: the answer is one or more `{"name": ..., "parameters": {...}}` objects (after an optional
    <|python_tag|>, separated by ";"), or plain content."""

    tag = "<|python_tag|>"

    def _calls(self, text: str) -> list[ToolCall] | None:
        body, decoder, calls, i = text.strip().removeprefix(self.tag).strip(), json.JSONDecoder(), [], 0
        while i < len(body):
            try:
                obj, i = decoder.raw_decode(body, i)
            except json.JSONDecodeError:
                return None
            call = _call_from_json(obj)
            if call is None:
                return None
            calls.append(call)
            while i < len(body) and body[i] in " \n\t;":
                i += 1
        return calls or None

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        calls = self._calls(text)
        return (None, calls) if calls else (text, [])

    def partial(self, text: str) -> tuple[str, list[ToolCall]]:
        head = text.lstrip()
        if head.startswith(("{", self.tag)) or self.tag.startswith(head):
            return "", []  # a call is being written (or may be): decided at the end
        return text, []


TOOL_PARSERS = {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser}


class ToolStream:
    """Content deltas and newly complete calls as the answer grows."""

    def __init__(self, parser: ToolParser):
        self.parser = parser
        self.sent_content = self.sent_calls = 0

    def update(self, text: str, final: bool) -> tuple[str, list[ToolCall]]:
        content, calls = self.parser.extract(text) if final else self.parser.partial(text)
        content = content or ""
        delta, new = content[self.sent_content:], calls[self.sent_calls:]
        self.sent_content, self.sent_calls = max(self.sent_content, len(content)), max(self.sent_calls, len(calls))
        return delta, new


# ---- tool_choice "required" and a named function: constrained so the output is always a valid call ------------
def _parameters(tool: dict) -> dict:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def named_tool_constraint(tools: list[dict], name: str) -> StructuredOutputsParams:
    """The output is the named function's arguments object."""
    for tool in tools:
        if tool["function"]["name"] == name:
            return StructuredOutputsParams(json=_parameters(tool))
    raise ValueError(f"tool_choice names the function {name!r}, which is not in tools")


def required_tools_constraint(tools: list[dict], parallel: bool = True) -> StructuredOutputsParams:
    """The output is a JSON list of one or more {"name": ..., "parameters": {...}} calls of the given tools."""
    items = {"anyOf": [{"type": "object", "required": ["name", "parameters"],
                        "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                       "parameters": _parameters(t)}} for t in tools]}
    return StructuredOutputsParams(json={"type": "array", "minItems": 1, **({} if parallel else {"maxItems": 1}),
                                         "items": items})


def calls_from_required(text: str) -> list[ToolCall]:
    try:
        calls = [_call_from_json(obj) for obj in json.loads(text)]
    except (json.JSONDecodeError, TypeError):
        return []
    return [c for c in calls if c is not None]
