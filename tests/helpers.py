"""Shared test helpers: random prompts, the HF reference, pool checks."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_prompts(n: int, lo: int, hi: int, seed: int = 0, vocab: int = 49152) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (k,), generator=g).tolist() for k in lengths]


class HFReference:
    """Greedy continuations from HF transformers in fp32, with the logits to judge near-ties."""

    def __init__(self, path: str):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    @torch.inference_mode()
    def greedy(self, prompt: list[int], max_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
        ids = torch.tensor([prompt])
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                                  output_scores=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
        return out.sequences[0, len(prompt):].tolist(), [s[0] for s in out.scores]


def assert_greedy_match(ours: list[int], theirs: list[int], scores: list[torch.Tensor], tie_tol: float = 1e-3) -> None:
    """Equal token for token, except a divergence at a near-tie of HF's top two logits (as vLLM's tests allow)."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            gap = abs(float(scores[i][a]) - float(scores[i][b]))
            assert gap < tie_tol, f"diverged at token {i}: ours {a}, HF {b}, logit gap {gap:.2e}"
            return
    assert len(ours) == len(theirs), f"lengths differ: {len(ours)} vs {len(theirs)}"


def assert_pool_empty(llm) -> None:
    bm = llm.engine.block_manager
    assert all(b.ref_count == 0 for b in bm.blocks), "blocks still referenced"
    assert bm.num_free_blocks == bm.num_blocks
    assert not llm.engine.requests and not llm.engine.scheduler.has_unfinished()


def check_greedy_against_hf(model: str, prompts: list[list[int]], max_tokens: int, expect_preemption: bool = False,
                            also=None, **engine_args) -> None:
    """An engine built with `engine_args` (fp32) gives HF's greedy tokens, preempts if asked to, empties its pool,
    passes `also(llm)` if given, and shuts down (with its worker processes)."""
    from pagedllm import LLM, SamplingParams

    hf = HFReference(model)
    refs = [hf.greedy(p, max_tokens) for p in prompts]
    llm = LLM(model, dtype="float32", **engine_args)
    try:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        for out, (ref, scores) in zip(outs, refs):
            assert_greedy_match(out.outputs[0].token_ids, ref, scores)
        if expect_preemption:
            assert llm.engine.scheduler.num_preemptions > 0
        assert_pool_empty(llm)
        if also is not None:
            also(llm)
    finally:
        llm.engine.shutdown()


def plan_for(model: str | None, concurrency: int = 8, device_memory: int | None = None, max_model_len: int = 2048,
             dtype: str = "bfloat16", **engine_args) -> dict:
    """The memory plan of the configuration an engine with these arguments would run (loads nothing)."""
    from pagedllm.engine.arg_utils import EngineArgs
    from pagedllm.memory import make_plan
    from pagedllm.model_loader.resolve import model_config_for

    args = EngineArgs(model=model, dtype=dtype, max_model_len=max_model_len, device="cpu", **engine_args)
    return make_plan(args.create_engine_config(model_config_for(model)), concurrency, device_memory)


@contextlib.contextmanager
def running_server(model: str, *args: str):
    """A real `pagedllm serve` process on a free port: yields (base URL, process); killed afterwards."""
    import httpx
    import pytest

    port = free_port()
    cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", model, "--port", str(port), "--log-level",
           "warning", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
        assert proc.poll() is None, proc.stdout.read()
    else:
        proc.kill()
        pytest.fail("server did not start")
    try:
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.kill()
