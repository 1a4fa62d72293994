"""The pure-MLX RWKV-4, 5 and 6 WKV recurrences: serial, chunked and the entry points."""

import mlx.core as mx
import numpy as np
import pytest

from rwkv_mlx import ops
from rwkv_mlx.ops.wkv4 import EMPTY_EXPONENT, empty_state, wkv4_chunked, wkv4_serial
from rwkv_mlx.ops.wkv5 import wkv5_chunked, wkv5_serial
from rwkv_mlx.ops.wkv6 import wkv6_chunked, wkv6_serial


def reference_wkv4(k, v, w, u):
    """Float64 RWKV-4 WKV from the zero state, without any rescaling."""
    k, v, w, u = (np.asarray(x, dtype=np.float64) for x in (k, v, w, u))
    B, T, C = k.shape
    A = np.zeros((B, C))
    Bsum = np.zeros((B, C))
    out = np.zeros((B, T, C))
    for t in range(T):
        out[:, t] = (A + np.exp(u + k[:, t]) * v[:, t]) / (Bsum + np.exp(u + k[:, t]))
        A = np.exp(w) * A + np.exp(k[:, t]) * v[:, t]
        Bsum = np.exp(w) * Bsum + np.exp(k[:, t])
    return out, A, Bsum


def reference_wkv6(r, w, k, v, u, state):
    """Float64 RWKV-5/6 WKV with the state indexed [value, key]."""
    r, w, k, v, u, S = (np.asarray(x, dtype=np.float64) for x in (r, w, k, v, u, state))
    w = np.broadcast_to(w, r.shape)
    out = np.zeros(r.shape)
    for t in range(r.shape[1]):
        kv = v[:, t, :, :, None] * k[:, t, :, None, :]
        out[:, t] = np.einsum("bhvk,bhk->bhv", S + u[None, :, None, :] * kv, r[:, t])
        S = S * np.exp(w[:, t])[:, :, None, :] + kv
    return out, S


def wkv4_inputs(B=2, T=37, C=8, key_scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((B, T, C)) * key_scale
    v = rng.standard_normal((B, T, C))
    w = -np.exp(rng.standard_normal(C) * 1.5)
    u = rng.standard_normal(C) * 0.5
    return (mx.array(x.astype(np.float32)) for x in (k, v, w, u))


def wkv6_inputs(B=2, T=37, H=3, N=8, decay_spread=1.5, seed=0):
    rng = np.random.default_rng(seed)
    r, k, v = (rng.standard_normal((B, T, H, N)) for _ in range(3))
    w = -np.exp(rng.standard_normal((B, T, H, N)) * decay_spread - 1.0)
    u = rng.standard_normal((H, N)) * 0.5
    state = rng.standard_normal((B, H, N, N))
    return (mx.array(x.astype(np.float32)) for x in (r, w, k, v, u, state))


def gap(ours, theirs) -> float:
    return float(np.abs(np.array(ours, dtype=np.float64) - np.asarray(theirs)).max())


# ---------------------------------------------------------------- RWKV-4


@pytest.mark.parametrize("form", [wkv4_serial, wkv4_chunked])
def test_wkv4_matches_float64_reference(form):
    k, v, w, u = wkv4_inputs()
    expected, A, Bsum = reference_wkv4(k, v, w, u)

    out, state = form(k, v, w, u, empty_state(2, 8))

    assert out.dtype == mx.float32
    assert state.shape == (2, 3, 8)
    assert gap(out, expected) <= 1e-5
    p = np.array(state[:, 2], dtype=np.float64)
    assert gap(np.array(state[:, 0]) * np.exp(p), A) <= 1e-4 * np.abs(A).max()
    assert gap(np.array(state[:, 1]) * np.exp(p), Bsum) <= 1e-4 * np.abs(Bsum).max()


@pytest.mark.parametrize("length", [1, 15, 16, 17, 50])
def test_wkv4_chunked_matches_serial(length):
    k, v, w, u = wkv4_inputs(T=length, seed=length)

    serial, serial_state = wkv4_serial(k, v, w, u, empty_state(2, 8))
    chunked, chunked_state = wkv4_chunked(k, v, w, u, empty_state(2, 8))

    assert gap(chunked, serial) <= 1e-5
    # p is an exponent; a and b are relative to it.
    assert gap(chunked_state[:, :2], serial_state[:, :2]) <= 1e-5
    assert gap(chunked_state[:, 2], serial_state[:, 2]) <= 1e-5 * max(1.0, float(mx.abs(serial_state[:, 2]).max()))


@pytest.mark.parametrize("form", [wkv4_serial, wkv4_chunked])
def test_wkv4_keys_past_float32_exponent_range(form):
    # e^100 is inf in float32; the running-maximum form never takes it.
    k, v, w, u = wkv4_inputs(key_scale=60.0)
    k = k.at[:, 5].add(150.0)

    out, state = form(k, v, w, u, empty_state(2, 8))
    serial, _ = wkv4_serial(k, v, w, u, empty_state(2, 8))

    assert bool(mx.all(mx.isfinite(out)))
    assert bool(mx.all(mx.isfinite(state)))
    # Each output is a weighted mean of values, so it lies within their range.
    assert float(mx.abs(out).max()) <= float(mx.abs(v).max()) + 1e-5
    assert gap(out, serial) <= 1e-4


@pytest.mark.parametrize("form", [wkv4_serial, wkv4_chunked])
def test_wkv4_padding_leaves_state_unchanged(form):
    k, v, w, u = wkv4_inputs(B=2, T=20)
    # Row 0: three pads in front; row 1: two at the end.
    mask = np.ones((2, 20), dtype=bool)
    mask[0, :3] = False
    mask[1, -2:] = False
    mask = mx.array(mask)

    out, state = form(k, v, w, u, empty_state(2, 8), mask)
    row0, state0 = wkv4_serial(k[:1, 3:], v[:1, 3:], w, u, empty_state(1, 8))
    row1, state1 = wkv4_serial(k[1:, :-2], v[1:, :-2], w, u, empty_state(1, 8))

    assert gap(out[0, 3:], row0[0]) <= 1e-5
    assert gap(out[1, :-2], row1[0]) <= 1e-5
    assert gap(state[0, :2], state0[0, :2]) <= 1e-5
    assert gap(state[1, :2], state1[0, :2]) <= 1e-5


def test_wkv4_all_padding_keeps_empty_state():
    k, v, w, u = wkv4_inputs(B=1, T=20)
    mask = mx.zeros((1, 20), dtype=mx.bool_)

    _, state = wkv4_chunked(k, v, w, u, empty_state(1, 8), mask)

    assert float(mx.abs(state[:, :2]).max()) == 0.0
    assert float(state[:, 2].max()) <= EMPTY_EXPONENT / 2


def test_wkv4_state_carries_across_calls():
    k, v, w, u = wkv4_inputs(T=40)

    whole, whole_state = wkv4_chunked(k, v, w, u, empty_state(2, 8))
    first, state = wkv4_chunked(k[:, :23], v[:, :23], w, u, empty_state(2, 8))
    second, state = ops.wkv4(k[:, 23:], v[:, 23:], w, u, state)

    assert gap(mx.concatenate([first, second], axis=1), whole) <= 1e-5
    assert gap(state[:, :2], whole_state[:, :2]) <= 1e-5


@pytest.mark.parametrize("length", [1, 3, 20])
def test_wkv4_entry_point_matches_serial(length):
    k, v, w, u = wkv4_inputs(T=length)
    mask = mx.array(np.arange(length)[None, :] >= np.array([[0], [1]]))

    out, state = ops.wkv4(k, v, w, u, empty_state(2, 8), mask)
    serial, serial_state = wkv4_serial(k, v, w, u, empty_state(2, 8), mask)

    assert gap(mx.where(mask[..., None], out, 0), mx.where(mask[..., None], serial, 0)) <= 1e-5
    assert gap(state[:, :2], serial_state[:, :2]) <= 1e-5


# ---------------------------------------------------------------- RWKV-5 and 6


@pytest.mark.parametrize("form", [wkv6_serial, wkv6_chunked])
def test_wkv6_matches_float64_reference(form):
    r, w, k, v, u, state = wkv6_inputs()
    expected, expected_state = reference_wkv6(r, w, k, v, u, state)

    out, new_state = form(r, w, k, v, u, state)

    assert out.dtype == mx.float32
    assert new_state.dtype == mx.float32
    assert gap(out, expected) <= 2e-5 * np.abs(expected).max()
    assert gap(new_state, expected_state) <= 2e-5 * np.abs(expected_state).max()


@pytest.mark.parametrize("length", [1, 15, 16, 17, 50])
@pytest.mark.parametrize("chunk_length", [8, 16])
def test_wkv6_chunked_matches_serial(length, chunk_length):
    r, w, k, v, u, state = wkv6_inputs(T=length, seed=length)

    serial, serial_state = wkv6_serial(r, w, k, v, u, state)
    chunked, chunked_state = wkv6_chunked(r, w, k, v, u, state, chunk_length=chunk_length)

    assert gap(chunked, serial) <= 1e-4
    assert gap(chunked_state, serial_state) <= 1e-4


def test_wkv6_chunked_survives_decays_near_zero():
    # Log decays down to about -3000: exp(-sum) of a chunk would overflow.
    r, w, k, v, u, state = wkv6_inputs(decay_spread=3.0, T=48)
    assert float(w.min()) < -1000

    chunked, chunked_state = wkv6_chunked(r, w, k, v, u, state)
    expected, expected_state = reference_wkv6(r, w, k, v, u, state)

    assert bool(mx.all(mx.isfinite(chunked)))
    # Differences of prefix sums near -1000 lose about 1e-4 to rounding.
    assert gap(chunked, expected) <= 1e-4 * np.abs(expected).max()
    assert gap(chunked_state, expected_state) <= 1e-4 * np.abs(expected_state).max()


@pytest.mark.parametrize("form", [wkv6_serial, wkv6_chunked])
def test_wkv6_zero_positions_leave_state_unchanged(form):
    r, w, k, v, u, state = wkv6_inputs(T=20)
    keep = mx.array(np.arange(20) >= 5)[None, :, None, None]
    w, k, v = (mx.where(keep, x, 0.0) for x in (w, k, v))

    _, padded_state = form(r, w, k, v, u, state)
    _, state_after = wkv6_serial(r[:, 5:], w[:, 5:], k[:, 5:], v[:, 5:], u, state)

    assert gap(padded_state, state_after) <= 1e-4


@pytest.mark.parametrize("length", [1, 4, 30])
def test_wkv5_constant_decay_matches_wkv6(length):
    r, w, k, v, u, state = wkv6_inputs(T=length)
    decay = w[0, 0]  # [H, N]

    out5, state5 = ops.wkv5(r, decay, k, v, u, state)
    out6, state6 = wkv6_serial(r, mx.broadcast_to(decay, r.shape), k, v, u, state)
    serial5, _ = wkv5_serial(r, decay, k, v, u, state)
    chunked5, _ = wkv5_chunked(r, decay, k, v, u, state)

    assert gap(out5, out6) <= 1e-4
    assert gap(state5, state6) <= 1e-4
    assert gap(serial5, out6) <= 1e-6
    assert gap(chunked5, out6) <= 1e-4


@pytest.mark.parametrize("length", [1, 3, 20])
def test_wkv6_entry_point_matches_serial(length):
    r, w, k, v, u, state = wkv6_inputs(T=length)

    out, new_state = ops.wkv6(r, w, k, v, u, state)
    serial, serial_state = wkv6_serial(r, w, k, v, u, state)

    assert out.shape == (2, length, 3, 8)
    assert gap(out, serial) <= 1e-4
    assert gap(new_state, serial_state) <= 1e-4
