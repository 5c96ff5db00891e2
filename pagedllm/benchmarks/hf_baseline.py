"""The same workload through HF transformers on the same checkpoint, for `--compare hf`."""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from pagedllm.benchmarks.workloads import Workload


def load_hf(folder: str, dtype: torch.dtype, device: torch.device, load_format: str = "auto"):
    """The checkpoint in transformers; with load_format "dummy", a randomly initialised model of its config (only
    the shapes matter for speed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if load_format == "dummy":
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.to(device).eval()


@torch.inference_mode()
def static_batches(model, w: Workload, batch_size: int = 16, pad_id: int = 0) -> float:
    """`generate` on fixed batches with left padding, every sample forced to its batch's longest output.
    Returns seconds."""
    device = next(model.parameters()).device
    start = time.perf_counter()
    for i in tqdm(range(0, len(w.prompts), batch_size), desc="HF static batches"):
        prompts, outs = w.prompts[i:i + batch_size], w.output_lens[i:i + batch_size]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        n = max(outs)
        model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=pad_id, eos_token_id=None)
    return time.perf_counter() - start


@torch.inference_mode()
def continuous_batching(model, w: Workload) -> float:
    """transformers' own continuous batching (`generate_batch`). Returns seconds."""
    from transformers import GenerationConfig

    n = max(w.output_lens)
    config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    start = time.perf_counter()
    model.generate_batch(inputs=w.prompts, generation_config=config, progress_bar=True, warmup=False)
    return time.perf_counter() - start


@torch.inference_mode()
def single_request_tpot(model, prompt: list[int], output_len: int) -> dict:
    """Batch-1 `generate`: time to first token and time per output token after it."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None)
    model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm-up
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len, **kwargs)
    total = time.perf_counter() - t0
    return {"ttft_s": ttft, "tpot_s": (total - ttft) / (output_len - 1)}
