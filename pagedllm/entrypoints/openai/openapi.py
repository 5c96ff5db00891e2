"""What /openapi.json says the server answers, truthfully: the error body and its status codes (400, not FastAPI's
422, as OpenAI and vLLM answer), each endpoint's response model, and the event-stream media type of streaming."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from pagedllm.entrypoints.openai import protocol as p
from pagedllm.entrypoints.openai import protocol_chat as pc

_ERROR_CODES = {
    400: "invalid request: a bad field, a prompt too long, malformed JSON",
    401: "missing or wrong API key (with --api-key)",
    404: "unknown model or path",
    500: "the engine failed while running the request (fixed message; the cause is in the server log)",
    503: "the engine is dead (fixed message)",
}


def errors(*codes: int) -> dict:
    return {code: {"model": p.ErrorResponse, "description": _ERROR_CODES[code]} for code in codes}


def _ref(model) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def json_or_stream(model, chunk) -> dict:
    """A JSON body, or with "stream": true server-sent events: each a chunk, or an error body if the engine fails
    mid-stream, then the text [DONE]."""
    body = {"anyOf": [_ref(chunk), _ref(p.ErrorResponse)]}
    data = {"anyOf": [{"type": "string", "contentMediaType": "application/json", "contentSchema": body},
                      {"const": "[DONE]"}]}
    event = {"type": "object", "required": ["data"], "properties": {"data": data, "event": {"type": "string"}}}
    return {200: {"model": model, "description": "the response, or with stream=true server-sent events",
                  "content": {"text/event-stream": {"schema": event}}}}


STREAM_MODELS = (p.CompletionResponse, pc.ChatCompletionChunk, p.ErrorResponse)  # what events refer to
COMPLETIONS = {**json_or_stream(p.CompletionResponse, p.CompletionResponse), **errors(400, 401, 404, 500, 503)}
CHAT = {**json_or_stream(pc.ChatCompletionResponse, pc.ChatCompletionChunk), **errors(400, 401, 404, 500, 503)}
TOKENS = errors(400, 401, 404, 503)
HEALTH = {503: {"model": p.HealthResponse, "description": "the engine is dead"}}
METRICS = {200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}}


def describe(app: FastAPI) -> None:
    """Drop FastAPI's 422 responses (a request that fails validation is a 400 with the error body)."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for operations in schema["paths"].values():
                for op in operations.values():
                    if op.get("responses", {}).pop("422", None) is not None:
                        op["responses"].setdefault("400", {"description": _ERROR_CODES[400], "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}})
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            for model in STREAM_MODELS:  # stream events refer to them by name
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(js.pop("$defs", {}))
                components.setdefault(model.__name__, js)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
