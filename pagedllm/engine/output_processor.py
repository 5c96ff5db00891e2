"""Sampled tokens into sequences (logprobs, incremental text, stop conditions), and requests into RequestOutputs."""

from __future__ import annotations

import time
from collections.abc import Callable

from pagedllm.engine.detokenizer import Detokenizer, find_stop
from pagedllm.engine.sequence import Request, Sequence
from pagedllm.outputs import CompletionOutput, Logprob, RequestOutput
from pagedllm.step import PromptLogprobs, SamplerOutput


class OutputProcessor:
    """`finish(seq)` is called for each sequence that a token ends (the scheduler frees its blocks)."""

    def __init__(self, tokenizer, eos_token_ids: tuple[int, ...], max_model_len: int,
                 finish: Callable[[Sequence], None]):
        self.tokenizer = tokenizer
        self.detokenizer = Detokenizer(tokenizer) if tokenizer is not None else None
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.finish = finish

    def append_tokens(self, seqs: list[Sequence], result: SamplerOutput) -> int:
        """Row j of `result` is the next token of seqs[j] (a speculating sequence has consecutive rows, -1 after its
        first rejected proposal); returns how many tokens were appended (a sequence aborted while its batch was in
        flight, or ended by an earlier row, takes none)."""
        now = time.time()
        tokens = result.token_ids.tolist()
        lps = result.logprobs.tolist() if result.logprobs is not None else None
        appended = 0
        for j, (seq, token) in enumerate(zip(seqs, tokens)):
            if seq.is_finished or token < 0:
                continue
            guided = seq.guide is not None and token not in self.eos_token_ids
            if guided and not seq.guide.consume_token(token):
                # the constraint allowed nothing samplable (min_tokens banned the EOS that completes it): it ends here
                seq.finish_reason = "stop"
                self.finish(seq)
                continue
            seq.token_ids.append(token)
            appended += 1
            m = seq.request.metrics
            m.first_token_time = m.first_token_time or now
            m.last_token_time = now
            if lps is not None:
                seq.cumulative_logprob += lps[j]
                if seq.params.logprobs is not None:
                    k = seq.params.logprobs
                    top = (result.top_ids[j, :k].tolist(), result.top_logprobs[j, :k].tolist()) if k else ([], [])
                    seq.logprobs.append(self._logprob_entry(token, lps[j], int(result.ranks[j]), *top))
            self._check_stop(seq, token)
        return appended

    def append_prompt_logprobs(self, rows: list[tuple[Sequence, int]], result: PromptLogprobs) -> None:
        """Row i of the step's prompt-logprob rows scored `result.counts[i]` tokens from its chunk start + 1."""
        lps, ranks = result.token_logprobs.tolist(), result.ranks.tolist()
        top_ids, top_lps = result.top_ids.tolist(), result.top_logprobs.tolist()
        offset = 0
        for (seq, start), count in zip(rows, result.counts):
            logprobs, k = seq.request.prompt_logprobs, seq.params.prompt_logprobs
            # positions already there (a chunk computed again after preemption) or past the prompt are skipped
            for j in range(offset + max(0, len(logprobs) - start - 1), offset + min(count, seq.num_prompt_tokens - start - 1)):
                token = seq.token_ids[start + 1 + j - offset]
                logprobs.append(self._logprob_entry(token, lps[j], ranks[j], top_ids[j][:k], top_lps[j][:k]))
            offset += count

    def _logprob_entry(self, token: int, logprob: float, rank: int, top_ids: list[int],
                       top_logprobs: list[float]) -> dict[int, Logprob]:
        """The token's logprob and rank, and the top-k (most likely first) beside it."""
        entry = {token: Logprob(logprob, rank, self._piece(token))}
        for r, (tid, lp) in enumerate(zip(top_ids, top_logprobs), 1):
            entry.setdefault(tid, Logprob(lp, r, self._piece(tid)))
        return entry

    def _piece(self, token: int) -> str | None:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else None

    def _check_stop(self, seq: Sequence, token: int) -> None:
        p = seq.params
        delta = self.detokenizer.update(seq) if self.detokenizer else ""
        reason, stop_reason = None, None
        if seq.num_output_tokens > p.min_tokens or p.min_tokens == 0:
            if not p.ignore_eos and token in self.eos_token_ids:
                reason = "stop"
            elif token in p.stop_token_ids:
                reason, stop_reason = "stop", token
            elif p.stop_strings and delta:
                hit = find_stop(seq.detok.text, len(delta), p.stop_strings)
                if hit is not None:
                    pos, stop = hit
                    seq.detok.text = seq.detok.text[:pos + (len(stop) if p.include_stop_str_in_output else 0)]
                    reason, stop_reason = "stop", stop
        if reason is None and (seq.num_output_tokens >= (p.max_tokens or self.max_model_len)
                               or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            if self.detokenizer is not None and not isinstance(stop_reason, str):
                self.detokenizer.update(seq, final=True)
            seq.finish_reason, seq.stop_reason = reason, stop_reason
            self.finish(seq)

    @staticmethod
    def make_output(req: Request) -> RequestOutput:
        """The request as it stands. Text that could still be the start of a stop string is held back."""
        hold = max((len(s) for s in req.params.stop_strings), default=1) - 1
        completions = []
        for seq in sorted(req.seqs, key=lambda s: s.index):
            text = seq.detok.text
            if hold and not seq.is_finished:  # a stop string may still complete across this tail
                text = text[:max(0, len(text) - hold)]
            completions.append(CompletionOutput(
                index=seq.index, text=text, token_ids=seq.output_token_ids,
                cumulative_logprob=seq.cumulative_logprob if seq.params.logprobs is not None else None,
                logprobs=seq.logprobs if seq.params.logprobs is not None else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
            ))
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, completions,
                             req.is_finished or req.error is not None, req.metrics, req.num_cached_tokens, req.error,
                             req.prompt_logprobs)
