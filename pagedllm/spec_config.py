"""Speculative decoding settings (vLLM's --speculative-config), read by the engine args, the engine and the bench."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

SPEC_METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Prompt lookup ("ngram"): a decoding sequence whose last n tokens (prompt_lookup_max down to
    prompt_lookup_min) occurred earlier in it proposes the tokens that followed them, up to num_speculative_tokens.
    "draft_model": a smaller model with the same vocabulary (`model`) proposes them, one forward each. The target
    model verifies them all in the sequence's next step."""

    method: str = "ngram"
    model: str | None = None  # the draft model (method draft_model): a checkpoint folder or .gguf file
    num_speculative_tokens: int = 3
    prompt_lookup_max: int = 5
    prompt_lookup_min: int = 2
    # no proposals in a step that runs more than this many sequences: a batched step is bound by compute on the
    # CPU, where every rejected token is paid in full (benchmarks/spec_batch.py measures the crossover); None: never
    disable_by_batch_size: int | None = 4

    @classmethod
    def parse(cls, value: dict | str | None) -> SpeculativeConfig | None:
        """From a dict or its JSON (the CLI's form); None stays None. Raises ValueError on what it cannot run."""
        if value is None or value == "":
            return None
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError("speculative_config must be a JSON object")
        method = value.get("method", "draft_model" if "model" in value else "ngram")
        if method not in SPEC_METHODS:
            raise ValueError(f"speculative_config: method {method!r} is not supported; use {', '.join(SPEC_METHODS)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        config = cls(**{**value, "method": method})
        if (method == "draft_model") != isinstance(config.model, str):
            raise ValueError("speculative_config: method draft_model takes a draft `model` (a local checkpoint), "
                             "ngram takes none")
        ints = {f.name: getattr(config, f.name) for f in fields(cls)
                if f.name not in ("method", "model") and getattr(config, f.name) is not None}
        if any(not isinstance(v, int) or v < 1 for v in ints.values()):
            raise ValueError(f"speculative_config: {', '.join(ints)} must be positive integers")
        if config.prompt_lookup_min > config.prompt_lookup_max:
            raise ValueError("speculative_config: prompt_lookup_min must not exceed prompt_lookup_max")
        return config
