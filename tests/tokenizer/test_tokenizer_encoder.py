"""The vectorized longest-match encoder on synthetic vocabularies, against a
plain greedy loop written here."""

from __future__ import annotations

import numpy as np
import pytest

from rwkv_mlx.tokenizer import TokenizerError
from rwkv_mlx.tokenizer import longest_match
from rwkv_mlx.tokenizer.longest_match import LongestMatchEncoder


def greedy_oracle(token_ids: dict[bytes, int], data: bytes) -> list[int]:
    """Greedy longest match the obvious way: try every length, longest first."""
    longest = max(len(token) for token in token_ids)
    ids, position = [], 0
    while position < len(data):
        for length in range(min(longest, len(data) - position), 0, -1):
            token_id = token_ids.get(data[position : position + length])
            if token_id is not None:
                ids.append(token_id)
                position += length
                break
    return ids


def synthetic_vocabulary(seed: int, alphabet: bytes, count: int, max_length: int) -> list[bytes | None]:
    """All single bytes plus random strings over a small alphabet, so that
    pieces are long and split into many tokens."""
    rng = np.random.default_rng(seed)
    tokens = {bytes([value]) for value in range(256)}
    while len(tokens) < 256 + count:
        length = int(rng.integers(2, max_length + 1))
        tokens.add(bytes(rng.choice(list(alphabet), size=length).tolist()))
    return [None] + sorted(tokens, key=lambda token: (len(token), token))


@pytest.mark.parametrize("seed", range(4))
def test_encoder_matches_oracle_on_random_text(seed):
    alphabet = b"ab c\n"
    token_bytes = synthetic_vocabulary(seed, alphabet, count=300, max_length=20 if seed % 2 else 90)
    encoder = LongestMatchEncoder(token_bytes)
    token_ids = {token: token_id for token_id, token in enumerate(token_bytes) if token}

    rng = np.random.default_rng(100 + seed)
    for length in (0, 1, 255, 256, 3000, 70000):
        # Mostly the small alphabet, with some other bytes that cut pieces.
        data = bytes(np.where(rng.random(length) < 0.9, rng.choice(list(alphabet), length), rng.integers(0, 256, length)).tolist())
        expected = greedy_oracle(token_ids, data)
        assert encoder.encode(data) == expected, f"length {length}"


def test_encoder_all_pieces_single_tokens():
    token_bytes = [None] + [bytes([value]) for value in range(256)] + [b"xy"]
    encoder = LongestMatchEncoder(token_bytes)
    data = b"xy-" * 400
    assert encoder.encode(data) == [257, ord("-") + 1] * 400


def test_encoder_long_tokens_and_long_pieces():
    # Tokens of 16, 70 and 128 bytes need the long-token and loop paths.
    long_tokens = [b"=" * 16, b"=" * 70, b" " * 128, b" " * 64, b"abcdefghijklmnopq"]
    token_bytes = [None] + [bytes([value]) for value in range(256)] + long_tokens
    encoder = LongestMatchEncoder(token_bytes)
    token_ids = {token: token_id for token_id, token in enumerate(token_bytes) if token}
    data = b"x" + b"=" * 300 + b" " * 1000 + b"abcdefghijklmnopqr" * 30 + b"=" * 17
    assert encoder.encode(data) == greedy_oracle(token_ids, data)


@pytest.mark.parametrize("window", [64, 1000])
def test_encoder_small_windows_and_chunks(monkeypatch, window):
    monkeypatch.setattr(longest_match, "_WINDOW_BYTES", window)
    monkeypatch.setattr(longest_match, "_CHUNK_BYTES", window * 3)
    token_bytes = synthetic_vocabulary(7, b"ab ", count=200, max_length=12)
    encoder = LongestMatchEncoder(token_bytes)
    token_ids = {token: token_id for token_id, token in enumerate(token_bytes) if token}
    rng = np.random.default_rng(7)
    data = bytes(rng.choice(list(b"ab .\n"), 20000).tolist())
    assert encoder.encode(data) == greedy_oracle(token_ids, data)


def test_encoder_rejects_vocabulary_without_all_bytes():
    with pytest.raises(TokenizerError, match=r"no token for the single bytes \[0, 1, 2"):
        LongestMatchEncoder([None, b"a", b"b"])


def test_encoder_rejects_repeated_token():
    token_bytes = [None] + [bytes([value]) for value in range(256)] + [b"ab", b"ab"]
    with pytest.raises(TokenizerError, match="token ids 257 and 258 both have the bytes b'ab'"):
        LongestMatchEncoder(token_bytes)
