"""Sampler behaviour on hand-built logits, and seeded / n>1 / stop behaviour through the engine."""

from __future__ import annotations

import math

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.engine.sampling_metadata import build_sampling_metadata
from pagedllm.engine.sequence import Request
from pagedllm.layers.sampler import Sampler
from pagedllm.step import SamplingMetadata
from tests.helpers import assert_pool_empty, random_prompts

V = 8


def _meta(params: list[SamplingParams], outputs: list[list[int]] | None = None, prompt=(0,)) -> SamplingMetadata:
    seqs = []
    for i, p in enumerate(params):
        req = Request(str(i), None, list(prompt), p, 64)
        seq = req.seqs[0]
        seq.token_ids += (outputs[i] if outputs else [])
        seqs.append(seq)
    return build_sampling_metadata(seqs, V, (7,), torch.device("cpu"))


def _draws(logits: torch.Tensor, p: SamplingParams, n: int = 400) -> set[int]:
    sampler = Sampler(seed=0)
    m = _meta([p] * n)
    return set(sampler(logits.expand(n, -1).clone(), m).token_ids.tolist())


LOGITS = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0]])


def test_greedy_is_argmax_and_top_k_1_equals_greedy():
    assert _draws(LOGITS, SamplingParams(temperature=0)) == {0}
    assert _draws(LOGITS, SamplingParams(temperature=1.0, top_k=1)) == {0}


def test_top_k_limits_candidates():
    assert _draws(LOGITS, SamplingParams(temperature=5.0, top_k=3)) == {0, 1, 2}


def test_top_p_keeps_smallest_nucleus():
    probs = LOGITS.softmax(-1)[0]
    # mass of token 0 is ~0.64: top_p 0.5 keeps only it; top_p 0.9 keeps exactly the tokens needed to pass 0.9
    assert _draws(LOGITS, SamplingParams(temperature=1.0, top_p=0.5)) == {0}
    needed = int((probs.cumsum(0) < 0.9).sum()) + 1
    assert _draws(LOGITS, SamplingParams(temperature=1.0, top_p=0.9), n=2000) == set(range(needed))


def test_min_p_drops_tokens_below_fraction_of_top():
    probs = LOGITS.softmax(-1)[0]
    kept = {i for i in range(V) if probs[i] >= 0.1 * probs[0]}
    assert _draws(LOGITS, SamplingParams(temperature=1.0, min_p=0.1), n=2000) == kept


def test_penalties_as_specified():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0]])
    out_tokens = [[0, 0, 1]]  # token 0 twice, token 1 once; prompt is token 3
    cases = {
        "presence": (SamplingParams(temperature=0, presence_penalty=0.5), [1.5, -2.5, 1.0, 0.5]),
        "frequency": (SamplingParams(temperature=0, frequency_penalty=0.5), [1.0, -2.5, 1.0, 0.5]),
        "repetition": (SamplingParams(temperature=0, repetition_penalty=2.0), [1.0, -4.0, 1.0, 0.25]),
    }
    from pagedllm.layers.sampler import apply_penalties

    for name, (p, expected) in cases.items():
        m = _meta([p], out_tokens, prompt=(3,))
        got = apply_penalties(logits.clone(), m)[0, :4].tolist()
        assert got == pytest.approx(expected), name


def test_min_tokens_bans_eos_and_stop_ids():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 9.0]])  # 7 is EOS, 6 a stop id
    m = _meta([SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[6])])
    assert Sampler()(logits.clone(), m).token_ids.item() == 0
    m = _meta([SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[6])], [[1, 2]])
    assert Sampler()(logits.clone(), m).token_ids.item() == 7


def test_logit_bias_and_allowed_token_ids_apply_to_their_rows_only():
    plain, biased = SamplingParams(temperature=0), SamplingParams(temperature=0, logit_bias={3: 10.0, 0: -1.5})
    out = Sampler()(LOGITS.expand(2, -1).clone(), _meta([plain, biased])).token_ids.tolist()
    assert out == [0, 3]  # 1.0 + 10 beats 4.0; the unbiased row keeps its argmax
    out = Sampler()(LOGITS.clone(), _meta([SamplingParams(temperature=0, logit_bias={0: -3.0})])).token_ids.tolist()
    assert out == [1]  # 4 - 3 < 3
    assert _draws(LOGITS, SamplingParams(temperature=5.0, allowed_token_ids=[2, 5, 6]), n=2000) == {2, 5, 6}
    mixed = Sampler()(LOGITS.expand(2, -1).clone(), _meta([SamplingParams(temperature=0, allowed_token_ids=[4, 6]),
                                                            plain])).token_ids.tolist()
    assert mixed == [4, 0]
    # logprobs stay the model's own (raw), as vLLM's default
    lp = Sampler()(LOGITS.clone(), _meta([SamplingParams(temperature=0, logit_bias={3: 10.0}, logprobs=0)]))
    assert lp.token_ids.item() == 3 and lp.logprobs.item() == pytest.approx(LOGITS.log_softmax(-1)[0, 3].item())


def test_logprobs_are_raw_log_softmax():
    m = _meta([SamplingParams(temperature=0, logprobs=3)])
    out = Sampler()(LOGITS.clone(), m)
    ref = LOGITS.log_softmax(-1)[0]
    assert out.logprobs.item() == pytest.approx(ref[0].item())
    assert out.top_ids[0].tolist() == [0, 1, 2]
    assert out.ranks.item() == 1


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(tiny_models["qwen3"], dtype="float32")


def test_seeded_sampling_is_independent_of_the_batch(llm):
    prompts = [{"prompt_token_ids": p} for p in random_prompts(6, 5, 40, seed=3)]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=42, max_tokens=12)
    other = SamplingParams(temperature=1.0, max_tokens=7)
    alone = llm.generate(prompts[0], seeded, use_tqdm=False)[0].outputs[0].token_ids
    mixed = llm.generate(prompts, [seeded] + [other] * 5, use_tqdm=False)[0].outputs[0].token_ids
    reordered = llm.generate(prompts[::-1], [other] * 5 + [seeded], use_tqdm=False)[-1].outputs[0].token_ids
    assert alone == mixed == reordered
    assert_pool_empty(llm)


def test_n_samples_share_prompt_blocks(llm):
    engine = llm.engine
    prompt = random_prompts(1, 37, 37, seed=5)[0]  # 2 full blocks + a partial one
    rid = engine.add_request({"prompt_token_ids": prompt}, SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=8))
    engine.step()
    seqs = engine.requests[rid].seqs
    assert len(seqs) == 3
    tables = [s.block_table for s in seqs]
    assert tables[0] == tables[1] == tables[2]
    assert all(engine.block_manager.blocks[b].ref_count == 3 for b in tables[0])
    outs = engine.step()  # every sample writes into the shared partial block: copy-on-write
    assert [s.block_table[:2] for s in seqs] == [tables[0][:2]] * 3  # full prompt blocks stay shared
    assert len({s.block_table[2] for s in seqs}) == 3
    while engine.has_unfinished_requests():
        outs += engine.step()
    final = [o for o in outs if o.finished][0]
    assert len(final.outputs) == 3 and all(len(c.token_ids) == 8 for c in final.outputs)
    assert_pool_empty(llm)


def test_stop_string_cuts_text(llm):
    prompt = {"prompt_token_ids": random_prompts(1, 10, 10, seed=9)[0]}
    full = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)[0]
    text = full.outputs[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop and text.find(stop) > 0
    cut = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert cut.text == text[: text.find(stop)]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert_pool_empty(llm)


def test_stop_token_ids_and_max_tokens(llm):
    prompt = {"prompt_token_ids": random_prompts(1, 10, 10, seed=9)[0]}
    ids = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    ids = ids.outputs[0].token_ids
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[ids[4]], ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    first = ids.index(ids[4])
    assert out.token_ids == ids[: first + 1] and out.finish_reason == "stop" and out.stop_reason == ids[4]
    assert len(ids) == 10


def test_invalid_arguments_raise_value_error(llm):
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(max_tokens=-3), dict(n=0), dict(min_p=2)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate({"prompt_token_ids": [5] * 600}, use_tqdm=False)
    with pytest.raises(ValueError, match="token ids"):
        llm.generate({"prompt_token_ids": [10**9]}, use_tqdm=False)
    for bad in (dict(logit_bias={10**9: 1.0}), dict(allowed_token_ids=[-1]), dict(stop_token_ids=[10**9])):
        with pytest.raises(ValueError, match="must name token ids"):
            llm.generate({"prompt_token_ids": [5]}, SamplingParams(**bad), use_tqdm=False)
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[])
    with pytest.raises(ValueError, match="unknown engine argument"):
        LLM(llm.engine.config.load.model_path, not_an_arg=1)
    assert_pool_empty(llm)


def test_logprobs_through_engine(llm):
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=4, logprobs=2),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 4
    for tok, entry in zip(out.token_ids, out.logprobs):
        assert tok in entry and entry[tok].rank == 1 and len(entry) == 2
        assert math.isfinite(entry[tok].logprob)


def test_greedy_n_samples_equal_single_greedy(llm):
    """Copy-on-write must copy the shared partial block's K/V: every greedy sample equals n=1."""
    prompt = {"prompt_token_ids": random_prompts(1, 21, 21, seed=11)[0]}
    one = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    three = llm.generate(prompt, SamplingParams(n=3, temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    assert [c.token_ids for c in three.outputs] == [one.outputs[0].token_ids] * 3
    assert_pool_empty(llm)
