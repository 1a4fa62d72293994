"""tokenizer.json export: tokenizers and transformers encode like the reference."""

from __future__ import annotations

import json

import pytest
from tokenizer_corpus import first_difference

from rwkv_mlx.tokenizer import WORLD_CHAT_TEMPLATE, ByteTokenizer, WorldTokenizer, load_tokenizer
from rwkv_mlx.tokenizer.export import byte_to_unicode, longest_match_regex

# Documents for the slower pipelines: every kind once, all random kinds once.
EXPORT_DOCUMENTS = [
    "all_hand_written",
    "space_runs",
    "long_space_runs",
    "crlf",
    "mixed_whitespace",
    "leading_spaces",
    "trailing_spaces",
    "both_ends",
    "single_space",
    "empty",
    "end_of_text_marker",
    "code_points_below_0x800",
    "controls_between_letters",
    "invisible_characters",
    "combining_marks",
    "emoji",
    "all_emoji_blocks",
    "random_all_planes_0",
    "random_bmp_0",
    "random_scripts_0",
    "random_ascii_0",
    "random_text_tokens_0",
]


@pytest.fixture(scope="module")
def saved_world(world, tmp_path_factory):
    directory = tmp_path_factory.mktemp("world")
    world.save_pretrained(directory)
    return directory


def test_byte_alphabet_is_the_tokenizers_one():
    from tokenizers import pre_tokenizers

    alphabet = byte_to_unicode()
    assert len(set(alphabet)) == 256
    assert sorted(alphabet) == sorted(pre_tokenizers.ByteLevel.alphabet())
    assert alphabet[ord(" ")] == "\u0120"
    assert alphabet[ord("A")] == "A"


def test_longest_match_regex_prefers_longer_tokens():
    import re

    regex = longest_match_regex([b"a", b"b", b"ab", b"abc", b"bcd"])
    # Python's re has the same semantics for this syntax (no byte above 0x7f).
    assert re.findall(regex, "abcabbcdab") == ["abc", "ab", "bcd", "ab"]


def test_save_pretrained_writes_two_files(saved_world):
    assert sorted(path.name for path in saved_world.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    config = json.loads((saved_world / "tokenizer_config.json").read_text())
    assert config["chat_template"] == WORLD_CHAT_TEMPLATE
    assert config["eos_token"] == "<|endoftext|>"
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_tokenizers_library_encodes_like_reference(saved_world, corpus):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(saved_world / "tokenizer.json"))
    for name in EXPORT_DOCUMENTS:
        data, _, expected = corpus[name]
        actual = tokenizer.encode(data.decode("utf-8")).ids
        assert actual == expected, f"{name}: {first_difference(actual, expected)}"


def test_tokenizers_library_decodes(saved_world, world):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(saved_world / "tokenizer.json"))
    text = "Hello 😀 갇\r\n  end"
    assert tokenizer.decode(world.encode(text)) == text


def test_transformers_loads_without_remote_code(saved_world, corpus):
    transformers = pytest.importorskip("transformers")

    for loader in (transformers.AutoTokenizer, transformers.PreTrainedTokenizerFast):
        tokenizer = loader.from_pretrained(str(saved_world))
        assert tokenizer.eos_token_id == 0
        for name in ("all_hand_written", "long_space_runs", "end_of_text_marker", "random_scripts_0", "emoji"):
            data, _, expected = corpus[name]
            actual = tokenizer.encode(data.decode("utf-8"))
            assert actual == expected, f"{loader.__name__}, {name}: {first_difference(actual, expected)}"
        assert tokenizer.decode(expected, skip_special_tokens=True) == data.decode("utf-8")


def test_transformers_renders_world_chat_template(saved_world, world):
    transformers = pytest.importorskip("transformers")

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(saved_world))
    messages = [{"role": "user", "content": "Hi\n\n\nthere"}, {"role": "assistant", "content": "Hello!"}]
    for add_generation_prompt in (True, False):
        expected = world.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert rendered == expected


def test_saved_world_loads_back_fast(saved_world, world):
    loaded = load_tokenizer(saved_world)
    assert isinstance(loaded, WorldTokenizer)
    assert loaded._encoder is world._encoder  # same vocabulary, shared tables
    assert loaded.vocab_size == 65536
    assert loaded.chat_template == WORLD_CHAT_TEMPLATE


def test_saved_bytes_loads_back_and_exports_exactly(tmp_path, byte_tokenizer):
    from tokenizers import Tokenizer

    byte_tokenizer.save_pretrained(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    text = "bytes 😀 \x00\x7f\r\n"
    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(text).ids == list(text.encode())


def test_save_pretrained_replaces_existing_files(tmp_path, world):
    (tmp_path / "tokenizer.json").write_text("old")
    world.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["type"] == "WordLevel"
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]


def test_custom_vocabulary_exports_exactly(tmp_path):
    from tokenizers import Tokenizer

    token_bytes = [None] + [bytes([value]) for value in range(256)] + [b"ab", b"abc", b"bcd", b"  ", b"    "]
    tokenizer = WorldTokenizer(token_bytes, name_or_path="custom")
    tokenizer.save_pretrained(tmp_path)
    exported = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = "abcd abcabbcd      x"
    assert exported.encode(text).ids == tokenizer.encode(text)
    reloaded = load_tokenizer(tmp_path)
    assert reloaded.encode(text) == tokenizer.encode(text)
    assert reloaded.vocab_size == len(token_bytes)
