"""One engine, or data-parallel replicas of it behind the same protocol, from one resolved configuration."""

from __future__ import annotations

from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.engine.data_parallel import DataParallelEngine
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.engine.protocol import EngineClient


def create_engine(args: EngineArgs) -> EngineClient:
    config = args.create_engine_config()
    if config.parallel.data_parallel_size > 1:
        return DataParallelEngine(config)
    return LLMEngine(config)
