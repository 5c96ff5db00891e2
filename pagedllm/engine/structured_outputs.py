"""Structured outputs (vLLM's name; formerly guided decoding): a JSON schema, any JSON object, a regular expression,
a choice of strings or a grammar (Lark, or llama.cpp's GBNF / EBNF) constrains what a request may generate.

The backend is llguidance (vLLM's "guidance" backend): each constraint compiles, lazily and in milliseconds, into a
matcher that keeps one sequence's state and tells which tokens may come next. Before sampling, the allowed tokens
of every constrained row become one bitmask, applied to the logits on tensors. (outlines-core, used before, had to
build a full index up front: about 5 s for any-JSON-object.)
"""

from __future__ import annotations

import functools
import json

import torch

from pagedllm.sampling_params import StructuredOutputsParams

# JSON written as json.dumps writes it: free whitespace lets a weak model pad forever (vLLM's disable_any_whitespace)
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def strict_objects(schema):
    """The schema with `additionalProperties: false` wherever an object lists its properties and says nothing about
    others (vLLM's disable_additional_properties; xgrammar's strict mode): a model asked for {name, age} writes just
    those instead of inventing more until max_tokens."""
    if isinstance(schema, list):
        return [strict_objects(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_objects(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def grammar_spec(s: StructuredOutputsParams) -> tuple[str, str]:
    """(llguidance format, text) for one constraint."""
    if s.choice is not None:
        return "choice", json.dumps(s.choice)
    if s.regex is not None:
        return "regex", s.regex
    if s.grammar is not None:
        return "grammar", s.grammar
    try:
        schema = {"type": "object"} if s.json_object else json.loads(s.json) if isinstance(s.json, str) else s.json
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid structured-output constraint: the JSON schema does not parse: {exc}") from None
    if not isinstance(schema, dict):
        raise ValueError("invalid structured-output constraint: a JSON schema must be an object")
    return "json", json.dumps({"x-guidance": COMPACT_JSON, **strict_objects(schema)})


class StructuredOutputs:
    """One per engine: the tokenizer as llguidance sees it and the compiled grammars (cached)."""

    def __init__(self, tokenizer, vocab_size: int):
        if tokenizer is None or tokenizer.eos_token_id is None:
            raise ValueError("structured outputs need the model's tokenizer and its EOS token")
        import llguidance.hf

        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)

    @functools.lru_cache(maxsize=256)  # noqa: B019 (one instance per engine, alive as long as it)
    def _grammar(self, kind: str, text: str) -> str:
        import llguidance

        try:
            grammar = llguidance.grammar_from(kind, text)
        except ValueError as exc:
            raise ValueError(f"invalid structured-output constraint: {exc}") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)  # "" when the grammar is fine
        if error:
            raise ValueError(f"invalid structured-output constraint: {error}")
        return grammar

    def matcher(self, s: StructuredOutputsParams):
        """A fresh matcher (the state of one sequence); ValueError if the constraint cannot be compiled."""
        import llguidance

        m = llguidance.LLMatcher(self.tokenizer, self._grammar(*grammar_spec(s)))
        if m.is_error():
            raise ValueError(f"invalid structured-output constraint: {m.get_error()}")
        return m


def allowed_mask(matchers: list, vocab_size: int) -> torch.Tensor:
    """[len(matchers), vocab_size] booleans: True where the row's matcher allows the token (EOS only where the
    constraint is complete)."""
    import llguidance.torch

    bits = llguidance.torch.allocate_token_bitmask(len(matchers), vocab_size)
    for row, m in enumerate(matchers):
        llguidance.torch.fill_next_token_bitmask(m, bits, row)
    shifts = torch.arange(32, dtype=torch.int32)
    return ((bits.unsqueeze(-1) >> shifts) & 1).bool().view(len(matchers), -1)[:, :vocab_size]
