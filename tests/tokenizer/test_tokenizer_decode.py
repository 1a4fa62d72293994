"""Decoding and streaming detokenization of the World and byte tokenizers."""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx
from rwkv_mlx.tokenizer import DecodingStreamingDetokenizer, StreamingDetokenizer, TokenizerError

# Ids of single-byte World tokens: the byte value plus one.
B = {value: value + 1 for value in range(256)}
HELLO = [33155]  # "Hello"
EMOJI_GRINNING = [3319, 153, 129]  # "😀" as b"\xf0\x9f", b"\x98", b"\x80"
HANGUL_GAT = [3256, 136]  # "갇" as b"\xea\xb0", b"\x87"


def stream(detokenizer, ids):
    """Feed ids one by one; return the segment read after each, and the final text."""
    segments = []
    for token_id in ids:
        detokenizer.add_token(token_id)
        segments.append(detokenizer.last_segment)
    detokenizer.finalize()
    segments.append(detokenizer.last_segment)
    return segments, detokenizer.text


def test_world_token_ids_used_here(world):
    assert world.encode("Hello") == HELLO
    assert world.encode("😀") == EMOJI_GRINNING
    assert world.encode("갇") == HANGUL_GAT


def test_decode_end_of_text_is_empty(world):
    assert world.decode([0]) == ""
    assert world.decode([0, *HELLO, 0]) == "Hello"
    assert world.decode([]) == ""


def test_decode_single_int_and_arrays(world):
    assert world.decode(HELLO[0]) == "Hello"
    assert world.decode(np.array(EMOJI_GRINNING)) == "😀"
    assert world.decode(mx.array(EMOJI_GRINNING)) == "😀"
    assert world.decode([np.int64(HELLO[0])]) == "Hello"


def test_decode_replaces_each_bad_span(world):
    # An invalid byte, then text, then a truncated character at the end.
    ids = [B[0xFF], *HELLO, B[0xE4], B[0xBD]]
    assert world.decode(ids) == "\ufffdHello\ufffd"
    # A truncated character in the middle keeps the text around it.
    assert world.decode([*HELLO, B[0xF0], B[0x9F], *HELLO]) == "Hello\ufffdHello"
    # Two separate bad spans give two replacements.
    assert world.decode([B[0x80], B[0x41], B[0x80]]) == "\ufffdA\ufffd"


def test_decode_matches_bytes_decode_with_replace(world):
    rng = np.random.default_rng(0)
    for _ in range(200):
        ids = rng.integers(1, 65530, size=int(rng.integers(1, 20))).tolist()
        expected = b"".join(world._token_bytes[i] for i in ids).decode("utf-8", errors="replace")
        assert world.decode(ids) == expected


@pytest.mark.parametrize("bad_id", [65530, 65535, 65536, -1, 10**9])
def test_decode_rejects_id_outside_vocabulary(world, bad_id):
    with pytest.raises(TokenizerError, match=f"token id {bad_id} .*position 1"):
        world.decode([HELLO[0], bad_id])


@pytest.mark.parametrize("bad_id", [1.5, "7", None])
def test_decode_rejects_non_integer_id(world, bad_id):
    with pytest.raises(TokenizerError, match="token id"):
        world.decode([HELLO[0], bad_id])


def test_streaming_holds_back_split_emoji(world):
    segments, text = stream(world.detokenizer, [*HELLO, *EMOJI_GRINNING, *HELLO])
    assert segments == ["Hello", "", "", "😀", "Hello", ""]
    assert text == "Hello😀Hello"


def test_streaming_holds_back_split_hangul_syllable(world):
    segments, text = stream(world.detokenizer, HANGUL_GAT)
    assert segments == ["", "갇", ""]
    assert text == "갇"


def test_streaming_replaces_invalid_byte_at_once(world):
    segments, text = stream(world.detokenizer, [B[0xFF], *HELLO])
    assert segments == ["\ufffd", "Hello", ""]
    assert text == "\ufffdHello"


def test_streaming_flushes_incomplete_character_on_finalize(world):
    segments, text = stream(world.detokenizer, [*HELLO, B[0xF0], B[0x9F]])
    assert segments == ["Hello", "", "", "\ufffd"]
    assert text == "Hello\ufffd"


def test_streaming_end_of_text_adds_nothing(world):
    segments, text = stream(world.detokenizer, [*HELLO, 0])
    assert segments == ["Hello", "", ""]
    assert text == "Hello"


def test_streaming_rejects_id_outside_vocabulary(world):
    detokenizer = world.detokenizer
    with pytest.raises(TokenizerError, match="token id 65531"):
        detokenizer.add_token(65531)
    assert detokenizer.tokens == []


def test_streaming_equals_decode_on_random_ids(world):
    rng = np.random.default_rng(1)
    detokenizer = world.detokenizer
    for _ in range(100):
        # Many single bytes from 0x80 up, so characters split often.
        ids = np.where(rng.random(60) < 0.5, rng.integers(0x81, 0x101, 60), rng.integers(1, 65530, 60)).tolist()
        detokenizer.reset()
        segments, text = stream(detokenizer, ids)
        assert text == world.decode(ids)
        assert "".join(segments) == text
        assert detokenizer.tokens == ids


def test_streaming_reset_clears_state(world):
    detokenizer = world.detokenizer
    detokenizer.add_token(B[0xF0])
    detokenizer.reset()
    segments, text = stream(detokenizer, HELLO)
    assert text == "Hello"
    assert detokenizer.offset == 5


def test_detokenizer_property_returns_fresh_instances(world):
    first, second = world.detokenizer, world.detokenizer
    first.add_token(HELLO[0])
    assert isinstance(second, StreamingDetokenizer)
    assert second.tokens == []


def test_byte_tokenizer_encode_decode(byte_tokenizer):
    text = "héllo 😀\r\n"
    assert byte_tokenizer.encode(text) == list(text.encode("utf-8"))
    assert byte_tokenizer.decode(byte_tokenizer.encode(text)) == text
    assert byte_tokenizer.decode([0xFF, 0x68, 0x69]) == "\ufffdhi"
    assert byte_tokenizer.decode(np.array([0x68, 0x69], dtype=np.int64)) == "hi"
    assert byte_tokenizer.vocab_size == 256
    assert byte_tokenizer.eos_token_id is None


@pytest.mark.parametrize("bad_id", [256, -1])
def test_byte_tokenizer_rejects_id_outside_vocabulary(byte_tokenizer, bad_id):
    with pytest.raises(TokenizerError, match=f"token id {bad_id}"):
        byte_tokenizer.decode([0x41, bad_id])


def test_byte_tokenizer_streaming_split_character(byte_tokenizer):
    segments, text = stream(byte_tokenizer.detokenizer, list("갇".encode()))
    assert segments == ["", "", "갇", ""]


def test_decoding_detokenizer_holds_back_replacement_character(world):
    detokenizer = DecodingStreamingDetokenizer(world.decode)
    segments, text = stream(detokenizer, [*HELLO, *EMOJI_GRINNING, world.encode("\n")[0], *HELLO])
    assert segments == ["Hello", "", "", "😀", "\n", "Hello", ""]
    assert text == "Hello😀\nHello"
