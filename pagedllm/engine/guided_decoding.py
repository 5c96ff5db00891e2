"""Structured outputs (vLLM's guided decoding): a JSON schema, any JSON object, a regular expression or a choice
of strings constrains what a request may generate.

Each constraint becomes a regular expression and, with outlines-core (the engine behind vLLM's "outlines"
backend), an index of which tokens may follow each state of it. A guided sequence keeps its own Guide (its state);
before sampling, the allowed tokens of every guided row become one bitmask, applied to the logits on tensors.
Indexes are built once per constraint and engine (a generic JSON object takes seconds; a choice, milliseconds).
"""

from __future__ import annotations

import functools
import json
import re

import torch

from pagedllm.sampling_params import GuidedDecodingParams


def _token_bytes(tokenizer) -> dict[bytes, list[int]]:
    """Each ordinary token's bytes as it appears in text (byte-level BPE maps bytes to printable characters;
    SentencePiece writes spaces as U+2581 and unprintable bytes as <0xNN>)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    byte_level = type(tokenizer.backend_tokenizer.decoder).__name__ == "ByteLevel"
    special = set(tokenizer.all_special_ids)
    added = tokenizer.get_added_vocab()  # written as their text, not in the byte alphabet
    out: dict[bytes, list[int]] = {}
    for token, i in tokenizer.get_vocab().items():
        if i in special:
            continue
        if token in added:
            data = token.encode()
        elif byte_level:
            data = bytes(byte_of[c] for c in token)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            data = bytes([int(token[3:5], 16)])
        else:
            data = token.replace("\u2581", " ").encode()
        out.setdefault(data, []).append(i)
    return out


def regex_for(g: GuidedDecodingParams) -> str:
    from outlines_core.json_schema import build_regex_from_schema

    if g.choice is not None:
        return "(" + "|".join(re.escape(c) for c in g.choice) + ")"
    if g.regex is not None:
        return g.regex
    schema = {"type": "object"} if g.json_object else g.json
    return build_regex_from_schema(schema if isinstance(schema, str) else json.dumps(schema))


class GuidedDecoding:
    def __init__(self, tokenizer):
        if tokenizer is None or tokenizer.eos_token_id is None:
            raise ValueError("guided decoding needs the model's tokenizer and its EOS token")
        from outlines_core import Vocabulary

        self.vocabulary = Vocabulary(tokenizer.eos_token_id, _token_bytes(tokenizer))

    @functools.lru_cache(maxsize=64)  # noqa: B019 (one instance per engine, alive as long as it)
    def _index(self, regex: str):
        from outlines_core import Index

        try:
            return Index(regex, self.vocabulary)
        except Exception as exc:  # an invalid or unsatisfiable pattern is the caller's mistake
            raise ValueError(f"cannot build the guided-decoding index: {exc}") from None

    def guide(self, g: GuidedDecodingParams):
        """A fresh state machine for one sequence."""
        from outlines_core import Guide

        return Guide(self._index(regex_for(g)))


def allowed_mask(guides: list, vocab_size: int) -> torch.Tensor:
    """[len(guides), vocab_size] booleans: True where the row's guide allows the token (EOS only where the
    constraint is complete)."""
    words = -(-vocab_size // 32)  # int32 words of one row's bitmask
    bits = torch.zeros(len(guides), words, dtype=torch.int32)
    for row, guide in enumerate(guides):
        guide.write_mask_into(bits[row].data_ptr(), words, 4)
    shifts = torch.arange(32, dtype=torch.int32)
    return ((bits.unsqueeze(-1) >> shifts) & 1).bool().view(len(guides), -1)[:, :vocab_size]
