"""The tokenizer interface shared by the World and byte-level tokenizers.

Both have a vocabulary of byte strings and encode by greedy longest match
(for the byte-level tokenizer every token is one byte, so that is trivial).
The class offers the methods that callers of a Hugging Face tokenizer and
mlx-lm's ``TokenizerWrapper`` use: ``encode``, ``decode``, ``eos_token_id``,
``get_vocab``, ``convert_ids_to_tokens``, ``apply_chat_template``,
``save_pretrained`` and a streaming ``detokenizer``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .chat import WORLD_CHAT_TEMPLATE, format_world_chat, render_jinja_chat_template
from .detokenizer import StreamingDetokenizer
from .errors import TokenizerError
from .export import build_tokenizers_json, bytes_to_token_string, write_json_files

# Marks a tokenizer_config.json written by save_pretrained, so load_tokenizer
# can rebuild the fast encoder instead of running the slower tokenizer.json.
ENCODING_CONFIG_KEY = "rwkv_mlx_encoding"
GREEDY_LONGEST_MATCH = "greedy_longest_match"


class ByteVocabTokenizer:
    """A tokenizer whose tokens are byte strings.

    Args:
        token_bytes: The bytes of every token, indexed by id. The entry of the
            end-of-text id, if any, is ``b""``, and ids without a token have
            ``None``.
        vocab_size: Number of ids, at least ``len(token_bytes)``; the ids
            beyond ``token_bytes`` have no token.
        eos_token_id: The end-of-text id, which decodes to nothing, or None.
        eos_token: The name of the end-of-text token in exported files.
        chat_template: A Jinja chat template, or None.
        name_or_path: What the tokenizer was loaded from.
    """

    bos_token = None
    bos_token_id = None
    pad_token = None
    pad_token_id = None
    unk_token = None

    def __init__(
        self,
        token_bytes: Sequence[bytes | None],
        vocab_size: int,
        eos_token_id: int | None,
        eos_token: str | None,
        chat_template: str | None,
        name_or_path: str,
    ):
        if vocab_size < len(token_bytes):
            raise TokenizerError(f"vocab_size {vocab_size} is smaller than the {len(token_bytes)} ids of the vocabulary")
        self._token_bytes = list(token_bytes) + [None] * (vocab_size - len(token_bytes))
        self.eos_token_id = eos_token_id
        self.eos_token = eos_token
        self.chat_template = chat_template
        self.name_or_path = name_or_path

    # --------------------------------------------------------------- encoding

    @property
    def vocab_size(self) -> int:
        """Number of ids, including ids that have no token."""
        return len(self._token_bytes)

    def __len__(self) -> int:
        return len(self._token_bytes)

    def encode_bytes(self, data: bytes) -> list[int]:
        """Encode bytes.

        Args:
            data: The bytes.

        Returns:
            The token ids.
        """
        raise NotImplementedError

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> list[int]:
        """Encode text.

        The text is encoded as it is: nothing is stripped, no space is added
        in front, and no special tokens are added or recognized, so
        ``add_special_tokens`` has no effect. ``<|endoftext|>`` in the text
        is encoded as ordinary characters.

        Args:
            text: The text.
            add_special_tokens: Accepted for compatibility with Hugging Face
                tokenizers; ignored.
            **kwargs: Other Hugging Face keyword arguments; ignored.

        Returns:
            The token ids.

        Raises:
            TokenizerError: If ``text`` is not a string or contains a lone
                surrogate, which UTF-8 cannot encode.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a string, got {type(text).__name__}")
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise TokenizerError(
                f"the text has a lone surrogate {text[error.start]!r} at position {error.start}, which "
                "cannot be encoded as UTF-8"
            ) from None
        return self.encode_bytes(data)

    def __call__(self, text: str, **kwargs: Any) -> dict[str, list[int]]:
        """Encode text as Hugging Face tokenizers do: ``{"input_ids": ids}``."""
        return {"input_ids": self.encode(text)}

    # --------------------------------------------------------------- decoding

    def token_bytes(self, token_id: int) -> bytes:
        """Return the bytes of one token.

        Raises:
            TokenizerError: If the id is not an integer or has no token.
        """
        if not isinstance(token_id, int):
            token_id = _as_int(token_id)
        if 0 <= token_id < len(self._token_bytes):
            data = self._token_bytes[token_id]
            if data is not None:
                return data
        raise TokenizerError(self._unknown_id_message(token_id))

    def decode_bytes(self, token_ids: Iterable[int]) -> bytes:
        """Join the bytes of token ids.

        Raises:
            TokenizerError: If an id is not an integer or has no token.
        """
        ids = as_id_list(token_ids)
        table = self._token_bytes
        try:
            if not ids or min(ids) >= 0:
                return b"".join([table[token_id] for token_id in ids])
        except (IndexError, TypeError):
            pass

        # A negative id, an id past the table, an id without bytes or a
        # non-integer id: find the first one for the message.
        position, token_id = next(
            (position, token_id)
            for position, token_id in enumerate(ids)
            if type(token_id) is not int or not 0 <= token_id < len(table) or table[token_id] is None
        )
        raise TokenizerError(f"{self._unknown_id_message(token_id)} (position {position})")

    def decode(self, token_ids: Iterable[int] | int, skip_special_tokens: bool = False, **kwargs: Any) -> str:
        """Decode token ids to text.

        Bytes that do not form valid UTF-8 become U+FFFD, one per bad span,
        and the rest of the text is kept. The end-of-text id decodes to
        nothing.

        Args:
            token_ids: The ids, as a list, array or a single int.
            skip_special_tokens: Accepted for compatibility; the end-of-text
                id decodes to nothing either way.
            **kwargs: Other Hugging Face keyword arguments; ignored.

        Returns:
            The text.

        Raises:
            TokenizerError: If an id is not an integer or has no token; the
                message names the id.
        """
        return self.decode_bytes(token_ids).decode("utf-8", errors="replace")

    def batch_decode(self, sequences: Iterable[Iterable[int]], **kwargs: Any) -> list[str]:
        """Decode several sequences of token ids."""
        return [self.decode(ids) for ids in sequences]

    def _unknown_id_message(self, token_id: Any) -> str:
        return (
            f"token id {token_id!r} is not in the vocabulary of this tokenizer "
            f"(ids 0 to {len(self._token_bytes) - 1}{self._missing_ids_note()})"
        )

    def _missing_ids_note(self) -> str:
        missing = [token_id for token_id, data in enumerate(self._token_bytes) if data is None]
        if not missing:
            return ""
        if missing == list(range(missing[0], missing[-1] + 1)):
            return f"; ids {missing[0]} to {missing[-1]} have no token"
        return f"; {len(missing)} ids have no token"

    @property
    def detokenizer(self) -> StreamingDetokenizer:
        """A new streaming detokenizer for this vocabulary."""
        return StreamingDetokenizer(self.token_bytes)

    # ----------------------------------------------- Hugging Face vocabulary

    def get_vocab(self) -> dict[str, int]:
        """Return the token strings and their ids.

        Tokens are written in the byte-level alphabet of ``tokenizer.json``
        (a space is ``Ġ``); the end-of-text token is ``eos_token``.
        """
        return dict(self._vocab_items)

    @functools.cached_property
    def _vocab_items(self) -> tuple[tuple[str, int], ...]:
        items = []
        for token_id, data in enumerate(self._token_bytes):
            if data:
                items.append((bytes_to_token_string(data), token_id))
            elif data is not None and token_id == self.eos_token_id and self.eos_token:
                items.append((self.eos_token, token_id))
        return tuple(items)

    @functools.cached_property
    def _id_to_string(self) -> dict[int, str]:
        return {token_id: string for string, token_id in self._vocab_items}

    @functools.cached_property
    def _string_to_id(self) -> dict[str, int]:
        return dict(self._vocab_items)

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        """Return the token strings of ids, in the form of ``get_vocab``.

        Raises:
            TokenizerError: If an id has no token.
        """
        if isinstance(ids, int):
            self.token_bytes(ids)
            return self._id_to_string[ids]
        return [self.convert_ids_to_tokens(token_id) for token_id in as_id_list(ids)]

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | None | list[int | None]:
        """Return the ids of token strings in the form of ``get_vocab``, or
        None for a string that is not a token."""
        if isinstance(tokens, str):
            return self._string_to_id.get(tokens)
        return [self._string_to_id.get(token) for token in tokens]

    # ------------------------------------------------------------------- chat

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render a conversation with the chat template.

        The World template is rendered in Python; any other template with
        Jinja, as transformers does.

        Args:
            messages: Dicts with ``"role"`` and ``"content"``.
            add_generation_prompt: End with the prompt for the model's reply.
            tokenize: Return token ids instead of text.
            **kwargs: Passed to a Jinja template as variables; keyword
                arguments of transformers that do not apply here (such as
                ``return_dict``) are accepted and ignored.

        Returns:
            The token ids, or the text when ``tokenize`` is False.

        Raises:
            TokenizerError: If the tokenizer has no chat template or the
                template rejects the messages.
        """
        if self.chat_template is None:
            raise TokenizerError(
                f"the tokenizer {self.name_or_path!r} has no chat template; encode the prompt as plain text"
            )
        if self.chat_template == WORLD_CHAT_TEMPLATE:
            text = format_world_chat(messages, add_generation_prompt)
        else:
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
        return self.encode(text) if tokenize else text

    # ----------------------------------------------------------------- export

    def to_tokenizers_json(self) -> dict[str, Any]:
        """Return the ``tokenizer.json`` contents that encode like this tokenizer
        with the stock ``tokenizers`` library (see ``export.py``)."""
        special = {}
        if self.eos_token_id is not None and self.eos_token:
            special[self.eos_token_id] = self.eos_token
        return build_tokenizers_json(self._token_bytes, special)

    def to_tokenizers(self):
        """Return a ``tokenizers.Tokenizer`` that encodes like this one.

        It is exact but much slower than ``encode``: 0.4 to 1 MB/s against
        about 60 MB/s on the 2-core x86 development machine
        (``bench/bench_tokenizer.py``).
        """
        from tokenizers import Tokenizer

        return Tokenizer.from_str(json.dumps(self.to_tokenizers_json()))

    def tokenizer_config(self) -> dict[str, Any]:
        """Return the ``tokenizer_config.json`` contents for transformers."""
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": 1 << 30,
            "clean_up_tokenization_spaces": False,
            # Encode "<|endoftext|>" in text as characters, as encode does.
            "split_special_tokens": True,
            "add_bos_token": False,
            "add_eos_token": False,
            ENCODING_CONFIG_KEY: GREEDY_LONGEST_MATCH,
        }
        if self.eos_token_id is not None and self.eos_token:
            config["eos_token"] = self.eos_token
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        return config

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> tuple[str, ...]:
        """Write ``tokenizer.json`` and ``tokenizer_config.json``.

        transformers' ``PreTrainedTokenizerFast`` and ``AutoTokenizer`` load
        the directory without remote code and encode like this tokenizer;
        ``load_tokenizer`` on the directory gives this tokenizer back. Each
        file is written under a temporary name and then renamed.

        Args:
            save_directory: The directory; created if missing.
            **kwargs: Hugging Face keyword arguments; ignored.

        Returns:
            The paths of the written files.
        """
        files = {"tokenizer.json": self.to_tokenizers_json(), "tokenizer_config.json": self.tokenizer_config()}
        return tuple(str(path) for path in write_json_files(save_directory, files))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size})"


def _as_int(value: Any) -> int:
    """Convert a numpy or MLX scalar id to int; raise for anything else."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int):
        raise TokenizerError(f"token id {value!r} is not an integer")
    return value


def as_id_list(token_ids: Iterable[int] | int) -> list[int]:
    """Turn an int, a list, a numpy array or an MLX array of ids into a list of ints."""
    if isinstance(token_ids, int):
        return [token_ids]
    if hasattr(token_ids, "tolist"):
        ids = token_ids.tolist()
        return ids if isinstance(ids, list) else [ids]
    ids = list(token_ids)
    if not all(type(token_id) is int for token_id in ids):
        ids = [token_id if type(token_id) is int else _as_int(token_id) for token_id in ids]
    return ids
