"""How many KV blocks the pool gets, decided at start-up and said in the log.

An explicit --num-gpu-blocks-override wins. On CUDA every rank profiles one forward pass of the
largest step (max_num_batched_tokens) and what is left of its memory x gpu_memory_utilization after
weights and peak activations becomes blocks; the pool is the smallest over ranks. On the CPU,
--kv-cache-memory or a documented default. Blocks are sized with the memory planner's exact
per-token formula (for the pipeline stage holding the most layers: every stage holds as many blocks).
"""

from __future__ import annotations

import logging

from pagedllm.config import EngineConfig
from pagedllm.executor.abstract import Executor
from pagedllm.memory.kv_sizing import cpu_default_kv_budget, kv_bytes_per_token
from pagedllm.memory.units import format_bytes
from pagedllm.step import StepInputs

logger = logging.getLogger("pagedllm")


def profile_step(config: EngineConfig) -> tuple[StepInputs, int]:
    """The largest step the scheduler can build (its token budget as prompts of at most max_model_len tokens),
    over scratch blocks; and how many blocks that takes."""
    budget, max_len, bs = config.scheduler.max_num_batched_tokens, config.max_model_len, config.cache.block_size
    sizes = sorted(min(max_len, budget - i) for i in range(0, budget, max_len))
    tables, first = [], 0
    for n in sizes:
        tables.append(list(range(first, first + -(-n // bs))))
        first += len(tables[-1])
    last = [sum(sizes[:i + 1]) - 1 for i in range(len(sizes))]
    step = StepInputs.build([[0] * n for n in sizes], [0] * len(sizes), tables, sample_positions=last)
    return step, first


def determine_num_blocks(config: EngineConfig, executor: Executor, draft_bytes_per_token: int = 0) -> int:
    """`draft_bytes_per_token`: a draft model's KV per token; its pool has as many blocks as the target's and
    shares the budget with it."""
    cache, par, max_len = config.cache, config.parallel, config.max_model_len
    layers = max(end - start for start, end in par.stage_layers(config.model.num_layers))
    target_per_token = kv_bytes_per_token(config.model, cache.cache_dtype.itemsize, par.tensor_parallel_size, layers)
    per_token = target_per_token + draft_bytes_per_token
    per_block = per_token * cache.block_size
    weights = max(executor.weight_bytes())
    if cache.num_gpu_blocks_override is not None:
        num_blocks, source = cache.num_gpu_blocks_override, "--num-gpu-blocks-override"
    elif config.device.type == "cuda":
        peak, num_blocks = executor.profile(*profile_step(config))  # blocks of the target's pool alone
        num_blocks = num_blocks * target_per_token // per_token
        source = (f"each device's memory x {cache.gpu_memory_utilization} - weights - peak activations "
                  f"{format_bytes(peak)} (profiled), the fewest over {par.world_size} rank(s)")
    else:
        wanted = config.scheduler.max_num_seqs * max_len * per_token
        num_blocks = (cache.kv_cache_memory or cpu_default_kv_budget(wanted)) // per_block
        source = "--kv-cache-memory" if cache.kv_cache_memory else \
            "CPU default: min(4 GiB, 40% of free RAM, what max_num_seqs x max_model_len need)"
    tokens = num_blocks * cache.block_size
    logger.info("KV cache: %d blocks x %d tokens = %d tokens, %s (%s per token%s; weights %s; from %s); "
                "max concurrency at max_model_len %d: %.2f", num_blocks, cache.block_size, tokens,
                format_bytes(num_blocks * per_block), format_bytes(per_token),
                f", of which the draft model's {format_bytes(draft_bytes_per_token)}" if draft_bytes_per_token else "",
                format_bytes(weights), source, max_len, tokens / max_len)
    if tokens < max_len:
        need = -(-max_len // cache.block_size)
        if cache.num_gpu_blocks_override is not None:
            more = f"--num-gpu-blocks-override {need}"
        elif config.device.type == "cuda":
            more = "a higher --gpu-memory-utilization, a smaller --max-num-batched-tokens, or --tensor-parallel-size 2"
        else:
            more = f"--kv-cache-memory {format_bytes(need * per_block).replace(' ', '')} or more"
        raise ValueError(
            f"the KV cache holds {tokens} tokens ({num_blocks} blocks of {cache.block_size}, "
            f"{format_bytes(num_blocks * per_block)}) but one sequence of max_model_len={max_len} "
            f"needs {need} blocks ({format_bytes(need * per_block)} at {format_bytes(per_token)} per token). "
            f"Fix: lower --max-model-len to at most {tokens}, or give the cache more room: {more}"
        )
    return num_blocks
