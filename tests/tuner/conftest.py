"""Fixtures of the tuner tests."""

import pytest

from tuner_helpers import ByteTokenizer


@pytest.fixture
def tokenizer() -> ByteTokenizer:
    return ByteTokenizer()
