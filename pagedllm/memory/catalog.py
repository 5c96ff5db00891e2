"""Built-in configs for the Qwen3 family (the brief's example), so `pagedllm plan qwen3-1.7b` needs no files."""

from __future__ import annotations

# (hidden, layers, heads, kv_heads, intermediate, tied embeddings); all: head_dim 128, vocab 151936
_QWEN3 = {
    "qwen3-0.6b": (1024, 28, 16, 8, 3072, True),
    "qwen3-1.7b": (2048, 28, 16, 8, 6144, True),
    "qwen3-4b": (2560, 36, 32, 8, 9728, True),
    "qwen3-8b": (4096, 36, 32, 8, 12288, False),
    "qwen3-14b": (5120, 40, 40, 8, 17408, False),
    "qwen3-32b": (5120, 64, 64, 8, 25600, False),
}


def builtin_config(name: str) -> dict | None:
    spec = _QWEN3.get(name.lower())
    if spec is None:
        return None
    hidden, layers, heads, kv_heads, inter, tied = spec
    return {
        "model_type": "qwen3", "vocab_size": 151936, "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": 128, "intermediate_size": inter,
        "tie_word_embeddings": tied, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
        "dtype": "bfloat16", "eos_token_id": 151645,
    }


BUILTIN_NAMES = tuple(_QWEN3)
