"""State files: round trips, continuing from a saved state, and rejected files."""

import os

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from random_models import TINY_CONFIG, random_model
from rwkv_mlx.generate import generate_step
from rwkv_mlx.io.errors import CheckpointError
from rwkv_mlx.io.state import (
    STATE_FORMAT,
    load_state,
    model_fingerprint,
    read_state,
    save_state,
    tokenizer_identity,
)


@pytest.fixture(scope="module")
def model():
    return random_model(seed=5)


def state_after(model, text: bytes):
    cache = model.make_cache()
    model(mx.array([list(text)]), cache=cache)
    mx.eval([layer.cache for layer in cache])
    return cache


def greedy(model, ids, count, cache=None):
    return [t for t, _ in generate_step(mx.array(ids), model, max_tokens=count, prompt_cache=cache)]


def test_round_trip(model, tmp_path):
    path = tmp_path / "context.state"
    cache = state_after(model, b"some context")
    save_state(path, cache, model, tokenizer="bytes", tokens=12)
    loaded, metadata = load_state(path, model, tokenizer="bytes")

    for ours, saved in zip(loaded, cache):
        for a, b in zip(ours.cache, saved.cache):
            assert a.dtype == b.dtype
            assert mx.array_equal(a, b).item()
    assert loaded[0][1].dtype == mx.float32
    assert metadata["format"] == STATE_FORMAT
    assert metadata["rwkv_version"] == "7"
    assert metadata["tokens"] == "12"
    assert metadata["num_layers"] == str(TINY_CONFIG["num_hidden_layers"])
    assert sorted(read_state(path)[0]) == sorted(
        f"layers.{i}.{name}"
        for i in range(2)
        for name in ("attn.token_shift", "attn.wkv_state", "ffn.token_shift")
    )


def test_continue_equals_one_run(model, tmp_path):
    path = tmp_path / "prompt.safetensors"
    first, second = list(b"A saved context, "), list(b"then more text")
    cache = model.make_cache()
    assert greedy(model, first, 0, cache) == []
    save_state(path, cache, model)
    loaded, _ = load_state(path, model)

    assert greedy(model, second, 16, loaded) == greedy(model, first + second, 16)


def test_state_after_generation_holds_every_token(model, tmp_path):
    prompt = list(b"count: ")
    cache = model.make_cache()
    generated = greedy(model, prompt, 6, cache)
    save_state(tmp_path / "s", cache, model)
    loaded, _ = load_state(tmp_path / "s", model)
    reference = state_after(model, bytes(prompt + generated))

    for ours, theirs in zip(loaded, reference):
        for a, b in zip(ours.cache, theirs.cache):
            assert mx.abs(a - b).max().item() <= 1e-5


def test_other_model_rejected(model, tmp_path):
    path = tmp_path / "s.safetensors"
    save_state(path, state_after(model, b"abc"), model)
    other = random_model(seed=6)

    with pytest.raises(CheckpointError, match="different model") as raised:
        load_state(path, other)
    assert "another checkpoint, another dtype or quantization, or other adapters" in str(raised.value)
    assert "computes in" not in str(raised.value)


def test_other_dtype_named_in_rejection(model, tmp_path):
    path = tmp_path / "s.safetensors"
    save_state(path, state_after(model, b"abc"), model)
    half = random_model(seed=5, dtype=mx.float16)

    with pytest.raises(CheckpointError, match="another dtype or quantization") as raised:
        load_state(path, half)
    assert "computes in float32, and this one computes in float16" in str(raised.value)


def test_other_shape_rejected(model, tmp_path):
    path = tmp_path / "s.safetensors"
    save_state(path, state_after(model, b"abc"), model)
    wider = random_model({**TINY_CONFIG, "num_hidden_layers": 3})

    with pytest.raises(CheckpointError, match="model of another shape") as raised:
        load_state(path, wider)
    assert "num_layers 2 in the state and 3 in this model" in str(raised.value)


def test_wrong_tensor_shape_rejected(model, tmp_path):
    path = tmp_path / "s.safetensors"
    save_state(path, state_after(model, b"abc"), model)
    arrays, metadata = read_state(path)
    arrays["layers.1.attn.wkv_state"] = arrays["layers.1.attn.wkv_state"][..., :16]
    mx.save_safetensors(str(path), arrays, metadata=metadata)

    with pytest.raises(CheckpointError, match=r"'layers.1.attn.wkv_state' has shape \(1, 2, 32, 16\), expected \(1, 2, 32, 32\)"):
        load_state(path, model)

    del arrays["layers.1.attn.wkv_state"]
    mx.save_safetensors(str(path), arrays, metadata=metadata)
    with pytest.raises(CheckpointError, match="missing tensor 'layers.1.attn.wkv_state'"):
        load_state(path, model)


def test_other_tokenizer_rejected(model, tmp_path):
    path = tmp_path / "s.safetensors"
    save_state(path, state_after(model, b"abc"), model, tokenizer="bytes")

    with pytest.raises(CheckpointError, match="tokenizer 'bytes'.*'world'"):
        load_state(path, model, tokenizer="world")


def test_fingerprint_depends_on_weights():
    assert model_fingerprint(random_model(seed=1)) == model_fingerprint(random_model(seed=1))
    assert model_fingerprint(random_model(seed=1)) != model_fingerprint(random_model(seed=2))


def test_unreadable_files_rejected(model, tmp_path):
    missing = tmp_path / "missing.state"
    with pytest.raises(CheckpointError, match="missing.state: state file not found"):
        load_state(missing, model)

    garbage = tmp_path / "garbage.state"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="garbage.state: not a readable state file"):
        load_state(garbage, model)

    good = tmp_path / "good.state"
    save_state(good, state_after(model, b"abc"), model)
    truncated = tmp_path / "truncated.state"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated.state: not a readable state file"):
        load_state(truncated, model)

    weights = tmp_path / "weights.safetensors"
    mx.save_safetensors(str(weights), {"x": mx.ones(3)}, metadata={"format": "mlx"})
    with pytest.raises(CheckpointError, match="not an rwkv_mlx state file"):
        load_state(weights, model)

    with pytest.raises(CheckpointError, match="a folder"):
        load_state(tmp_path, model)


def test_interrupted_save_keeps_old_file(model, tmp_path, monkeypatch):
    path = tmp_path / "chat.state"
    save_state(path, state_after(model, b"old"), model)
    before = path.read_bytes()

    def write_half_then_fail(file, arrays, metadata=None):
        file.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(mx, "save_safetensors", write_half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        save_state(path, state_after(model, b"new"), model)

    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["chat.state"]


def test_empty_state_not_saved(model, tmp_path):
    with pytest.raises(ValueError, match="empty state"):
        save_state(tmp_path / "s", model.make_cache(), model)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_state(tmp_path / "no" / "s", state_after(model, b"a"), model)
    with pytest.raises(ValueError, match=f"{tmp_path} is a folder; name a state file"):
        save_state(tmp_path, state_after(model, b"a"), model)
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_identity(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {}}')

    assert tokenizer_identity("world") == "world"
    assert tokenizer_identity(None) == ""
    assert tokenizer_identity(str(tmp_path)).startswith("sha256:")
    assert tokenizer_identity(str(tmp_path)) == tokenizer_identity(str(tmp_path / "tokenizer.json"))


def test_state_file_given_as_model_named(model, tmp_path):
    from rwkv_mlx.loading import load_model

    path = tmp_path / "s.safetensors"
    save_state(path, state_after(model, b"abc"), model)

    with pytest.raises(CheckpointError, match="an rwkv_mlx state file, not a model; pass it with --load-state"):
        load_model(str(path))


def test_adapter_file_given_as_model_named(tmp_path):
    from rwkv_mlx.loading import load_model

    path = tmp_path / "adapters.safetensors"
    mx.save_safetensors(str(path), {"layers.0.attn.r_proj.lora_a": mx.zeros((4, 2))}, metadata={"fine_tune_type": "lora"})

    with pytest.raises(CheckpointError, match="a file of a training run .*, not a model; pass the run's folder with --adapter-path"):
        load_model(str(path))


def test_truncated_safetensors_model_named(model, tmp_path):
    from rwkv_mlx.loading import load_model

    path = tmp_path / "model.safetensors"
    mx.save_safetensors(str(path), dict(tree_flatten(model.parameters())))
    path.write_bytes(path.read_bytes()[:-100])

    with pytest.raises(CheckpointError, match="not a readable safetensors file .*it may be truncated"):
        load_model(str(path))


def test_save_rejects_cache_of_another_model(model, tmp_path):
    wider = random_model({**TINY_CONFIG, "hidden_size": 128})

    with pytest.raises(ValueError, match="has shape .*pass the model whose make_cache\\(\\) made the cache"):
        save_state(tmp_path / "s.safetensors", state_after(wider, b"abc"), model)
    assert not (tmp_path / "s.safetensors").exists()


def test_save_rejects_negative_token_count(model, tmp_path):
    with pytest.raises(ValueError, match="tokens must be a count of 0 or more, got -1"):
        save_state(tmp_path / "s.safetensors", state_after(model, b"abc"), model, tokens=-1)
