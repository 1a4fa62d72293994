"""The tokenizers inside mlx-lm: TokenizerWrapper, its detokenizer, and
mlx-lm's own loader on an exported directory."""

from __future__ import annotations

import pytest

tokenizer_utils = pytest.importorskip("mlx_lm.tokenizer_utils")

from rwkv_mlx.tokenizer import format_world_chat, load_tokenizer, wrap_for_mlx_lm  # noqa: E402

MESSAGES = [{"role": "user", "content": "Tell me a joke."}]
TEXT_WITH_SPLIT_CHARACTERS = " leading space, emoji 😀 and 갇 and 👨‍👩‍👧‍👦\n\nend "


def stream_text(detokenizer, ids):
    detokenizer.reset()
    pieces = []
    for token_id in ids:
        detokenizer.add_token(token_id)
        pieces.append(detokenizer.last_segment)
    detokenizer.finalize()
    pieces.append(detokenizer.last_segment)
    return pieces


def test_wrapper_of_world_tokenizer():
    wrapper = wrap_for_mlx_lm(load_tokenizer("world"))
    assert isinstance(wrapper, tokenizer_utils.TokenizerWrapper)
    assert 0 in wrapper.eos_token_ids
    assert wrapper.has_chat_template
    assert wrapper.vocab_size == 65536
    assert wrapper.encode("Hello", add_special_tokens=False) == [33155]


def test_wrapper_chat_template_as_mlx_lm_calls_it():
    tokenizer = load_tokenizer("world")
    wrapper = wrap_for_mlx_lm(tokenizer)
    ids = wrapper.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert ids == tokenizer.encode(format_world_chat(MESSAGES))
    text = wrapper.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == "User: Tell me a joke.\n\nAssistant:"


def test_wrapper_detokenizer_streams_whole_characters():
    tokenizer = load_tokenizer("world")
    wrapper = wrap_for_mlx_lm(tokenizer)
    detokenizer = wrapper.detokenizer
    assert isinstance(detokenizer, tokenizer_utils.StreamingDetokenizer)
    ids = tokenizer.encode(TEXT_WITH_SPLIT_CHARACTERS)
    pieces = stream_text(detokenizer, ids)
    assert "".join(pieces) == TEXT_WITH_SPLIT_CHARACTERS
    assert "\ufffd" not in "".join(pieces[:-1])
    assert detokenizer.text == TEXT_WITH_SPLIT_CHARACTERS
    # Each access gives a fresh detokenizer, as for concurrent requests.
    assert wrapper.detokenizer.tokens == []


def test_wrapper_of_byte_tokenizer_has_no_chat_template():
    wrapper = wrap_for_mlx_lm(load_tokenizer("bytes"))
    assert not wrapper.has_chat_template
    assert wrapper.eos_token_ids == set()
    pieces = stream_text(wrapper.detokenizer, list(TEXT_WITH_SPLIT_CHARACTERS.encode()))
    assert "".join(pieces) == TEXT_WITH_SPLIT_CHARACTERS


def test_wrapper_extra_eos_ids():
    wrapper = wrap_for_mlx_lm(load_tokenizer("world"), eos_token_ids=[261])
    assert wrapper.eos_token_ids == {0, 261}


def test_mlx_lm_loads_exported_directory(tmp_path):
    # mlx-lm's own loader reads the files through transformers.
    tokenizer = load_tokenizer("world")
    tokenizer.save_pretrained(tmp_path)
    loaded = tokenizer_utils.load(tmp_path)
    assert loaded.encode(TEXT_WITH_SPLIT_CHARACTERS, add_special_tokens=False) == tokenizer.encode(
        TEXT_WITH_SPLIT_CHARACTERS
    )
    assert 0 in loaded.eos_token_ids
    assert loaded.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == format_world_chat(
        MESSAGES
    )
    # The decoder is wrapped in a Sequence, so mlx-lm picks its general
    # detokenizer, which keeps the leading space.
    detokenizer = loaded.detokenizer
    assert isinstance(detokenizer, tokenizer_utils.NaiveStreamingDetokenizer)
    pieces = stream_text(detokenizer, tokenizer.encode(TEXT_WITH_SPLIT_CHARACTERS))
    assert "".join(pieces) == TEXT_WITH_SPLIT_CHARACTERS
