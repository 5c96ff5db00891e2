"""One engine, or data-parallel replicas of it behind the same interface."""

from __future__ import annotations

from pagedllm.config import EngineArgs


def create_engine(args: EngineArgs):
    if args.data_parallel_size > 1:
        from pagedllm.distributed.data_parallel import DataParallelEngine

        return DataParallelEngine(args)
    from pagedllm.engine.llm_engine import LLMEngine

    return LLMEngine(args)
