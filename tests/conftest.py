"""Tiny random-weight checkpoints saved by transformers (so the real loader reads them) and HF references."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from pagedllm.model_loader.resolve import resolve_model

if not torch.cuda.is_available():  # the Triton kernels run on CPU tensors through Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=512, initializer_range=0.2, rms_norm_eps=1e-6)


def _save_tiny(path: str, arch: str, **overrides) -> str:
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    classes = {"qwen3": (Qwen3Config, Qwen3ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM)}
    config_cls, model_cls = classes[arch]
    kwargs = {**TINY, "num_key_value_heads": 2, "head_dim": 16, "bos_token_id": 1, "eos_token_id": 2, **overrides}
    torch.manual_seed(0)
    model = model_cls(config_cls(**kwargs)).eval()
    model.save_pretrained(path)
    # borrow the embedded model's tokenizer (same vocabulary size); PAGEDLLM_TEST_TOKENIZER names a folder holding
    # just its files, for machines without the embedded model's package (benchmarks/gpu/run.sh)
    source = os.environ.get("PAGEDLLM_TEST_TOKENIZER") or resolve_model(None)
    for name in os.listdir(source):
        if name.startswith("tokenizer") or name.endswith(".jinja"):
            shutil.copy(os.path.join(source, name), path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return {
        "qwen3": _save_tiny(str(root / "qwen3"), "qwen3"),
        "llama": _save_tiny(str(root / "llama"), "llama", tie_word_embeddings=True),
        "qwen2": _save_tiny(str(root / "qwen2"), "qwen2", num_key_value_heads=1),
    }
