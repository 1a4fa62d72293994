"""Reading, checking and tokenizing JSON Lines training data."""

import logging

import numpy as np
import pytest

from rwkv_mlx.tuner.datasets import DatasetError, Features, load_datasets, load_jsonl_dataset
from tuner_helpers import write_jsonl


class PlainTokenizer:
    """Bytes without a chat template."""

    eos_token_id = 0

    def encode(self, text):
        return list(text.encode())


def trained_text(example) -> str:
    """The bytes whose prediction counts in the loss."""
    return bytes(example.tokens[example.loss_mask].tolist()).decode()


def test_text_records_train_every_token(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "hello"}, {"text": "hi"}])

    data = load_jsonl_dataset(path, tokenizer)

    assert data.kind == "text"
    assert data[0].tokens.tolist() == list(b"hello") + [0]
    assert data[0].loss_mask.tolist() == [False] + [True] * 5
    assert data[1].source == f"{path}:2"


def test_completions_train_on_completion_only(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "2+2?", "completion": "4"}])

    example = load_jsonl_dataset(path, tokenizer)[0]

    assert bytes(example.tokens.tolist()).decode() == "User: 2+2?\n\nAssistant: 4\n\n"
    assert trained_text(example) == " 4\n\n"


def test_completions_unmasked_when_asked(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "2+2?", "completion": "4"}])

    example = load_jsonl_dataset(path, tokenizer, mask_prompt=False)[0]

    assert example.loss_mask[1:].all()


def test_completions_without_chat_template(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Q", "completion": "A"}])

    example = load_jsonl_dataset(path, PlainTokenizer())[0]

    assert example.tokens.tolist() == [ord("Q"), ord("A"), 0]
    assert example.loss_mask.tolist() == [False, True, True]


def test_chat_trains_every_assistant_message(tmp_path, tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"},
    ]
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": messages}])

    example = load_jsonl_dataset(path, tokenizer)[0]

    assert trained_text(example) == " Hello\n\n Goodbye\n\n"


def test_custom_feature_names(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [{"body": "abc"}])

    data = load_jsonl_dataset(path, tokenizer, features=Features(text="body"))

    assert data[0].tokens.tolist() == [97, 98, 99, 0]


def test_blank_lines_are_skipped(tmp_path, tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n\n   \n{"text": "b"}\n')

    data = load_jsonl_dataset(path, tokenizer)

    assert len(data) == 2
    assert data[1].source.endswith(":4")


@pytest.mark.parametrize(
    "lines, message",
    [
        ([], "the file has no records"),
        (["", "  "], "the file has no records"),
        (['{"text": "ok"}', '{"text": "broken"'], ":2: invalid JSON"),
        (['{"text": "a\tb"}'], ":1: invalid JSON (Invalid control character at column 12)"),
        (['{"text": "abc"', '{"text": "ok"}'], ":1: invalid JSON (Expecting ',' delimiter at column 15)"),
        (['["a", "b"]'], ":1: expected a JSON object, found a JSON list"),
        (['{"body": "x", "title": "y"}'], ":1: the record has none of the fields"),
        (['{"text": "a"}', '{"messages": []}'], ":2: expected a text record with 'text' like line 1"),
        (['{"text": ""}'], ":1: field 'text' is empty"),
        (['{"text": 5}'], ":1: field 'text' must be a string, found a JSON int"),
        (['{"prompt": "p", "completion": ""}'], ":1: field 'completion' is empty"),
        (['{"messages": "hi"}'], ":1: field 'messages' must be a non-empty list"),
        (['{"messages": [{"role": "user"}]}'], ":1: message 0 of 'messages' needs a 'role' and a 'content'"),
        (['{"messages": [{"role": "robot", "content": "x"}]}'], ":1: message 0 has role 'robot'"),
        (['{"messages": [{"role": "user", "content": "x"}]}'], ":1: the chat has no assistant message"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, tokenizer, lines, message):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines))

    with pytest.raises(DatasetError) as error:
        load_jsonl_dataset(path, tokenizer)

    assert str(path) in str(error.value)
    assert message in str(error.value)


def test_invalid_utf8_names_line(tmp_path, tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "\xff\xfe"}\n')

    with pytest.raises(DatasetError, match=r"train\.jsonl:2: not valid UTF-8"):
        load_jsonl_dataset(path, tokenizer)


def test_over_long_record_names_line(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "short"}, {"text": "x" * 100}])

    with pytest.raises(DatasetError) as error:
        load_jsonl_dataset(path, tokenizer, max_tokens=50, max_tokens_hint=" (the limit)")

    assert f"{path}:2: the record has 101 tokens, more than the 50 allowed (the limit)" in str(error.value)


def test_prompt_masking_rejected_for_text(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}])

    with pytest.raises(DatasetError, match="prompt masking needs"):
        load_jsonl_dataset(path, tokenizer, mask_prompt=True)


class FailingTemplateTokenizer(PlainTokenizer):
    chat_template = "roles user and assistant only"

    def apply_chat_template(self, messages, add_generation_prompt=False):
        raise ValueError(f"the chat format has no role {messages[0]['role']}")


def test_tokenizer_error_names_line(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}])

    with pytest.raises(DatasetError, match=r"train\.jsonl:1: the tokenizer failed on the record: the chat format has no role tool"):
        load_jsonl_dataset(path, FailingTemplateTokenizer())


class NoTemplateTokenizer(PlainTokenizer):
    """A tokenizer with the method but no template, as Hugging Face's and this package's byte tokenizer."""

    chat_template = None

    def apply_chat_template(self, messages, add_generation_prompt=False):
        raise ValueError("no chat template")


def test_completions_with_template_method_but_no_template(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Q", "completion": "A"}])

    example = load_jsonl_dataset(path, NoTemplateTokenizer())[0]

    assert example.tokens.tolist() == [ord("Q"), ord("A"), 0]


def test_chat_needs_template(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": [{"role": "assistant", "content": "x"}]}])

    with pytest.raises(DatasetError) as error:
        load_jsonl_dataset(path, PlainTokenizer())

    message = str(error.value)
    assert "chat records need a tokenizer with a chat template, and this tokenizer has none" in message
    assert "use 'text' or 'prompt'/'completion' records instead" in message
    assert "--tokenizer DIR" in message


@pytest.mark.parametrize("split, remedy", [("train", False), ("test", False), ("valid", True)])
def test_empty_file_advice_fits_split(tmp_path, tokenizer, split, remedy):
    path = tmp_path / f"{split}.jsonl"
    path.write_text("\n")

    with pytest.raises(DatasetError) as error:
        load_jsonl_dataset(path, tokenizer)

    assert f"{path}: the file has no records; add one JSON object per line" in str(error.value)
    assert ("remove the file" in str(error.value)) == remedy


def test_one_token_text_rejected(tmp_path, tokenizer):
    # The text is the end-of-text token alone, so none is appended.
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "fine"}, {"text": "\u0000"}])

    with pytest.raises(DatasetError) as error:
        load_jsonl_dataset(path, tokenizer)

    message = str(error.value)
    assert f"{path}:2: the text tokenizes to 1 token, and training needs at least 2" in message
    assert "make the text longer or remove the record" in message
    assert "completion" not in message


def test_record_count_logged_with_format_name(tmp_path, tokenizer, caplog):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Q", "completion": "A"}] * 2)

    with caplog.at_level(logging.INFO):
        load_jsonl_dataset(path, tokenizer)

    assert f"read 2 completion records from {path}" in caplog.text


def test_folder_splits(tmp_path, tokenizer, caplog):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}])
    write_jsonl(tmp_path / "test.jsonl", [{"text": "b"}])

    with caplog.at_level(logging.WARNING):
        data = load_datasets(str(tmp_path), tokenizer, ["train", "valid", "test"])

    assert sorted(data) == ["test", "train"]
    assert "no valid.jsonl" in caplog.text


def test_missing_train_file(tmp_path, tokenizer):
    with pytest.raises(DatasetError, match=r"train\.jsonl not found"):
        load_datasets(str(tmp_path), tokenizer, ["train"])


def test_missing_folder(tmp_path, tokenizer):
    with pytest.raises(DatasetError, match="data folder not found"):
        load_datasets(str(tmp_path / "nowhere"), tokenizer)


def test_hub_dataset_is_downloaded(tmp_path, tokenizer, monkeypatch):
    import huggingface_hub

    write_jsonl(tmp_path / "data" / "train.jsonl", [{"text": "from the hub"}])
    requests = []

    def fake_snapshot_download(repo_id, repo_type, allow_patterns):
        requests.append((repo_id, repo_type, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    data = load_datasets("someone/notes", tokenizer, ["train"])

    assert requests == [("someone/notes", "dataset", ["*.jsonl"])]
    assert np.array_equal(data["train"][0].tokens[:4], list(b"from"))


@pytest.mark.parametrize("item", ["hello there", b"hello", {"text": "hello"}])
def test_text_example_rejected(item):
    from rwkv_mlx.tuner.datasets import as_example

    with pytest.raises(DatasetError, match=r"example 3 is a \w+, not token ids; encode text with the tokenizer"):
        as_example(item, 3)


@pytest.mark.parametrize("tokens", [np.array([1.5, 2.0]), [1.0, 2.0], [True, False]])
def test_non_integer_tokens_rejected(tokens):
    from rwkv_mlx.tuner.datasets import as_example

    with pytest.raises(DatasetError, match="example 2: token ids must be integers"):
        as_example(tokens, 2)


def test_missing_jsonl_file_named(tmp_path):
    from rwkv_mlx.tokenizer import ByteTokenizer

    with pytest.raises(DatasetError, match="nope.jsonl: file not found"):
        load_jsonl_dataset(tmp_path / "nope.jsonl", ByteTokenizer())


def test_empty_example_rejected():
    from rwkv_mlx.tuner.datasets import make_example

    with pytest.raises(DatasetError, match="example: no tokens; an example needs at least two"):
        make_example([])
