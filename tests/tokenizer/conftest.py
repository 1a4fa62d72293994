"""Shared fixtures of the tokenizer tests: the tokenizers and the corpus."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tokenizer_corpus import EXPECTED_IDS_FILE, build_documents  # noqa: E402

from rwkv_mlx.tokenizer import load_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def world():
    return load_tokenizer("world")


@pytest.fixture(scope="session")
def byte_tokenizer():
    return load_tokenizer("bytes")


@pytest.fixture(scope="session")
def corpus(world):
    """``{name: (data, is_text, expected_ids)}`` for every corpus document,
    after checking that the documents are the ones the ids were made from."""
    expected = np.load(EXPECTED_IDS_FILE)
    documents = build_documents(world._token_bytes)
    names = [name for name, _, _ in documents]
    assert names == expected["names"].tolist(), "the corpus documents changed; rerun make_expected_ids.py"

    result = {}
    offsets = expected["offsets"]
    for index, (name, data, is_text) in enumerate(documents):
        assert hashlib.sha256(data).hexdigest() == expected["sha256"][index], (
            f"document {name} differs from the one the expected ids were made from; rerun make_expected_ids.py"
        )
        ids = expected["ids"][offsets[index] : offsets[index + 1]].astype(np.int64).tolist()
        result[name] = (data, is_text, ids)
    return result
