"""Incremental, UTF-8 safe detokenization of one sequence's output.

Hand-written on purpose, after `tokenizers`' DecodeStream: both hold a token
back while it ends in an incomplete character, so multi-byte characters (CJK,
emoji) are never streamed broken. DecodeStream, though, can neither start from
the prompt's context (a sentencepiece "▁word" first token would lose its
space) nor give back what it holds when generation ends (bytes that never
become a character would vanish). This keeps a small decode window that starts
in the prompt, and `flush()` releases what is held, so joining every delta
always equals decoding the output tokens in context.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

_CONTEXT_TOKENS = 5  # prompt tokens decoded with the output, for spacing only
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns one sequence's token ids into text deltas, one token at a time."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0  # where the decode window starts
        self._read = len(self._ids)  # tokens before this are already emitted

    def step(self, token_id: int) -> str:
        """Text this token settles ("" while a character is incomplete)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Everything still held, as the tokenizer decodes it (at the end of output)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        settled = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if not final and (len(text) <= len(settled) or text.endswith(_REPLACEMENT)):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(settled) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)
