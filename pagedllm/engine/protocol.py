"""What the offline LLM, the async engine and the server rely on: one protocol that the single engine and the
data-parallel front both implement."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pagedllm.config import EngineConfig
from pagedllm.engine.input_processor import InputProcessor, ProcessedPrompt, PromptType
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams


@dataclass
class EngineStats:
    """A snapshot for metrics and the offline API (counters are totals since start)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    spec_decode_num_drafts: int = 0
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0


class EngineClient(Protocol):
    config: EngineConfig
    processor: InputProcessor  # tokenizer, chat template and the checks, shared by every front end

    @property
    def tokenizer(self): ...

    @property
    def num_prompt_tokens(self) -> int: ...

    @property
    def num_generation_tokens(self) -> int: ...

    def add_request(self, prompt: PromptType | ProcessedPrompt, params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None) -> str:
        """Queue a request (ValueError if it is invalid); its outputs come from step()."""

    def abort_request(self, request_id: str) -> None: ...

    def step(self) -> list[RequestOutput]:
        """Advance the work; outputs of the requests that got tokens or finished."""

    def has_unfinished_requests(self) -> bool: ...

    def stats(self) -> list[tuple[dict[str, str], EngineStats]]:
        """One (labels, stats) pair per engine replica; a single engine has no extra labels."""

    def reset_prefix_cache(self) -> None: ...

    def check_health(self) -> None:
        """Raise if the engine can no longer serve."""

    def health(self) -> dict: ...

    def shutdown(self) -> None:
        """Abort what is left and release processes, process groups and the KV pool. Idempotent."""
