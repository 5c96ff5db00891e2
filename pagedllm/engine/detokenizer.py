"""Incremental detokenization and stop-string handling.

Decoding a growing token list one token at a time can split a multi-byte UTF-8 character or a
merged word piece; text is only released once the decoded tail is stable (no trailing U+FFFD).
"""

from __future__ import annotations

from pagedllm.engine.sequence import Sequence

_CONTEXT_TOKENS = 6  # tokens re-decoded before the new ones so spaces and merges come out right


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def update(self, seq: Sequence, final: bool = False) -> str:
        """Append the newly stable text of `seq`'s output to seq.detok.text; return that delta.
        `final` releases whatever is left, even an incomplete character."""
        st, ids = seq.detok, seq.output_token_ids
        skip = seq.params.skip_special_tokens
        prefix_text = self.decode(ids[st.prefix_offset:st.read_offset], skip)
        full_text = self.decode(ids[st.prefix_offset:], skip)
        if len(full_text) <= len(prefix_text) or (full_text.endswith("\ufffd") and not final):
            return ""
        delta = full_text[len(prefix_text):]
        st.text += delta
        st.read_offset = len(ids)
        st.prefix_offset = max(st.prefix_offset, st.read_offset - _CONTEXT_TOKENS)
        return delta


def find_stop(text: str, new_chars: int, stops: list[str]) -> tuple[int, str] | None:
    """Earliest stop string that ends inside the last `new_chars` characters: (its start, the string)."""
    best = None
    for stop in stops:
        start = max(0, len(text) - new_chars - len(stop) + 1)
        pos = text.find(stop, start)
        if pos != -1 and (best is None or pos < best[0]):
            best = (pos, stop)
    return best
