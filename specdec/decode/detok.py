"""Text of a growing token sequence, emitted piece by piece (the engine's and the server's
streaming text)."""

from __future__ import annotations

from collections.abc import Sequence


class IncrementalDetokenizer:
    """Text of a growing token sequence without re-decoding it all or re-tokenizing.

    Decodes a sliding window (the tokens since the last emitted text plus a few before them as
    context, so word-initial spaces and multi-byte characters come out right), emitting text
    only once it no longer ends in an incomplete character (U+FFFD).
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int], context: int = 5):
        self.tokenizer = tokenizer
        self.tokens = list(prompt_ids[-(context + 1) :])
        self.prefix_offset = max(len(self.tokens) - context, 0)
        self.read_offset = len(self.tokens)
        self.text = ""

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append one token; returns the new text (maybe "")."""
        self.tokens.append(token_id)
        prefix_text = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.tokens[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.tokens)
        if self.prefix_offset > 256:  # keep the list short; offsets are relative to it
            del self.tokens[: self.prefix_offset]
            self.read_offset -= self.prefix_offset
            self.prefix_offset = 0
        self.text += delta
        return delta

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        prefix_text = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.tokens[self.prefix_offset :])
        delta = new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""
        self.prefix_offset = self.read_offset = len(self.tokens)
        self.text += delta
        return delta
