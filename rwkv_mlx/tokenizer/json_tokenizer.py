"""Tokenizers loaded from a Hugging Face ``tokenizer.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .base import as_id_list
from .chat import render_jinja_chat_template
from .detokenizer import DecodingStreamingDetokenizer, StreamingDetokenizer
from .errors import TokenizerError
from .export import token_string_to_bytes, write_json_files


def read_json_file(path: Path, description: str) -> dict[str, Any]:
    """Read a JSON object from a file.

    Args:
        path: The file.
        description: What the file is, for error messages ("tokenizer file").

    Raises:
        TokenizerError: If the file cannot be read or is not a JSON object.
    """
    try:
        contents = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise TokenizerError(f"cannot read the {description} {path}: {error}") from None
    except json.JSONDecodeError as error:
        raise TokenizerError(f"the {description} {path} is not valid JSON: {error}") from None
    if not isinstance(contents, dict):
        raise TokenizerError(f"the {description} {path} must contain a JSON object, found {type(contents).__name__}")
    return contents


def special_token_name(value: Any) -> str | None:
    """Return the text of a special token entry of ``tokenizer_config.json``,
    which is a string or a dict with ``"content"``."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def chat_template_from_config(config: Mapping[str, Any]) -> str | None:
    """Return the chat template of a config: a string, or the ``default`` one
    of a list of named templates."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, Mapping)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class JsonTokenizer:
    """A tokenizer from a ``tokenizer.json``, run by the ``tokenizers`` library.

    It offers the same methods as the World tokenizer. The special tokens
    and the chat template come from ``tokenizer_config.json`` beside the file.

    Args:
        path: The ``tokenizer.json`` file.
        config: The contents of ``tokenizer_config.json``, or an empty dict.

    Raises:
        TokenizerError: If the file is missing or not a valid tokenizer.
    """

    def __init__(self, path: str | Path, config: Mapping[str, Any] | None = None):
        from tokenizers import Tokenizer

        self.path = Path(path)
        self.name_or_path = str(path)
        self.config = dict(config or {})
        document = read_json_file(self.path, "tokenizer file")
        try:
            self._tokenizer = Tokenizer.from_str(json.dumps(document))
        except Exception as error:  # tokenizers raises plain Exception for bad files
            raise TokenizerError(f"the tokenizer file {self.path} is not a valid tokenizer.json: {error}") from None
        if self.config.get("split_special_tokens"):
            self._tokenizer.encode_special_tokens = True

        self.eos_token = special_token_name(self.config.get("eos_token"))
        self.bos_token = special_token_name(self.config.get("bos_token"))
        self.eos_token_id = self._tokenizer.token_to_id(self.eos_token) if self.eos_token else None
        self.bos_token_id = self._tokenizer.token_to_id(self.bos_token) if self.bos_token else None
        self.chat_template = chat_template_from_config(self.config)
        self._byte_level = _decodes_byte_level(document)

    @property
    def vocab_size(self) -> int:
        """Number of ids, including added tokens."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> list[int]:
        """Encode text.

        Args:
            text: The text.
            add_special_tokens: Add the tokens that the file's post-processor
                adds, such as a beginning-of-sequence token.
            **kwargs: Other Hugging Face keyword arguments; ignored.

        Returns:
            The token ids.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a string, got {type(text).__name__}")
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str, **kwargs: Any) -> dict[str, list[int]]:
        """Encode text as Hugging Face tokenizers do: ``{"input_ids": ids}``."""
        return {"input_ids": self.encode(text)}

    def _check_ids(self, token_ids: Iterable[int] | int) -> list[int]:
        ids = as_id_list(token_ids)
        size = self.vocab_size
        for position, token_id in enumerate(ids):
            if type(token_id) is not int or not 0 <= token_id < size or self._tokenizer.id_to_token(token_id) is None:
                raise TokenizerError(
                    f"token id {token_id!r} (position {position}) is not in the vocabulary of {self.path} "
                    f"(ids 0 to {size - 1})"
                )
        return ids

    def decode(self, token_ids: Iterable[int] | int, skip_special_tokens: bool = False, **kwargs: Any) -> str:
        """Decode token ids to text with the file's decoder.

        Raises:
            TokenizerError: If an id is not in the vocabulary.
        """
        return self._tokenizer.decode(self._check_ids(token_ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Iterable[Iterable[int]], **kwargs: Any) -> list[str]:
        """Decode several sequences of token ids."""
        return [self.decode(ids, **kwargs) for ids in sequences]

    def token_bytes(self, token_id: int) -> bytes:
        """Return the bytes of a token of a byte-level vocabulary, as the
        ``ByteLevel`` decoder maps them. Characters outside the byte-level
        alphabet give their UTF-8 bytes; added tokens written as plain text,
        such as the runs of spaces of GPT-NeoX-20B, have them.

        Raises:
            TokenizerError: If the vocabulary is not byte-level or the id is
                not in it.
        """
        (token_id,) = self._check_ids([token_id])
        if not self._byte_level:
            raise TokenizerError(f"the tokenizer {self.path} is not byte-level, so its tokens have no bytes")
        return token_string_to_bytes(self._tokenizer.id_to_token(token_id), strict=False)

    @property
    def detokenizer(self) -> StreamingDetokenizer | DecodingStreamingDetokenizer:
        """A new streaming detokenizer: byte-based for byte-level vocabularies,
        decode-based otherwise."""
        if self._byte_level:
            return StreamingDetokenizer(self.token_bytes)
        return DecodingStreamingDetokenizer(self.decode)

    def get_vocab(self) -> dict[str, int]:
        """Return the token strings and their ids."""
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        """Return the token strings of ids."""
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(self._check_ids([ids])[0])
        return [self._tokenizer.id_to_token(token_id) for token_id in self._check_ids(ids)]

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | None | list[int | None]:
        """Return the ids of token strings, or None for a string that is not a token."""
        if isinstance(tokens, str):
            return self._tokenizer.token_to_id(tokens)
        return [self._tokenizer.token_to_id(token) for token in tokens]

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render a conversation with the chat template of ``tokenizer_config.json``.

        Args:
            messages: Dicts with ``"role"`` and ``"content"``.
            add_generation_prompt: End with the prompt for the model's reply.
            tokenize: Return token ids (without added special tokens)
                instead of text.
            **kwargs: Further template variables.

        Returns:
            The token ids, or the text when ``tokenize`` is False.

        Raises:
            TokenizerError: If there is no chat template or it fails.
        """
        if self.chat_template is None:
            raise TokenizerError(f"the tokenizer {self.path} has no chat template in tokenizer_config.json")
        for name in ("return_dict", "tokenize", "continue_final_message", "chat_template"):
            kwargs.pop(name, None)
        text = render_jinja_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt,
            eos_token=self.eos_token,
            bos_token=self.bos_token,
            **kwargs,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> tuple[str, ...]:
        """Write ``tokenizer.json`` and ``tokenizer_config.json``, each under a
        temporary name first."""
        files = {"tokenizer.json": json.loads(self._tokenizer.to_str()), "tokenizer_config.json": self.config}
        return tuple(str(path) for path in write_json_files(save_directory, files))

    def __repr__(self) -> str:
        return f"JsonTokenizer(path={self.name_or_path!r}, vocab_size={self.vocab_size})"


def _decodes_byte_level(document: Mapping[str, Any]) -> bool:
    """Return whether the decoder maps token characters to bytes with the
    byte-level alphabet (a ``ByteLevel`` decoder, alone or in a ``Sequence``)."""
    decoder = document.get("decoder") or {}
    if decoder.get("type") == "Sequence":
        decoders = decoder.get("decoders") or []
        return len(decoders) == 1 and decoders[0].get("type") == "ByteLevel"
    return decoder.get("type") == "ByteLevel"


def vocab_token_bytes(document: Mapping[str, Any], path: Path, special_names: set[str]) -> dict[int, bytes]:
    """Return the bytes of every token of a byte-level WordLevel
    ``tokenizer.json``, by id, leaving out the named special tokens.

    Raises:
        TokenizerError: If the model is not WordLevel or a token is not
            written in the byte-level alphabet.
    """
    model = document.get("model") or {}
    if model.get("type") != "WordLevel" or not isinstance(model.get("vocab"), Mapping):
        raise TokenizerError(f"{path}: expected a WordLevel model with a vocab, found {model.get('type')!r}")
    return {int(token_id): token_string_to_bytes(token) for token, token_id in model["vocab"].items() if token not in special_names}
