"""World tokenizer encoding against the reference ids of the committed corpus.

The expected ids come from BlinkDL's reference trie tokenizer (rwkv 0.8.32),
written by make_expected_ids.py.
"""

from __future__ import annotations

import hashlib

import pytest
from tokenizer_corpus import corpus_names, first_difference

from rwkv_mlx.tokenizer import load_tokenizer, world_vocab_path
from rwkv_mlx.tokenizer.vocab import WORLD_VOCAB_SHA256


def test_shipped_vocab_is_the_reference_file():
    assert hashlib.sha256(world_vocab_path().read_bytes()).hexdigest() == WORLD_VOCAB_SHA256


def test_corpus_has_over_one_megabyte_of_random_unicode(corpus):
    random_text = [data for name, (data, _, _) in corpus.items() if name.startswith(("random_all_planes", "random_bmp", "random_scripts"))]
    assert sum(len(data) for data in random_text) > 1_000_000


@pytest.mark.parametrize("name", corpus_names())
def test_world_encode_matches_reference(world, corpus, name):
    data, is_text, expected = corpus[name]
    actual = world.encode(data.decode("utf-8")) if is_text else world.encode_bytes(data)
    assert actual == expected, f"{name}: {first_difference(actual, expected)}"


def test_python_loop_encoder_matches_reference(world, corpus):
    # The loop encodes short texts, long pieces and the last pieces of the
    # trie walk. Check it alone on one document of every kind.
    encoder = world._encoder
    for name, (data, _, expected) in corpus.items():
        if name.startswith("random_") and not name.endswith("_0"):
            continue
        actual = encoder._encode_with_loop(data, 0, len(data))
        assert actual == expected, f"{name}: {first_difference(actual, expected)}"


def test_world_encode_of_whole_corpus_at_once(world, corpus):
    # One long input exercises several windows and chunks. No token longer
    # than one byte contains a zero byte, so a zero byte between documents
    # is a cut on both sides and encodes to its own token.
    separator_id = world.encode("\x00")
    assert separator_id == [1]
    data = b"\x00".join(data for data, _, _ in corpus.values())
    expected = []
    for index, (_, _, ids) in enumerate(corpus.values()):
        expected += (separator_id if index else []) + ids
    actual = world.encode_bytes(data)
    assert actual == expected, first_difference(actual, expected)


@pytest.mark.parametrize("chunk_bytes", [1 << 12, 1 << 16])
def test_world_encode_small_chunks_and_windows(world, corpus, monkeypatch, chunk_bytes):
    from rwkv_mlx.tokenizer import longest_match

    monkeypatch.setattr(longest_match, "_CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(longest_match, "_WINDOW_BYTES", chunk_bytes // 4)
    for name in ("all_hand_written", "random_scripts_0", "long_space_runs", "random_byte_tokens_0"):
        data, is_text, expected = corpus[name]
        actual = world.encode_bytes(data)
        assert actual == expected, f"{name}: {first_difference(actual, expected)}"


def test_every_text_token_encodes_to_itself(world):
    # The whole text of a token is its own longest match.
    for token_id, data in enumerate(world._token_bytes):
        if not data:
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        assert world.encode(text) == [token_id], f"token {token_id} {data!r}"


def test_every_token_bytes_encode_to_itself(world):
    ids = [token_id for token_id, data in enumerate(world._token_bytes) if data]
    for token_id in ids:
        assert world.encode_bytes(world._token_bytes[token_id]) == [token_id]


def test_world_encode_keeps_surrounding_whitespace(world):
    assert world.decode(world.encode("  padded \n")) == "  padded \n"
    assert world.encode(" ") == [33]
    assert world.encode("") == []


def test_world_encode_rejects_lone_surrogate(world):
    from rwkv_mlx.tokenizer import TokenizerError

    with pytest.raises(TokenizerError, match="surrogate"):
        world.encode("a\ud800b")


def test_world_encode_rejects_bytes_argument(world):
    from rwkv_mlx.tokenizer import TokenizerError

    with pytest.raises(TokenizerError, match="expects a string"):
        world.encode(b"abc")


def test_vocab_directory_loads_as_world(tmp_path, world):
    (tmp_path / "rwkv_vocab_v20230424.txt").write_bytes(world_vocab_path().read_bytes())
    loaded = load_tokenizer(tmp_path)
    assert loaded.vocab_size == 65536
    assert loaded.encode("Hello world") == world.encode("Hello world")
