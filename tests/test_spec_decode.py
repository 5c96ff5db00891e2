"""Speculative decoding (n-gram proposals verified in the paged engine): greedy output identical to running without
it across the engine's features, rejection sampling that keeps the target distribution, its counters, and clear
errors for what it does not run."""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.engine.spec_decode import ngram_proposal
from pagedllm.layers.sampler import Sampler
from tests.helpers import assert_pool_empty, random_prompts

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


def test_ngram_proposal_takes_the_latest_longest_match():
    assert ngram_proposal([1, 2, 3, 4, 9, 2, 3, 5, 6, 2, 3], 2, 2, 4) == [5, 6]  # latest occurrence of [2, 3]
    assert ngram_proposal([7, 1, 2, 3, 4, 8, 1, 2, 3], 3, 2, 4) == [4, 8, 1]  # [1, 2, 3] beats [2, 3]
    assert ngram_proposal([1, 2, 3, 4], 3, 2, 4) == []
    assert ngram_proposal([5, 5, 5], 4, 1, 3) == [5]  # only what exists after the match


def _repetitive(n: int, seed: int) -> list[list[int]]:
    """Prompts that quote themselves, so that prompt lookup has something to propose."""
    return [p * 3 for p in random_prompts(n, 6, 14, seed=seed)]


def _generate(model: str, prompts, params, **engine_args):
    llm = LLM(model, **{"dtype": "float32", "max_model_len": 256, "kv_cache_memory": 2 << 20, **engine_args})
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        stats = llm.engine.stats()[0][1]
        assert_pool_empty(llm)
        return [[c.token_ids for c in o.outputs] for o in outs], [[c.finish_reason for c in o.outputs] for o in outs], stats
    finally:
        llm.shutdown()


CONFIGS = {
    "plain": {},
    "no-prefix-caching": {"enable_prefix_caching": False},
    "small-chunks": {"max_num_batched_tokens": 8},  # proposals cut to what the token budget leaves
    "preemption": {"kv_cache_memory": 64 << 10, "block_size": 4, "max_model_len": 64},  # 32 blocks, 4 x ~12 wanted
    "tensor-parallel": {"tensor_parallel_size": 2},
    "pipeline-parallel": {"pipeline_parallel_size": 2},  # the draft runs whole beside stage 0, in the engine's process
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_output_is_identical_without_speculation(tiny_models, name):
    prompts = _repetitive(4, seed=21)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, n=2 if name == "plain" else 1)
    want, _, _ = _generate(tiny_models["qwen3"], prompts, params, **CONFIGS[name])
    spec = {**NGRAM, "disable_by_batch_size": 8}
    got, _, stats = _generate(tiny_models["qwen3"], prompts, params, speculative_config=spec, **CONFIGS[name])
    assert got == want
    assert stats.spec_decode_num_drafts > 0 and stats.spec_decode_num_accepted_tokens > 0
    assert stats.spec_decode_num_accepted_tokens <= stats.spec_decode_num_draft_tokens
    assert stats.num_preemptions > 0 or name != "preemption"


TYPOS = ("Fix the typos in this paragraph and write it out again: The quick brwon fox jumpd over the lazy dog. It "
         "was a sunny day and the fox was very hapy. The dog did not care at all, it just slept in the sun all afternon.")


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])  # the embedded GGUF's own Q4_1 / Q8_0, and bf16
def test_greedy_chat_is_identical_without_speculation_in_low_precision(dtype):
    """Below fp32 a verified token's logits must be bitwise those of its decode, or near-ties (frequent at bf16's
    resolution: this answer had an exact one) resolve differently. The attention kernel attends a short chunk
    token by token, and the linear kernels compute each row alike for up to 4 rows (8 for 4-bit weights), so one
    speculating sequence at k = 3 is exact; more concurrent rows reach the matrix product, as in vLLM outside
    its batch-invariant mode."""
    params = SamplingParams(temperature=0, max_tokens=64)
    outs = []
    for spec in (None, NGRAM):
        llm = LLM(dtype=dtype, max_model_len=512, speculative_config=spec)
        try:
            outs.append(llm.chat([{"role": "user", "content": TYPOS}], params, use_tqdm=False)[0].outputs[0].token_ids)
            stats = llm.engine.stats()[0][1]
        finally:
            llm.shutdown()
    assert outs[0] == outs[1]
    assert stats.spec_decode_num_accepted_tokens > 10


@pytest.mark.parametrize("name", ["plain", "preemption", "small-chunks", "tensor-parallel", "pipeline-parallel"])
def test_a_draft_model_gives_the_same_greedy_output(tiny_models, name):
    """The target itself as its draft accepts every proposal (its K/V bookkeeping must be exact for that); another
    model with the same vocabulary (the tiny Llama) proposes worse, and the output stays the target's."""
    prompts = _repetitive(4, seed=24)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, n=2 if name == "plain" else 1)
    want, _, _ = _generate(tiny_models["qwen3"], prompts, params, **CONFIGS[name])
    for draft in ("qwen3", "llama"):
        spec = {"method": "draft_model", "model": tiny_models[draft], "num_speculative_tokens": 3,
                "disable_by_batch_size": 8}
        got, _, stats = _generate(tiny_models["qwen3"], prompts, params, speculative_config=spec, **CONFIGS[name])
        assert got == want
        assert stats.spec_decode_num_drafts > 0
        if draft == "qwen3":
            assert stats.spec_decode_num_accepted_tokens == stats.spec_decode_num_draft_tokens


def test_a_draft_models_pool_shares_the_kv_budget(tiny_models):
    budget = 2 << 20
    alone = LLM(tiny_models["qwen3"], dtype="float32", max_model_len=256, kv_cache_memory=budget)
    blocks_alone = alone.engine.block_manager.num_blocks
    alone.shutdown()
    llm = LLM(tiny_models["qwen3"], dtype="float32", max_model_len=256, kv_cache_memory=budget,
              speculative_config={"method": "draft_model", "model": tiny_models["llama"]})
    target = llm.engine.executor.driver.runner.kv_cache_bytes
    draft = llm.engine.speculator.draft.executor.driver.runner.kv_cache_bytes
    assert target + draft <= budget and llm.engine.block_manager.num_blocks == blocks_alone // 2  # equal KV shapes
    llm.shutdown()


def test_stops_and_max_tokens_end_inside_an_accepted_run(tiny_models):
    prompts = _repetitive(3, seed=22)
    base, _, _ = _generate(tiny_models["qwen3"], prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    stop_ids = [toks[0][7] for toks in base]  # a token each sample produces mid-way
    for max_tokens in (5, 11):
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, stop_token_ids=stop_ids)
        want, want_reasons, _ = _generate(tiny_models["qwen3"], prompts, params)
        got, reasons, _ = _generate(tiny_models["qwen3"], prompts, params, speculative_config=NGRAM)
        assert got == want and reasons == want_reasons


def test_large_batches_do_not_speculate(tiny_models):
    prompts = _repetitive(6, seed=23)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    _, _, stats = _generate(tiny_models["qwen3"], prompts, params,
                            speculative_config={**NGRAM, "disable_by_batch_size": 5})
    assert stats.spec_decode_num_drafts == 0  # six sequences run together to the end


def test_rejection_sampling_against_a_draft_distribution():
    """A draft that proposes from q: the emitted token is distributed as p, accepted with probability
    sum(min(p, q))."""
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    q = torch.tensor([0.4, 0.3, 0.2, 0.1])
    groups = 40_000
    proposals = torch.multinomial(q, groups, replacement=True, generator=torch.Generator().manual_seed(5))
    rows, meta = _rows([0], torch.stack([p.log(), p.log()]), greedy=False, groups=groups)
    meta.spec = (torch.stack([proposals, torch.full_like(proposals, -1)], 1).view(-1), meta.spec[1])
    meta.spec_probs = torch.stack([q, torch.zeros(4)]).repeat(groups, 1)
    tokens = Sampler(seed=6)(rows, meta).token_ids.view(groups, 2)
    assert (torch.bincount(tokens[:, 0], minlength=4).float() / groups - p).abs().max() < 0.01
    accepted = (tokens[:, 0] == proposals).float().mean()
    assert abs(accepted - torch.minimum(p, q).sum()) < 0.01


def test_sampling_through_the_engine_keeps_the_target_distribution(tiny_models):
    """Temperature 0.3 on the tiny Qwen3, 1,000 samples with and without a draft model (the tiny Llama, whose
    proposals the target mostly rejects: the residual max(0, p - q) does the sampling): the tokens after the first
    keep their frequencies within 5 standard deviations."""
    import collections

    prompt = random_prompts(1, 8, 9, seed=4)[0] * 3
    params = SamplingParams(temperature=0.3, max_tokens=3, ignore_eos=True, n=250)
    spec = {"method": "draft_model", "model": tiny_models["llama"], "num_speculative_tokens": 2,
            "disable_by_batch_size": None}
    samples = {}
    for name, config in (("target", None), ("speculative", spec)):
        llm = LLM(tiny_models["qwen3"], dtype="float32", max_model_len=64, kv_cache_memory=16 << 20, max_num_seqs=512,
                  speculative_config=config)
        outs = llm.generate([{"prompt_token_ids": prompt}] * 4, params, use_tqdm=False)
        samples[name] = [c.token_ids for o in outs for c in o.outputs]
        if config:
            assert llm.engine.stats()[0][1].spec_decode_num_drafts > 500
        llm.shutdown()
    for pos in (1, 2):
        want = collections.Counter(t[pos] for t in samples["target"])
        got = collections.Counter(t[pos] for t in samples["speculative"])
        for token, count in want.most_common(3):
            p = count / 1000
            assert abs(got[token] - count) / 1000 < 5 * (2 * p * (1 - p) / 1000) ** 0.5 + 1e-3, (pos, token, count, got[token])


def _rows(drafts: list[int], logits: torch.Tensor, greedy: bool, groups: int):
    """SamplingMetadata for `groups` copies of one speculating sequence (rows: its proposals, then the last)."""
    from pagedllm.step import SamplingMetadata

    k = len(drafts) + 1
    rows = groups * k
    firsts = torch.arange(rows) // k * k
    return logits.repeat(groups, 1), SamplingMetadata(
        temperature=torch.ones(rows), greedy=torch.full((rows,), greedy), all_greedy=greedy, top_k=None, top_p=None,
        min_p=None, presence=None, frequency=None, repetition=None, output_tokens=None, prompt_tokens=None,
        banned=None, bias=None, allowed=None, guided=None, generators={}, num_logprobs=-1,
        spec=(torch.tensor(drafts + [-1]).repeat(groups), firsts))


def test_rejection_sampling_keeps_the_target_distribution():
    """Proposals 2 then 0 against target distributions p0 (row 0) and p1 (row 1): the first token is distributed as
    p0 whatever was proposed, the second as p1 whenever the first proposal was accepted."""
    p0 = torch.tensor([0.1, 0.2, 0.3, 0.4])
    p1 = torch.tensor([0.5, 0.25, 0.15, 0.1])
    logits = torch.stack([p0.log(), p1.log(), torch.tensor([0.7, 0.1, 0.1, 0.1]).log()])
    groups = 40_000
    rows, meta = _rows([2, 0], logits, greedy=False, groups=groups)
    tokens = Sampler(seed=3)(rows, meta).token_ids.view(groups, 3)
    first = torch.bincount(tokens[:, 0], minlength=4).float() / groups
    assert (first - p0).abs().max() < 0.01
    accepted = tokens[:, 0] == 2
    assert abs(accepted.float().mean() - p0[2]) < 0.01  # accepted with probability p0(2)
    second = torch.bincount(tokens[accepted, 1], minlength=4).float() / accepted.sum()
    assert (second - p1).abs().max() < 0.02
    assert (tokens[~accepted, 1:] == -1).all()  # nothing after a rejection
    both = accepted & (tokens[:, 1] == 0)
    assert (tokens[both, 2] >= 0).all() and (tokens[~both, 2] == -1).all()  # the bonus row only after two accepts


def test_greedy_verification_takes_the_argmax():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    rows, meta = _rows([1, 2], logits, greedy=True, groups=1)
    assert Sampler()(rows, meta).token_ids.tolist() == [1, 0, -1]  # 1 accepted; 2 rejected for the argmax 0


@pytest.mark.parametrize("config,message", [
    ({"method": "draft_model"}, "takes a draft `model`"),
    ({"method": "ngram", "model": "x"}, "ngram takes none"),
    ({"method": "eagle"}, "not supported"),
    ({"num_speculative_tokens": 0}, "positive integers"),
    ({"prompt_lookup_min": 5, "prompt_lookup_max": 2}, "must not exceed"),
    ({"lookahead": 3}, "unknown field"),
])
def test_bad_speculative_configs_are_refused(tiny_models, config, message):
    with pytest.raises(ValueError, match=message):
        LLM(tiny_models["qwen3"], speculative_config=config)
