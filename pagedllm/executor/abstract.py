"""What the engine may do with the model: every operation goes through an executor, which runs it on every rank
that must take part (a collective never runs on one rank alone)."""

from __future__ import annotations

import torch

from pagedllm.step import PromptLogprobs, SamplingMetadata, StepInputs, StepOutput
from pagedllm.worker.worker import Worker


class WorkerDiedError(RuntimeError):
    """A rank of the replica is gone: nothing can run any more."""


class Executor:
    driver: Worker  # rank 0, in this process: it also samples

    def submit(self, step: StepInputs):
        """Start a step; the handle goes to collect(). With a pipeline several steps may be in flight."""
        raise NotImplementedError

    def _results(self, flight) -> tuple[torch.Tensor | None, PromptLogprobs | None]:
        """The last stage's (logits of the sampled rows, prompt logprobs) of a step in flight."""
        raise NotImplementedError

    def collect(self, flight, sampling: SamplingMetadata | None) -> StepOutput:
        """Finish a step: the sampled rows' tokens (when it sampled any) and prompt logprobs (when asked for)."""
        logits, prompt = self._results(flight)
        sampled = self.driver.sample(logits, sampling) if logits is not None and sampling is not None else None
        return StepOutput(sampled, prompt)

    def propose(self, step: StepInputs, sampling: SamplingMetadata) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A draft model's step: its proposals for the sampled rows and their distributions (Sampler.propose)."""
        logits, _ = self._results(self.submit(step))
        return self.driver.sampler.propose(logits, sampling)

    def collective_rpc(self, method: str, *args, reply: bool = True) -> list:
        """Call Worker.method(*args) on every rank; their results, rank 0's first (only rank 0's without reply)."""
        raise NotImplementedError

    def weight_bytes(self) -> list[int]:
        return self.collective_rpc("weight_bytes")

    def allocate_kv_cache(self, num_blocks: int) -> list[int]:
        """Every rank allocates its pool of num_blocks; the bytes each took."""
        return self.collective_rpc("allocate_kv_cache", num_blocks)

    def profile(self, step: StepInputs, scratch_blocks: int) -> tuple[int, int]:
        """Run `step` (the largest a step can be) through every rank and return (the largest peak of activations, the
        fewest KV blocks that fit on any rank) from CUDA's memory statistics."""
        self.collective_rpc("begin_profile", scratch_blocks)
        self.collect(self.submit(step), None)
        results = self.collective_rpc("end_profile")
        return max(peak for peak, _ in results), min(blocks for _, blocks in results)

    def score(self, step: StepInputs) -> torch.Tensor:
        """Logits at every position of the step's tokens (fp32)."""
        return self.collective_rpc("score", step, reply=False)[0]

    def check_health(self) -> None:
        pass

    def shutdown(self) -> None:
        pass
