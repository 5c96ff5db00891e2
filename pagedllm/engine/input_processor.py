"""Everything about a request that can be checked before it reaches a model: the tokenizer, the chat
template and the limits. Shared by the engine and the data-parallel front (which holds no model)."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

from pagedllm.config import EngineConfig
from pagedllm.engine.chat_template import ChatOptions, render_chat
from pagedllm.engine.structured_outputs import StructuredOutputs
from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger("pagedllm")

PromptType = str | list[int] | dict


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        logger.warning("no tokenizer in %s: only token-id prompts are accepted and outputs carry no text", path)
        return None


@dataclass(frozen=True)
class ProcessedPrompt:
    """A request the InputProcessor has tokenized and checked; engines take it as it is (validated once)."""

    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams


def _valid_text(text: str) -> str:
    """Text a tokenizer can take: JSON can carry lone UTF-16 surrogates, which are not Unicode text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text holds characters that are not valid Unicode (lone surrogates)") from None
    return text


class InputProcessor:
    def __init__(self, config: EngineConfig, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size, self.max_model_len = config.model.vocab_size, config.max_model_len
        self.sampling_defaults = dict(config.model.sampling_defaults)
        self.max_logprobs = config.model.max_logprobs
        self.max_num_seqs = config.scheduler.max_num_seqs
        self.pipeline = config.parallel.pipeline_parallel_size > 1
        self._ids = itertools.count()
        eos = set(config.model.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        self._structured: StructuredOutputs | None = None  # built on the first constrained request

    def guide(self, params: SamplingParams):
        """A fresh structured-output matcher for one sequence of a constrained request (None for others); a constraint
        that cannot be compiled is a ValueError. Grammars are cached, so checking one here and building the state
        later compiles it once."""
        if params.structured_outputs is None:
            return None
        if self._structured is None:
            self._structured = StructuredOutputs(self.tokenizer, self.vocab_size)
        return self._structured.matcher(params.structured_outputs)

    def chat_prompt(self, messages: list[dict], options: ChatOptions | None = None) -> dict:
        """A conversation as a prompt (its text and token ids) through the chat template."""
        text = _valid_text(render_chat(self.tokenizer, messages, options or ChatOptions()))
        return {"prompt": text, "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)}

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt.get("prompt")
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        if not isinstance(prompt, str):
            raise ValueError("a prompt must be a string, a list of token ids or {'prompt_token_ids': [...]}, "
                             f"got {type(prompt).__name__}")
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass {'prompt_token_ids': [...]}")
        return prompt, self.tokenizer.encode(_valid_text(prompt))

    def claim_request_id(self, request_id: str | None, in_use) -> str:
        """The caller's id if it is free, or a fresh one."""
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in in_use:
            raise ValueError(f"request id {request_id!r} is already in use")
        return request_id

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams for a request that sets nothing: vLLM's defaults under the model's generation config."""
        return SamplingParams(**self.sampling_defaults)

    def process(self, prompt: PromptType | ProcessedPrompt, params: SamplingParams | None = None) -> ProcessedPrompt:
        """Tokenize and check one request; ValueError says what is wrong with it. A ProcessedPrompt passes as it is."""
        if isinstance(prompt, ProcessedPrompt):
            return prompt
        params = params or self.default_sampling_params()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        text, ids = self._tokenize(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        if any(not 0 <= t < self.vocab_size for t in params.token_ids_in_use()):
            raise ValueError(f"stop_token_ids, logit_bias and allowed_token_ids must name token ids in "
                             f"[0, {self.vocab_size})")
        if params.n > self.max_num_seqs:  # its samples could never run together (and a huge n would exhaust memory)
            raise ValueError(f"n ({params.n}) exceeds max_num_seqs ({self.max_num_seqs})")
        for name in ("logprobs", "prompt_logprobs"):
            if (getattr(params, name) or 0) > self.max_logprobs:
                raise ValueError(f"{name} {getattr(params, name)} exceeds the server's limit of {self.max_logprobs} "
                                 "(--max-logprobs)")
        if params.prompt_logprobs is not None and self.pipeline:
            raise ValueError("prompt_logprobs are not supported with pipeline parallelism yet")
        self.guide(params)  # compiles (and caches) the constraint, so a bad one fails here
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens but max_model_len is {self.max_model_len}: "
                             "it must leave room for at least one generated token")
        return ProcessedPrompt(text, ids, params)
