"""Turn a stream of generated token ids into text deltas for streaming responses.

Decoding one token at a time is wrong: a character can span several byte tokens, and SentencePiece
decoders change a token's text by its neighbours. So we decode a short window twice -- with and
without the new tokens -- and emit the difference, holding text back while it ends in U+FFFD (an
incomplete UTF-8 character). Work per token is constant, not growing with the output.
"""

from __future__ import annotations

from pagoda.tokenizer.tokenizer import Tokenizer

# Prompt tokens kept as left context, so the first generated token decodes as it reads after the
# prompt (vLLM uses the same few).
_PROMPT_CONTEXT = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Feed generated ids with add(); the deltas concatenate to the decoded generation.

    Without prompt_ids the concatenation equals tokenizer.decode(generated ids). With them it does too
    for byte-level vocabularies; a SentencePiece one keeps the first token's leading space (" Paris"),
    as the text reads after the prompt, where decode() of the generation alone would strip it.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_ids or [])[-_PROMPT_CONTEXT:]
        self._ids: list[int] = context
        self._prefix_offset = 0  # window start: context the decoder needs, already emitted
        self._read_offset = len(context)  # ids before this are emitted
        self.text = ""

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self._ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def _delta(self, final: bool) -> str:
        prefix = self._decode(self._prefix_offset, self._read_offset)
        full = self._decode(self._prefix_offset)
        if len(full) <= len(prefix) or (full.endswith(_REPLACEMENT) and not final):
            return ""
        delta = full[len(prefix):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self.text += delta
        return delta

    def add(self, token_id: int) -> str:
        """The text this token completes; "" while a character is still partial."""
        self._ids.append(int(token_id))
        return self._delta(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the end decodes as U+FFFD)."""
        return self._delta(final=True)
