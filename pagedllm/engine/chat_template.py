"""Chat messages into a prompt through the model's chat template, with what vLLM passes along: tools, template
kwargs (Qwen3's enable_thinking), a replacement template, continuing the final message.

Messages reach the template whole: an assistant's tool_calls (their JSON-string arguments parsed into objects,
as templates such as Llama 3's expect), a tool message's tool_call_id and name, reasoning_content. Content may be
a string or OpenAI's content parts; only text parts can be taken, anything else is an error that says so.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ChatOptions:
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # the reply continues the last (assistant) message instead of starting anew
    chat_template: str | None = None  # a template's text; None: the tokenizer's own
    chat_template_kwargs: dict = field(default_factory=dict)  # extra template variables, e.g. {"enable_thinking": False}
    tools: list[dict] | None = None  # OpenAI's [{"type": "function", "function": {...}}]

    def __post_init__(self) -> None:
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")


def load_chat_template(value: str | None) -> str | None:
    """--chat-template: a file's path, or the template itself (vLLM takes both)."""
    if value is None or not os.path.isfile(value):
        return value
    with open(value) as f:
        return f.read()


def _text(content, index: int) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"messages[{index}].content must be a string or a list of content parts")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise ValueError(f"messages[{index}] has a content part of type {kind!r}: this model takes text only")
        texts.append(part.get("text", ""))
    return "".join(texts)


def _tool_call(call: dict) -> dict:
    call = dict(call)
    fn = dict(call.get("function") or {})
    if isinstance(fn.get("arguments"), str):
        try:
            fn["arguments"] = json.loads(fn["arguments"])
        except json.JSONDecodeError:
            pass  # templates that print arguments as a string still can
    call["function"] = fn
    return call


def normalize_messages(messages: list[dict]) -> list[dict]:
    """Every field a message carries, its content as text, assistant tool-call arguments as objects."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"messages[{i}] must be a dict with a 'role'")
        m = {k: v for k, v in m.items() if v is not None}
        m["content"] = _text(m.get("content"), i) or ""
        if m.get("tool_calls"):
            m["tool_calls"] = [_tool_call(c) for c in m["tool_calls"]]
        out.append(m)
    return out


def render_chat(tokenizer, messages: list[dict], options: ChatOptions) -> str:
    """The prompt text the template makes of the conversation."""
    if tokenizer is None or not (options.chat_template or getattr(tokenizer, "chat_template", None)):
        raise ValueError("this model has no chat template; pass one with --chat-template")
    try:
        return tokenizer.apply_chat_template(
            normalize_messages(messages), tools=options.tools, chat_template=options.chat_template, tokenize=False,
            add_generation_prompt=options.add_generation_prompt,
            continue_final_message=options.continue_final_message, **options.chat_template_kwargs)
    except ValueError:
        raise
    except Exception as exc:  # a template that rejects the conversation (raise_exception, missing fields)
        raise ValueError(f"cannot apply the chat template: {exc}") from None
