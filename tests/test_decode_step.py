"""The compiled one-token decode step gives what the uncompiled model gives."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models.cache import ArraysCache

from random_models import TINY_CONFIG, random_model
from rwkv_mlx.models import rwkv7
from rwkv_mlx.tuner import apply_lora_layers

PROMPT = mx.array([[5, 17, 200, 3, 42, 9]])


def decode_logits(model, steps: int = 4, uncompiled: bool = False) -> list:
    """Return the logits of ``steps`` greedy tokens after the prompt."""
    cache = model.make_cache()
    logits = model(PROMPT, cache=cache)
    outputs = []
    for _ in range(steps):
        token = mx.argmax(logits[:, -1], axis=-1, keepdims=True)
        logits = model._logits(token, cache, None) if uncompiled else model(token, cache=cache)
        outputs.append(np.array(logits))
    return outputs


def assert_all_close(found: list, expected: list) -> None:
    for a, b in zip(found, expected):
        assert np.abs(a - b).max() <= 1e-5 * (1 + np.abs(b).max())


def test_compiled_step_matches_uncompiled():
    model = random_model(seed=3)

    found = decode_logits(model)
    expected = decode_logits(model, uncompiled=True)

    assert model._compiled_decode is not None
    assert_all_close(found, expected)


def test_compiled_step_follows_new_weights():
    model = random_model(seed=3)
    decode_logits(model)
    model.update(tree_map(lambda p: p * 1.01, model.parameters()))

    found = decode_logits(model)

    assert_all_close(found, decode_logits(model, uncompiled=True))


def test_compiled_step_follows_added_adapters():
    model = random_model(seed=3)
    decode_logits(model)
    model.freeze()
    apply_lora_layers(model, -1, {"rank": 4, "scale": 10.0, "dropout": 0.0, "keys": ["attn.r_proj", "ffn.value"]})
    lora_b = [(name, mx.ones_like(value) * 0.01) for name, value in tree_flatten(model.trainable_parameters())
              if name.endswith("lora_b")]  # fmt: skip
    model.load_weights(lora_b, strict=False)

    found = decode_logits(model)

    assert_all_close(found, decode_logits(model, uncompiled=True))
    assert not np.allclose(found[0], decode_logits(random_model(seed=3))[0])


def test_padded_cache_is_not_compiled():
    model = random_model(seed=3)
    cache = [ArraysCache(size=3, left_padding=[1]) for _ in model.layers]
    model(PROMPT, cache=cache)

    assert not rwkv7._is_decode_step(PROMPT[:, :1], cache)
    assert rwkv7._is_decode_step(PROMPT[:, :1], model.make_cache()) is False
    assert getattr(model, "_compiled_decode", None) is None


def test_quantized_model_compiled_step():
    model = random_model(seed=3)
    nn.quantize(model, group_size=32, bits=4, class_predicate=lambda path, m: isinstance(m, nn.Linear) and m.weight.shape[-1] % 32 == 0)

    assert_all_close(decode_logits(model), decode_logits(model, uncompiled=True))


def filled_cache(model, batch: int = 1) -> list:
    cache = model.make_cache()
    mx.eval(model(mx.repeat(PROMPT, batch, axis=0), cache=cache))
    return cache


def test_cache_of_another_model_rejected():
    model = random_model(seed=3)
    expected = decode_logits(model)
    wider = random_model(dict(TINY_CONFIG, hidden_size=128, intermediate_size=256), seed=4)

    with pytest.raises(ValueError, match=r"layer 0's time-mix token shift in the cache has shape \[1, 1, 128\]"):
        model(PROMPT[:, :1], cache=filled_cache(wider))
    with pytest.raises(ValueError, match=r"the cache has 3 layers but the model has 2"):
        model(PROMPT[:, :1], cache=filled_cache(model) + filled_cache(model)[:1])

    assert_all_close(decode_logits(model), expected)


def test_cache_of_another_batch_rejected():
    model = random_model(seed=3)

    with pytest.raises(ValueError, match=r"the cache contains a batch of 2 sequences .*, but the input has 1"):
        model(PROMPT[:, :1], cache=filled_cache(model, batch=2))


def test_non_integer_ids_rejected():
    model = random_model(seed=3)

    with pytest.raises(ValueError, match=r"expected token ids as an integer array \[B, T\], got mlx.core.float32"):
        model(PROMPT.astype(mx.float32), cache=filled_cache(model))
    with pytest.raises(ValueError, match=r"of shape \[6\]"):
        model(PROMPT[0])


def test_failed_trace_leaves_parameters(monkeypatch):
    model = random_model(seed=3)
    expected = decode_logits(model)
    model._compiled_decode = None
    cache = filled_cache(model)

    def failing_linear(layer, x):
        raise RuntimeError("out of memory")

    with monkeypatch.context() as patch:
        patch.setattr(rwkv7, "linear", failing_linear)
        with pytest.raises(RuntimeError, match="out of memory"):
            model(PROMPT[:, :1], cache=cache)

    mx.eval(model.parameters())
    assert_all_close(decode_logits(model), expected)
