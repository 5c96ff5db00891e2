"""Prefix caching and chunked prefill keep greedy parity with HF, including under preemption and eviction."""

from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams
from tests.helpers import HFReference, assert_greedy_match, assert_pool_empty, random_prompts

MAX_TOKENS = 16


def _shared_prefix_prompts(n: int, prefix_len: int, seed: int) -> list[list[int]]:
    prefix = random_prompts(1, prefix_len, prefix_len, seed=seed)[0]
    return [prefix + tail for tail in random_prompts(n, 1, 20, seed=seed + 1)]


@pytest.fixture(scope="module")
def hf_refs(tiny_models):
    cache = {}

    def get(arch: str, prompts: list[list[int]]):
        hf = cache.setdefault(arch, HFReference(tiny_models[arch]))
        return [hf.greedy(p, MAX_TOKENS) for p in prompts]

    return get


def _generate(llm: LLM, prompts):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def _check(outs, refs):
    for out, (ref, scores) in zip(outs, refs):
        assert_greedy_match(out.outputs[0].token_ids, ref, scores)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_shared_prefix_batch_matches_hf_and_repeat_hits_every_full_block(tiny_models, hf_refs, arch):
    prompts = _shared_prefix_prompts(8, 100, seed=40)
    refs = hf_refs(arch, prompts)
    llm = LLM(tiny_models[arch], dtype="float32", max_model_len=256)
    _check(_generate(llm, prompts), refs)
    sched = llm.engine.scheduler
    assert sched.prefix_hits > 0  # later prompts of the batch reuse the first one's blocks
    hits_before = sched.prefix_hits
    again = _generate(llm, prompts[:1])
    full_blocks = (len(prompts[0]) - 1) // llm.engine.block_manager.block_size
    assert again[0].num_cached_tokens == full_blocks * 16
    assert sched.prefix_hits - hits_before == full_blocks * 16
    _check(again, refs[:1])
    (_, stats), = llm.get_stats()
    assert stats.prefix_cache_hits == sched.prefix_hits and stats.prefix_cache_queries >= stats.prefix_cache_hits
    llm.reset_prefix_cache()  # forgotten: the same prompt computes every token again, with the same result
    after_reset = _generate(llm, prompts[:1])
    assert after_reset[0].num_cached_tokens == 0
    _check(after_reset, refs[:1])
    assert_pool_empty(llm)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_token_budget_of_16_with_prefix_caching(tiny_models, hf_refs, arch):
    prompts = _shared_prefix_prompts(6, 60, seed=50)
    llm = LLM(tiny_models[arch], dtype="float32", max_model_len=256, max_num_batched_tokens=16)
    _check(_generate(llm, prompts), hf_refs(arch, prompts))
    assert_pool_empty(llm)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_prefix_caching_under_preemption_and_eviction(tiny_models, hf_refs, arch):
    prompts = _shared_prefix_prompts(8, 40, seed=60) + random_prompts(6, 30, 60, seed=61)
    llm = LLM(tiny_models[arch], dtype="float32", max_model_len=96, num_gpu_blocks_override=14, block_size=8)
    _check(_generate(llm, prompts), hf_refs(arch, prompts))
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.scheduler.prefix_hits > 0
    assert_pool_empty(llm)


def test_chunked_prefill_does_not_stall_running_decodes(tiny_models):
    """While a long prompt is prefilled in chunks, the running request gets a token every step."""
    llm = LLM(tiny_models["qwen3"], dtype="float32", max_model_len=512, max_num_batched_tokens=32)
    engine = llm.engine
    short = engine.add_request({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=30, ignore_eos=True))
    engine.step()
    engine.add_request({"prompt_token_ids": random_prompts(1, 300, 300, seed=3)[0]},
                       SamplingParams(max_tokens=2, ignore_eos=True))
    for _ in range(8):  # 300 tokens at <= 31 a step: the long prompt needs ~10 steps
        before = len(engine.requests[short].seqs[0].output_token_ids)
        engine.step()
        assert len(engine.requests[short].seqs[0].output_token_ids) == before + 1
    while engine.has_unfinished_requests():
        engine.step()
    assert_pool_empty(llm)


def test_disabling_prefix_caching(tiny_models, hf_refs):
    llm = LLM(tiny_models["qwen3"], dtype="float32", max_model_len=256, enable_prefix_caching=False)
    prompt = random_prompts(1, 50, 50, seed=2)
    first = _generate(llm, prompt)
    second = _generate(llm, prompt)
    bm = llm.engine.block_manager
    assert second[0].num_cached_tokens == 0 and llm.engine.scheduler.prefix_hits == 0
    assert not bm.cached and all(b.hash is None for b in bm.blocks)  # no block was ever registered
    assert first[0].outputs[0].token_ids == second[0].outputs[0].token_ids
    _check(second, hf_refs("qwen3", prompt))
