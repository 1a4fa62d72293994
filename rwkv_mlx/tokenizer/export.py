"""Writing a byte vocabulary as a Hugging Face ``tokenizer.json``.

The file must encode exactly like greedy longest match, with nothing but
stock ``tokenizers`` components, so that ``tokenizers``, transformers'
``PreTrainedTokenizerFast`` and mlx-lm load it without remote code:

- ``ByteLevel`` pre-tokenizer without its regex and without a prefix space:
  it only maps every UTF-8 byte to one printable character (the byte-level
  alphabet of GPT-2), so the steps after it see one character per byte.
- ``Split`` with a regex built from the trie of all tokens and the
  ``isolated`` behavior. At a node, the regex tries the children (one
  alternative per next byte) before it accepts the node itself, and it
  accepts only nodes that are tokens. A backtracking engine (``tokenizers``
  uses Oniguruma) therefore matches the longest token at the current
  position, and successive matches are exactly the greedy tokens. Every
  single byte is a token, so the matches cover the whole text.
- ``WordLevel`` model that maps each match to its id.
- ``ByteLevel`` decoder, inside a ``Sequence``: the decoder maps characters
  back to bytes and replaces invalid UTF-8 per bad span. mlx-lm picks its
  streaming detokenizer from the decoder. For a bare ``ByteLevel`` it picks
  one that drops a leading space of the output, and for a ``Sequence`` its
  general one, which keeps the text intact.

The regex for the World vocabulary is about 270 KB, and the pipeline encodes
at about 1 MB/s on the 2-core x86 development machine, in time linear in the
text. ``tests/tokenizer`` checks it against the reference ids.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Sequence

from .._files import write_atomically
from .errors import TokenizerError


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> tuple[str, ...]:
    """Return the byte-level alphabet: the character for every byte value.

    The bytes of printable Latin-1 characters (``!``..``~``, ``¡``..``¬``,
    ``®``..``ÿ``) are their own characters. The other 68 bytes get the
    characters from U+0100 on, in increasing byte order. This is the table of
    the ``ByteLevel`` pre-tokenizer and decoder of ``tokenizers``.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {}
    next_free = 256
    for value in range(256):
        if value in printable:
            table[value] = chr(value)
        else:
            table[value] = chr(next_free)
            next_free += 1
    return tuple(table[value] for value in range(256))


@functools.lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    """Return the inverse of ``byte_to_unicode``."""
    return {character: value for value, character in enumerate(byte_to_unicode())}


def bytes_to_token_string(data: bytes) -> str:
    """Write token bytes in the byte-level alphabet."""
    alphabet = byte_to_unicode()
    return "".join(alphabet[value] for value in data)


def token_string_to_bytes(token: str, strict: bool = True) -> bytes:
    """Read token bytes written in the byte-level alphabet.

    Args:
        token: The token string.
        strict: Raise for a character outside the alphabet. Otherwise such a
            character stands for its UTF-8 bytes, as in the ``ByteLevel``
            decoder of ``tokenizers``, which added tokens written as plain
            text (such as runs of spaces in GPT-NeoX-20B) rely on.

    Raises:
        TokenizerError: If ``strict`` and a character is not in the alphabet.
    """
    inverse = unicode_to_byte()
    if strict:
        try:
            return bytes(inverse[character] for character in token)
        except KeyError as error:
            raise TokenizerError(
                f"the token {token!r} has the character {error.args[0]!r}, which is not a byte"
            ) from None
    parts = []
    for character in token:
        value = inverse.get(character)
        parts.append(character.encode("utf-8") if value is None else bytes([value]))
    return b"".join(parts)


def longest_match_regex(tokens: Sequence[bytes]) -> str:
    """Build the regex that matches the longest token at a position.

    Args:
        tokens: The bytes of all tokens.

    Returns:
        The regex over byte-level characters (Oniguruma syntax).
    """
    # The trie as nested dicts; the key None marks a node that is a token.
    root: dict = {}
    for data in tokens:
        node = root
        for character in bytes_to_token_string(data):
            node = node.setdefault(character, {})
        node[None] = True

    def escape(character: str) -> str:
        # ASCII punctuation as a hex escape, since some of it is syntax.
        return f"\\x{ord(character):02x}" if character.isascii() and not character.isalnum() else character

    # Render children before parents without recursion (tokens can be 128
    # bytes deep): each node becomes the alternation of its children, made
    # optional when the node itself is a token.
    rendered: dict[int, str] = {}
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        children = sorted(key for key in node if key is not None)
        if not children_done:
            stack.append((node, True))
            stack.extend((node[key], False) for key in children)
            continue
        alternatives = [escape(key) + rendered.pop(id(node[key])) for key in children]
        if not alternatives:
            rendered[id(node)] = ""
            continue
        body = alternatives[0] if len(alternatives) == 1 else "(?:" + "|".join(alternatives) + ")"
        if None in node:
            body = body + "?" if len(alternatives) > 1 or len(body) == 1 else "(?:" + body + ")?"
        rendered[id(node)] = body
    return rendered[id(root)]


def build_tokenizers_json(token_bytes: Sequence[bytes | None], special_tokens: dict[int, str]) -> dict[str, Any]:
    """Build the ``tokenizer.json`` contents for a greedy longest-match vocabulary.

    Args:
        token_bytes: The bytes of every token, indexed by id; ``None`` or
            ``b""`` for ids without bytes.
        special_tokens: Names of the ids that have no bytes but should be in
            the vocabulary, such as ``{0: "<|endoftext|>"}``. They decode to
            their name in ``tokenizers`` and are never produced from text.

    Returns:
        The JSON document as a dict.
    """
    vocab = {bytes_to_token_string(data): token_id for token_id, data in enumerate(token_bytes) if data}
    for token_id, name in special_tokens.items():
        if name in vocab:
            raise TokenizerError(f"the special token name {name!r} is also the text of token {vocab[name]}")
        vocab[name] = token_id
    regex = longest_match_regex([data for data in token_bytes if data])
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
                {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            ],
        },
        "post_processor": None,
        "decoder": {
            "type": "Sequence",
            "decoders": [{"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}],
        },
        # WordLevel needs an unknown-token entry. It is never used, because
        # every piece the regex matches is a token.
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": min(vocab, key=vocab.__getitem__)},
    }


def write_json_files(directory: str | Path, files: dict[str, Any]) -> list[Path]:
    """Write JSON files into a directory, each atomically.

    Each file is written to a temporary name in the same directory and then
    renamed, so an interrupted write never leaves a half-written file under
    its final name.

    Args:
        directory: The target directory; created if missing.
        files: File name to JSON-serializable contents.

    Returns:
        The paths written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, contents in files.items():
        def write_json(stream, contents=contents):
            json.dump(contents, stream, ensure_ascii=False, indent=2)
            stream.write("\n")

        write_atomically(directory / name, write_json, text=True)
        written.append(directory / name)
    return written
