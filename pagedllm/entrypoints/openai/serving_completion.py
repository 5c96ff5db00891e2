"""/v1/completions: prompts (text or token ids), echo, logprobs, streaming."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request

from pagedllm.entrypoints.openai import protocol as p
from pagedllm.entrypoints.openai.serving import (
    APIError,
    JSONResponse,
    OpenAIServing,
    choice_updates,
    finish_reason,
    top_logprobs,
    usage,
)
from pagedllm.outputs import CompletionOutput, RequestOutput


class OpenAIServingCompletion(OpenAIServing):
    async def completions(self, req: p.CompletionRequest, raw: Request):
        model = self.check_model(req.model)
        params = self.params(req, req.max_tokens, req.logprobs)
        if req.echo and req.logprobs is not None:  # the echoed prompt comes with its tokens' logprobs
            params.prompt_logprobs = max(params.prompt_logprobs or 0, req.logprobs)
        prompts = req.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise APIError(400, "prompt must not be empty", param="prompt")
        inputs = [x if isinstance(x, str) else {"prompt_token_ids": x} for x in prompts]
        rid = p.random_id("cmpl")
        streams = await self.add([(x, f"{rid}-{i}") for i, x in enumerate(inputs)], params)
        if req.stream:
            return self.stream(self._completion_chunks(req, model, rid, params, streams))
        finals = await self.gather(raw, streams)
        choices = []
        for i, out in enumerate(finals):
            prefix = self._echo_text(out) if req.echo else ""
            for c in out.outputs:
                lps = self._completion_logprobs(out, c, req, 0, 0) if req.logprobs is not None else None
                choices.append(p.CompletionChoice(
                    index=i * params.n + c.index, text=prefix + c.text, finish_reason=finish_reason(c),
                    stop_reason=c.stop_reason, logprobs=lps, prompt_logprobs=self._prompt_logprobs(req, out)))
        return JSONResponse(p.CompletionResponse(id=rid, model=model, choices=choices, usage=usage(finals)).model_dump())

    def _echo_text(self, out: RequestOutput) -> str:
        if out.prompt is not None:
            return out.prompt
        return self.sync.tokenizer.decode(out.prompt_token_ids) if self.sync.tokenizer else ""

    @staticmethod
    def _prompt_logprobs(req: p.CompletionRequest, out: RequestOutput) -> p.PromptLogprobsOut | None:
        return p.prompt_logprobs_out(out.prompt_logprobs) if req.prompt_logprobs is not None else None

    def _completion_logprobs(self, out: RequestOutput, c: CompletionOutput, req: p.CompletionRequest, start: int,
                             offset: int) -> p.CompletionLogprobs:
        """OpenAI's logprobs of the output tokens from `start`; with echo, from the first chunk on, the prompt's
        tokens first (the first has none)."""
        lp, k = p.CompletionLogprobs(), req.logprobs
        tokens = list(zip(c.token_ids[start:], (c.logprobs or [])[start:]))
        if req.echo and start == 0:
            tokens = list(zip(out.prompt_token_ids, out.prompt_logprobs or [None] * len(out.prompt_token_ids))) + tokens
        for token, entry in tokens:
            text = self.decode_token(token)
            lp.tokens.append(text)
            lp.token_logprobs.append(entry[token].logprob if entry else None)
            lp.top_logprobs.append({self.decode_token(t): e.logprob for t, e in top_logprobs(entry, k)} if entry else None)
            lp.text_offset.append(offset)
            offset += len(text)
        return lp

    async def _completion_chunks(self, req, model, rid, params, streams) -> AsyncIterator[p.CompletionResponse]:
        sent: dict[int, tuple[int, int]] = {}  # choice index -> (chars sent, tokens sent)
        finals: dict[int, RequestOutput] = {}
        async for i, out, c in choice_updates(streams):
            if out.finished:
                finals[i] = out
            idx = i * params.n + c.index
            chars, toks = sent.get(idx, (0, 0))
            prefix = self._echo_text(out) if req.echo and idx not in sent else ""
            delta = prefix + c.text[chars:]
            if not delta and c.finish_reason is None:
                continue
            first = idx not in sent
            lps = self._completion_logprobs(out, c, req, toks, chars + len(prefix)) if req.logprobs is not None else None
            sent[idx] = (len(c.text), len(c.token_ids))
            yield p.CompletionResponse(id=rid, model=model, usage=None, choices=[p.CompletionChoice(
                index=idx, text=delta, logprobs=lps, finish_reason=finish_reason(c), stop_reason=c.stop_reason,
                prompt_logprobs=self._prompt_logprobs(req, out) if first else None)])
        if req.stream_options and req.stream_options.include_usage:
            yield p.CompletionResponse(id=rid, model=model, choices=[], usage=usage(list(finals.values())))
