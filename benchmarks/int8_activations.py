"""One request's decode speed of the embedded GGUF model with int8 activations (the default on CPUs with
AVX512-VNNI) against bf16 activations (PAGEDLLM_INT8_ACTIVATIONS=0): two engines in one process, a 128-token
prompt and 128 output tokens each, in alternating order.

    .venv/bin/python benchmarks/int8_activations.py [--pairs 6]
"""

import argparse
import os

from pagedllm import LLM, SamplingParams

PROMPT = [{"prompt_token_ids": list(range(100, 228))}]


def decode_rate(llm: LLM) -> float:
    llm.generate(PROMPT, SamplingParams(max_tokens=1), use_tqdm=False)  # the prompt's blocks cached
    metrics = llm.generate(PROMPT, SamplingParams(max_tokens=128, ignore_eos=True, temperature=0),
                           use_tqdm=False)[0].metrics
    return 127 / (metrics.last_token_time - metrics.first_token_time)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pairs", type=int, default=6)
    ns = p.parse_args()
    engines = {}
    for setting in ("auto", "0"):
        os.environ["PAGEDLLM_INT8_ACTIVATIONS"] = setting  # read when the engine loads its weights
        engines[setting] = LLM(max_model_len=1024, kv_cache_memory=256 << 20)
    for i in range(ns.pairs):
        rates = {s: decode_rate(engines[s]) for s in (("auto", "0") if i % 2 == 0 else ("0", "auto"))}
        print(f"int8 activations {rates['auto']:.1f} tok/s, bf16 activations {rates['0']:.1f}: "
              f"{rates['auto'] / rates['0']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
