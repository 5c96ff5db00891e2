"""Batched sampling: guided-decoding masks, allowed tokens, logit bias, penalties, temperature, top-k / top-p /
min-p, seeds and logprobs, all on tensors.

Sampling uses the exponential-race trick (argmax of p / q with q ~ Exp(1)), which draws from p
exactly and lets a seeded request supply its own noise row from its own generator, so its output
does not depend on what else is in the batch.
"""

from __future__ import annotations

import torch

from pagedllm import kernels
from pagedllm.step import SamplerOutput, SamplingMetadata


def _token_counts(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    counts = torch.zeros(tokens.shape[0], vocab_size + 1, dtype=torch.float32, device=tokens.device)
    counts.scatter_add_(1, tokens, torch.ones_like(tokens, dtype=torch.float32))
    return counts[:, :vocab_size]


def argmax(x: torch.Tensor) -> torch.Tensor:
    """Index of each row's maximum (the first, on ties, as argmax). On the CPU the native kernel: torch's max over a
    row does not vectorise there (one 49k-vocabulary row from Python: 44 us, its argmax 160 us, the kernel 7-9 us)."""
    if x.dim() == 2 and kernels.native_ops_enabled(x.device, x.dtype):
        return kernels.argmax(x)
    return x.max(-1).indices


def apply_penalties(logits: torch.Tensor, m: SamplingMetadata) -> torch.Tensor:
    vocab = logits.shape[1]
    out_counts = _token_counts(m.output_tokens, vocab)
    seen = (out_counts > 0) | (_token_counts(m.prompt_tokens, vocab) > 0)
    rep = m.repetition.unsqueeze(1)
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - m.frequency.unsqueeze(1) * out_counts
    return logits - m.presence.unsqueeze(1) * (out_counts > 0).float()


def apply_allowed_and_bias(logits: torch.Tensor, m: SamplingMetadata) -> torch.Tensor:
    """Rows with allowed_token_ids or guided decoding keep only the tokens these allow; logit_bias is added to its
    tokens' logits."""
    if m.guided is not None:
        rows, mask = m.guided
        logits = logits.index_put((rows,), logits[rows].masked_fill(~mask, float("-inf")))
    if m.allowed is not None:
        rows, ids = m.allowed
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep[rows, ids] = True
        restricted = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        restricted[rows] = True
        logits = logits.masked_fill(restricted.unsqueeze(1) & ~keep, float("-inf"))
    if m.bias is not None:
        rows, ids, values = m.bias
        logits = logits.index_put((rows, ids), values.to(logits.dtype), accumulate=True)
    return logits


def apply_top_k_top_p_min_p(logits: torch.Tensor, m: SamplingMetadata) -> torch.Tensor:
    """Mask (to -inf) every token outside the rows' top-k, top-p nucleus and min-p floor."""
    if m.min_p is not None:
        probs = logits.softmax(-1)
        floor = m.min_p.unsqueeze(1) * probs.max(-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    if m.top_k is None and m.top_p is None:
        return logits
    sorted_logits, order = logits.sort(-1, descending=True)
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if m.top_k is not None:
        drop |= torch.arange(logits.shape[1], device=logits.device).unsqueeze(0) >= m.top_k.unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    if m.top_p is not None:
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens; the top token always stays
        drop |= before >= m.top_p.unsqueeze(1)
    return logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))


def _probs(logits: torch.Tensor, m: SamplingMetadata) -> torch.Tensor:
    """The rows' sampling distributions: temperature, then top-k / top-p / min-p."""
    return apply_top_k_top_p_min_p(logits / m.temperature.unsqueeze(1), m).softmax(-1)


class Sampler:
    def __init__(self, seed: int = 0):
        self.generator: torch.Generator | None = None
        self.seed = seed

    def __call__(self, logits: torch.Tensor, m: SamplingMetadata) -> SamplerOutput:
        if m.num_logprobs >= 0 or m.presence is not None or m.bias is not None or not m.all_greedy:
            logits = logits.float()  # plain greedy needs only the argmax, the same in the model's dtype
        raw_logprobs = logits.log_softmax(-1) if m.num_logprobs >= 0 else None
        if m.allowed is not None or m.bias is not None or m.guided is not None:  # before the penalties, as vLLM
            logits = apply_allowed_and_bias(logits, m)
        if m.presence is not None:
            logits = apply_penalties(logits, m)
        if m.banned is not None:
            logits[m.banned] = float("-inf")
        probs = None if m.all_greedy else _probs(logits, m)
        if m.spec is not None:
            tokens = self._verify(logits, probs, m)
        else:
            tokens = argmax(logits)
            if probs is not None:
                tokens = torch.where(m.greedy, tokens, self._race(probs, m))
        return self._with_logprobs(tokens, raw_logprobs, m.num_logprobs)

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.seed)
        return self.generator

    def _race(self, probs: torch.Tensor, m: SamplingMetadata) -> torch.Tensor:
        """One token per row drawn from probs."""
        noise = torch.empty_like(probs).exponential_(generator=self._generator(probs.device))
        for row, gen in m.generators.items():  # only seeded rows
            noise[row] = torch.empty(probs.shape[1]).exponential_(generator=gen).to(probs.device)
        return argmax(probs / noise)

    def propose(self, logits: torch.Tensor, m: SamplingMetadata) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A draft model's proposals: the argmax on greedy rows, else a draw from its distribution q (after the
        request's temperature / top-k / top-p / min-p, as the target's), returned with q for verification."""
        tokens = argmax(logits)
        if m.all_greedy:
            return tokens, None
        q = _probs(logits.float(), m)
        return torch.where(m.greedy, tokens, self._race(q, m)), q

    def _verify(self, logits: torch.Tensor, probs: torch.Tensor | None, m: SamplingMetadata) -> torch.Tensor:
        """Speculative rows: row r of a sequence proposed draft d (or -1 on its last row). A greedy row accepts d if
        it is the argmax. A random one accepts it with probability min(1, p(d) / q(d)), q being the proposer's
        distribution (a draft model's; n-gram proposals are certain: q(d) = 1), else draws from max(0, p - q):
        rejection sampling, so the output keeps exactly the target distribution. A row emits d if accepted, else
        its own token; rows after a sequence's first non-accepted row emit -1."""
        drafts, first = m.spec
        has_draft = drafts >= 0
        d = drafts.clamp(min=0)
        tokens = argmax(logits)
        accepted = tokens == d
        if probs is not None:
            q = m.spec_probs if m.spec_probs is not None else torch.zeros_like(probs).scatter_(1, d[:, None], 1.0)
            p_d, q_d = probs.gather(1, d[:, None]).squeeze(1), q.gather(1, d[:, None]).squeeze(1)
            u = torch.rand(p_d.shape, generator=self._generator(p_d.device), device=p_d.device)
            residual = torch.where(has_draft[:, None], (probs - q).clamp_(min=0), probs)
            tokens = torch.where(m.greedy, tokens, self._race(residual, m))
            accepted = torch.where(m.greedy, accepted, u * q_d < p_d)
        accepted &= has_draft
        tokens = torch.where(accepted, d, tokens)
        stops = (~accepted).long()  # a sequence's rows end at its first row that is not an accepted proposal
        before = stops.cumsum(0) - stops
        return torch.where(before == before[first], tokens, -1)

    @staticmethod
    def _with_logprobs(tokens: torch.Tensor, logprobs: torch.Tensor | None, k: int) -> SamplerOutput:
        if logprobs is None:
            return SamplerOutput(tokens, None, None, None, None)
        chosen = logprobs.gather(1, tokens.clamp(min=0).unsqueeze(1)).squeeze(1)  # -1: a rejected proposal's row
        ranks = (logprobs > chosen.unsqueeze(1)).sum(-1) + 1
        top = logprobs.topk(k, dim=-1) if k > 0 else None
        return SamplerOutput(tokens, chosen, top.indices if top else None, top.values if top else None, ranks)
