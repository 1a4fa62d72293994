"""Training data: JSON Lines files in mlx-lm's formats, tokenized and checked.

A data folder contains ``train.jsonl``, ``valid.jsonl`` and ``test.jsonl``, one
JSON object per line (blank lines are skipped). All records of a file have one
of three formats, detected from its first record:

``{"text": "..."}``
    Plain text; the loss covers every token. The end-of-text token is
    appended unless the text already ends with it.
``{"prompt": "...", "completion": "..."}``
    The loss covers the completion only, unless prompt masking is turned
    off. With a tokenizer that has a chat template the pair is rendered as a
    user and an assistant message. Without one, the completion follows the
    prompt directly, then the end-of-text token.
``{"messages": [{"role": "user", "content": "..."}, ...]}``
    A chat, rendered with the tokenizer's chat template; the loss covers
    every assistant message, unless prompt masking is turned off. A
    tokenizer without a chat template (the byte-level one) rejects chats.

The field names can be changed with ``text_feature``, ``prompt_feature``,
``completion_feature`` and ``chat_feature``, as in mlx-lm. Every error names
the file and the line.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")

# The name of each record format in messages: "read 16 completion records".
FORMAT_NAMES = {"text": "text", "completions": "completion", "chat": "chat"}
CHAT_ROLES = ("system", "user", "assistant", "tool")


class DatasetError(ValueError):
    """Invalid training data; the message names the file and the line."""


@dataclass
class Example:
    """One tokenized record.

    Attributes:
        tokens: Token ids, [n] int32.
        loss_mask: [n] bool; ``loss_mask[i]`` is True when predicting
            ``tokens[i]`` from the tokens before it counts in the loss
            (``loss_mask[0]`` is always False).
        source: Where the record came from, ``file:line``.
    """

    tokens: np.ndarray
    loss_mask: np.ndarray
    source: str = ""

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def trained_tokens(self) -> int:
        return int(self.loss_mask.sum())


@dataclass
class Features:
    """The record field names of each format (mlx-lm's ``*_feature`` options)."""

    text: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"
    chat: str = "messages"

    @classmethod
    def from_config(cls, config: Any) -> "Features":
        return cls(
            text=getattr(config, "text_feature", None) or "text",
            prompt=getattr(config, "prompt_feature", None) or "prompt",
            completion=getattr(config, "completion_feature", None) or "completion",
            chat=getattr(config, "chat_feature", None) or "messages",
        )

    def describe(self, record_format: str) -> str:
        if record_format == "completions":
            return f"'{self.prompt}' and '{self.completion}'"
        return f"'{self.chat if record_format == 'chat' else self.text}'"


def make_example(tokens: Sequence[int], loss_mask: Optional[Sequence[bool]] = None, source: str = "") -> Example:
    """Build an Example, training on every token after the first when no mask is given.

    Args:
        tokens (Sequence[int]): The token ids.
        loss_mask (Sequence[bool], optional): Which tokens count in the loss;
            the first never does, as no token predicts it.
        source (str): Where the example comes from, for error messages.

    Returns:
        Example: The example.

    Raises:
        DatasetError: If there are no tokens, or they are not integers.
    """
    tokens = np.asarray(tokens)
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise DatasetError(f"{source or 'example'}: token ids must be integers, got {tokens.dtype}")
    tokens = tokens.astype(np.int32).reshape(-1)
    if not tokens.size:
        raise DatasetError(f"{source or 'example'}: no tokens; an example needs at least two")
    if loss_mask is None:
        loss_mask = np.ones(len(tokens), dtype=bool)
    loss_mask = np.asarray(loss_mask, dtype=bool).reshape(-1).copy()
    if loss_mask.shape != tokens.shape:
        raise ValueError(f"{source or 'example'}: loss_mask has {len(loss_mask)} entries for {len(tokens)} tokens")
    if len(loss_mask):
        loss_mask[0] = False
    return Example(tokens, loss_mask, source)


def as_example(item: Any, index: int = 0, kind: str = "example") -> Example:
    """Return ``item`` as an Example.

    ``item`` is an Example, a sequence of token ids, or a (tokens, loss_mask)
    pair. Errors name it as ``{kind} {index}``, such as "validation example 3".
    """
    if isinstance(item, Example):
        return item
    if isinstance(item, (str, bytes, dict)):
        raise DatasetError(
            f"{kind} {index} is a {type(item).__name__}, not token ids; encode text with the tokenizer "
            "(make_example(tokenizer.encode(text))), or read a JSON Lines file with load_jsonl_dataset"
        )
    if isinstance(item, tuple) and len(item) == 2 and not np.isscalar(item[1]):
        return make_example(item[0], item[1], source=f"{kind} {index}")
    return make_example(item, source=f"{kind} {index}")


def read_jsonl(path: Path) -> List[Tuple[int, Dict[str, Any]]]:
    """Read a JSON Lines file into (line number, record) pairs, skipping blank lines.

    Raises:
        DatasetError: For a missing file, a line that is not valid UTF-8,
            not valid JSON, or not a JSON object, and for a file without records.
    """
    if not Path(path).is_file():
        raise DatasetError(f"{path}: file not found" if not Path(path).exists() else f"{path}: not a file")
    records = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DatasetError(f"{path}:{number}: not valid UTF-8 ({error.reason} at byte {error.start})") from error
            if not line.strip():
                continue
            try:
                # Without its line break, an error at the end of the line is
                # reported there and not at column 1 of a next line.
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as error:
                # Some of json's messages end in "at" ("Invalid control character at").
                reason = error.msg.removesuffix(" at")
                raise DatasetError(f"{path}:{number}: invalid JSON ({reason} at column {error.colno})") from error
            if not isinstance(record, dict):
                raise DatasetError(f"{path}:{number}: expected a JSON object, found a JSON {type(record).__name__}")
            records.append((number, record))
    if not records:
        # Only valid.jsonl is optional (see load_datasets).
        remedy = ", or remove the file to train without validation" if Path(path).stem == "valid" else ""
        raise DatasetError(f"{path}: the file has no records; add one JSON object per line{remedy}")
    return records


def record_format(record: Dict[str, Any], features: Features) -> Optional[str]:
    """Return ``completions``, ``chat`` or ``text`` for a record, or None (mlx-lm's order)."""
    if features.prompt in record and features.completion in record:
        return "completions"
    if features.chat in record:
        return "chat"
    if features.text in record:
        return "text"
    return None


def _field_list(record: Dict[str, Any]) -> str:
    return ", ".join(f"'{key}'" for key in record) or "none"


def _string_field(record, name, where, allow_empty=False) -> str:
    value = record[name]
    if not isinstance(value, str):
        raise DatasetError(f"{where}: field '{name}' must be a string, found a JSON {type(value).__name__}")
    if not value and not allow_empty:
        raise DatasetError(f"{where}: field '{name}' is empty")
    return value


def _check_messages(messages: Any, name: str, where: str) -> List[Dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f"{where}: field '{name}' must be a non-empty list of messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DatasetError(f"{where}: message {index} of '{name}' needs a 'role' and a 'content'")
        if message["role"] not in CHAT_ROLES:
            raise DatasetError(
                f"{where}: message {index} has role {message['role']!r}; expected one of {', '.join(CHAT_ROLES)}"
            )
        if not isinstance(message["content"], str):
            raise DatasetError(f"{where}: message {index} has a content that is not a string")
    return messages


def _template(tokenizer, messages, add_generation_prompt: bool) -> List[int]:
    """Render messages with the tokenizer's chat template, as token ids."""
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    if isinstance(rendered, str):
        rendered = tokenizer.encode(rendered)
    return list(rendered)


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def _tokenize_chat(tokenizer, messages, mask_prompt: bool) -> Tuple[List[int], np.ndarray]:
    tokens = _template(tokenizer, messages, add_generation_prompt=False)
    if not mask_prompt:
        return tokens, np.ones(len(tokens), dtype=bool)

    # Each assistant message spans from the end of the conversation before it
    # (with the generation prompt) to the end of the conversation with it.
    # The common prefix guards against tokens that merge across the border.
    mask = np.zeros(len(tokens), dtype=bool)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = 0
        if index > 0:
            start = _common_prefix_length(_template(tokenizer, messages[:index], True), tokens)
        end = _common_prefix_length(_template(tokenizer, messages[: index + 1], False), tokens)
        mask[start:end] = True
    return tokens, mask


def tokenize_record(
    record: Dict[str, Any], kind: str, tokenizer, mask_prompt: bool, features: Features, where: str
) -> Tuple[List[int], np.ndarray]:
    """Tokenize one record and mark the tokens that count in the loss.

    Args:
        record (dict): The JSON record.
        kind (str): ``text``, ``completions`` or ``chat``.
        tokenizer: Has ``encode``, ``eos_token_id`` and, for chats,
            ``apply_chat_template``.
        mask_prompt (bool): Train on completions or assistant messages only.
        features (Features): The field names.
        where (str): ``file:line``, for errors.

    Returns:
        tuple[list[int], np.ndarray]: The token ids and the loss mask.
    """
    # A tokenizer without a template may still have the method (Hugging Face
    # tokenizers, and this package's), with ``chat_template`` None.
    has_template = callable(getattr(tokenizer, "apply_chat_template", None))
    has_template = has_template and getattr(tokenizer, "chat_template", "") is not None

    if kind == "text":
        text = _string_field(record, features.text, where)
        tokens = list(tokenizer.encode(text))
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is not None and (not tokens or tokens[-1] != eos):
            tokens.append(eos)
        return tokens, np.ones(len(tokens), dtype=bool)

    if kind == "completions":
        prompt = _string_field(record, features.prompt, where, allow_empty=True)
        completion = _string_field(record, features.completion, where)
        if has_template:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            return _tokenize_chat(tokenizer, messages, mask_prompt)
        prompt_tokens = list(tokenizer.encode(prompt)) if prompt else []
        tokens = prompt_tokens + list(tokenizer.encode(completion))
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is not None:
            tokens.append(eos)
        mask = np.ones(len(tokens), dtype=bool)
        if mask_prompt:
            mask[: len(prompt_tokens)] = False
        return tokens, mask

    messages = _check_messages(record[features.chat], features.chat, where)
    if not has_template:
        raise DatasetError(
            f"{where}: chat records need a tokenizer with a chat template, and this tokenizer has none; use "
            f"'{features.text}' or '{features.prompt}'/'{features.completion}' records instead, or a tokenizer with a "
            "chat template (--tokenizer DIR, where DIR holds tokenizer.json and a tokenizer_config.json with a "
            "'chat_template')"
        )
    if mask_prompt and not any(m["role"] == "assistant" for m in messages):
        raise DatasetError(f"{where}: the chat has no assistant message, so no token would count in the loss")
    return _tokenize_chat(tokenizer, messages, mask_prompt)


class TokenizedDataset(list):
    """A list of ``Example`` from one file, with its path and record format."""

    def __init__(self, examples: Sequence[Example], path: Optional[Path] = None, kind: str = ""):
        super().__init__(examples)
        self.path = path
        self.kind = kind


def load_jsonl_dataset(
    path: Path,
    tokenizer,
    mask_prompt: Optional[bool] = None,
    max_tokens: Optional[int] = None,
    max_tokens_hint: str = "",
    features: Optional[Features] = None,
) -> TokenizedDataset:
    """Read, check and tokenize one JSON Lines file.

    Args:
        path (Path): The file.
        tokenizer: See ``tokenize_record``.
        mask_prompt (bool, optional): Train on completions and assistant
            messages only. None means yes for the prompt-completion and chat
            formats; it must not be True for text records.
        max_tokens (int, optional): Reject records with more tokens.
        max_tokens_hint (str): How ``max_tokens`` was set, for its error.
        features (Features, optional): The field names.

    Returns:
        TokenizedDataset: One Example per record.
    """
    path = Path(path)
    features = features or Features()
    records = read_jsonl(path)

    first_line, first = records[0]
    kind = record_format(first, features)
    if kind is None:
        raise DatasetError(
            f"{path}:{first_line}: the record has none of the fields 'text', 'prompt' and 'completion', "
            f"or 'messages' (found {_field_list(first)})"
        )
    if kind == "text" and mask_prompt:
        raise DatasetError(f"{path}: prompt masking needs prompt-completion or chat records, but the records have 'text'")
    masked = kind != "text" if mask_prompt is None else mask_prompt

    examples = []
    for number, record in records:
        where = f"{path}:{number}"
        found = record_format(record, features)
        if found != kind:
            raise DatasetError(
                f"{where}: expected a {FORMAT_NAMES[kind]} record with {features.describe(kind)} like line {first_line}, "
                f"found fields {_field_list(record)}"
            )
        try:
            tokens, mask = tokenize_record(record, kind, tokenizer, masked, features, where)
        except DatasetError:
            raise
        except (ValueError, TypeError, KeyError) as error:
            raise DatasetError(f"{where}: the tokenizer failed on the record: {error}") from error
        example = make_example(tokens, mask, source=where)
        if max_tokens is not None and len(example) > max_tokens:
            raise DatasetError(
                f"{where}: the record has {len(example)} tokens, more than the {max_tokens} allowed"
                f"{max_tokens_hint}; split it into several records"
            )
        if example.trained_tokens == 0:
            raise DatasetError(f"{where}: {_untrained_reason(kind, len(example))}")
        examples.append(example)
    logger.info("read %d %s records from %s", len(examples), FORMAT_NAMES[kind], path)
    return TokenizedDataset(examples, path, kind)


def _untrained_reason(kind: str, length: int) -> str:
    """Return why no token of a record counts in the loss, and what to do."""
    if kind == "text":
        return (
            f"the text tokenizes to {length} token{'' if length == 1 else 's'}, and training needs at least 2, "
            "because every token is predicted from the ones before it; make the text longer or remove the record"
        )
    if kind == "completions":
        return "no token of the completion counts in the loss; give the record a completion that is not empty"
    return "no token of an assistant message counts in the loss; give the chat an assistant message that is not empty"


def _find_split_files(folder: Path) -> Dict[str, Path]:
    found = {}
    for split in SPLITS:
        for candidate in (folder / f"{split}.jsonl", folder / "data" / f"{split}.jsonl"):
            if candidate.is_file():
                found[split] = candidate
                break
    return found


def resolve_data_folder(data: str) -> Path:
    """Return the local folder of ``--data``: a folder, or a Hugging Face
    dataset repo id whose JSON Lines files are downloaded."""
    path = Path(data).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise DatasetError(f"{data}: --data must be a folder with train.jsonl, valid.jsonl and test.jsonl, not a file")
    parts = data.split("/")
    if data.startswith((".", "/", "~")) or len(parts) != 2 or not all(parts):
        raise DatasetError(
            f"{data}: data folder not found; pass a folder with train.jsonl, valid.jsonl and test.jsonl, "
            "or a Hugging Face dataset id (owner/name)"
        )

    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(data, repo_type="dataset", allow_patterns=["*.jsonl"]))
    except Exception as error:  # huggingface_hub raises many unrelated types
        raise DatasetError(
            f"{data}: no such data folder, and downloading it as a Hugging Face dataset failed: {error}"
        ) from error


def load_datasets(
    data: str,
    tokenizer,
    splits: Sequence[str] = SPLITS,
    mask_prompt: Optional[bool] = None,
    max_tokens: Optional[int] = None,
    max_tokens_hint: str = "",
    features: Optional[Features] = None,
) -> Dict[str, TokenizedDataset]:
    """Load the requested splits of a data folder.

    Args:
        data (str): A folder, or a Hugging Face dataset repo id.
        tokenizer: See ``tokenize_record``.
        splits (sequence of str): The splits to load; a missing file raises
            DatasetError, except ``valid``, which is then left out with a warning.
        mask_prompt, max_tokens, max_tokens_hint, features: See ``load_jsonl_dataset``.

    Returns:
        dict[str, TokenizedDataset]: The loaded splits by name.
    """
    folder = resolve_data_folder(data)
    files = _find_split_files(folder)
    loaded = {}
    for split in splits:
        if split not in files:
            if split == "valid":
                logger.warning("no valid.jsonl in %s: training runs without validation", folder)
                continue
            raise DatasetError(f"{folder}: {split}.jsonl not found; add it (one JSON object per line) to use --{split}")
        loaded[split] = load_jsonl_dataset(files[split], tokenizer, mask_prompt, max_tokens, max_tokens_hint, features)
    return loaded
