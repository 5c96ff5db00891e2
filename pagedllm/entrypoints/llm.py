"""The offline API, as vLLM users know it: `LLM(model).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

from collections.abc import Sequence as Seq

from tqdm import tqdm

from pagedllm.engine.arg_utils import EngineArgs, engine_kwargs
from pagedllm.engine.chat_template import ChatOptions
from pagedllm.engine.factory import create_engine
from pagedllm.engine.input_processor import PromptType
from pagedllm.engine.protocol import EngineClient
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams

Messages = list[dict]


class LLM:
    """Release what an engine holds (worker processes, process groups, the KV pool) with `shutdown()`, a `with`
    block, or by dropping the last reference; then another engine, of any parallelism, can be built."""

    def __init__(self, model: str | None = None, **kwargs):
        self.engine: EngineClient = create_engine(EngineArgs(model=model, **engine_kwargs(kwargs)))

    def get_default_sampling_params(self) -> SamplingParams:
        """What generate() and chat() use when given no SamplingParams: the model's generation config
        (generation_config="auto") over vLLM's defaults."""
        return self.engine.processor.default_sampling_params()

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_stats(self) -> list:
        """[(labels, EngineStats)]: one entry, or one per data-parallel replica. Counters (tokens, prefix-cache
        queries and hits, preemptions) are totals since the engine started."""
        return self.engine.stats()

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (on every data-parallel replica)."""
        self.engine.reset_prefix_cache()

    def generate(
        self,
        prompts: PromptType | Seq[PromptType],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or self.get_default_sampling_params()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        return self._run([(p, sp) for p, sp in zip(prompts, params)], use_tqdm)

    def chat(
        self,
        messages: Messages | list[Messages],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template: str | None = None,
        chat_template_kwargs: dict | None = None,
        tools: list[dict] | None = None,
    ) -> list[RequestOutput]:
        """One conversation or several, through the model's chat template (or `chat_template`); `tools` and
        `chat_template_kwargs` (e.g. {"enable_thinking": False} for Qwen3) reach the template."""
        options = ChatOptions(add_generation_prompt, continue_final_message, chat_template,
                              chat_template_kwargs or {}, tools)
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.engine.processor.chat_prompt(c, options) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, work: list[tuple[PromptType, SamplingParams]], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.engine
        prompt0, gen0 = engine.num_prompt_tokens, engine.num_generation_tokens
        ids = []
        try:
            for prompt, sp in work:
                ids.append(engine.add_request(prompt, sp))
        except Exception:
            for rid in ids:
                engine.abort_request(rid)
            raise
        order = {rid: i for i, rid in enumerate(ids)}
        results: list[RequestOutput | None] = [None] * len(ids)
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        try:
            while any(r is None for r in results):
                for out in engine.step():
                    if out.finished and out.request_id in order:
                        results[order[out.request_id]] = out
                        bar.update(1)
                elapsed = bar.format_dict["elapsed"] or 1e-9
                bar.set_postfix_str(f"in: {(engine.num_prompt_tokens - prompt0) / elapsed:.0f} tok/s, "
                                    f"out: {(engine.num_generation_tokens - gen0) / elapsed:.0f} tok/s", refresh=False)
                if not engine.has_unfinished_requests() and any(r is None for r in results):
                    raise RuntimeError("the engine stopped with requests unanswered")
        finally:
            bar.close()
            for rid in ids:
                engine.abort_request(rid)
        return results
