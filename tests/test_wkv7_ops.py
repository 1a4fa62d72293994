"""The pure-MLX WKV-7 forms against each other and against a float64 loop."""

import mlx.core as mx
import numpy as np
import pytest

from rwkv_mlx.ops import wkv7
from rwkv_mlx.ops.chunks import unstack_chunks
from rwkv_mlx.ops.wkv7 import wkv7_chunked, wkv7_serial


def random_inputs(B, T, H, N, seed=0):
    """Inputs shaped like a real layer's: unit-norm removal keys, decays in (0.545, 1)."""
    rng = np.random.default_rng(seed)
    r, k, v = (0.5 * rng.standard_normal((B, T, H, N)) for _ in range(3))
    w = -np.exp(-0.5) / (1 + np.exp(-3 * rng.standard_normal((B, T, H, N))))
    kk = rng.standard_normal((B, T, H, N))
    kk /= np.linalg.norm(kk, axis=-1, keepdims=True)
    rate = 1 / (1 + np.exp(-rng.standard_normal((B, T, H, N))))
    a, b = -kk, kk * rate
    state = 0.3 * rng.standard_normal((B, H, N, N))  # not symmetric
    return [x.astype(np.float32) for x in (r, w, k, v, a, b, state)]


def reference_float64(r, w, k, v, a, b, state):
    """The recurrence written out in float64 numpy."""
    r, w, k, v, a, b, state = (x.astype(np.float64) for x in (r, w, k, v, a, b, state))
    ys = np.zeros_like(r)
    for t in range(r.shape[1]):
        sa = state @ a[:, t, :, :, None]
        state = state * np.exp(w[:, t, :, None, :]) + sa * b[:, t, :, None, :] + v[:, t, :, :, None] * k[:, t, :, None, :]
        ys[:, t] = (state @ r[:, t, :, :, None])[..., 0]
    return ys, state


@pytest.mark.parametrize("T", [1, 15, 16, 17, 65, 300])
@pytest.mark.parametrize("H", [1, 3])
@pytest.mark.parametrize("N", [16, 64])
def test_chunked_equals_serial(T, H, N):
    inputs = [mx.array(x) for x in random_inputs(2, T, H, N, seed=T * 7 + H + N)]

    y_serial, state_serial = wkv7_serial(*inputs)
    y_chunked, state_chunked = wkv7_chunked(*inputs)

    assert y_chunked.shape == (2, T, H, N)
    assert y_chunked.dtype == mx.float32
    assert state_chunked.dtype == mx.float32
    assert mx.abs(y_chunked - y_serial).max().item() <= 1e-5
    assert mx.abs(state_chunked - state_serial).max().item() <= 1e-5


@pytest.mark.parametrize("T", [1, 2, 17, 40])
def test_forms_match_float64(T):
    inputs = random_inputs(1, T, 2, 32, seed=T)
    y_ref, state_ref = reference_float64(*inputs)

    for form in (wkv7_serial, wkv7_chunked, wkv7):
        y, state = form(*(mx.array(x) for x in inputs))
        assert np.abs(np.array(y) - y_ref).max() <= 1e-5, form.__name__
        assert np.abs(np.array(state) - state_ref).max() <= 1e-5, form.__name__


@pytest.mark.parametrize("chunk_length", [8, 32, 64])
def test_chunk_lengths_agree(chunk_length):
    inputs = [mx.array(x) for x in random_inputs(1, 100, 2, 16, seed=3)]

    y_serial, state_serial = wkv7_serial(*inputs)
    y, state = wkv7_chunked(*inputs, chunk_length=chunk_length)

    assert mx.abs(y - y_serial).max().item() <= 1e-5
    assert mx.abs(state - state_serial).max().item() <= 1e-5


def test_zero_positions_keep_state():
    r, w, k, v, a, b, state = random_inputs(1, 20, 2, 16, seed=5)
    for x in (w, k, v, a, b):
        x[:, 5:12] = 0
    inputs = [mx.array(x) for x in (r, w, k, v, a, b, state)]
    skipped = [mx.array(np.delete(x, np.s_[5:12], axis=1)) for x in (r, w, k, v, a, b)]

    _, state_full = wkv7_chunked(*inputs)
    _, state_skipped = wkv7_chunked(*skipped, inputs[-1])

    assert mx.abs(state_full - state_skipped).max().item() <= 1e-5


def test_low_precision_inputs_keep_float32_state():
    inputs = random_inputs(1, 33, 2, 16, seed=9)
    low = [mx.array(x).astype(mx.bfloat16) for x in inputs[:-1]]

    y, state = wkv7_chunked(*low, mx.array(inputs[-1]))

    assert y.dtype == mx.float32
    assert state.dtype == mx.float32


def test_gradients_flow_through_chunked_form():
    inputs = [mx.array(x) for x in random_inputs(1, 20, 1, 8, seed=11)]

    def loss(form, *xs):
        y, state = form(*xs)
        return (y * y).sum() + state.sum()

    grads_serial = mx.grad(lambda *xs: loss(wkv7_serial, *xs), argnums=tuple(range(7)))(*inputs)
    grads_chunked = mx.grad(lambda *xs: loss(wkv7_chunked, *xs), argnums=tuple(range(7)))(*inputs)

    for name, g_s, g_c in zip("rwkvab", grads_serial, grads_chunked):
        scale = mx.abs(g_s).max().item() + 1e-6
        assert mx.abs(g_s - g_c).max().item() / scale <= 1e-4, name
    scale = mx.abs(grads_serial[6]).max().item()
    assert mx.abs(grads_serial[6] - grads_chunked[6]).max().item() / scale <= 1e-4


def test_unstack_chunks_gradient_matches_indexing():
    x = mx.random.normal((2, 3, 5, 4), key=mx.random.key(0))
    weights = mx.random.normal((5, 2, 3, 4), key=mx.random.key(1))

    def loss(chunks):
        # The last chunk stays unused, so its gradient must come back as zeros.
        return sum((chunk * weights[c]).sum() for c, chunk in enumerate(chunks[:-1]))

    found = mx.grad(lambda x: loss(unstack_chunks(x, 2)))(x)
    expected = mx.grad(lambda x: loss([x[:, :, c] for c in range(5)]))(x)

    assert len(unstack_chunks(x, 2)) == 5
    assert mx.array_equal(unstack_chunks(x, 2)[3], x[:, :, 3]).item()
    assert mx.allclose(found, expected).item()
    assert mx.all(found[:, :, -1] == 0).item()
