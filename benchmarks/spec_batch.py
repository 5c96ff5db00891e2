"""At what batch size ngram speculation stops paying (what `disable_by_batch_size` should be): B copies of the
typo-fixing conversation decoded together, with speculation (never disabled) and without, in alternation in one
process, for each B. Prints output tokens/s and the speed-up per B.

    .venv/bin/python benchmarks/spec_batch.py [--dtype bfloat16]
"""

import argparse
import time

from pagedllm import LLM, SamplingParams

TEXT = ("Fix the typos in this paragraph and write it out again: The quick brwon fox jumpd over the lazy dog. It was a "
        "sunny day and the fox was very hapy. The dog did not care at all, it just slept in the sun all afternon. Later "
        "that evening the farmer came home and fed both of them, and they all went to sleep in the old barn behind the "
        "house.")


def rate(llm: LLM, batch: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=256)
    start = time.perf_counter()
    outs = llm.chat([[{"role": "user", "content": TEXT}]] * batch, params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8])
    ns = p.parse_args()
    spec = {"method": "ngram", "num_speculative_tokens": 3, "disable_by_batch_size": None}
    on = LLM(dtype=ns.dtype, max_model_len=1024, speculative_config=spec)
    off = LLM(dtype=ns.dtype, max_model_len=1024)
    for llm in (on, off):
        rate(llm, 1)
    for batch in ns.batches:
        a1, b1, b2, a2 = rate(on, batch), rate(off, batch), rate(off, batch), rate(on, batch)
        print(f"batch {batch}: with ngram {a1:.1f}, {a2:.1f} tok/s; without {b1:.1f}, {b2:.1f}: "
              f"speed-up {a1 / b1:.2f}x, {a2 / b2:.2f}x")


if __name__ == "__main__":
    main()
