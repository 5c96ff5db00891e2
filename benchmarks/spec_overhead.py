"""What ngram speculation adds to W1: the time spent in the speculator (proposals, verification accounting) during
the workload, against the whole run. Timing the run with and without it cannot show a 5 % difference on this VM
(its bandwidth moves by more within a minute), but the speculator's own time can be measured directly.

    .venv/bin/python benchmarks/spec_overhead.py
"""

import argparse
import collections
import time

from pagedllm import LLM, SamplingParams
from pagedllm.benchmarks.workloads import make_workload


def main() -> None:
    spent = collections.Counter()
    llm = LLM(max_model_len=1024, speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    speculator = llm.engine.speculator
    for name in ("prepare", "fill", "row_probs", "settle"):
        method = getattr(speculator, name)

        def timed(*args, _method=method, _name=name, **kwargs):
            start = time.perf_counter()
            result = _method(*args, **kwargs)
            spent[_name] += time.perf_counter() - start
            return result

        setattr(speculator, name, timed)
    w1 = argparse.Namespace(num_prompts=64, input_len=[32, 512], output_len=[128, 128], shared_prefix_len=0,
                            workload_seed=0)
    w = make_workload(w1, llm.engine.config.model.vocab_size)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in w.output_lens]
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in w.prompts], params, use_tqdm=False)
    total = time.perf_counter() - start
    stats = llm.engine.stats()[0][1]
    print(f"W1 with ngram speculation: {total:.2f} s, {stats.spec_decode_num_drafts} verifying steps; in the "
          f"speculator {1e3 * sum(spent.values()):.1f} ms ({100 * sum(spent.values()) / total:.3f} % of the run): "
          + ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in spent.items()))


if __name__ == "__main__":
    main()
