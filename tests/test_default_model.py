"""The default model that ships in the package, and the script that trains it."""

import importlib.util
import json
import re
import struct
import sys
import zlib
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from tokenizers import Tokenizer

import rwkv_mlx
from rwkv_mlx.default_model import DEFAULT_MODEL_NOTICE, DEFAULT_MODEL_PATH
from rwkv_mlx.loading import load_model

from random_models import random_model

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO_ROOT / "examples" / "train_default_model.py"

MAX_WEIGHTS_BYTES = 10_000_000
PROMPT = "She was not sure that Mr. Darcy"
GENERATED_BYTES = 200
MIN_KNOWN_WORD_FRACTION = 0.8
MIN_WORD_COUNT = 20
# Random bytes also form one- and two-letter runs that happen to be words
# ("a", "I", "of"), so only runs of three or more letters count as words.
WORD_PATTERN = re.compile(r"[A-Za-z]{3,}")


@pytest.fixture(scope="module")
def training_script():
    """The training example, imported as a module."""
    spec = importlib.util.spec_from_file_location("train_default_model", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def default_model():
    """The default model and its tokenizer, loaded as a user would."""
    return rwkv_mlx.load(str(DEFAULT_MODEL_PATH))


@pytest.fixture(scope="module")
def vocabulary():
    return set((DEFAULT_MODEL_PATH / "vocabulary.txt").read_text().split())


def greedy_continuation(model, prompt_ids, length):
    """Feed the prompt, then append the most likely byte ``length`` times."""
    cache = model.make_cache()
    logits = model(mx.array([prompt_ids]), cache=cache)
    generated = []
    for _ in range(length):
        token = mx.argmax(logits[0, -1]).item()
        generated.append(token)
        logits = model(mx.array([[token]]), cache=cache)
    return generated


def known_word_fraction(text, vocabulary):
    """Return the fraction of the text's words of three or more letters found in
    the vocabulary, and the number of such words."""
    words = [word.lower() for word in WORD_PATTERN.findall(text)]
    if not words:
        return 0.0, 0
    return sum(word in vocabulary for word in words) / len(words), len(words)


def mean_cross_entropy(model, ids):
    logits = model(mx.array([ids[:-1]]))
    log_probabilities = logits[0] - mx.logsumexp(logits[0], axis=-1, keepdims=True)
    picked = mx.take_along_axis(log_probabilities, mx.array(ids[1:])[:, None], axis=-1)
    return -picked.mean().item()


def test_default_model_files():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "loss_curve.png", "MODEL_CARD.md"):
        assert (DEFAULT_MODEL_PATH / name).is_file(), f"{name} is missing from {DEFAULT_MODEL_PATH}"
    weights_bytes = (DEFAULT_MODEL_PATH / "model.safetensors").stat().st_size
    assert weights_bytes < MAX_WEIGHTS_BYTES
    assert (DEFAULT_MODEL_PATH / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_model_config():
    config = json.loads((DEFAULT_MODEL_PATH / "config.json").read_text())
    assert config["model_type"] == "rwkv7"
    assert config["vocab_size"] == 256


def test_notice_names_model_sources():
    assert "\n" not in DEFAULT_MODEL_NOTICE
    assert "--model" in DEFAULT_MODEL_NOTICE
    assert "Hugging Face" in DEFAULT_MODEL_NOTICE
    assert ".pth" in DEFAULT_MODEL_NOTICE


def test_tokenizer_ids_are_bytes():
    # The model was trained on raw bytes, so the shipped tokenizer.json must
    # map every byte to its own value, in any library that reads it.
    tokenizer = Tokenizer.from_file(str(DEFAULT_MODEL_PATH / "tokenizer.json"))
    text = "It is a truth, £5 — naïve\n\tend"
    ids = tokenizer.encode(text).ids
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert tokenizer.get_vocab_size() == 256


def test_loaded_tokenizer_ids_are_bytes(default_model):
    _, tokenizer = default_model
    text = "It is a truth, £5"
    assert tokenizer.encode(text) == list(text.encode("utf-8"))


def test_greedy_generation_makes_words(default_model, vocabulary):
    model, tokenizer = default_model
    generated = greedy_continuation(model, tokenizer.encode(PROMPT), GENERATED_BYTES)
    text = tokenizer.decode(generated)

    fraction, count = known_word_fraction(text, vocabulary)
    assert "\ufffd" not in text, f"invalid UTF-8 in {text!r}"
    assert count >= MIN_WORD_COUNT, f"only {count} words in {text!r}"
    assert fraction >= MIN_KNOWN_WORD_FRACTION, f"{fraction:.0%} known words in {text!r}"


def test_word_check_rejects_random_model(vocabulary):
    # The same check on an untrained model: it must fail, or the test above proves nothing.
    model = random_model(seed=3)
    generated = greedy_continuation(model, list(PROMPT.encode()), GENERATED_BYTES)
    text = bytes(generated).decode("utf-8", errors="replace")

    fraction, count = known_word_fraction(text, vocabulary)
    assert count < MIN_WORD_COUNT or fraction < MIN_KNOWN_WORD_FRACTION


def test_sample_loss_below_unigram(default_model):
    # sample.txt is the start of the training text, so a trained model must
    # beat the unigram distribution of its bytes by a wide margin.
    model, _ = default_model
    ids = list((DEFAULT_MODEL_PATH / "sample.txt").read_bytes()[:2048])
    counts = np.bincount(ids, minlength=256)
    probabilities = counts[counts > 0] / len(ids)
    unigram_entropy = float(-(probabilities * np.log(probabilities)).sum())

    assert mean_cross_entropy(model, ids) < 0.7 * unigram_entropy


def test_card_validation_loss_below_unigram():
    card = (DEFAULT_MODEL_PATH / "MODEL_CARD.md").read_text()
    model_loss = float(re.search(r"\| this model, after the last step \| ([0-9.]+)", card).group(1))
    unigram_loss = float(re.search(r"\| unigram byte distribution [^|]*\| ([0-9.]+)", card).group(1))

    assert unigram_loss > 2.5
    assert model_loss < 0.7 * unigram_loss


def write_rdb(path, objects):
    """Write serialized R objects the way R's lazy-load databases store them."""
    with open(path, "wb") as f:
        for payload in objects:
            f.write(struct.pack(">I", len(payload)))
            f.write(zlib.compress(payload))


def serialize_r_strings(strings, version=3):
    header = b"X\n" + struct.pack(">iii", version, 0x040201, 0x030500)
    if version == 3:
        header += struct.pack(">i", 5) + b"UTF-8"
    body = struct.pack(">ii", 16, len(strings))
    for string in strings:
        if string is None:
            body += struct.pack(">ii", 9, -1)
        else:
            encoded = string.encode("utf-8")
            body += struct.pack(">ii", 0x8009, len(encoded)) + encoded
    return header + body


def test_rdb_reader_character_vectors(training_script, tmp_path):
    rdb = tmp_path / "Rdata.rdb"
    integer_vector = b"X\n" + struct.pack(">iiii", 2, 0x040201, 0x020300, 13) + struct.pack(">ii", 1, 7)
    write_rdb(rdb, [
        serialize_r_strings(["EMMA", "", "By Jane Austen", None]),
        integer_vector,
        serialize_r_strings(["Persuasion", "naïve"], version=2),
    ])

    vectors = training_script.read_r_string_vectors(rdb)

    assert vectors == [["EMMA", "", "By Jane Austen", ""], ["Persuasion", "naïve"]]


def test_rdb_reader_truncated_file(training_script, tmp_path):
    rdb = tmp_path / "Rdata.rdb"
    write_rdb(rdb, [serialize_r_strings(["EMMA"])])
    rdb.write_bytes(rdb.read_bytes()[:-6])

    with pytest.raises(ValueError, match="Rdata.rdb"):
        training_script.read_r_string_vectors(rdb)


def test_training_data_missing_file(training_script, tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such.txt"):
        training_script.load_text(tmp_path / "no-such.txt")


def test_training_data_empty_file(training_script, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        training_script.load_text(empty)


def test_training_smoke_loss_decreases(training_script, tmp_path):
    output = tmp_path / "model"
    history = training_script.main([
        "--data", str(DEFAULT_MODEL_PATH / "sample.txt"),
        "--output", str(output),
        "--layers", "2", "--hidden-size", "64", "--head-size", "32",
        "--steps", "30", "--batch-size", "8", "--seq-len", "64",
        "--warmup", "5", "--eval-every", "10", "--eval-batches", "2",
        "--validation-fraction", "0.2", "--no-plot",
    ])

    train_losses = [loss for _, loss in history.train]
    validation_losses = [loss for _, loss in history.valid]
    assert history.train[-1][0] == 30
    assert train_losses[-1] < train_losses[0] - 0.3
    assert validation_losses[-1] < validation_losses[0]
    model, config, _ = load_model(str(output))
    assert config["num_hidden_layers"] == 2
    assert (output / "tokenizer.json").is_file()
    card = (output / "MODEL_CARD.md").read_text()
    assert "the local file sample.txt" in card
    assert "30 steps" in card


@pytest.mark.parametrize("steps, warmup", [(10, 50), (800, 50)])
def test_schedule_decays_before_last_step(training_script, steps, warmup):
    schedule = training_script.learning_rate_schedule(2e-3, 1e-4, warmup, steps)
    rates = [schedule(mx.array(step)).item() for step in range(steps)]

    assert max(rates) == pytest.approx(2e-3)
    assert rates[-1] < 0.2 * 2e-3
    assert rates[-1] > 1e-4
