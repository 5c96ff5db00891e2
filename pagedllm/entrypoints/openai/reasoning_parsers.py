"""Reasoning parsers (vLLM's --reasoning-parser): split a thinking model's output into its reasoning and its answer.

The split works on text, so tags that the tokenizer cuts into several tokens are no problem, and on the whole
output so far, so streaming and non-streaming agree: each stream chunk sends what the split of the longer text
adds. A partial tag at the end of the text is held back until the next token decides it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReasoningSplit:
    reasoning: str | None  # None: the output has no reasoning part
    content: str | None  # None: the answer has not started (the thinking never closed, or is still going)


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that begins `tag` (and could become it)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningParser:
    start, end = "<think>", "</think>"
    starts_in_reasoning = False  # the template pre-fills the start tag (DeepSeek-R1): the output begins inside it

    def __init__(self, prompt: str | None = None):
        # a prompt that ends inside an open thinking block (Qwen3 thinking-only templates pre-fill "<think>")
        self.prefilled = self.starts_in_reasoning or (prompt or "").rstrip().endswith(self.start)

    def split(self, text: str, final: bool = True) -> ReasoningSplit:
        """The output so far as reasoning and content; with final=False a tail that may be the start of a tag is
        left out of both."""
        inside = self.prefilled
        body = text
        if not inside:
            stripped = text.lstrip()
            if stripped.startswith(self.start):
                inside, body = True, stripped[len(self.start):]
            elif not final and self.start.startswith(stripped):
                return ReasoningSplit(None, None)  # may still become the start tag
        if not inside:
            return ReasoningSplit(None, text)
        if self.end in body:
            reasoning, content = body.split(self.end, 1)
            return ReasoningSplit(reasoning.lstrip("\n"), content.lstrip("\n"))
        if not final:
            body = body[:len(body) - partial_suffix(body, self.end)]
        return ReasoningSplit(body.lstrip("\n"), None)


class Qwen3ReasoningParser(ReasoningParser):
    """Qwen3: `<think>...</think>` opens the output unless the prompt turned thinking off (enable_thinking=False
    pre-fills an empty block in the prompt, so the output is all answer)."""


class DeepSeekR1ReasoningParser(ReasoningParser):
    """DeepSeek-R1: the template opens the thinking block, so everything before `</think>` is reasoning (all of
    it, if the block never closes)."""

    starts_in_reasoning = True


REASONING_PARSERS = {"qwen3": Qwen3ReasoningParser, "deepseek_r1": DeepSeekR1ReasoningParser}


class ReasoningStream:
    """Deltas of reasoning and content as the output grows."""

    def __init__(self, parser: ReasoningParser):
        self.parser = parser
        self.sent_reasoning = self.sent_content = 0

    def update(self, text: str, final: bool) -> tuple[str, str]:
        split = self.parser.split(text, final)
        reasoning, content = split.reasoning or "", split.content or ""
        delta = reasoning[self.sent_reasoning:], content[self.sent_content:]
        self.sent_reasoning, self.sent_content = len(reasoning), len(content)
        return delta
