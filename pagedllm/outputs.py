"""What a finished (or streaming) request hands back, shaped like vLLM's outputs."""

from __future__ import annotations

from dataclasses import dataclass

# What clients are told when something fails inside the engine; the detail (paths, library messages, tracebacks)
# goes to the server log only. A request whose engine (or data-parallel replica) died gets ENGINE_DEAD (HTTP 503).
ENGINE_DEAD = "The engine serving this request died (EngineDeadError); the server log has the cause."
REQUEST_FAILED = "The engine failed while running this request; the server log has the cause."


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per generated token: token id -> Logprob (the sampled token plus the top-k).
SampleLogprobs = list[dict[int, Logprob]]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0
    error: str | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # None for the first prompt token
