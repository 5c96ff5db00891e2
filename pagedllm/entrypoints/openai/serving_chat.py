"""/v1/chat/completions: the chat template with tools and template kwargs, reasoning output, tool calls, logprobs,
streaming.

Each choice's text goes through the same stages, streamed or not: the reasoning parser splits off the thinking;
the answer becomes content and tool calls (parsed for tool_choice "auto"; for "required" or a named function the
output was constrained to be the call, so it is read directly).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request

from pagedllm.engine.async_engine import AsyncLLMEngine
from pagedllm.engine.chat_template import ChatOptions
from pagedllm.entrypoints.openai import protocol as p
from pagedllm.entrypoints.openai import protocol_chat as pc
from pagedllm.entrypoints.openai.reasoning_parsers import REASONING_PARSERS, ReasoningStream
from pagedllm.entrypoints.openai.serving import (
    APIError,
    JSONResponse,
    OpenAIServing,
    choice_updates,
    finish_reason,
    top_logprobs,
    usage,
)
from pagedllm.entrypoints.openai.tool_parsers import (
    TOOL_PARSERS,
    ToolCall,
    ToolStream,
    calls_from_required,
    named_tool_constraint,
    required_tools_constraint,
)
from pagedllm.outputs import CompletionOutput


@dataclass(frozen=True)
class ChatSettings:
    """The server's chat flags, with vLLM's names."""

    chat_template: str | None = None  # --chat-template (its text)
    default_chat_template_kwargs: dict = field(default_factory=dict)  # --default-chat-template-kwargs
    reasoning_parser: str | None = None  # --reasoning-parser
    enable_auto_tool_choice: bool = False  # --enable-auto-tool-choice
    tool_call_parser: str | None = None  # --tool-call-parser


class _Choice:
    """One choice's text, turned into reasoning, content and tool calls as it grows."""

    def __init__(self, serving: OpenAIServingChat, prompt: str, tool_choice: str):
        settings = serving.settings
        parser = REASONING_PARSERS[settings.reasoning_parser](prompt) if settings.reasoning_parser else None
        self.reasoning = ReasoningStream(parser) if parser else None
        self.tool_choice = tool_choice
        self.tools = ToolStream(TOOL_PARSERS[settings.tool_call_parser]()) if tool_choice == "auto" else None
        self.answer = ""  # the answer (text after the reasoning) so far
        self.sent_content = 0
        self.calls: list[ToolCall] = []
        self.named: ToolCall | None = None  # a named function's call, streamed as its arguments grow

    def update(self, text: str, final: bool) -> tuple[str, str, list[pc.DeltaToolCall]]:
        """(reasoning delta, content delta, tool-call deltas) for the output so far."""
        reasoning = ""
        if self.reasoning is not None:
            reasoning, answer_delta = self.reasoning.update(text, final)
            self.answer += answer_delta
        else:
            self.answer = text
        if self.tool_choice == "none":
            delta, self.sent_content = self.answer[self.sent_content:], len(self.answer)
            return reasoning, delta, []
        if self.tools is not None:
            content, new = self.tools.update(self.answer, final)
            return reasoning, content, self._deltas(new)
        if self.tool_choice.startswith("function:"):  # the answer is the arguments: stream them as they come
            first = self.named is None
            if first:
                self.named = ToolCall.of(self.tool_choice.removeprefix("function:"), "")
            sent = len(self.named.arguments)
            self.named = ToolCall(self.named.name, self.answer, self.named.id)
            delta = pc.DeltaToolCall(index=0, function=pc.DeltaFunctionCall(arguments=self.answer[sent:]))
            if first:
                delta.id, delta.type, delta.function.name = self.named.id, "function", self.named.name
            self.calls = [self.named]
            return reasoning, "", [delta] if first or delta.function.arguments else []
        return reasoning, "", self._deltas(calls_from_required(self.answer)) if final else []  # required

    def _deltas(self, new: list[ToolCall]) -> list[pc.DeltaToolCall]:
        start = len(self.calls)
        self.calls += new
        return [pc.DeltaToolCall(index=start + i, id=c.id, type="function",
                                function=pc.DeltaFunctionCall(name=c.name, arguments=c.arguments))
                for i, c in enumerate(new)]


class OpenAIServingChat(OpenAIServing):
    def __init__(self, engine: AsyncLLMEngine, served_model_names: list[str], settings: ChatSettings | None = None):
        super().__init__(engine, served_model_names)
        self.settings = settings or ChatSettings()

    def _tool_choice(self, req: p.ChatCompletionRequest) -> str:
        choice = req.resolved_tool_choice()
        if choice != "none" and not req.tools:
            raise APIError(400, f"tool_choice {choice!r} needs tools", param="tool_choice")
        if choice == "auto" and not (self.settings.enable_auto_tool_choice and self.settings.tool_call_parser):
            raise APIError(400, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
                           param="tool_choice")
        return choice

    def _params(self, req: p.ChatCompletionRequest, tool_choice: str, logprobs: int | None):
        params = self.params(req, req.max_completion_tokens or req.max_tokens, logprobs)
        if tool_choice in ("none", "auto"):
            return params
        if params.structured_outputs is not None:
            raise APIError(400, "a structured-output constraint cannot be combined with a required or named tool choice")
        try:
            params.structured_outputs = (named_tool_constraint(req.tool_dicts(), tool_choice.removeprefix("function:"))
                                         if tool_choice.startswith("function:")
                                         else required_tools_constraint(req.tool_dicts(), req.parallel_tool_calls))
        except ValueError as exc:
            raise APIError(400, str(exc), param="tool_choice") from None
        return params

    async def chat(self, req: p.ChatCompletionRequest, raw: Request):
        model = self.check_model(req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        tool_choice = self._tool_choice(req)
        params = self._params(req, tool_choice, logprobs)
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        try:
            options = ChatOptions(req.add_generation_prompt and not req.continue_final_message,
                                  req.continue_final_message, req.chat_template or self.settings.chat_template,
                                  {**self.settings.default_chat_template_kwargs, **(req.chat_template_kwargs or {})},
                                  req.tool_dicts())
            prompt = await self.engine.call(lambda e: e.processor.chat_prompt(messages, options))
        except ValueError as exc:  # a template that rejects the conversation is the caller's mistake
            raise APIError(400, str(exc), param="messages") from None
        rid = p.random_id("chatcmpl")
        streams = await self.add([(prompt, rid)], params)
        if req.stream:
            return self.stream(self._chunks(req, model, rid, streams, prompt["prompt"], tool_choice))
        out = (await self.gather(raw, streams))[0]
        choices = [self._choice(req, c, prompt["prompt"], tool_choice, logprobs) for c in out.outputs]
        response = pc.ChatCompletionResponse(id=rid, model=model, choices=choices, usage=usage([out]),
                                             prompt_logprobs=p.prompt_logprobs_out(out.prompt_logprobs))
        return JSONResponse(response.model_dump())

    def _choice(self, req, c: CompletionOutput, prompt: str, tool_choice: str, logprobs: int | None) -> pc.ChatChoice:
        state = _Choice(self, prompt, tool_choice)
        reasoning, content, _ = state.update(c.text, final=True)
        message = pc.ChatResponseMessage(
            content=content or (None if state.calls or reasoning else ""), reasoning_content=reasoning or None,
            reasoning=reasoning or None,
            tool_calls=[pc.ToolCallOut(id=t.id, function=pc.FunctionCall(name=t.name, arguments=t.arguments))
                        for t in state.calls])
        return pc.ChatChoice(index=c.index, message=message, finish_reason=self._finish(c, state),
                            stop_reason=c.stop_reason, logprobs=self._logprobs(c, logprobs, 0) if req.logprobs else None)

    @staticmethod
    def _finish(c: CompletionOutput, state: _Choice) -> str | None:
        reason = finish_reason(c)
        return "tool_calls" if state.calls and reason == "stop" else reason

    def _logprobs(self, c: CompletionOutput, k: int, start: int) -> pc.ChatLogprobs:
        def item(token: int, logprob: float) -> dict:
            text = self.decode_token(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return pc.ChatLogprobs(content=[
            pc.ChatTokenLogprob(**item(token, entry[token].logprob),
                               top_logprobs=[pc.TopLogprob(**item(t, e.logprob)) for t, e in top_logprobs(entry, k)])
            for token, entry in zip(c.token_ids[start:], (c.logprobs or [])[start:])])

    async def _chunks(self, req, model, rid, streams, prompt: str, tool_choice: str) -> AsyncIterator[pc.ChatCompletionChunk]:
        states: dict[int, _Choice] = {}
        sent_tokens: dict[int, int] = {}
        final = None
        async for _, out, c in choice_updates(streams):
            final = out
            if c.index not in states:
                states[c.index], sent_tokens[c.index] = _Choice(self, prompt, tool_choice), 0
                yield self._chunk(rid, model, c.index, pc.DeltaMessage(role="assistant", content=""))
            state, done = states[c.index], c.finish_reason is not None
            reasoning, content, calls = state.update(c.text, final=done)
            lps = self._logprobs(c, req.top_logprobs or 0, sent_tokens[c.index]) if req.logprobs else None
            sent_tokens[c.index] = len(c.token_ids)
            if not (reasoning or content or calls or done or (lps and lps.content)):
                continue
            delta = pc.DeltaMessage(content=content or None, reasoning_content=reasoning or None,
                                   reasoning=reasoning or None, tool_calls=calls or None)
            yield self._chunk(rid, model, c.index, delta, self._finish(c, state) if done else None, lps)
        if req.stream_options and req.stream_options.include_usage and final is not None:
            yield pc.ChatCompletionChunk(id=rid, model=model, choices=[], usage=usage([final]))

    @staticmethod
    def _chunk(rid: str, model: str, index: int, delta: pc.DeltaMessage, finish: str | None = None,
               logprobs: pc.ChatLogprobs | None = None) -> pc.ChatCompletionChunk:
        return pc.ChatCompletionChunk(id=rid, model=model, choices=[pc.ChatStreamChoice(
            index=index, delta=delta, finish_reason=finish, logprobs=logprobs)])
