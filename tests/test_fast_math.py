"""The power-of-two exponential and the functions built on it agree with MLX's own."""

import mlx.core as mx
import numpy as np
import pytest

from rwkv_mlx.ops import fast_math


def relative_error(actual: mx.array, expected: mx.array) -> float:
    return (mx.abs(actual - expected) / mx.maximum(mx.abs(expected), 1e-30)).max().item()


def large(values) -> mx.array:
    """Repeat the values into an array large enough for the power form
    (``fast_math.SMALL_SIZE`` elements or more)."""
    x = mx.array(values) if not isinstance(values, mx.array) else values
    repeats = -(-fast_math.SMALL_SIZE // x.shape[-1])
    return mx.concatenate([x] * repeats, axis=-1)


def test_small_arrays_use_mlx_functions():
    x = mx.linspace(-5.0, 5.0, 11)

    assert np.array_equal(np.array(fast_math.exp(x)), np.array(mx.exp(x)))
    assert np.array_equal(np.array(fast_math.sigmoid(x)), np.array(mx.sigmoid(x)))


def test_large_arrays_use_power_form():
    x = large(mx.linspace(-5.0, 5.0, 11))

    assert np.array_equal(np.array(fast_math.exp(x)), np.array(mx.power(2.0, x * fast_math.LOG2_E)))


def test_exp_matches_mlx_float32_range():
    x = mx.linspace(-87.0, 88.0, 100_001)

    assert relative_error(fast_math.exp(x), mx.exp(x)) < 1e-6


def test_exp_edges():
    x = large([-mx.inf, -1e30, -200.0, 0.0, 200.0, mx.inf])

    assert np.array_equal(np.array(fast_math.exp(x))[:6], [0.0, 0.0, 0.0, 1.0, np.inf, np.inf])


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32, mx.float64])
def test_exp_keeps_the_dtype(dtype):
    x = large(mx.array([-1.0, 0.5], dtype=dtype))

    assert fast_math.exp(x).dtype == dtype
    assert fast_math.sigmoid(x).dtype == dtype


def test_float64_uses_the_exact_exponential():
    x = large(mx.array([-3.25, 0.1, 7.0], dtype=mx.float64))

    assert np.array_equal(np.array(fast_math.exp(x)), np.array(mx.exp(x)))


def test_exp_gradient():
    x = large(mx.linspace(-5.0, 5.0, 101))

    grad = mx.grad(lambda x: fast_math.exp(x).sum())(x)

    assert relative_error(grad, mx.exp(x)) < 1e-6


def test_sigmoid_and_gradient_match_mlx():
    x = large(mx.linspace(-30.0, 30.0, 10_001))

    assert mx.abs(fast_math.sigmoid(x) - mx.sigmoid(x)).max().item() < 1e-7
    grad = mx.grad(lambda x: fast_math.sigmoid(x).sum())(x)
    expected = mx.grad(lambda x: mx.sigmoid(x).sum())(x)
    assert mx.abs(grad - expected).max().item() < 1e-7


def test_sigmoid_gradient_finite_on_overflow():
    x = large([-1000.0, -100.0, 100.0, 1000.0])

    value, grad = mx.value_and_grad(lambda x: fast_math.sigmoid(x).sum())(x)

    assert np.isfinite(np.array(grad)).all()
    assert np.abs(np.array(grad)).max() < 1e-30
    assert value.item() == x.size / 2


def test_float16_sigmoid_gradient_is_finite():
    x = large(mx.array([-60000.0, -20.0, -5.0, 0.0, 20.0], dtype=mx.float16))

    grad = mx.grad(lambda x: fast_math.sigmoid(x).astype(mx.float32).sum())(x)

    assert np.isfinite(np.array(grad.astype(mx.float32))).all()
    assert abs(grad[3].item() - 0.25) < 1e-3


def test_sigmoid_inside_compile():
    x = large(mx.linspace(-10.0, 10.0, 33))
    compiled = mx.compile(lambda x: fast_math.sigmoid(x) * 2)

    assert mx.allclose(compiled(x), 2 * mx.sigmoid(x), atol=1e-7).item()
    grad = mx.grad(lambda x: compiled(x).sum())(x)
    # s (1 - s) near s = 1 keeps about 3 digits in float32: compare absolutely.
    assert mx.abs(grad - 2 * mx.sigmoid(x) * (1 - mx.sigmoid(x))).max().item() < 2e-7


def test_logsumexp_and_softmax_match_mlx():
    x = mx.random.normal((7, 3000), key=mx.random.key(0)) * 20

    assert relative_error(fast_math.logsumexp(x), mx.logsumexp(x, axis=-1)) < 1e-6
    assert mx.abs(fast_math.softmax(x) - mx.softmax(x, axis=-1)).max().item() < 1e-6
    assert fast_math.logsumexp(x, axis=0).shape == (3000,)

    grad = mx.grad(lambda x: fast_math.logsumexp(x).sum())(x)
    assert mx.abs(grad - mx.softmax(x, axis=-1)).max().item() < 1e-6
