"""The OpenAI-compatible HTTP server: FastAPI app, errors in OpenAI's shape, API key, metrics, lifecycle."""

from __future__ import annotations

import argparse
import contextlib
import logging
import secrets
import signal
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagedllm.engine.async_engine import AsyncLLMEngine, EngineDeadError
from pagedllm.engine.chat_template import ChatOptions, load_chat_template
from pagedllm.engine.factory import create_engine
from pagedllm.engine.protocol import EngineClient
from pagedllm.entrypoints.cli_args import engine_args_from
from pagedllm.entrypoints.openai import openapi
from pagedllm.entrypoints.openai import protocol as p
from pagedllm.entrypoints.openai.metrics import Metrics
from pagedllm.entrypoints.openai.serving import APIError, JSONResponse
from pagedllm.entrypoints.openai.serving_chat import ChatSettings, OpenAIServingChat
from pagedllm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagedllm.model_loader.resolve import EMBEDDED_MODEL_NAME
from pagedllm.outputs import ENGINE_DEAD, REQUEST_FAILED

logger = logging.getLogger("pagedllm")


def _served_names(engine: EngineClient, served_model_name: str | None) -> list[str]:
    if served_model_name:
        return [served_model_name]
    return [engine.config.load.model or EMBEDDED_MODEL_NAME]


def build_app(engine: EngineClient | Callable[[], EngineClient], served_model_name: str | None = None,
              api_key: str | None = None, chat_settings: ChatSettings | None = None,
              metrics_namespace: str = "vllm") -> FastAPI:
    """`engine`, or a function that builds it (on the engine thread, where all its torch work then runs)."""
    async_engine = AsyncLLMEngine(engine)
    engine = async_engine.engine
    names = _served_names(engine, served_model_name)
    metrics = Metrics(engine, names[0], metrics_namespace)
    async_engine.on_finished = metrics.observe_finished  # before the server takes any request
    serving = OpenAIServingCompletion(async_engine, names)
    chat_serving = OpenAIServingChat(async_engine, names, chat_settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        logger.info("shutting down: aborting %d request(s)", len(engine.requests))
        async_engine.shutdown()

    app = FastAPI(title="pagedllm", lifespan=lifespan, default_response_class=JSONResponse)
    app.state.engine = async_engine
    app.state.metrics = metrics

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return JSONResponse(APIError(401, "invalid or missing API key", "authentication_error").body(), 401)
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return JSONResponse(APIError(400, "the request body is not valid JSON").body(), status_code=400)
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return JSONResponse(APIError(400, message, param=where or None).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        kind = "NotFoundError" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(exc.status_code, str(exc.detail), kind).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception):  # a bug: the detail goes to the log, never to the client
        logger.error("unhandled error in a request", exc_info=exc)
        return JSONResponse(APIError(500, REQUEST_FAILED, "server_error").body(), status_code=500)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, exc: EngineDeadError):
        return JSONResponse(APIError(503, str(exc), "server_error").body(), status_code=503)

    @app.get("/health", response_model=p.HealthResponse, responses=openapi.HEALTH)
    async def health():
        if not async_engine.is_alive:
            return JSONResponse({"status": "unhealthy", "error": ENGINE_DEAD}, status_code=503)
        return engine.health()

    @app.get("/v1/models", response_model=p.ModelList, responses=openapi.errors(401))
    async def models():
        created = int(time.time())
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "pagedllm",
             "max_model_len": engine.config.max_model_len} for name in serving.names]}

    @app.post("/v1/completions", response_model=None, responses=openapi.COMPLETIONS)
    async def completions(req: p.CompletionRequest, raw: Request):
        return await serving.completions(req, raw)

    @app.post("/v1/chat/completions", response_model=None, responses=openapi.CHAT)
    async def chat(req: p.ChatCompletionRequest, raw: Request):
        return await chat_serving.chat(req, raw)

    @app.post("/tokenize", response_model=p.TokenizeResponse, responses=openapi.TOKENS)
    async def tokenize(req: p.TokenizeRequest):
        serving.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt or messages")
        if engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer")
        if req.messages is not None:
            messages = [m.model_dump(exclude_none=True) for m in req.messages]
            settings = chat_serving.settings
            options = ChatOptions(req.add_generation_prompt, chat_template=settings.chat_template,
                                  chat_template_kwargs={**settings.default_chat_template_kwargs,
                                                        **(req.chat_template_kwargs or {})},
                                  tools=[t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None)
            try:
                prompt = await async_engine.call(lambda e: e.processor.chat_prompt(messages, options))
            except ValueError as exc:
                raise APIError(400, str(exc), param="messages") from None
            ids = prompt["prompt_token_ids"]
        else:
            ids = await async_engine.call(lambda e: e.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens))
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.config.max_model_len}

    @app.post("/detokenize", response_model=p.DetokenizeResponse, responses=openapi.TOKENS)
    async def detokenize(req: p.DetokenizeRequest):
        serving.check_model(req.model)
        if engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer")
        if any(not 0 <= t < engine.config.model.vocab_size for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {engine.config.model.vocab_size})", param="tokens")
        return {"prompt": await async_engine.call(lambda e: e.tokenizer.decode(req.tokens))}

    @app.get("/metrics", response_class=Response, responses=openapi.METRICS)
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    openapi.describe(app)
    return app


class GracefulServer(uvicorn.Server):
    """Stops gracefully on SIGINT / SIGTERM, then exits normally (plain uvicorn re-raises the signal
    afterwards, which ends in a KeyboardInterrupt traceback)."""

    @contextlib.contextmanager
    def capture_signals(self):
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def cmd_serve(ns: argparse.Namespace) -> None:
    if ns.model_tag and ns.model and ns.model_tag != ns.model:
        raise ValueError("give the model once: either MODEL or --model")
    ns.model = ns.model_tag or ns.model
    args = engine_args_from(ns)
    settings = ChatSettings(load_chat_template(ns.chat_template), ns.default_chat_template_kwargs or {},
                            ns.reasoning_parser, ns.enable_auto_tool_choice, ns.tool_call_parser)
    app = build_app(lambda: create_engine(args), ns.served_model_name, ns.api_key, settings, ns.metrics_namespace)
    logger.info("serving %s on http://%s:%d/v1", app.state.engine.engine.config.model.name, ns.host, ns.port)
    config = uvicorn.Config(app, host=ns.host, port=ns.port, log_level=ns.log_level, timeout_graceful_shutdown=5)
    GracefulServer(config).run()
