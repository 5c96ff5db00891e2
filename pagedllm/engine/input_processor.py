"""Everything about a request that can be checked before it reaches a model: the tokenizer, the chat
template and the limits. Shared by the engine and the data-parallel front (which holds no model)."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

from pagedllm.config import EngineConfig
from pagedllm.engine.guided_decoding import GuidedDecoding
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


class InputProcessor:
    def __init__(self, config: EngineConfig, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size, self.max_model_len = config.model.vocab_size, config.max_model_len
        self._ids = itertools.count()
        eos = set(config.model.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        self._guided: GuidedDecoding | None = None  # built on the first constrained request

    def guide(self, params: SamplingParams):
        """A fresh guided-decoding state for one sequence of a constrained request (None for others); a constraint
        that cannot be compiled is a ValueError. Indexes are cached, so checking one here and building the state
        later compiles it once."""
        if params.guided_decoding is None:
            return None
        if self._guided is None:
            self._guided = GuidedDecoding(self.tokenizer)
        return self._guided.guide(params.guided_decoding)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template")
        if not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

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
        return prompt, self.tokenizer.encode(prompt)

    def claim_request_id(self, request_id: str | None, in_use) -> str:
        """The caller's id if it is free, or a fresh one."""
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in in_use:
            raise ValueError(f"request id {request_id!r} is already in use")
        return request_id

    def process(self, prompt: PromptType | ProcessedPrompt, params: SamplingParams | None = None) -> ProcessedPrompt:
        """Tokenize and check one request; ValueError says what is wrong with it. A ProcessedPrompt passes as it is."""
        if isinstance(prompt, ProcessedPrompt):
            return prompt
        params = params or SamplingParams()
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
        self.guide(params)  # compiles (and caches) the constraint, so a bad one fails here
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens but max_model_len is {self.max_model_len}: "
                             "it must leave room for at least one generated token")
        return ProcessedPrompt(text, ids, params)
