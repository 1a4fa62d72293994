"""Gradients of the training loss against central finite differences.

The model runs in float64 on the CPU, except the WKV recurrence and the decay,
which the model computes in float32 by design (and MLX 0.32's float64 exp on
the CPU is only accurate to about 1e-7 relative). That rounding (about 1e-7 of
the loss, divided by the step 2 * EPSILON) sets the tolerance: with this step
the measured error is at most 4e-6 for directional derivatives of 1e-4 to 1e-2.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from rwkv_mlx.tuner.adapters import prepare_for_training
from rwkv_mlx.tuner.trainer import TrainingArgs, batch_loss_and_grad, sequence_loss
from tuner_helpers import (
    assert_metal_gradients_match,
    cast_trainable,
    plain_and_checkpointed,
    random_batch,
    randomize_trainable,
    tiny_model,
)

EPSILON = 1e-2
RELATIVE_TOLERANCE = 1e-2
ABSOLUTE_TOLERANCE = 1e-5

MODES = {
    "lora": dict(lora_parameters={"rank": 4, "scale": 2.0}),
    "dora": dict(lora_parameters={"rank": 4, "scale": 2.0}),
    "state": {},
    "full": dict(num_layers=1),
}


def prepared_model(mode: str):
    model = tiny_model(seed=3, dtype=mx.float64)
    model = prepare_for_training(model, mode, **MODES[mode])
    cast_trainable(model, mx.float64)
    randomize_trainable(model, scale=0.05, seed=4)
    return model


def loss_at(model, batch, args, name, direction, step):
    """The loss with trainable tensor ``name`` moved by ``step * direction``."""
    original = dict(tree_flatten(model.trainable_parameters()))[name]
    model.load_weights([(name, original + step * direction)], strict=False)
    loss, _, _ = batch_loss_and_grad(model, batch, args)
    model.load_weights([(name, original)], strict=False)
    return loss


@pytest.mark.parametrize("mode", list(MODES))
def test_gradient_matches_finite_differences(mode):
    model = prepared_model(mode)
    batch = random_batch(batch_size=2, length=40, seed=5, prompt=6)
    args = TrainingArgs(max_seq_length=64, loss_chunk_size=16)
    _, _, grads = batch_loss_and_grad(model, batch, args, nn.value_and_grad(model, sequence_loss))
    grads = dict(tree_flatten(grads))
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert set(grads) == set(trainable)

    rng = np.random.default_rng(6)
    for name, value in trainable.items():
        direction = mx.array(rng.standard_normal(value.shape), dtype=mx.float64)
        direction = direction / mx.linalg.norm(direction.reshape(-1))
        plus = loss_at(model, batch, args, name, direction, EPSILON)
        minus = loss_at(model, batch, args, name, direction, -EPSILON)
        numeric = (plus - minus) / (2 * EPSILON)
        analytic = (grads[name] * direction).sum().item()

        assert abs(numeric - analytic) <= ABSOLUTE_TOLERANCE + RELATIVE_TOLERANCE * abs(analytic), name


@pytest.mark.parametrize("mode", ["lora", "state"])
def test_checkpointed_gradient_equals_plain(mode):
    model = prepared_model(mode)
    batch = random_batch(batch_size=2, length=40, seed=7)

    plain, checkpointed = plain_and_checkpointed(model, batch, max_seq_length=64)

    assert abs(plain[0] - checkpointed[0]) <= 1e-12
    for (name, a), (_, b) in zip(tree_flatten(plain[2]), tree_flatten(checkpointed[2])):
        assert mx.abs(a - b).max().item() <= 1e-10, name


def test_chunked_loss_equals_whole_sequence():
    model = prepared_model("state")
    batch = random_batch(batch_size=3, length=70, seed=8, prompt=5)

    whole, count, _ = batch_loss_and_grad(model, batch, TrainingArgs(max_seq_length=96))
    chunked, chunked_count, _ = batch_loss_and_grad(model, batch, TrainingArgs(max_seq_length=20))

    assert count == chunked_count
    assert abs(whole - chunked) <= 1e-6 * abs(whole)


@pytest.mark.parametrize("mode", ["lora", "state"])
def test_metal_kernel_gradient_equals_pure_mlx(mode, monkeypatch):
    # Through the RWKV-7 Metal forward and backward kernels.
    model = prepare_for_training(tiny_model(seed=3), mode, **MODES[mode])

    assert_metal_gradients_match(model, monkeypatch)