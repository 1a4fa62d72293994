"""Streaming detokenization for byte vocabularies."""

from __future__ import annotations

import codecs
from typing import Callable


class StreamingDetokenizer:
    """Turn token ids into text one id at a time, holding back incomplete
    UTF-8 until the character is complete.

    It follows the protocol of ``mlx_lm.tokenizer_utils.StreamingDetokenizer``
    (``reset``, ``add_token``, ``finalize``, ``text``, ``tokens``, ``offset``
    and ``last_segment``), so mlx-lm's ``TokenizerWrapper`` and generation
    loop can use it. It does not import mlx-lm.

    Bytes that can never become valid UTF-8 are replaced by U+FFFD as soon as
    that is certain, one replacement per bad span, as ``bytes.decode`` with
    ``errors="replace"`` does. Bytes that may still start a character wait
    for the next token, and ``finalize`` replaces any that remain. After
    ``finalize``, ``text`` equals ``tokenizer.decode(tokens)``.

    Args:
        token_bytes: Returns the bytes of a token id and raises
            ``TokenizerError`` for an id outside the vocabulary; usually the
            ``token_bytes`` method of a tokenizer.
    """

    def __init__(self, token_bytes: Callable[[int], bytes]):
        self._token_bytes = token_bytes
        self.reset()

    def reset(self) -> None:
        """Drop all streaming state."""
        self.tokens: list[int] = []
        self.offset = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._segments: list[str] = []  # text not yet joined into _text
        self._text = ""
        self._unread: list[str] = []  # text added since last_segment was read

    def add_token(self, token: int) -> None:
        """Add one token id.

        Raises:
            TokenizerError: If the id is outside the vocabulary.
        """
        data = self._token_bytes(token)
        self.tokens.append(token)
        text = self._decoder.decode(data)
        if text:
            self._segments.append(text)
            self._unread.append(text)

    def finalize(self) -> None:
        """Flush held-back bytes, replacing an incomplete character by U+FFFD."""
        text = self._decoder.decode(b"", final=True)
        if text:
            self._segments.append(text)
            self._unread.append(text)

    @property
    def text(self) -> str:
        """All text decoded so far."""
        if self._segments:
            self._text += "".join(self._segments)
            self._segments = []
        return self._text

    @property
    def last_segment(self) -> str:
        """The text added since this property was last read."""
        segment = "".join(self._unread)
        self._unread = []
        self.offset += len(segment)
        return segment


class DecodingStreamingDetokenizer:
    """A streaming detokenizer for vocabularies whose tokens are not plain
    bytes, built on the tokenizer's ``decode``.

    It decodes all tokens since the last newline each time and emits the new
    part of the text, holding back a trailing U+FFFD that may still become a
    character. This costs time quadratic in the length of a line, which is
    why the byte vocabularies use ``StreamingDetokenizer`` instead. It has
    the same protocol as ``StreamingDetokenizer``.

    Args:
        decode: Decodes a list of token ids to text.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self.reset()

    def reset(self) -> None:
        """Drop all streaming state."""
        self.tokens: list[int] = []
        self.offset = 0
        self.text = ""
        self._line_tokens: list[int] = []
        self._line_emitted = 0  # characters of the current line already in text

    def add_token(self, token: int) -> None:
        """Add one token id."""
        self.tokens.append(token)
        self._line_tokens.append(token)
        line = self._decode(self._line_tokens)
        ready = line.rstrip("\ufffd")
        if len(ready) > self._line_emitted:
            self.text += ready[self._line_emitted :]
            self._line_emitted = len(ready)
        if ready.endswith("\n") and len(ready) == len(line):
            self._line_tokens = []
            self._line_emitted = 0

    def finalize(self) -> None:
        """Flush the held-back text."""
        line = self._decode(self._line_tokens)
        self.text += line[self._line_emitted :]
        self._line_tokens = []
        self._line_emitted = 0

    @property
    def last_segment(self) -> str:
        """The text added since this property was last read."""
        segment = self.text[self.offset :]
        self.offset = len(self.text)
        return segment
