"""Greedy parity with HF transformers in fp32 on tiny random Qwen3 / Llama / Qwen2 checkpoints."""

from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.kernels import load_cpu_ops
from tests.helpers import HFReference, assert_greedy_match, assert_pool_empty, random_prompts

MAX_TOKENS = 24
PROMPTS = random_prompts(16, 3, 80)


@pytest.fixture(scope="module")
def references(tiny_models):
    cache = {}

    def get(arch: str, prompts=PROMPTS, max_tokens: int = MAX_TOKENS):
        key = (arch, tuple(map(tuple, prompts)), max_tokens)
        if key not in cache:
            hf = HFReference(tiny_models[arch])
            cache[key] = [hf.greedy(list(p), max_tokens) for p in prompts]
        return cache[key]

    return get


def _check(llm: LLM, refs, prompts=PROMPTS, max_tokens: int = MAX_TOKENS) -> None:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for out, prompt, (ref, scores) in zip(outs, prompts, refs):
        assert out.prompt_token_ids == prompt
        assert_greedy_match(out.outputs[0].token_ids, ref, scores)
    assert_pool_empty(llm)


@pytest.mark.parametrize("arch", ["qwen3", "llama", "qwen2"])
def test_greedy_matches_hf(tiny_models, references, arch):
    llm = LLM(tiny_models[arch], dtype="float32")
    assert llm.engine.executor.driver.runner.inputs.native == load_cpu_ops()
    _check(llm, references(arch))


@pytest.mark.parametrize("arch", ["qwen3", "qwen2"])
def test_greedy_matches_hf_with_torch_attention(tiny_models, references, arch, monkeypatch):
    """The pure-torch attention path (used off the CPU, or where the native kernel cannot be built)."""
    monkeypatch.setenv("PAGEDLLM_ATTENTION_BACKEND", "torch")
    llm = LLM(tiny_models[arch], dtype="float32")
    assert llm.engine.executor.driver.runner.inputs.native is False
    _check(llm, references(arch))


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_greedy_matches_hf_two_seqs_at_a_time(tiny_models, references, arch):
    _check(LLM(tiny_models[arch], dtype="float32", max_num_seqs=2), references(arch))


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_greedy_matches_hf_under_preemption(tiny_models, references, arch):
    llm = LLM(tiny_models[arch], dtype="float32", num_gpu_blocks_override=16, block_size=8, max_model_len=128)
    _check(llm, references(arch))
    assert llm.engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_greedy_matches_hf_with_small_token_budget(tiny_models, references, arch):
    llm = LLM(tiny_models[arch], dtype="float32", max_num_batched_tokens=16, enable_prefix_caching=False)
    _check(llm, references(arch))


def test_scoring_a_position_per_step_gives_the_prompts_logits(tiny_models):
    """engine.score(tokens, step_tokens=1) computes each position as a decode step does (what `bench quantization`
    compares decode arithmetic with); in fp32 the logits are the one-step prompt's."""
    import torch

    llm = LLM(tiny_models["qwen3"], max_model_len=256)
    tokens = list(range(3, 45))
    torch.testing.assert_close(llm.engine.score(tokens, step_tokens=1), llm.engine.score(tokens), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(llm.engine.score(tokens, step_tokens=5), llm.engine.score(tokens), atol=1e-4, rtol=1e-4)
    assert_pool_empty(llm)
