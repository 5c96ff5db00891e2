"""The whole model in the engine's process."""

from __future__ import annotations

from pagedllm.config import EngineConfig
from pagedllm.executor.abstract import Executor
from pagedllm.step import StepInputs
from pagedllm.worker.worker import Worker


class UniProcExecutor(Executor):
    def __init__(self, config: EngineConfig):
        self.driver = Worker(config, 0)

    def submit(self, step: StepInputs) -> tuple:
        """Without a pipeline a step runs to the end at once; its handle is its results."""
        return self.driver.execute_step(step)

    def _results(self, flight: tuple) -> tuple:
        return flight

    def collective_rpc(self, method: str, *args, reply: bool = True) -> list:
        return [getattr(self.driver, method)(*args)]

    def shutdown(self) -> None:
        self.driver = None  # the model and its KV pool go with it
