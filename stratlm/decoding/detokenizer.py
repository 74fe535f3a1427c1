"""Streaming detokenization: tokens into text pieces that never split a character."""

from __future__ import annotations

from stratlm.core.tokenizer import Tokenizer


class StreamingDetokenizer:
    """Turns tokens into text pieces as they arrive; never emits half a multi-byte character.

    The pieces always join to decode(all tokens): each piece is the growth of the decoded
    text, held back while the text ends in an incomplete UTF-8 sequence (U+FFFD). Each step
    decodes a short window, not the whole sequence (a batch of 64 rows spent ~8 ms a step
    re-decoding 256-token outputs): the tokens since the piece before last, so the window
    starts at a character boundary and keeps the context that tokenizers which strip a
    leading space need. The window grows only while text is held back.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""
        self._start = 0  # window start: where the piece before last ended
        self._done = 0  # tokens already shown as text
        self._shown_in_window = ""  # decode(tokens[_start:_done])

    def add(self, token: int) -> str:
        self.tokens.append(int(token))
        text = self.tokenizer.decode(self.tokens[self._start :])
        if text.endswith("\ufffd") or not text.startswith(self._shown_in_window):
            return ""
        piece = text[len(self._shown_in_window) :]
        self.text += piece
        self._start, self._done = self._done, len(self.tokens)
        self._shown_in_window = self.tokenizer.decode(self.tokens[self._start : self._done])
        return piece

    def finish(self) -> str:
        """Whatever was held back (a genuinely invalid byte sequence at the very end)."""
        text = self.tokenizer.decode(self.tokens)
        piece = text[len(self.text) :] if text.startswith(self.text) else ""
        self.text = text
        return piece
