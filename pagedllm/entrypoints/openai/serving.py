"""What /v1/completions and /v1/chat/completions share on top of the async engine: model names, sampling fields,
adding requests (bad input is a 400 before any output), gathering and streaming outputs, errors."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import fastapi.responses
from fastapi import Request
from fastapi.responses import StreamingResponse

from pagedllm.engine.async_engine import AsyncLLMEngine, RequestStream
from pagedllm.engine.protocol import EngineClient
from pagedllm.entrypoints.openai import protocol as p
from pagedllm.entrypoints.openai.streams import collect, merge, sse, unless_disconnected
from pagedllm.outputs import ENGINE_DEAD, CompletionOutput, RequestOutput
from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger("pagedllm")


class JSONResponse(fastapi.responses.JSONResponse):
    """JSON with non-ASCII characters escaped: a request's text may hold lone surrogates, which an error message can
    quote and UTF-8 cannot encode (starlette's JSONResponse would fail with a 500)."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


def error_body(exc: Exception) -> dict:
    """The error event of a stream: a request's own mistake (ValueError) is a 400; the engine's failures carry the
    fixed messages of outputs.py (503 when it died)."""
    if not isinstance(exc, RuntimeError):
        return APIError(400, str(exc)).body()
    return APIError(503 if str(exc) == ENGINE_DEAD else 500, str(exc), "server_error").body()


def finish_reason(c: CompletionOutput) -> str | None:
    return {"abort": "abort", "error": "error"}.get(c.finish_reason, c.finish_reason)


def usage(finals: list[RequestOutput]) -> p.UsageInfo:
    prompt = sum(len(o.prompt_token_ids) for o in finals)
    completion = sum(len(c.token_ids) for o in finals for c in o.outputs)
    return p.UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def top_logprobs(entry: dict, k: int) -> list:
    """The k most likely tokens of one position, most likely first (the sampled one may lie outside them)."""
    return sorted(((t, e) for t, e in entry.items() if e.rank is not None and e.rank <= k), key=lambda te: te[1].rank)


def raise_if_failed(out: RequestOutput) -> None:
    if out.error:
        raise RuntimeError(out.error)


async def choice_updates(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput, CompletionOutput]]:
    """(stream index, its output, one of its choices) for each choice the output advanced or ended; a failed request
    raises. With n > 1 every output carries all the choices, so one that has ended is not given again."""
    ended: set[tuple[int, int]] = set()
    async for i, out in merge(streams):
        raise_if_failed(out)
        for c in out.outputs:
            if (i, c.index) not in ended:
                if c.finish_reason is not None:
                    ended.add((i, c.index))
                yield i, out, c


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

    def params(self, req: p.SamplingFields, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        if req.model_extra:  # accepted, as OpenAI and vLLM do, but said
            logger.warning("The following fields were present in the request but ignored: %s", sorted(req.model_extra))
        try:
            return req.sampling_params(max_tokens, logprobs, self.sync.processor.sampling_defaults)
        except ValueError as exc:
            raise APIError(400, str(exc)) from None

    def _check_max_tokens(self, prompt_len: int, params: SamplingParams) -> None:
        """A max_tokens that cannot fit after the prompt is a 400, as in vLLM (offline, it just ends at the limit)."""
        limit = self.sync.config.max_model_len
        if params.max_tokens is not None and prompt_len + params.max_tokens > limit:
            raise APIError(400, f"'max_tokens' or 'max_completion_tokens' is too large: {params.max_tokens}. This model's "
                                f"maximum context length is {limit} tokens and your request has {prompt_len} input "
                                f"tokens ({params.max_tokens} > {limit} - {prompt_len})", param="max_tokens")

    def decode_token(self, token: int) -> str:
        return self.sync.tokenizer.decode([token]) if self.sync.tokenizer is not None else str(token)

    async def add(self, prompts: list[tuple], params: SamplingParams) -> list[RequestStream]:
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

    async def gather(self, raw: Request, streams) -> list[RequestOutput]:
        finals = await unless_disconnected(raw, collect(streams))
        if finals is None:
            raise APIError(499, "client disconnected", "client_closed_request")
        for out in finals:
            if out.error:
                raise APIError(503 if out.error == ENGINE_DEAD else 500, out.error, "server_error")
        return finals

    @staticmethod
    def stream(chunks) -> StreamingResponse:
        return StreamingResponse(sse(chunks, error_body), media_type="text/event-stream")
