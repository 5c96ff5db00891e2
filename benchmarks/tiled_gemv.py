"""The embedded model's decode GEMVs on its own weights, tiled (int8 activations, kernels/csrc/quant_gemv_tiled.h)
against untiled copies (bf16 activations), both on 2 MiB pages, in alternation in one process: the 30 layers' qkv,
o, gate_up and down projections (120 calls) and the Q8_0 LM head, at 1 and 4 rows (a decode; speculation's
verifying step at k = 3).

    .venv/bin/python benchmarks/tiled_gemv.py [--rows 1 4] [--repeats 4]
"""

import argparse
import time

import torch

from pagedllm import LLM, kernels
from pagedllm.layers import quantization as quant
from pagedllm.platform import move_to_huge_pages


def untiled_copies(weights: list[tuple]) -> list[tuple]:
    holder = torch.nn.Module()
    for i, tensors in enumerate(weights):
        for j, t in enumerate(quant.untile(*tensors)):
            if t is not None:
                holder.register_parameter(f"w{i}_{j}", torch.nn.Parameter(t.contiguous(), requires_grad=False))
    move_to_huge_pages(holder)
    return [tuple(getattr(holder, f"w{i}_{j}", None) for j in range(3)) for i in range(len(weights))]


def ms_per_pass(weights: list[tuple], x: dict[int, torch.Tensor], passes: int = 20) -> float:
    start = time.perf_counter()
    for _ in range(passes):
        for values, scale, offset in weights:
            kernels.linear(x[scale.shape[1] * 32], values, None, scale, offset)
    return (time.perf_counter() - start) / passes * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    p.add_argument("--repeats", type=int, default=4)
    ns = p.parse_args()
    with LLM(max_model_len=256) as llm:
        model = llm.engine.executor.driver.runner.model
        if model.lm_head.weight.dim() != 3:
            raise SystemExit("the weights are not tiled here (no AVX512-VNNI, or PAGEDLLM_INT8_ACTIVATIONS=0)")
        modules = [m for layer in model.model.layers
                   for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)]
        tiled = [(m.weight, m.weight_scale, getattr(m, "weight_offset", None)) for m in [*modules, model.lm_head]]
        plain = untiled_copies(tiled)
        for rows in ns.rows:
            x = {k: torch.randn(rows, k).bfloat16() for k in {s.shape[1] * 32 for _, s, _ in tiled}}
            for _ in range(ns.repeats):
                times = {name: (ms_per_pass(w[:-1], x), ms_per_pass(w[-1:], x)) for name, w in
                         (("untiled", plain), ("tiled", tiled))}
                print(f"{rows} row(s): layers {times['untiled'][0]:.2f} -> {times['tiled'][0]:.2f} ms, "
                      f"LM head {times['untiled'][1]:.2f} -> {times['tiled'][1]:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
