"""The same engine on a CUDA device, when one is present (CI has none: these skip)."""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM, SamplingParams
from tests.helpers import HFReference, assert_greedy_match, assert_pool_empty, random_prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_cuda_greedy_matches_hf_and_sizes_pool_by_profiling(tiny_models):
    prompts = random_prompts(8, 3, 60, seed=100)
    hf = HFReference(tiny_models["qwen3"])
    refs = [hf.greedy(p, 16) for p in prompts]
    llm = LLM(tiny_models["qwen3"], dtype="float32", device="cuda", max_model_len=256, gpu_memory_utilization=0.2)
    assert llm.engine.executor.driver.runner.kv_cache.is_cuda
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    for out, (ref, scores) in zip(outs, refs):
        assert_greedy_match(out.outputs[0].token_ids, ref, scores)
    assert_pool_empty(llm)


def test_cuda_sampling_with_seed_is_reproducible(tiny_models):
    llm = LLM(tiny_models["llama"], dtype="bfloat16", device="cuda", max_model_len=256, gpu_memory_utilization=0.2)
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=3, max_tokens=12, ignore_eos=True)
    a = llm.generate({"prompt_token_ids": [5, 6, 7]}, params, use_tqdm=False)[0].outputs[0].token_ids
    b = llm.generate({"prompt_token_ids": [5, 6, 7]}, params, use_tqdm=False)[0].outputs[0].token_ids
    assert a == b and len(a) == 12


@pytest.mark.parametrize("eager", [False, True])
def test_cuda_graphs_give_hf_tokens(tiny_models, eager):
    """Decode steps replayed from CUDA graphs (Triton attention) against HF, batches padded to a captured size."""
    prompts = random_prompts(5, 3, 40, seed=101)
    hf = HFReference(tiny_models["qwen3"])
    refs = [hf.greedy(p, 12) for p in prompts]
    llm = LLM(tiny_models["qwen3"], dtype="float32", device="cuda", max_model_len=256, gpu_memory_utilization=0.2,
              max_num_seqs=8, enforce_eager=eager)
    assert (llm.engine.executor.driver.runner.graphs is None) == eager
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for out, (ref, scores) in zip(outs, refs):
        assert_greedy_match(out.outputs[0].token_ids, ref, scores)
    assert_pool_empty(llm)
