"""The mixed corpus of the World tokenizer parity tests.

``build_documents()`` returns the same documents on every machine: the
hand-written texts in ``corpus/`` (English, Chinese, other languages, code)
and documents generated here (whitespace runs, control characters, emoji,
more than 1 MB of random Unicode, and random concatenations of vocabulary
tokens). The random documents come from SplitMix64 in numpy's wrapping
uint64 arithmetic, which gives the same numbers on every platform and numpy
version.

``make_expected_ids.py`` encodes the documents with the reference tokenizer
and stores the ids in ``corpus/expected_ids.npz``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
EXPECTED_IDS_FILE = CORPUS_DIR / "expected_ids.npz"
HAND_WRITTEN = ("english", "chinese", "multilingual", "code")

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)

# Blocks of code points that random "words" are drawn from: (first, last).
_SCRIPT_BLOCKS = [
    (0x0021, 0x007E),  # ASCII
    (0x0061, 0x007A),  # ASCII lowercase, for English-like words
    (0x00A1, 0x00FF),  # Latin-1
    (0x0100, 0x024F),  # Latin Extended
    (0x0370, 0x03FF),  # Greek
    (0x0400, 0x04FF),  # Cyrillic
    (0x0590, 0x05FF),  # Hebrew
    (0x0600, 0x06FF),  # Arabic
    (0x0900, 0x097F),  # Devanagari
    (0x0E00, 0x0E7F),  # Thai
    (0x1100, 0x11FF),  # Hangul Jamo
    (0x2000, 0x206F),  # General punctuation
    (0x2190, 0x22FF),  # Arrows and mathematical operators
    (0x2500, 0x257F),  # Box drawing
    (0x3000, 0x303F),  # CJK punctuation
    (0x3040, 0x30FF),  # Hiragana and Katakana
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xAC00, 0xD7A3),  # Hangul syllables
    (0xE000, 0xF8FF),  # Private use
    (0xFF00, 0xFFEF),  # Half-width and full-width forms
    (0x1F300, 0x1FAFF),  # Emoji and pictographs
    (0x20000, 0x2A6DF),  # CJK extension B
]
_SEPARATORS = [" ", " ", " ", "  ", "\n", "\n\n", ", ", ". ", "\t", "\r\n", "", "-", "    ", "。", "、"]


def random_uint64(seed: int, count: int) -> np.ndarray:
    """Return ``count`` SplitMix64 outputs for ``seed``."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + np.arange(1, count + 1, dtype=np.uint64) * _GAMMA
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def _uniform(seed: int, count: int, low: int, high: int) -> np.ndarray:
    """Integers in [low, high], int64 (the small modulo bias does not matter here)."""
    return (random_uint64(seed, count) % np.uint64(high - low + 1)).astype(np.int64) + low


def _code_points_to_text(code_points: np.ndarray) -> str:
    # Skip the surrogates, which UTF-8 cannot encode, by moving them up.
    code_points = np.where((code_points >= 0xD800) & (code_points <= 0xDFFF), code_points + 0x800, code_points)
    return code_points.astype("<u4").tobytes().decode("utf-32-le")


def random_plane_text(seed: int, length: int, last_code_point: int) -> str:
    """Code points uniform in [0, last_code_point] without surrogates."""
    return _code_points_to_text(_uniform(seed, length, 0, last_code_point))


def random_script_text(seed: int, words: int) -> str:
    """Words of 1 to 12 code points, each from one script block, joined by
    separators drawn from spaces, newlines, tabs and punctuation."""
    blocks = _uniform(seed, words, 0, len(_SCRIPT_BLOCKS) - 1)
    lengths = _uniform(seed + 1, words, 1, 12)
    separators = _uniform(seed + 2, words, 0, len(_SEPARATORS) - 1)
    offsets = random_uint64(seed + 3, int(lengths.sum()))
    parts = []
    position = 0
    for block, length, separator in zip(blocks.tolist(), lengths.tolist(), separators.tolist()):
        first, last = _SCRIPT_BLOCKS[block]
        code_points = first + (offsets[position : position + length] % np.uint64(last - first + 1)).astype(np.int64)
        position += length
        parts.append(_code_points_to_text(code_points))
        parts.append(_SEPARATORS[separator])
    return "".join(parts)


def random_ascii_text(seed: int, length: int) -> str:
    """ASCII with many spaces, newlines and control characters."""
    pool = "".join(chr(c) for c in range(32, 127)) + " " * 30 + "\n" * 8 + "\t\r\x00\x01\x1b\x7f"
    picks = _uniform(seed, length, 0, len(pool) - 1)
    return "".join(pool[index] for index in picks.tolist())


def random_token_bytes(seed: int, count: int, token_bytes: list[bytes | None], text_only: bool) -> bytes:
    """Concatenate random vocabulary tokens; with ``text_only`` only tokens
    that are valid UTF-8 on their own, so the result is text."""
    pool = []
    for data in token_bytes:
        if not data:
            continue
        if text_only:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                continue
        pool.append(data)
    picks = _uniform(seed, count, 0, len(pool) - 1)
    return b"".join(pool[index] for index in picks.tolist())


def _whitespace_documents() -> list[tuple[str, str]]:
    runs = "\n".join(f"word{' ' * k}word" for k in range(1, 301))
    long_runs = "x".join(" " * k for k in (127, 128, 129, 255, 256, 257, 1000, 2047, 2048, 2049, 4096, 5000, 10000))
    newlines = " ".join(f"a{chr(10) * k}b" for k in range(1, 101))
    crlf = "".join(f"line {k}" + "\r\n" * (k % 7 + 1) for k in range(200)) + "\r\r\n\n\r"
    tabs = "\n".join("\t" * k + "x" + "\t" * (k % 5) for k in range(1, 60))
    indentation = "".join("\n" + " " * (4 * (k % 12)) + f"statement_{k}()" for k in range(400))
    mixed = "".join(" \t\n\r\x0b\x0c\u00a0\u3000\u2028"[int(v)] for v in _uniform(7, 20000, 0, 8))
    return [
        ("space_runs", runs),
        ("long_space_runs", long_runs),
        ("only_spaces_5000", " " * 5000),
        ("newline_runs", newlines),
        ("crlf", crlf),
        ("tabs", tabs),
        ("indentation", indentation),
        ("mixed_whitespace", mixed),
        ("leading_spaces", "   leading spaces stay"),
        ("trailing_spaces", "trailing spaces stay   "),
        ("both_ends", "  \t both ends \n "),
        ("single_space", " "),
        ("single_newline", "\n"),
    ]


def _special_documents() -> list[tuple[str, str]]:
    controls = "".join(chr(c) for c in range(32)) + "\x7f" + "".join(chr(c) for c in range(0x80, 0xA0))
    between = "".join(f"a{chr(c)}b " for c in [*range(32), 0x7F, *range(0x80, 0xA0)])
    invisible = "a\u200bb\u200cc\u200dd\u200ee\u200ff\u2028g\u2029h\ufeffi\u00adj\u2060k\ufffdl\ufffem\uffffn\U0010ffff"
    combining = "".join(base + "\u0301\u0323\u0308" for base in "aeiouAEIOU") + "e\u0301 n\u0303 A\u030a \u1100\u1161\u11a8"
    emoji = (
        "😀😃😄😁😆😅🤣😂🙂🙃 👍👍🏻👍🏼👍🏽👍🏾👍🏿 👨‍👩‍👧‍👦 👩🏽‍💻 🏳️‍🌈 🏴‍☠️ 🇺🇸🇯🇵🇩🇪🇫🇷🇨🇳🇰🇷 "
        "1️⃣2️⃣#️⃣*️⃣ ❤️ ♥ ☺️ ✈️ 🧑‍🤝‍🧑 🫠🫡🫶 Text with emoji 🎉 in the middle, and at the end 🚀"
    )
    all_emoji = " ".join(chr(c) for c in range(0x1F300, 0x1FB00))
    return [
        ("empty", ""),
        ("end_of_text_marker", "<|endoftext|> is ordinary text here <|endoftext|>"),
        ("ascii_table", "".join(chr(c) for c in range(128))),
        ("code_points_below_0x800", "".join(chr(c) for c in range(1, 0x800))),
        ("controls", controls),
        ("controls_between_letters", between),
        ("invisible_characters", invisible),
        ("combining_marks", combining),
        ("emoji", emoji),
        ("all_emoji_blocks", all_emoji),
    ]


def _random_documents(token_bytes: list[bytes | None]) -> list[tuple[str, bytes, bool]]:
    documents: list[tuple[str, bytes, bool]] = []
    for k in range(6):
        seed = 1000 + k
        documents.append((f"random_all_planes_{k}", random_plane_text(seed, 12000, 0x10FFFF).encode(), True))
        documents.append((f"random_bmp_{k}", random_plane_text(seed + 100, 16000, 0xFFFF).encode(), True))
        documents.append((f"random_scripts_{k}", random_script_text(seed + 200, 4000).encode(), True))
        documents.append((f"random_ascii_{k}", random_ascii_text(seed + 300, 20000).encode(), True))
    for k in range(4):
        seed = 2000 + k
        documents.append((f"random_text_tokens_{k}", random_token_bytes(seed, 8000, token_bytes, True), True))
        documents.append((f"random_byte_tokens_{k}", random_token_bytes(seed + 100, 8000, token_bytes, False), False))
    return documents


def build_documents(token_bytes: list[bytes | None]) -> list[tuple[str, bytes, bool]]:
    """Build the corpus.

    Args:
        token_bytes: The World vocabulary, indexed by id, for the documents
            made of random tokens.

    Returns:
        ``(name, data, is_text)`` for every document. ``data`` is UTF-8 text
        when ``is_text``, else raw bytes to encode with ``encode_bytes``.
    """
    documents: list[tuple[str, bytes, bool]] = []
    hand_written = [(name, (CORPUS_DIR / f"{name}.txt").read_text(encoding="utf-8")) for name in HAND_WRITTEN]
    for name, text in hand_written:
        documents.append((name, text.encode(), True))
    documents.append(("all_hand_written", "\n".join(text for _, text in hand_written).encode(), True))
    for name, text in _whitespace_documents() + _special_documents():
        documents.append((name, text.encode(), True))
    documents.extend(_random_documents(token_bytes))
    return documents


def corpus_names() -> list[str]:
    """The document names, read from the expected-ids file without building
    the corpus, for parametrizing tests."""
    with np.load(EXPECTED_IDS_FILE) as expected:
        return expected["names"].tolist()


def first_difference(actual: list[int], expected: list[int]) -> str:
    """Describe where two id lists first differ, for assertion messages."""
    for index, (a, b) in enumerate(zip(actual, expected)):
        if a != b:
            return f"first difference at id {index}: got {actual[index:index + 5]}, expected {expected[index:index + 5]}"
    return f"lengths differ: got {len(actual)} ids, expected {len(expected)}"
