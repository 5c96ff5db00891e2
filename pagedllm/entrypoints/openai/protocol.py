"""OpenAI request and response schemas (with vLLM's extra sampling fields), as pydantic models."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pagedllm.sampling_params import SamplingParams, StructuredOutputsParams


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are ignored, as OpenAI does; wrong types are 400s


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None  # OpenAI's {"name": ..., "schema": {...}}


class SamplingFields(OpenAIModel):
    """Fields shared by completions and chat, mapped onto SamplingParams."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[str, float] | None = None  # OpenAI's: token id (as a string) -> bias in [-100, 100]
    allowed_token_ids: list[int] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None  # vLLM's: {"json" | "regex" | "choice" | "grammar" | ...: ...}
    guided_json: dict[str, Any] | str | None = None  # its older spellings
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    prompt_logprobs: int | None = None  # vLLM's: top-k logprobs of every prompt token after the first
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, defaults: dict) -> SamplingParams:
        """The request's fields; those it leaves unset take `defaults` (the model's generation config), then vLLM's."""
        given = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
                 "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                 "repetition_penalty": self.repetition_penalty, "max_tokens": max_tokens}
        chosen = {"max_tokens": None, **defaults, **{k: v for k, v in given.items() if v is not None}}
        return SamplingParams(
            n=self.n, seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens, logprobs=logprobs, prompt_logprobs=self.prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens, include_stop_str_in_output=self.include_stop_str_in_output,
            logit_bias=self._logit_bias(), allowed_token_ids=self.allowed_token_ids,
            structured_outputs=self._structured_outputs(), **chosen,
        )

    def _structured_outputs(self) -> StructuredOutputsParams | None:
        """vLLM's structured_outputs, its older guided_* fields or OpenAI's response_format: one constraint."""
        given = [(k, v) for k, v in (("json", self.guided_json), ("regex", self.guided_regex),
                                     ("choice", self.guided_choice), ("grammar", self.guided_grammar)) if v is not None]
        if self.structured_outputs is not None:
            given += list(self.structured_outputs.items())
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            given.append(("json_object", True))
        elif fmt is not None and fmt.type == "json_schema":
            if not fmt.json_schema or "schema" not in fmt.json_schema:
                raise ValueError("response_format json_schema needs {'json_schema': {'schema': {...}}}")
            given.append(("json", fmt.json_schema["schema"]))
        if len(given) > 1:
            raise ValueError(f"give one structured-output constraint, not {len(given)}")
        try:
            return StructuredOutputsParams(**dict(given)) if given else None
        except TypeError:
            raise ValueError(f"unknown structured_outputs field in {sorted(self.structured_outputs)}; use one of "
                             "json, regex, choice, grammar, json_object") from None

    def _logit_bias(self) -> dict[int, float] | None:
        """Token ids from their string keys, biases clamped to [-100, 100] (as OpenAI and vLLM)."""
        if self.logit_bias is None:
            return None
        try:
            return {int(t): min(100.0, max(-100.0, b)) for t, b in self.logit_bias.items()}
        except ValueError:
            raise ValueError("logit_bias keys must be token ids") from None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False  # with logprobs, the prompt tokens' logprobs come first (the first is null), as vLLM's


class ChatMessage(OpenAIModel):
    """A message as OpenAI defines it; every field (tool_calls, tool_call_id, name, ...) reaches the template."""

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(OpenAIModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ChatTool(OpenAIModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedToolChoice(OpenAIModel):
    type: Literal["function"] = "function"
    function: dict[str, str]  # {"name": ...}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # e.g. Qwen3's {"enable_thinking": false}
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # default: auto with tools
    parallel_tool_calls: bool = True

    def tool_dicts(self) -> list[dict] | None:
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None

    def resolved_tool_choice(self) -> str:
        """none, auto, required, or the named function's name (prefixed "function:")."""
        choice = self.tool_choice or ("auto" if self.tools else "none")
        if isinstance(choice, NamedToolChoice):
            return "function:" + choice.function.get("name", "")
        return choice


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


PromptLogprobsOut = list[dict[str, dict[str, Any]] | None]  # vLLM's: token id -> {logprob, rank, decoded_token}


def prompt_logprobs_out(entries: list | None) -> PromptLogprobsOut | None:
    if entries is None:
        return None
    return [None if e is None else {str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
                                    for t, lp in e.items()} for e in entries]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobsOut | None = None


class ResponseBase(BaseModel):
    """What every response and stream chunk opens with (its `object` names its kind)."""

    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str


class CompletionResponse(ResponseBase):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TokenizeRequest(OpenAIModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ChatTool] | None = None


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int]


# ---- responses of the other endpoints, and the error body (what /openapi.json documents) -------------------------
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pagedllm"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class HealthResponse(BaseModel):
    status: Literal["ok", "degraded", "unhealthy"]
    error: str | None = None
    replicas: list[dict[str, Any]] | None = None  # data parallelism: each replica's state
