"""Structured outputs on the embedded model: the text always fits the constraint."""

from __future__ import annotations

import json
import re

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.sampling_params import GuidedDecodingParams, StructuredOutputsParams
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
        with pytest.raises(ValueError, match="structured"):
            StructuredOutputsParams(**bad)
    with pytest.raises(ValueError, match="invalid structured-output constraint"):
        _chat(llm, "hi", StructuredOutputsParams(regex="(unclosed"))
    with pytest.raises(ValueError, match="invalid structured-output constraint"):
        _chat(llm, "hi", StructuredOutputsParams(grammar="start: unknown_rule"))
    assert_pool_empty(llm)


def test_a_grammar_constrains_the_output(llm):
    """A Lark grammar and llama.cpp's GBNF spelling of the same language."""
    lark = 'start: greeting " " name\ngreeting: "hello" | "goodbye"\nname: /[A-Z][a-z]{2,8}/'
    gbnf = 'root ::= greeting " " name\ngreeting ::= "hello" | "goodbye"\nname ::= [A-Z] [a-z] [a-z] [a-z]?'
    for grammar, pattern in ((lark, r"(hello|goodbye) [A-Z][a-z]{2,8}"), (gbnf, r"(hello|goodbye) [A-Z][a-z]{2,3}")):
        (c,) = _chat(llm, "Greet someone.", StructuredOutputsParams(grammar=grammar))
        assert re.fullmatch(pattern, c.text) and c.finish_reason == "stop", c.text
    assert_pool_empty(llm)


def test_the_old_name_still_works(llm):
    params = SamplingParams(temperature=0, max_tokens=5, guided_decoding=GuidedDecodingParams(choice=["yes", "no"]))
    assert params.structured_outputs == StructuredOutputsParams(choice=["yes", "no"])
    assert llm.generate("Is Paris in France?", params, use_tqdm=False)[0].outputs[0].text in ("yes", "no")


def test_the_mask_allows_exactly_the_tokens_whose_text_fits(llm):
    """Byte-level BPE writes a space as "Ġ": the mask is built from the text each token writes."""
    from pagedllm.engine.structured_outputs import StructuredOutputs, allowed_mask

    tok = llm.get_tokenizer()
    m = StructuredOutputs(tok, 49152).matcher(StructuredOutputsParams(regex=" the cat"))
    allowed = set(allowed_mask([m], 49152)[0].nonzero().flatten().tolist())
    texts = {i: tok.decode([i]) for i in allowed}
    assert tok.convert_tokens_to_ids("\u0120the") in allowed and tok.convert_tokens_to_ids("the") not in allowed
    assert all(" the cat".startswith(t) and t for t in texts.values()), texts
    assert m.consume_token(tok.convert_tokens_to_ids("\u0120the"))
    assert tok.convert_tokens_to_ids("\u0120cat") in allowed_mask([m], 49152)[0].nonzero().flatten().tolist()


def test_a_named_tool_choice_gives_arguments_that_fit_the_schema(llm):
    """What the server does for tool_choice={"type": "function", "function": {"name": ...}}, on real text."""
    from pagedllm.entrypoints.openai.tool_parsers import named_tool_constraint

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"},
                                         "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}}]
    params = SamplingParams(temperature=0, max_tokens=60,
                            structured_outputs=named_tool_constraint(tools, "get_weather"))
    out = llm.chat([{"role": "user", "content": "What is the weather like in Paris today?"}], params, tools=tools,
                   use_tqdm=False)[0].outputs[0]
    args = json.loads(out.text)
    assert set(args) == {"city", "unit"} and isinstance(args["city"], str) and args["city"]
    assert args["unit"] in ("celsius", "fahrenheit") and out.finish_reason == "stop"
