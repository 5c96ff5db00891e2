"""/v1/completions and /v1/chat/completions on top of the async engine."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from pagedllm.engine.async_engine import AsyncLLMEngine, RequestStream
from pagedllm.engine.protocol import EngineClient
from pagedllm.entrypoints.openai import protocol as p
from pagedllm.entrypoints.openai.streams import collect, merge, sse, unless_disconnected
from pagedllm.outputs import CompletionOutput, RequestOutput
from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger("pagedllm")


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


def error_body(exc: Exception) -> dict:
    return APIError(500 if isinstance(exc, RuntimeError) else 400, str(exc),
                    "server_error" if isinstance(exc, RuntimeError) else "invalid_request_error").body()


def _finish(c: CompletionOutput) -> str | None:
    return {"abort": "abort", "error": "error"}.get(c.finish_reason, c.finish_reason)


def _usage(finals: list[RequestOutput]) -> p.UsageInfo:
    prompt = sum(len(o.prompt_token_ids) for o in finals)
    completion = sum(len(c.token_ids) for o in finals for c in o.outputs)
    return p.UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _top(entry: dict, k: int) -> list:
    """The k most likely tokens of one position, most likely first (the sampled one may lie outside them)."""
    return sorted(((t, e) for t, e in entry.items() if e.rank is not None and e.rank <= k), key=lambda te: te[1].rank)


def _raise_if_failed(out: RequestOutput) -> None:
    if out.error:
        raise RuntimeError(out.error)


class OpenAIServing:
    def __init__(self, engine: AsyncLLMEngine, served_model_names: list[str]):
        self.engine = engine
        self.names = served_model_names
        self.sync: EngineClient = engine.engine  # read-only facts (tokenizer, limits)

    def check_model(self, name: str | None) -> str:
        if name is not None and name not in self.names:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.names[0]!r}",
                           "NotFoundError", "model")
        return self.names[0]

    @staticmethod
    def params(req: p.SamplingFields, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        if req.model_extra:  # accepted, as OpenAI and vLLM do, but said
            logger.warning("The following fields were present in the request but ignored: %s", sorted(req.model_extra))
        try:
            return req.sampling_params(max_tokens, logprobs)
        except ValueError as exc:
            raise APIError(400, str(exc)) from None

    def _check_max_tokens(self, prompt_len: int, params: SamplingParams) -> None:
        """A max_tokens that cannot fit after the prompt is a 400, as in vLLM (offline, it just ends at the limit)."""
        limit = self.sync.config.max_model_len
        if params.max_tokens is not None and prompt_len + params.max_tokens > limit:
            raise APIError(400, f"'max_tokens' or 'max_completion_tokens' is too large: {params.max_tokens}. This model's "
                                f"maximum context length is {limit} tokens and your request has {prompt_len} input "
                                f"tokens ({params.max_tokens} > {limit} - {prompt_len})", param="max_tokens")

    def _decode(self, token: int) -> str:
        return self.sync.tokenizer.decode([token]) if self.sync.tokenizer is not None else str(token)

    # ---- completions --------------------------------------------------------------------------
    async def completions(self, req: p.CompletionRequest, raw: Request):
        model = self.check_model(req.model)
        params = self.params(req, req.max_tokens, req.logprobs)
        prompts = req.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise APIError(400, "prompt must not be empty", param="prompt")
        inputs = [x if isinstance(x, str) else {"prompt_token_ids": x} for x in prompts]
        rid = p.random_id("cmpl")
        streams = await self._add([(x, f"{rid}-{i}") for i, x in enumerate(inputs)], params)
        if req.stream:
            return self._stream(self._completion_chunks(req, model, rid, params, streams), params)
        finals = await self._gather(raw, streams)
        choices = []
        for i, out in enumerate(finals):
            prefix = self._echo_text(out) if req.echo else ""
            for c in out.outputs:
                lps = self._completion_logprobs(c, req.logprobs, 0, len(prefix)) if req.logprobs is not None else None
                choices.append(p.CompletionChoice(index=i * params.n + c.index, text=prefix + c.text,
                                                  finish_reason=_finish(c), stop_reason=c.stop_reason, logprobs=lps))
        return JSONResponse(p.CompletionResponse(id=rid, model=model, choices=choices, usage=_usage(finals)).model_dump())

    def _echo_text(self, out: RequestOutput) -> str:
        if out.prompt is not None:
            return out.prompt
        return self.sync.tokenizer.decode(out.prompt_token_ids) if self.sync.tokenizer else ""

    def _completion_logprobs(self, c: CompletionOutput, k: int, start: int, offset: int) -> p.CompletionLogprobs:
        lp = p.CompletionLogprobs()
        for token, entry in zip(c.token_ids[start:], (c.logprobs or [])[start:]):
            text = self._decode(token)
            lp.tokens.append(text)
            lp.token_logprobs.append(entry[token].logprob)
            lp.top_logprobs.append({self._decode(t): e.logprob for t, e in _top(entry, k)})
            lp.text_offset.append(offset)
            offset += len(text)
        return lp

    async def _completion_chunks(self, req, model, rid, params, streams) -> AsyncIterator[p.CompletionResponse]:
        sent: dict[int, tuple[int, int]] = {}  # choice index -> (chars sent, tokens sent)
        finals: dict[int, RequestOutput] = {}
        async for i, out in merge(streams):
            _raise_if_failed(out)
            for c in out.outputs:
                idx = i * params.n + c.index
                chars, toks = sent.get(idx, (0, 0))
                prefix = self._echo_text(out) if req.echo and idx not in sent else ""
                delta = prefix + c.text[chars:]
                if not delta and c.finish_reason is None:
                    continue
                lps = self._completion_logprobs(c, req.logprobs, toks, chars) if req.logprobs is not None else None
                sent[idx] = (len(c.text), len(c.token_ids))
                yield p.CompletionResponse(id=rid, model=model, usage=None, choices=[p.CompletionChoice(
                    index=idx, text=delta, logprobs=lps, finish_reason=_finish(c), stop_reason=c.stop_reason)])
            if out.finished:
                finals[i] = out
        if req.stream_options and req.stream_options.include_usage:
            yield p.CompletionResponse(id=rid, model=model, choices=[], usage=_usage(list(finals.values())))

    # ---- chat ---------------------------------------------------------------------------------
    async def chat(self, req: p.ChatCompletionRequest, raw: Request):
        model = self.check_model(req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self.params(req, req.max_completion_tokens or req.max_tokens, logprobs)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            ids = await self.engine.call(lambda e: e.processor.apply_chat_template(messages, req.add_generation_prompt))
        except Exception as exc:  # a template that rejects the conversation is the caller's mistake
            raise APIError(400, f"cannot apply the chat template: {exc}", param="messages") from None
        rid = p.random_id("chatcmpl")
        streams = await self._add([({"prompt_token_ids": ids}, rid)], params)
        if req.stream:
            return self._stream(self._chat_chunks(req, model, rid, streams), params)
        finals = await self._gather(raw, streams)
        out = finals[0]
        choices = [p.ChatChoice(index=c.index, message=p.ChatResponseMessage(content=c.text), finish_reason=_finish(c),
                                stop_reason=c.stop_reason, logprobs=self._chat_logprobs(c, logprobs, 0) if req.logprobs else None)
                   for c in out.outputs]
        return JSONResponse(p.ChatCompletionResponse(id=rid, model=model, choices=choices, usage=_usage(finals)).model_dump())

    def _chat_logprobs(self, c: CompletionOutput, k: int, start: int) -> p.ChatLogprobs:
        def item(token: int, logprob: float) -> dict:
            text = self._decode(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return p.ChatLogprobs(content=[
            p.ChatTokenLogprob(**item(token, entry[token].logprob),
                               top_logprobs=[p.TopLogprob(**item(t, e.logprob)) for t, e in _top(entry, k)])
            for token, entry in zip(c.token_ids[start:], (c.logprobs or [])[start:])])

    async def _chat_chunks(self, req, model, rid, streams) -> AsyncIterator[p.ChatCompletionChunk]:
        sent: dict[int, tuple[int, int]] = {}
        final = None
        async for _, out in merge(streams):
            _raise_if_failed(out)
            for c in out.outputs:
                if c.index not in sent:
                    sent[c.index] = (0, 0)
                    yield p.ChatCompletionChunk(id=rid, model=model, choices=[p.ChatStreamChoice(
                        index=c.index, delta=p.DeltaMessage(role="assistant", content=""))])
                chars, toks = sent[c.index]
                delta = c.text[chars:]
                if not delta and c.finish_reason is None:
                    continue
                sent[c.index] = (len(c.text), len(c.token_ids))
                yield p.ChatCompletionChunk(id=rid, model=model, choices=[p.ChatStreamChoice(
                    index=c.index, delta=p.DeltaMessage(content=delta), finish_reason=_finish(c),
                    logprobs=self._chat_logprobs(c, req.top_logprobs or 0, toks) if req.logprobs else None)])
            final = out
        if req.stream_options and req.stream_options.include_usage and final is not None:
            yield p.ChatCompletionChunk(id=rid, model=model, choices=[], usage=_usage([final]))

    # ---- shared -------------------------------------------------------------------------------
    async def _add(self, prompts: list[tuple], params: SamplingParams) -> list[RequestStream]:
        """Add every prompt's request before answering, so bad input is a 400, not an error mid-stream."""
        streams: list[RequestStream] = []
        try:
            for prompt, rid in prompts:
                streams.append(await self.engine.add_request(prompt, params, rid,
                                                             check=lambda ids: self._check_max_tokens(len(ids), params)))
        except BaseException as exc:
            for s in streams:
                s.close()
            if isinstance(exc, ValueError):
                raise APIError(400, str(exc), param="prompt") from None
            raise
        return streams

    async def _gather(self, raw: Request, streams) -> list[RequestOutput]:
        finals = await unless_disconnected(raw, collect(streams))
        if finals is None:
            raise APIError(499, "client disconnected", "client_closed_request")
        for out in finals:
            if out.error:
                raise APIError(500, out.error, "server_error")
        return finals

    @staticmethod
    def _stream(chunks, params: SamplingParams) -> StreamingResponse:
        return StreamingResponse(sse(chunks, error_body), media_type="text/event-stream")
