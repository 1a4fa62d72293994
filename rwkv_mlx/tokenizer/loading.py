"""Choosing and loading a tokenizer by name or path."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Union

from .base import ENCODING_CONFIG_KEY, GREEDY_LONGEST_MATCH
from .errors import TokenizerError
from .json_tokenizer import JsonTokenizer, chat_template_from_config, read_json_file, special_token_name, vocab_token_bytes
from .vocab import WORLD_DEFINED_IDS, WORLD_VOCAB_SHA256, WORLD_VOCAB_SIZE, read_world_vocab
from .world import ByteTokenizer, WorldTokenizer, world_tables, world_tokenizer

Tokenizer = Union[WorldTokenizer, ByteTokenizer, JsonTokenizer]


def load_tokenizer(name_or_path: str | os.PathLike = "world") -> Tokenizer:
    """Load a tokenizer.

    Args:
        name_or_path: One of

            - ``"world"``: the RWKV World vocabulary shipped with the package
              (65,536 ids, id 0 is end-of-text);
            - ``"bytes"``: the byte-level vocabulary of 256-token models;
            - a ``tokenizer.json`` file, or a directory that contains one,
              with ``tokenizer_config.json`` beside it if present. Files written
              by ``save_pretrained`` of this package load as the World or
              byte tokenizer again;
            - a vocabulary file in the World format (``rwkv_vocab_*.txt``),
              or a directory that contains one and no ``tokenizer.json``.

    Returns:
        A tokenizer with ``encode``, ``decode``, ``vocab_size``,
        ``eos_token_id``, ``detokenizer``, ``apply_chat_template`` and
        ``save_pretrained``.

    Raises:
        TokenizerError: If the name is unknown, the path does not exist, or
            the files are malformed.
    """
    name = os.fspath(name_or_path)
    if name == "world":
        return world_tokenizer()
    if name == "bytes":
        return ByteTokenizer()

    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return _load_tokenizer_json(path / "tokenizer.json")
        vocab_files = sorted(path.glob("rwkv_vocab*.txt"))
        if vocab_files:
            return _load_world_vocab(vocab_files[0])
        raise TokenizerError(f"the directory {path} has no tokenizer.json and no rwkv_vocab*.txt vocabulary file")
    if path.is_file():
        if path.suffix == ".json":
            return _load_tokenizer_json(path)
        if path.suffix == ".txt":
            return _load_world_vocab(path)
        raise TokenizerError(
            f"cannot tell the tokenizer format of {path}: expected a tokenizer.json or a World vocabulary .txt file"
        )
    raise TokenizerError(
        f"tokenizer {name!r} not found: expected 'world', 'bytes', a tokenizer.json file, a World vocabulary "
        ".txt file, or a directory that contains one of them"
    )


def _load_world_vocab(path: Path) -> WorldTokenizer:
    """Load a World-format vocabulary file, sharing the tables of the shipped
    one when the file is identical to it."""
    if hashlib.sha256(path.read_bytes()).hexdigest() == WORLD_VOCAB_SHA256:
        tokenizer = world_tokenizer()
        tokenizer.name_or_path = str(path)
        return tokenizer
    return WorldTokenizer(read_world_vocab(path), name_or_path=str(path))


def _load_tokenizer_json(path: Path) -> Tokenizer:
    """Load a tokenizer.json; rebuild the World or byte tokenizer for files
    that ``save_pretrained`` of this package wrote."""
    config_path = path.parent / "tokenizer_config.json"
    config = read_json_file(config_path, "tokenizer config") if config_path.is_file() else {}
    if config.get(ENCODING_CONFIG_KEY) != GREEDY_LONGEST_MATCH:
        return JsonTokenizer(path, config)

    document = read_json_file(path, "tokenizer file")
    eos_token = special_token_name(config.get("eos_token"))
    try:
        by_id = vocab_token_bytes(document, path, {eos_token} if eos_token else set())
    except TokenizerError as error:
        raise TokenizerError(f"{path}: {error}") from None
    if not by_id:
        raise TokenizerError(f"{path}: the vocabulary is empty")
    token_bytes: list[bytes | None] = [None] * (max(by_id) + 1)
    for token_id, data in by_id.items():
        token_bytes[token_id] = data

    chat_template = chat_template_from_config(config)
    if eos_token is None and token_bytes == [bytes([value]) for value in range(256)]:
        return ByteTokenizer(chat_template)
    end_of_text_id = (document.get("model") or {}).get("vocab", {}).get(eos_token) if eos_token else None
    if end_of_text_id != 0:
        raise TokenizerError(
            f"{config_path}: a World vocabulary needs an eos_token with id 0 in {path.name}, found "
            f"{eos_token!r} with id {end_of_text_id}"
        )

    # Compare with the shipped World vocabulary only when the sizes agree,
    # because world_tables() reads and indexes it on first use.
    if len(token_bytes) == WORLD_DEFINED_IDS:
        shipped_bytes, shipped_encoder = world_tables()
        if token_bytes[1:] == list(shipped_bytes[1:]):
            return WorldTokenizer(
                shipped_bytes, WORLD_VOCAB_SIZE, chat_template, name_or_path=str(path), encoder=shipped_encoder
            )
    return WorldTokenizer(token_bytes, chat_template=chat_template, name_or_path=str(path))
