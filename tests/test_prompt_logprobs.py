"""Prompt logprobs (vLLM's prompt_logprobs, and completions' echo with logprobs) equal HF's log-softmax over the
prompt in fp32: with a chunked prompt, with the prompt already in the prefix cache, and with tensor parallelism."""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM, SamplingParams
from tests.helpers import assert_pool_empty, random_prompts

K = 3


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    return random_prompts(1, 45, 45, seed=5)[0]


@pytest.fixture(scope="module")
def hf_logprobs(tiny_models, prompt) -> torch.Tensor:
    """[len(prompt) - 1, vocab]: row i scores prompt[i + 1]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["qwen3"], dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(torch.tensor([prompt])).logits[0, :-1].float().log_softmax(-1)


def _check(entries, prompt: list[int], ref: torch.Tensor) -> None:
    assert len(entries) == len(prompt) and entries[0] is None
    for i, entry in enumerate(entries[1:]):
        token = prompt[i + 1]
        mine, theirs = entry[token].logprob, ref[i, token].item()
        assert mine == pytest.approx(theirs, abs=1e-4)
        # the rank, up to logits within rounding of the token's (a random model's are dense)
        assert int((ref[i] > theirs + 1e-4).sum()) + 1 <= entry[token].rank <= int((ref[i] >= theirs - 1e-4).sum())
        top = sorted((lp.rank, lp.logprob) for t, lp in entry.items() if lp.rank <= K)
        assert [lp for _, lp in top] == pytest.approx(ref[i].topk(K).values.tolist(), abs=1e-4)


def test_prompt_logprobs_match_hf_chunked_and_cached(tiny_models, prompt, hf_logprobs):
    llm = LLM(tiny_models["qwen3"], dtype="float32", max_model_len=256, max_num_batched_tokens=16)  # 8-token chunks
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=K)
    first = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    _check(first.prompt_logprobs, prompt, hf_logprobs)
    plain = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)[0]
    assert plain.prompt_logprobs is None and plain.num_cached_tokens > 0  # the prompt is in the prefix cache now
    again = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    assert again.num_cached_tokens == 0  # skipped the cache: a cached prefix has no logits to score
    _check(again.prompt_logprobs, prompt, hf_logprobs)
    assert again.outputs[0].token_ids == first.outputs[0].token_ids == plain.outputs[0].token_ids
    assert_pool_empty(llm)
    with pytest.raises(ValueError, match="--max-logprobs"):
        llm.generate("hi", SamplingParams(prompt_logprobs=21), use_tqdm=False)


def test_prompt_logprobs_with_tensor_parallelism(tiny_models, prompt, hf_logprobs):
    with LLM(tiny_models["qwen3"], dtype="float32", max_model_len=256, tensor_parallel_size=2) as llm:
        out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1, prompt_logprobs=K),
                           use_tqdm=False)[0]
        _check(out.prompt_logprobs, prompt, hf_logprobs)
