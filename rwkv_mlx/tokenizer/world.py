"""The RWKV World tokenizer and the byte-level tokenizer."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

from .base import ByteVocabTokenizer, as_id_list
from .chat import WORLD_CHAT_TEMPLATE
from .longest_match import LongestMatchEncoder
from .vocab import WORLD_VOCAB_SIZE, read_world_vocab, world_vocab_path

WORLD_EOS_TOKEN = "<|endoftext|>"


class WorldTokenizer(ByteVocabTokenizer):
    """Greedy longest-match tokenizer over UTF-8 bytes, as RWKV World models use.

    Encoding is meant to give the same ids as the reference trie tokenizer
    of BlinkDL's ``rwkv`` package for every input, and the tests compare them
    on a corpus of 2 MB of mixed text. Id 0 is end-of-text. ``encode`` never
    produces it, and it decodes to nothing.

    Args:
        token_bytes: The bytes of every token, indexed by id, with ``None``
            at index 0 and at ids without a token. Every single byte must be
            a token.
        vocab_size: Number of ids; defaults to ``len(token_bytes)``.
        chat_template: The chat template; defaults to the World format.
        name_or_path: What the tokenizer was loaded from.
        encoder: A prebuilt encoder for ``token_bytes``, to share its tables.

    Raises:
        TokenizerError: If a byte has no token or two ids share their bytes.
    """

    def __init__(
        self,
        token_bytes: Sequence[bytes | None],
        vocab_size: int | None = None,
        chat_template: str | None = WORLD_CHAT_TEMPLATE,
        name_or_path: str = "world",
        encoder: LongestMatchEncoder | None = None,
    ):
        token_bytes = [None if not data else data for data in token_bytes]
        token_bytes[0] = b""  # end-of-text: a token without bytes
        super().__init__(
            token_bytes,
            vocab_size=vocab_size or len(token_bytes),
            eos_token_id=0,
            eos_token=WORLD_EOS_TOKEN,
            chat_template=chat_template,
            name_or_path=name_or_path,
        )
        self._encoder = encoder or LongestMatchEncoder(token_bytes)

    @classmethod
    def from_vocab_file(cls, path: str | Path, vocab_size: int | None = None) -> "WorldTokenizer":
        """Load a vocabulary file in the World format (see ``vocab.py``).

        Args:
            path: The vocabulary file.
            vocab_size: Number of ids; defaults to the largest id plus one.

        Raises:
            TokenizerError: If the file is missing or malformed.
        """
        return cls(read_world_vocab(path), vocab_size=vocab_size, name_or_path=str(path))

    def encode_bytes(self, data: bytes) -> list[int]:
        """Encode bytes by greedy longest match.

        Args:
            data: The bytes.

        Returns:
            The token ids.
        """
        return self._encoder.encode(data)


@functools.lru_cache(maxsize=1)
def world_tables() -> tuple[tuple[bytes | None, ...], LongestMatchEncoder]:
    """Read the shipped World vocabulary and build its encoder once per process
    (about a second on the 2-core x86 development machine)."""
    token_bytes = read_world_vocab(world_vocab_path())
    token_bytes[0] = b""
    return tuple(token_bytes), LongestMatchEncoder(token_bytes)


def world_tokenizer() -> WorldTokenizer:
    """Return a World tokenizer for the vocabulary shipped with the package.

    The vocabulary tables are built once per process and shared. Every call
    returns a new tokenizer object, so attributes set on one (such as
    ``chat_template``) do not leak into another.
    """
    token_bytes, encoder = world_tables()
    return WorldTokenizer(token_bytes, vocab_size=WORLD_VOCAB_SIZE, name_or_path="world", encoder=encoder)


class ByteTokenizer(ByteVocabTokenizer):
    """The byte-level tokenizer of 256-token models: the id of a byte is its value.

    It has no end-of-text token, and a chat template only when one is given
    (from a saved ``tokenizer_config.json``).
    """

    def __init__(self, chat_template: str | None = None):
        super().__init__(
            [bytes([value]) for value in range(256)],
            vocab_size=256,
            eos_token_id=None,
            eos_token=None,
            chat_template=chat_template,
            name_or_path="bytes",
        )

    def encode_bytes(self, data: bytes) -> list[int]:
        """Return the byte values."""
        return list(data)

    def decode_bytes(self, token_ids) -> bytes:
        """Return the bytes of the ids.

        Raises:
            TokenizerError: If an id is not in 0..255.
        """
        ids = as_id_list(token_ids)
        try:
            return bytes(ids)
        except (ValueError, TypeError):
            return super().decode_bytes(ids)
