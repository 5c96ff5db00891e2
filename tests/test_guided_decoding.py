"""Structured outputs (guided decoding) on the embedded model: the text always fits the constraint."""

from __future__ import annotations

import json
import re

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.sampling_params import GuidedDecodingParams
from tests.helpers import assert_pool_empty


@pytest.fixture(scope="module")
def llm():
    return LLM(max_model_len=512)


def _chat(llm, question: str, guided: GuidedDecodingParams, **params):
    params = {"temperature": 0, "max_tokens": 60, **params}
    out = llm.chat([{"role": "user", "content": question}], SamplingParams(guided_decoding=guided, **params),
                   use_tqdm=False)[0]
    return out.outputs


def test_choice_regex_and_json_schema_are_obeyed(llm):
    (c,) = _chat(llm, "What is the capital of France?", GuidedDecodingParams(choice=["Paris", "London", "Berlin"]))
    assert c.text in ("Paris", "London", "Berlin") and c.finish_reason == "stop"
    (c,) = _chat(llm, "Give me a US phone number.", GuidedDecodingParams(regex=r"\d{3}-\d{3}-\d{4}"))
    assert re.fullmatch(r"\d{3}-\d{3}-\d{4}", c.text) and c.finish_reason == "stop"
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    (c,) = _chat(llm, "Describe a person as JSON.", GuidedDecodingParams(json=schema), max_tokens=100)
    person = json.loads(c.text)
    assert isinstance(person["name"], str) and isinstance(person["age"], int)
    free = _chat(llm, "Describe a person as JSON.", None, max_tokens=100)[0].text
    assert free != c.text  # the constraint changed what the model wrote
    assert_pool_empty(llm)


def test_every_sample_of_n_gets_its_own_state(llm):
    colours = ["red", "green", "blue"]
    outs = _chat(llm, "Pick a colour.", GuidedDecodingParams(choice=colours), n=4, temperature=1.0, seed=3)
    assert len(outs) == 4 and all(c.text in colours for c in outs)
    assert_pool_empty(llm)


def test_min_tokens_beyond_a_complete_constraint_ends_it_cleanly(llm):
    (c,) = _chat(llm, "Answer yes.", GuidedDecodingParams(choice=["yes"]), min_tokens=4)
    assert c.text == "yes" and c.finish_reason == "stop"
    assert_pool_empty(llm)


def test_bad_constraints_are_value_errors(llm):
    for bad in ({}, {"regex": "a", "choice": ["b"]}, {"choice": [""]}):
        with pytest.raises(ValueError, match="guided"):
            GuidedDecodingParams(**bad)
    with pytest.raises(ValueError, match="guided-decoding index"):
        _chat(llm, "hi", GuidedDecodingParams(regex="(unclosed"))
    assert_pool_empty(llm)


def test_token_bytes_for_sentencepiece_and_byte_level_vocabularies():
    """The bytes each token writes, for the two tokenizer families: SentencePiece ("\u2581" for a space, <0xNN>
    byte tokens) and byte-level BPE (the embedded model's)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from pagedllm.engine.guided_decoding import _token_bytes
    from pagedllm.model_loader.resolve import resolve_model

    vocab = {"<s>": 0, "</s>": 1, "\u2581the": 2, "cat": 3, "<0x0A>": 4, "<0xC3>": 5}
    sp = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    sp.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok = PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>")
    assert _token_bytes(tok) == {b" the": [2], b"cat": [3], b"\n": [4], b"\xc3": [5]}
    embedded = AutoTokenizer.from_pretrained(resolve_model(None))
    table = _token_bytes(embedded)
    assert table[b" the"] == [embedded.convert_tokens_to_ids("\u0120the")]  # byte-level: "Ġ" is the space byte
