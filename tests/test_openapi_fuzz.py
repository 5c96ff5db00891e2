"""Fuzzing the server from its own /openapi.json with schemathesis: generated valid and invalid requests to every
endpoint, and every answer checked against what the schema documents (no 5xx, documented status codes, content
types and bodies)."""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)


@pytest.fixture(scope="module")
def api_schema(tiny_models):
    from pagedllm.engine.arg_utils import EngineArgs
    from pagedllm.engine.llm_engine import LLMEngine
    from pagedllm.entrypoints.openai.api_server import build_app

    # few sequences and a short context keep every generated request quick (n > 8 is a 400)
    engine = LLMEngine.from_engine_args(EngineArgs(model=tiny_models["qwen3"], dtype="float32", max_model_len=64,
                                                   max_num_seqs=8, kv_cache_memory=4 << 20))
    app = build_app(engine, served_model_name="tiny")
    yield schemathesis.openapi.from_asgi("/openapi.json", _without_lifespan(app))
    engine.shutdown()


def _without_lifespan(app):
    """The app for requests only: schemathesis runs the ASGI lifespan around its calls, and the app's shutdown
    stops the engine (once, at the end, in a real server)."""
    async def asgi(scope, receive, send):
        if scope["type"] != "lifespan":
            return await app(scope, receive, send)
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})

    return asgi


EXAMPLES = int(os.environ.get("PAGEDLLM_FUZZ_EXAMPLES", "15"))  # per operation and mode; raise it for a long run
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_answer_is_documented(api_schema, mode):
    """Every operation, with schema-valid bodies (positive) and schema-breaking ones (negative)."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"}
    for op in operations:
        if mode is GenerationMode.NEGATIVE and op.method.upper() == "GET":
            continue  # nothing to break in a request without parameters
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  derandomize=True)  # the same requests on every run: CI never meets a case nobody saw here
        def call(case):
            case.call_and_validate(checks=CHECKS)

        call()


def test_the_schema_documents_400_not_422(api_schema):
    raw = api_schema.raw_schema
    for path, operations in raw["paths"].items():
        for method, op in operations.items():
            assert "422" not in op["responses"], (method, path)
    chat = raw["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "401", "404", "500", "503"} <= set(chat) and "text/event-stream" in chat["200"]["content"]
    assert "ErrorResponse" in raw["components"]["schemas"]
