"""Single-row linear layers: the other forms of the product give the layer's result."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from rwkv_mlx import _blas
from rwkv_mlx.ops import linear as linear_module
from rwkv_mlx.ops.linear import linear


@pytest.fixture
def without_gemv_forward(monkeypatch):
    """Choose the product's form as the CPU backend does without gemv_forward."""
    monkeypatch.setattr(_blas, "gemv_forward", None)


def layer_of(input_dims: int, output_dims: int, bias: bool = False, seed: int = 0) -> nn.Linear:
    mx.random.seed(seed)
    layer = nn.Linear(input_dims, output_dims, bias=bias)
    mx.eval(layer.parameters())
    return layer


def forbid_layer_call(monkeypatch):
    """Make any call of ``nn.Linear.__call__`` fail, to prove another form ran."""

    def forbidden(self, x):
        raise AssertionError("nn.Linear.__call__ was used")

    monkeypatch.setattr(nn.Linear, "__call__", forbidden)


@pytest.mark.parametrize("input_dims, output_dims", [(96, 24), (24, 40_000)])
def test_single_row_other_form_matches(input_dims, output_dims, monkeypatch, without_gemv_forward):
    layer = layer_of(input_dims, output_dims)
    x = mx.random.normal((1, 1, input_dims), key=mx.random.key(1))
    expected = layer(x)

    forbid_layer_call(monkeypatch)
    found = linear(layer, x)

    assert found.shape == (1, 1, output_dims)
    assert mx.allclose(found, expected, atol=1e-5).item()


def test_tall_head_blocks_cover_every_row(monkeypatch, without_gemv_forward):
    monkeypatch.setattr(linear_module, "BLOCK_ROWS", 7)
    monkeypatch.setattr(linear_module, "BLOCK_MIN_ROWS", 20)
    layer = layer_of(8, 23)
    x = mx.random.normal((1, 8), key=mx.random.key(2))

    assert np.allclose(np.array(linear(layer, x)), np.array(layer(x)), atol=1e-6)


@pytest.mark.parametrize(
    "shape, bias",
    [((1, 1, 96), True), ((2, 1, 96), False), ((1, 3, 96), False)],
)
def test_other_inputs_call_the_layer(shape, bias):
    layer = layer_of(96, 24, bias=bias)
    x = mx.random.normal(shape, key=mx.random.key(3))

    assert np.array_equal(np.array(linear(layer, x)), np.array(layer(x)))


def test_quantized_layer_is_called_as_it_is():
    layer = nn.QuantizedLinear.from_linear(layer_of(128, 64), group_size=64, bits=4)
    x = mx.random.normal((1, 1, 128), key=mx.random.key(4))

    assert np.array_equal(np.array(linear(layer, x)), np.array(layer(x)))


def test_gemv_forward_calls_the_layer(monkeypatch):
    # With gemv_forward loaded, the layer's own product is the fast one.
    monkeypatch.setattr(_blas, "gemv_forward", object())
    layer = layer_of(96, 24)
    x = mx.random.normal((1, 1, 96), key=mx.random.key(5))
    calls = []
    monkeypatch.setattr(nn.Linear, "__call__", lambda self, x: calls.append(x) or x @ self.weight.T)

    linear(layer, x)

    assert len(calls) == 1
