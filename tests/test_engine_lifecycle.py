"""Requests that end any way (abort, engine error) give every block back; detokenization is UTF-8 safe."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.engine.detokenizer import Detokenizer
from pagedllm.engine.sequence import Request
from pagedllm.outputs import REQUEST_FAILED
from tests.helpers import assert_pool_empty, random_prompts


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(tiny_models["llama"], dtype="float32", num_gpu_blocks_override=64, block_size=4, max_model_len=256)


def test_abort_mid_generation_frees_blocks(llm):
    engine = llm.engine
    ids = [engine.add_request({"prompt_token_ids": p}, SamplingParams(max_tokens=50, n=2, ignore_eos=True))
           for p in random_prompts(4, 10, 30, seed=1)]
    for _ in range(5):
        engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    for rid in ids:
        engine.abort_request(rid)
    assert_pool_empty(llm)


def test_steps_report_a_request_once_it_has_a_token_not_while_its_prompt_is_in_chunks(tiny_models):
    llm = LLM(tiny_models["llama"], dtype="float32", max_model_len=256, max_num_batched_tokens=16)
    engine = llm.engine
    rid = engine.add_request({"prompt_token_ids": random_prompts(1, 40, 40, seed=2)[0]},
                             SamplingParams(max_tokens=3, ignore_eos=True))
    reports = [[len(o.outputs[0].token_ids) for o in engine.step() if o.request_id == rid] for _ in range(7)]
    assert reports == [[], [], [], [], [1], [2], [3]]  # the prompt in 5 chunks of 8 (half the budget), then decodes
    assert_pool_empty(llm)


def test_engine_error_fails_only_that_step_and_engine_keeps_serving(llm, monkeypatch):
    engine = llm.engine
    rid = engine.add_request({"prompt_token_ids": [5, 6, 7, 8, 9]}, SamplingParams(max_tokens=5))
    real = engine.executor.submit

    def boom(*args, **kwargs):
        raise RuntimeError("simulated device fault")

    monkeypatch.setattr(engine.executor, "submit", boom)
    outs = engine.step()
    assert outs[0].request_id == rid and outs[0].finished and outs[0].error == REQUEST_FAILED
    monkeypatch.setattr(engine.executor, "submit", real)
    assert_pool_empty(llm)
    good = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(good[0].outputs[0].token_ids) == 3
    assert_pool_empty(llm)


def test_incremental_detokenization_never_splits_characters(llm):
    tok = llm.get_tokenizer()
    text = "Café 東京 🚀 naïve — ok"
    ids = tok.encode(text)
    req = Request("d", None, [0], SamplingParams(), 100)
    seq, detok = req.seqs[0], Detokenizer(tok)
    deltas = []
    for t in ids:
        seq.token_ids.append(t)
        deltas.append(detok.update(seq))
    deltas.append(detok.update(seq, final=True))
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids)


def test_async_engine_builds_its_engine_on_its_own_thread(tiny_models):
    """All torch work of a served engine runs on one thread (one OpenMP pool); start-up errors reach the caller."""
    import threading

    from pagedllm.engine.async_engine import AsyncLLMEngine
    from pagedllm.engine.llm_engine import LLMEngine

    built_on = []

    def build():
        built_on.append(threading.current_thread().name)
        return LLM(tiny_models["qwen3"], dtype="float32").engine

    engine = AsyncLLMEngine(build)
    try:
        assert built_on == ["pagedllm-engine"] and isinstance(engine.engine, LLMEngine) and engine.is_alive
    finally:
        engine.shutdown()

    def fail():
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        AsyncLLMEngine(fail)


LIFECYCLE = textwrap.dedent("""
    import gc, multiprocessing as mp, sys, weakref
    from pagedllm import LLM, SamplingParams

    def pool(llm):  # a weak reference to rank 0's KV pool
        return weakref.ref(llm.engine.executor.driver.runner.kv_cache)

    def main():
        kw = dict(dtype="float32", max_model_len=128, kv_cache_memory=1 << 20)
        def run(llm):
            out = llm.generate({"prompt_token_ids": [5, 6, 7, 8]},
                               SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
            return out[0].outputs[0].token_ids
        llm = LLM(sys.argv[1], tensor_parallel_size=2, **kw)
        ref, kv = run(llm), pool(llm)
        del llm; gc.collect()  # dropped: its worker, process group and pool go
        assert kv() is None and not mp.active_children()
        llm = LLM(sys.argv[1], tensor_parallel_size=2, **kw)  # a second group in the same process
        assert run(llm) == ref
        del llm; gc.collect()
        assert not mp.active_children()
        with LLM(sys.argv[1], pipeline_parallel_size=2, **kw) as llm:
            assert run(llm) == ref
        assert not mp.active_children()
        llm = LLM(sys.argv[1], data_parallel_size=2, **kw)
        assert run(llm) == ref
        llm.shutdown()
        assert not mp.active_children()
        llm = LLM(sys.argv[1], **kw)
        kv = pool(llm)
        assert run(llm) == ref
        llm.shutdown()
        assert kv() is None
        llm = LLM(sys.argv[1], tensor_parallel_size=2, **kw)  # left running: the interpreter's exit stops it
        assert run(llm) == ref
        print("all engines ran")

    if __name__ == "__main__":
        main()
""")


def test_engines_come_and_go_in_one_process(tiny_models, tmp_path):
    """TP, TP again, PP, DP and a single engine, one after another in one process, released by garbage collection,
    a with block or shutdown(); the process then exits cleanly with one engine still up."""
    script = tmp_path / "lifecycle.py"
    script.write_text(LIFECYCLE)
    r = subprocess.run([sys.executable, str(script), tiny_models["llama"]], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "all engines ran" in r.stdout
    assert "terminate called" not in r.stderr and "Traceback" not in r.stderr
