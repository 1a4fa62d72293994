"""load_tokenizer: names, paths, other tokenizer.json files and bad input."""

from __future__ import annotations

import json

import pytest

from rwkv_mlx.tokenizer import (
    ByteTokenizer,
    JsonTokenizer,
    TokenizerError,
    WorldTokenizer,
    load_tokenizer,
    read_world_vocab,
)


def write_whitespace_tokenizer(directory, config=None):
    """Write a small WordLevel tokenizer.json (not byte-level) with a BOS
    post-processor, and its tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "again": 5}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.add_special_tokens(["<s>", "</s>"])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def test_load_world_by_name(world):
    assert isinstance(world, WorldTokenizer)
    assert world.vocab_size == 65536
    assert len(world) == 65536
    assert world.eos_token_id == 0
    assert world.bos_token_id is None


def test_load_world_returns_independent_objects():
    first, second = load_tokenizer("world"), load_tokenizer("world")
    first.chat_template = None
    assert second.chat_template is not None
    assert first._encoder is second._encoder


def test_load_bytes_by_name(byte_tokenizer):
    assert isinstance(byte_tokenizer, ByteTokenizer)
    assert byte_tokenizer.vocab_size == 256


def test_load_world_vocab_file_directly(tmp_path):
    path = tmp_path / "my_vocab.txt"
    path.write_text("1 'a' 1\n2 'b' 1\n", encoding="utf-8")
    # A vocabulary without all 256 bytes cannot encode every text.
    with pytest.raises(TokenizerError, match="no token for the single bytes"):
        load_tokenizer(path)

    lines = [f"{value + 1} {bytes([value])!r} 1" for value in range(256)] + ["257 'ab' 2", "258 b'\\xe4\\xbd' 2"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenizer = load_tokenizer(path)
    assert tokenizer.vocab_size == 259
    assert tokenizer.encode("abab") == [257, 257]
    assert tokenizer.encode("你") == [258, 0xA0 + 1]


@pytest.mark.parametrize(
    "line, message",
    [
        ("1 'a'", "expected '<id> <literal> <length>'"),
        ("x 'a' 1", "must be integers"),
        ("0 'a' 1", "start at 1"),
        ("1 'a' 2", "has 1 bytes but the length field is 2"),
        ("1 __import__('os') 1", "not a Python str or bytes literal"),
        ("1 42 2", "non-empty str or bytes literal"),
    ],
)
def test_read_world_vocab_rejects_bad_line(tmp_path, line, message):
    path = tmp_path / "vocab.txt"
    path.write_text(f"2 'b' 1\n{line}\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match=f"line 2: .*{message}"):
        read_world_vocab(path)


def test_read_world_vocab_rejects_repeated_id(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("1 'a' 1\n1 'b' 1\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match="token id 1 appears a second time"):
        read_world_vocab(path)


def test_read_world_vocab_rejects_empty_and_missing(tmp_path):
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(TokenizerError, match="has no tokens"):
        read_world_vocab(tmp_path / "empty.txt")
    with pytest.raises(TokenizerError, match="not found"):
        read_world_vocab(tmp_path / "missing.txt")


def test_load_unknown_name_raises():
    with pytest.raises(TokenizerError, match="tokenizer 'wrold' not found"):
        load_tokenizer("wrold")


def test_load_directory_without_tokenizer_raises(tmp_path):
    with pytest.raises(TokenizerError, match="has no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_load_file_of_unknown_format_raises(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\x00")
    with pytest.raises(TokenizerError, match="cannot tell the tokenizer format"):
        load_tokenizer(tmp_path / "weights.bin")


def test_load_corrupt_tokenizer_json_raises(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(TokenizerError, match="tokenizer.json is not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Nope"}}')
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)


def test_load_other_tokenizer_json(tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[bot]{% endif %}"
    directory = write_whitespace_tokenizer(
        tmp_path / "model", {"eos_token": "</s>", "bos_token": {"content": "<s>"}, "chat_template": template}
    )
    tokenizer = load_tokenizer(directory)
    assert isinstance(tokenizer, JsonTokenizer)
    assert tokenizer.eos_token_id == 2
    assert tokenizer.bos_token_id == 1
    assert tokenizer.vocab_size == 6
    assert tokenizer.encode("hello world") == [1, 3, 4]
    assert tokenizer.encode("hello world", add_special_tokens=False) == [3, 4]
    assert tokenizer.decode([3, 4, 5]) == "hello world again"
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False) == "[user] hello\n[bot]"
    with pytest.raises(TokenizerError, match="token id 9 .*not in the vocabulary"):
        tokenizer.decode([3, 9])


def test_other_tokenizer_json_streams_by_decoding(tmp_path):
    tokenizer = load_tokenizer(write_whitespace_tokenizer(tmp_path / "model"))
    detokenizer = tokenizer.detokenizer
    for token_id in [3, 4, 5]:
        detokenizer.add_token(token_id)
    detokenizer.finalize()
    assert detokenizer.text == tokenizer.decode([3, 4, 5])
    with pytest.raises(TokenizerError, match="not byte-level"):
        tokenizer.token_bytes(3)


def test_other_tokenizer_json_file_path_and_save(tmp_path):
    directory = write_whitespace_tokenizer(tmp_path / "model", {"eos_token": "</s>"})
    tokenizer = load_tokenizer(directory / "tokenizer.json")
    assert tokenizer.eos_token_id == 2
    tokenizer.save_pretrained(tmp_path / "copy")
    copy = load_tokenizer(tmp_path / "copy")
    assert copy.encode("world hello") == tokenizer.encode("world hello")
    assert copy.eos_token_id == 2


def test_json_tokenizer_without_chat_template_raises(tmp_path):
    tokenizer = load_tokenizer(write_whitespace_tokenizer(tmp_path / "model"))
    assert tokenizer.chat_template is None
    with pytest.raises(TokenizerError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hello"}])


def test_byte_level_tokenizer_json_streams_bytes(tmp_path, world):
    # A tokenizer.json that is not ours but byte-level gets the byte-based
    # streaming detokenizer: our export without the marker in the config.
    world.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["rwkv_mlx_encoding"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(tmp_path)
    assert isinstance(tokenizer, JsonTokenizer)
    ids = world.encode("Hi 😀")
    assert tokenizer.encode("Hi 😀") == ids
    detokenizer = tokenizer.detokenizer
    segments = []
    for token_id in ids:
        detokenizer.add_token(token_id)
        segments.append(detokenizer.last_segment)
    assert segments == ["Hi", " ", "", "", "😀"]
    assert tokenizer.token_bytes(0) == b"<|endoftext|>"


def write_byte_level_bpe(directory):
    """Train a small byte-level BPE with an added token of plain spaces and a
    special token, and save it as tokenizer.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["hello world, the quick brown fox", "中文 和 emoji 😀 text"] * 20, trainer)
    tokenizer.add_tokens([AddedToken("    ", normalized=False)])
    tokenizer.add_special_tokens(["<|end|>"])
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>"}))
    return directory


def test_byte_level_bpe_streams_like_decode(tmp_path):
    tokenizer = load_tokenizer(write_byte_level_bpe(tmp_path / "bpe"))
    text = "hello    world 😀 中文<|end|>    x"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.token_bytes(tokenizer.convert_tokens_to_ids("    ")) == b"    "

    detokenizer = tokenizer.detokenizer
    segments = []
    for token_id in ids:
        detokenizer.add_token(token_id)
        segments.append(detokenizer.last_segment)
    detokenizer.finalize()
    assert "".join(segments) + detokenizer.last_segment == text
    assert "\ufffd" not in "".join(segments)
