"""What one engine step hands to the model side and gets back: plain tensors and ints, no engine objects.

The engine builds StepInputs (which tokens to compute, where their K/V go) and SamplingMetadata
(how to pick each sampled row's token); the executor carries them to the workers and returns a
SamplerOutput. StepInputs is all a tensor-parallel worker or pipeline stage needs to run the step,
so it travels as one flat int64 tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepInputs:
    token_ids: torch.Tensor  # [T] the tokens to compute, sequence after sequence
    starts: torch.Tensor  # [B] tokens each sequence had computed before this step
    lens: torch.Tensor  # [B] tokens each sequence computes now
    tables: torch.Tensor  # [B, W] block tables, padded with block 0
    copies: torch.Tensor  # [C, 2] (src, dst) block copies to make first (copy-on-write)
    # [S] positions in token_ids whose next token is sampled: a row's last token (repeated for n samples), or each
    # of a speculating row's last k + 1 tokens (its last verified token and its k proposals)
    sample_positions: torch.Tensor
    # [P, 3] rows whose prompt tokens' logprobs are wanted: (batch row, top k, the prompt token after the chunk or -1)
    prompt_logprobs: torch.Tensor

    @classmethod
    def build(cls, chunks: list[list[int]], starts: list[int], tables: list[list[int]],
              copies: list[tuple[int, int]] = (), sample_positions: list[int] = (),
              prompt_logprobs: list[tuple[int, int, int]] = ()) -> StepInputs:
        """One row per sequence: the token ids it computes now, how many it had computed, its block table. Rows hold
        decodes (one new token) first, by context length, then prompt chunks by length (see forward_context.py)."""
        width = max(len(t) for t in tables)
        return cls(
            token_ids=torch.tensor([t for chunk in chunks for t in chunk], dtype=torch.long),
            starts=torch.tensor(starts, dtype=torch.long),
            lens=torch.tensor([len(c) for c in chunks], dtype=torch.long),
            tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long),
            copies=torch.tensor(list(copies), dtype=torch.long).view(-1, 2),
            sample_positions=torch.tensor(list(sample_positions), dtype=torch.long),
            prompt_logprobs=torch.tensor(list(prompt_logprobs), dtype=torch.long).view(-1, 3),
        )

    @property
    def decodes_only(self) -> bool:
        """Every row computes one token (no prompt chunk, no verifying chunk)."""
        return len(self.token_ids) == len(self.lens)

    def next_decode(self, sampled: torch.Tensor) -> StepInputs:
        """The step after a step of decodes that sampled each row once (multi-step scheduling): each row computes the
        token it just sampled, in the slots its block table already holds."""
        return StepInputs(sampled.to(self.token_ids.device, torch.long), self.starts + 1, self.lens, self.tables,
                          self.copies[:0], self.sample_positions, self.prompt_logprobs)

    def pack(self) -> torch.Tensor:
        header = torch.tensor([len(self.token_ids), len(self.lens), self.tables.shape[1], len(self.copies),
                               len(self.sample_positions), len(self.prompt_logprobs)])
        return torch.cat([header, self.token_ids, self.starts, self.lens, self.tables.reshape(-1), self.copies.reshape(-1),
                          self.sample_positions, self.prompt_logprobs.reshape(-1)])

    @classmethod
    def unpack(cls, flat: torch.Tensor) -> StepInputs:
        t, b, w, c, s, p = flat[:6].tolist()
        parts = flat[6:].split([t, b, b, b * w, 2 * c, s, 3 * p])
        return cls(parts[0], parts[1], parts[2], parts[3].view(b, w), parts[4].view(c, 2), parts[5], parts[6].view(p, 3))


@dataclass
class SamplingMetadata:
    """One row per sampled sequence; optional parts are None when no row uses them."""

    temperature: torch.Tensor  # [B], 1.0 on greedy rows
    greedy: torch.Tensor  # [B] bool
    all_greedy: bool
    top_k: torch.Tensor | None  # [B] long, vocab size where off
    top_p: torch.Tensor | None
    min_p: torch.Tensor | None
    presence: torch.Tensor | None
    frequency: torch.Tensor | None
    repetition: torch.Tensor | None
    output_tokens: torch.Tensor | None  # [B, L] padded with vocab_size
    prompt_tokens: torch.Tensor | None
    banned: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids) masked out (min_tokens)
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (rows, token ids, values) added (logit_bias)
    allowed: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids): those rows keep only these tokens
    guided: tuple[torch.Tensor, torch.Tensor] | None  # (rows, [rows, vocab] allowed by their structured output)
    generators: dict[int, torch.Generator]  # seeded rows' own noise sources
    num_logprobs: int  # max top-k logprobs any row wants; -1 for none
    # speculative decoding: (the proposal each row verifies, -1 on a sequence's last row; each row's sequence's
    # first row), or None when no row speculates
    spec: tuple[torch.Tensor, torch.Tensor] | None = None
    spec_probs: torch.Tensor | None = None  # [rows, vocab] a draft model's q for each proposal (None: certain ones)


@dataclass
class PromptLogprobs:
    """Logprobs of prompt tokens, for the rows of StepInputs.prompt_logprobs in order: row i's positions are
    `counts[i]` consecutive entries."""

    counts: list[int]
    token_logprobs: torch.Tensor  # [N] each prompt token's logprob given the tokens before it
    ranks: torch.Tensor  # [N]
    top_ids: torch.Tensor  # [N, K]
    top_logprobs: torch.Tensor  # [N, K]


@dataclass
class StepOutput:
    """What the executor returns for a step: the sampled rows' tokens and any prompt logprobs."""

    sampled: SamplerOutput | None = None
    prompt_logprobs: PromptLogprobs | None = None


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B]
    logprobs: torch.Tensor | None  # [B] logprob of the sampled token
    top_ids: torch.Tensor | None  # [B, K]
    top_logprobs: torch.Tensor | None  # [B, K]
    ranks: torch.Tensor | None  # [B] rank of the sampled token (1 = most likely)
