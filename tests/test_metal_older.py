"""Tests of the RWKV-4, RWKV-5 and RWKV-6 Metal kernels, run through the CPU
emulation harness everywhere and on the Metal GPU where there is one.

References: float64 numpy loops (`reference_wkv4`, `reference_wkv6`),
central finite differences of them, and the pure-MLX recurrences of
`rwkv_mlx.ops.wkv4`, `rwkv_mlx.ops.wkv5` and `rwkv_mlx.ops.wkv6`.
"""

from importlib import resources

import mlx.core as mx
import numpy as np
import pytest

import metal_harness
from metal_kernels import METAL_PRESENT, NEEDS_EMULATOR, NEEDS_METAL, REPO_ROOT, kernels_on
from rwkv_mlx import ops
from rwkv_mlx.ops import metal, metal_older
from rwkv_mlx.ops.wkv4 import empty_state, wkv4_serial, wkv4_step
from rwkv_mlx.ops.wkv5 import wkv5_serial, wkv5_step
from rwkv_mlx.ops.wkv6 import wkv6_serial, wkv6_step

def as_float64(arrays):
    return [np.array(x.astype(mx.float32), dtype=np.float64) for x in arrays]


def assert_close(actual, expected, tolerance, label):
    """Check max |actual - expected| <= tolerance * max(1, max |expected|)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{label}: shape {actual.shape} != {expected.shape}"
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    error = float(np.abs(actual - expected).max(initial=0.0))
    assert error <= tolerance * scale, f"{label}: max error {error:.3g} exceeds {tolerance:g} x {scale:.3g}"


def ragged_mask(T):
    """Mask of a ragged batch: row 0 left-padded by 3, row 1 right-padded by 4 with a gap at 5."""
    mask = np.ones((2, T), dtype=bool)
    mask[0, :3] = False
    mask[1, T - 4:] = False
    mask[1, 5] = False
    return mask


def gradients(function, inputs, weights, argnums):
    """Return the gradients of sum(y * dy) + sum(state * dstate), with (y, state) = function(*inputs)."""
    dy, dstate = (mx.array(np.asarray(x, dtype=np.float32)) for x in weights)

    def loss(*xs):
        y, state = function(*xs)
        return (y * dy).sum() + (state * dstate).sum()

    grads = mx.grad(loss, argnums=argnums)(*inputs)
    mx.eval(grads)
    return grads


def finite_differences(reference, inputs, weights, epsilon=1e-6, chunk=256):
    """Return central differences of the float64 loss for every element of every input.

    ``reference(*inputs)`` runs on float64 inputs with an extra leading axis
    of perturbed copies. The perturbations of an input go through it in
    batches of ``chunk`` elements, each perturbed up and down.
    """
    dy, dstate = weights
    base = as_float64(inputs)
    grads = []
    for index, x in enumerate(base):
        flat_grad = np.zeros(x.size)
        for start in range(0, x.size, chunk):
            elements = np.arange(start, min(start + chunk, x.size))
            count = elements.size
            perturbed = [np.repeat(y[None], 2 * count, axis=0) for y in base]
            flat = perturbed[index].reshape(2 * count, -1)
            flat[np.arange(count), elements] += epsilon
            flat[count + np.arange(count), elements] -= epsilon
            y, state = reference(*perturbed)
            loss = (y * dy).reshape(2 * count, -1).sum(axis=1) + (state * dstate).reshape(2 * count, -1).sum(axis=1)
            flat_grad[elements] = (loss[:count] - loss[count:]) / (2 * epsilon)
        grads.append(flat_grad.reshape(x.shape))
    return grads


def assert_gradient_close(actual, expected, label):
    """Check the max error against 1e-4 of the largest gradient."""
    actual = np.array(actual.astype(mx.float32), dtype=np.float64)
    scale = np.abs(expected).max()
    error = np.abs(actual - expected).max()
    assert error <= 1e-4 * scale, f"{label}: max error {error:.3g} vs max |gradient| {scale:.3g}"


def fail_on_launch(launch):
    raise AssertionError(f"kernel {launch.name} launched on a machine without Metal")


# ---------------------------------------------------------------------------
# RWKV-4 inputs and reference
# ---------------------------------------------------------------------------

WKV4_NAMES = ("k", "v", "w", "u", "state")


def make_wkv4_inputs(B, T, C, seed=0, dtype=mx.float32, key_scale=1.0):
    """Return k, v (dtype ``dtype``), w, u [C] and a float32 state (a, b, p).

    The state is one a model could carry: a of either sign, b > 0 and a
    moderate exponent p.
    """
    rng = np.random.default_rng(seed)
    k = rng.normal(size=(B, T, C)) * key_scale
    v = rng.normal(size=(B, T, C))
    w = -np.exp(rng.normal(size=C))
    u = rng.normal(size=C) * 0.5
    state = np.stack([rng.normal(size=(B, C)), rng.uniform(0.5, 2.0, size=(B, C)), rng.normal(size=(B, C))], axis=1)
    k, v = (mx.array(x.astype(np.float32)).astype(dtype) for x in (k, v))
    return [k, v, *(mx.array(x.astype(np.float32)) for x in (w, u, state))]


def reference_wkv4(k, v, w, u, state, mask=None):
    """Run the rescaled RWKV-4 recurrence of `wkv4_step` in float64 (numpy arrays).

    Extra leading axes of ``k, v, state`` (and ``w, u``) are batch axes.
    """
    a, b, p = state[..., 0, :], state[..., 1, :], state[..., 2, :]
    # Line up the batch axes of w and u with those of p.
    w, u = (x.reshape(x.shape[:-1] + (1,) * (p.ndim - x.ndim) + x.shape[-1:]) for x in (w, u))
    out = np.zeros(k.shape)
    for t in range(k.shape[-2]):
        key, value = k[..., t, :], v[..., t, :]
        bonus = u + key
        top = np.maximum(p, bonus)
        e1, e2 = np.exp(p - top), np.exp(bonus - top)
        y = (e1 * a + e2 * value) / (e1 * b + e2)

        decayed = p + w
        top = np.maximum(decayed, key)
        f1, f2 = np.exp(decayed - top), np.exp(key - top)
        new = (f1 * a + f2 * value, f1 * b + f2, top)
        if mask is not None:
            keep = mask[..., t, None]
            new = tuple(np.where(keep, n, o) for n, o in zip(new, (a, b, p)))
            y = np.where(keep, y, 0.0)
        a, b, p = new
        out[..., t, :] = y
    return out, np.stack([a, b, p], axis=-2)


# ---------------------------------------------------------------------------
# RWKV-4 forward
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 2, 15, 16, 17, 100])
def test_wkv4_forward_matches_references(kernels, T):
    inputs = make_wkv4_inputs(2, T, 40, seed=T)
    y, state = metal_older.wkv4_metal(*inputs)
    y_ref, state_ref = reference_wkv4(*as_float64(inputs))
    y_mlx, state_mlx = wkv4_serial(*inputs)

    assert y.dtype == mx.float32
    assert state.dtype == mx.float32
    assert_close(y, y_ref, 1e-5, "y vs float64")
    assert_close(state, state_ref, 1e-5, "state vs float64")
    assert_close(y, y_mlx, 1e-5, "y vs pure MLX")
    assert_close(state, state_mlx, 1e-5, "state vs pure MLX")


def test_wkv4_forward_from_empty_state(kernels):
    k, v, w, u, _ = make_wkv4_inputs(2, 17, 8, seed=2)
    y, state = metal_older.wkv4_metal(k, v, w, u, empty_state(2, 8))

    # Unrescaled float64 sums A and B from zero.
    k64, v64, w64, u64 = as_float64([k, v, w, u])
    A = np.zeros((2, 8))
    B = np.zeros((2, 8))
    for t in range(17):
        expected = (A + np.exp(u64 + k64[:, t]) * v64[:, t]) / (B + np.exp(u64 + k64[:, t]))
        assert_close(y[:, t], expected, 1e-5, f"y at step {t}")
        A = np.exp(w64) * A + np.exp(k64[:, t]) * v64[:, t]
        B = np.exp(w64) * B + np.exp(k64[:, t])
    a, b, p = (np.array(state[:, i], dtype=np.float64) for i in range(3))
    assert_close(a * np.exp(p), A, 1e-5, "A = a e^p")
    assert_close(b * np.exp(p), B, 1e-5, "B = b e^p")


def test_wkv4_forward_large_keys_stay_finite(kernels):
    # Keys up to about 200 overflow e^k in float32; the rescaled state must not.
    inputs = make_wkv4_inputs(2, 30, 16, seed=4, key_scale=60.0)
    y, state = metal_older.wkv4_metal(*inputs)
    y_ref, state_ref = reference_wkv4(*as_float64(inputs))
    y_mlx, state_mlx = wkv4_serial(*inputs)
    assert np.isfinite(np.array(y)).all()
    assert np.isfinite(np.array(state)).all()
    assert_close(y, y_mlx, 1e-5, "y vs pure MLX")
    assert_close(state, state_mlx, 1e-5, "state vs pure MLX")
    # Against float64 the bound is looser: float32 rounds p + w to about 1e-5
    # at |p| near 100, and e^(p + w - k) carries that error.
    assert_close(y, y_ref, 1e-4, "y vs float64")
    assert_close(state, state_ref, 1e-4, "state vs float64")


WKV4_FORWARD_CONFIGS = {
    "one_thread_per_group": metal_older.WKV4KernelConfig(threads_per_group=1),
    "partial_last_group": metal_older.WKV4KernelConfig(threads_per_group=7),
    "one_group_loops": metal_older.WKV4KernelConfig(threads_per_group=16, groups=1),
    "more_threads_than_channels": metal_older.WKV4KernelConfig(threads_per_group=32, groups=4),
}


@pytest.mark.parametrize("config", WKV4_FORWARD_CONFIGS.values(), ids=WKV4_FORWARD_CONFIGS.keys())
def test_wkv4_forward_launch_configurations(kernels, config):
    inputs = make_wkv4_inputs(2, 17, 40, seed=7)
    y, state = metal_older.wkv4_metal(*inputs, config=config)
    y_ref, state_ref = reference_wkv4(*as_float64(inputs))
    assert_close(y, y_ref, 1e-5, "y")
    assert_close(state, state_ref, 1e-5, "state")


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16], ids=["bfloat16", "float16"])
def test_wkv4_forward_low_precision_inputs(kernels, dtype):
    # The decay in float16 as well; the launch is the same as the backward test's.
    inputs = make_wkv4_inputs(2, 17, 24, seed=3, dtype=dtype)
    inputs[2] = inputs[2].astype(mx.float16)
    y, state = metal_older.wkv4_metal(*inputs)
    # The kernel must compute in float32 from the rounded inputs.
    y_ref, state_ref = reference_wkv4(*as_float64(inputs))
    assert y.dtype == mx.float32
    assert state.dtype == mx.float32
    assert_close(y, y_ref, 1e-5, "y")
    assert_close(state, state_ref, 1e-5, "state")


def test_wkv4_forward_ragged_batch(kernels):
    T = 12
    inputs = make_wkv4_inputs(2, T, 24, seed=11)
    mask = ragged_mask(T)
    y, state = metal_older.wkv4_metal(*inputs, mx.array(mask))
    y = np.array(y)

    k, v, w, u, s0 = as_float64(inputs)
    for row in range(2):
        valid = np.flatnonzero(mask[row])
        y_row, state_row = reference_wkv4(k[row, valid], v[row, valid], w, u, s0[row])
        assert_close(y[row, valid], y_row, 1e-5, f"y of row {row}")
        assert_close(np.array(state)[row], state_row, 1e-5, f"state of row {row}")
    assert (y[~mask] == 0).all()


def test_wkv4_forward_all_padding_keeps_state(kernels):
    inputs = make_wkv4_inputs(1, 5, 8, seed=5)
    y, state = metal_older.wkv4_metal(*inputs, mx.zeros((1, 5), dtype=mx.bool_))
    assert (np.array(y) == 0).all()
    np.testing.assert_array_equal(np.array(state), np.array(inputs[4]))


def test_wkv4_forward_empty_sequence(kernels):
    inputs = make_wkv4_inputs(2, 0, 8)
    y, state = metal_older.wkv4_metal(*inputs)
    assert y.shape == (2, 0, 8)
    np.testing.assert_array_equal(np.array(state), np.array(inputs[4]))


# ---------------------------------------------------------------------------
# RWKV-4 backward and decode
# ---------------------------------------------------------------------------


def wkv4_loss_weights(B, T, C, seed=99):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(B, T, C)), rng.normal(size=(B, 3, C))


def wkv4_function(mask=None, config=metal_older.DEFAULT_WKV4_CONFIG):
    mask = None if mask is None else mx.array(mask)
    return lambda *xs: metal_older.wkv4_metal(*xs, mask, config=config)


GRADIENT_CASES = [
    pytest.param((kind, masked), id=f"{kind}-{'mask' if masked else 'no_mask'}", marks=marks)
    for kind, marks in (("emulated", NEEDS_EMULATOR), ("metal", NEEDS_METAL))
    for masked in (False, True)
]


@pytest.fixture(scope="module", params=GRADIENT_CASES)
def wkv4_gradient_case(request):
    """Return kernel gradients and finite differences for B = 2, T = 10, C = 8.

    The checkpoint interval 4 splits the sequence into segments of 4, 4 and 2
    positions. The masked case pads positions 0, 1 and 6 of row 0 and the
    last three positions of row 1.
    """
    kind, masked = request.param
    B, T, C = 2, 10, 8
    inputs = make_wkv4_inputs(B, T, C, seed=21)
    mask = None
    if masked:
        mask = np.ones((B, T), dtype=bool)
        mask[0, [0, 1, 6]] = False
        mask[1, 7:] = False
    weights = wkv4_loss_weights(B, T, C)
    config = metal_older.WKV4KernelConfig(checkpoint_interval=4, threads_per_group=5)
    with kernels_on(kind):
        grads = gradients(wkv4_function(mask, config), inputs, weights, tuple(range(5)))

    def reference(k, v, w, u, state):
        return reference_wkv4(k, v, w, u, state, mask)

    return grads, finite_differences(reference, inputs, weights), mask


@pytest.mark.parametrize("index", range(5), ids=WKV4_NAMES)
def test_wkv4_backward_matches_finite_differences(wkv4_gradient_case, index):
    grads, expected, mask = wkv4_gradient_case
    assert_gradient_close(grads[index], expected[index], f"d{WKV4_NAMES[index]}")
    if mask is not None and index < 2:
        assert (np.array(grads[index])[~mask] == 0).all(), "padding positions must get zero gradients"


WKV4_BACKWARD_CASES = {
    "default": (17, metal_older.WKV4KernelConfig()),
    "interval_5": (17, metal_older.WKV4KernelConfig(checkpoint_interval=5)),
    "one_group_interval_4": (17, metal_older.WKV4KernelConfig(threads_per_group=8, groups=1, checkpoint_interval=4)),
    "long_max_interval": (
        100,
        metal_older.WKV4KernelConfig(checkpoint_interval=metal_older.MAX_WKV4_CHECKPOINT_INTERVAL),
    ),
}


@pytest.mark.parametrize("T, config", WKV4_BACKWARD_CASES.values(), ids=WKV4_BACKWARD_CASES.keys())
def test_wkv4_backward_matches_pure_mlx(kernels, T, config):
    inputs = make_wkv4_inputs(2, T, 24, seed=31)
    weights = wkv4_loss_weights(2, T, 24)
    actual = gradients(wkv4_function(config=config), inputs, weights, tuple(range(5)))
    expected = gradients(wkv4_serial, inputs, weights, tuple(range(5)))
    for name, a, e in zip(WKV4_NAMES, actual, expected):
        assert_close(a, e, 1e-4, f"d{name}")


def test_wkv4_backward_low_precision_gradient_dtypes(kernels):
    inputs = make_wkv4_inputs(1, 6, 8, seed=51, dtype=mx.bfloat16)
    inputs[2] = inputs[2].astype(mx.float16)
    weights = wkv4_loss_weights(1, 6, 8)
    grads = gradients(wkv4_function(), inputs, weights, tuple(range(5)))
    upcast = [x.astype(mx.float32) for x in inputs]
    expected = gradients(wkv4_function(), upcast, weights, tuple(range(5)))
    for name, x, actual, reference in zip(WKV4_NAMES, inputs, grads, expected):
        assert actual.dtype == x.dtype, f"d{name} has dtype {actual.dtype}, expected {x.dtype}"
        assert_close(actual.astype(mx.float32), reference, 1e-2, f"d{name}")


def test_wkv4_decode_matches_references(kernels):
    k, v, w, u, state = make_wkv4_inputs(3, 1, 40, seed=61)
    mask = np.array([True, False, True])
    y, new_state = metal_older.wkv4_metal_decode(k[:, 0], v[:, 0], w, u, state, mx.array(mask))
    y_ref, state_ref = reference_wkv4(*as_float64([k, v, w, u, state]), mask[:, None])
    y_mlx, state_mlx = wkv4_step(k[:, 0], v[:, 0], w, u, state)

    assert_close(y, y_ref[:, 0], 1e-5, "y vs float64")
    assert_close(new_state, state_ref, 1e-5, "state vs float64")
    assert_close(np.array(y)[mask], np.array(y_mlx)[mask], 1e-5, "y vs pure MLX")
    assert_close(np.array(new_state)[mask], np.array(state_mlx)[mask], 1e-5, "state vs pure MLX")
    np.testing.assert_array_equal(np.array(new_state)[1], np.array(state)[1])


def test_wkv4_decode_steps_match_sequence(kernels):
    inputs = make_wkv4_inputs(2, 5, 16, seed=91)
    y_sequence, state_sequence = metal_older.wkv4_metal(*inputs)
    k, v, w, u, state = inputs
    for t in range(5):
        y, state = metal_older.wkv4_metal_decode(k[:, t], v[:, t], w, u, state)
        assert_close(y, y_sequence[:, t], 1e-6, f"y at step {t}")
    assert_close(state, state_sequence, 1e-6, "state")


def test_wkv4_decode_gradients(kernels):
    k, v, w, u, state = make_wkv4_inputs(2, 1, 16, seed=101)
    step = [k[:, 0], v[:, 0], w, u, state]
    weights = [np.random.default_rng(3).normal(size=s) for s in ((2, 16), (2, 3, 16))]
    actual = gradients(metal_older.wkv4_metal_decode, step, weights, tuple(range(5)))
    expected = gradients(wkv4_step, step, weights, tuple(range(5)))
    for name, a, e in zip(WKV4_NAMES, actual, expected):
        assert_close(a, e, 1e-5, f"d{name}")


# ---------------------------------------------------------------------------
# RWKV-5/6 inputs and reference
# ---------------------------------------------------------------------------

WKV6_NAMES = ("r", "w", "k", "v", "u", "state")


def make_wkv6_inputs(B, T, H, N, seed=0, dtype=mx.float32, decay_per_position=True):
    """Return r, w, k, v (dtype ``dtype``), u [H, N] and a float32 state.

    The log decay is -exp(x) with x spread around -1, so some channels forget
    within a few steps and others hardly at all. With ``decay_per_position``
    False it is one [H, N] decay, as in RWKV-5.
    """
    rng = np.random.default_rng(seed)
    shape = (B, T, H, N)
    r = rng.normal(size=shape)
    k = rng.normal(size=shape) / np.sqrt(N)
    v = rng.normal(size=shape)
    w = -np.exp(rng.normal(size=shape if decay_per_position else (H, N)) - 1.0)
    u = rng.normal(size=(H, N)) * 0.5
    state = rng.normal(size=(B, H, N, N)) * 0.3
    r, w, k, v = (mx.array(x.astype(np.float32)).astype(dtype) for x in (r, w, k, v))
    return [r, w, k, v, mx.array(u.astype(np.float32)), mx.array(state.astype(np.float32))]


def reference_wkv6(r, w, k, v, u, state, mask=None):
    """Run the RWKV-5/6 recurrence in float64 (numpy arrays, state [.., H, N(value), N(key)]).

    Extra leading axes are batch axes, and ``w`` may be [.., H, N] with the
    leading axes of ``u``.
    """
    # Line up the leading axes of w with those of r, and of u with those of the state.
    w = np.broadcast_to(w.reshape(w.shape[:-2] + (1,) * (r.ndim - w.ndim) + w.shape[-2:]), r.shape)
    u = u.reshape(u.shape[:-2] + (1,) * (r.ndim - 1 - u.ndim) + u.shape[-2:])
    S = state.copy()
    out = np.zeros(r.shape)
    for t in range(r.shape[-3]):
        rt, kt, vt = r[..., t, :, :], k[..., t, :, :], v[..., t, :, :]
        y = (S @ rt[..., None])[..., 0] + vt * (rt * u * kt).sum(axis=-1, keepdims=True)
        new = S * np.exp(w[..., t, :, :])[..., None, :] + vt[..., :, None] * kt[..., None, :]
        if mask is not None:
            keep = mask[..., t]
            new = np.where(keep[..., None, None, None], new, S)
            y = np.where(keep[..., None, None], y, 0.0)
        S = new
        out[..., t, :, :] = y
    return out, S


# ---------------------------------------------------------------------------
# RWKV-5/6 forward
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("N", [32, 64, 128])
@pytest.mark.parametrize("H", [1, 3])
@pytest.mark.parametrize("T", [1, 2, 15, 16, 17, 100])
def test_wkv6_forward_matches_references(kernels, T, H, N):
    inputs = make_wkv6_inputs(2, T, H, N, seed=T * 100 + H * 10 + N)
    y, state = metal_older.wkv6_metal(*inputs)
    y_ref, state_ref = reference_wkv6(*as_float64(inputs))
    y_mlx, state_mlx = wkv6_serial(*inputs)

    assert y.dtype == mx.float32
    assert state.dtype == mx.float32
    assert_close(y, y_ref, 1e-5, "y vs float64")
    assert_close(state, state_ref, 1e-5, "state vs float64")
    assert_close(y, y_mlx, 1e-5, "y vs pure MLX")
    assert_close(state, state_mlx, 1e-5, "state vs pure MLX")


@pytest.mark.parametrize("T, H, N", [(1, 3, 64), (16, 1, 32), (17, 3, 64), (100, 1, 128)])
def test_wkv5_forward_matches_references(kernels, T, H, N):
    inputs = make_wkv6_inputs(2, T, H, N, seed=T + H + N, decay_per_position=False)
    y, state = metal_older.wkv5_metal(*inputs)
    y_ref, state_ref = reference_wkv6(*as_float64(inputs))
    y_mlx, state_mlx = wkv5_serial(*inputs)

    assert_close(y, y_ref, 1e-5, "y vs float64")
    assert_close(state, state_ref, 1e-5, "state vs float64")
    assert_close(y, y_mlx, 1e-5, "y vs pure MLX")
    assert_close(state, state_mlx, 1e-5, "state vs pure MLX")


WKV6_FORWARD_CONFIGS = {
    "half_rows": metal_older.WKV6KernelConfig(rows_per_group=32),
    "half_rows_fewer_groups": metal_older.WKV6KernelConfig(rows_per_group=32, forward_groups=5),
    "one_group": metal_older.WKV6KernelConfig(forward_groups=1),
    "more_groups_than_heads": metal_older.WKV6KernelConfig(forward_groups=9),
}


@pytest.mark.parametrize("config", WKV6_FORWARD_CONFIGS.values(), ids=WKV6_FORWARD_CONFIGS.keys())
def test_wkv6_forward_launch_configurations(kernels, config):
    inputs = make_wkv6_inputs(2, 17, 3, 64, seed=7)
    y, state = metal_older.wkv6_metal(*inputs, config=config)
    y_ref, state_ref = reference_wkv6(*as_float64(inputs))
    assert_close(y, y_ref, 1e-5, "y")
    assert_close(state, state_ref, 1e-5, "state")


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16], ids=["bfloat16", "float16"])
def test_wkv6_forward_low_precision_inputs(kernels, dtype):
    # The bonus in float16 as well; the launch is the same as the backward test's.
    inputs = make_wkv6_inputs(2, 17, 2, 32, seed=3, dtype=dtype)
    inputs[4] = inputs[4].astype(mx.float16)
    y, state = metal_older.wkv6_metal(*inputs)
    # The kernel must compute in float32 from the rounded inputs.
    y_ref, state_ref = reference_wkv6(*as_float64(inputs))
    assert y.dtype == mx.float32
    assert state.dtype == mx.float32
    assert_close(y, y_ref, 1e-5, "y")
    assert_close(state, state_ref, 1e-5, "state")


def test_wkv6_forward_ragged_batch(kernels):
    T = 12
    inputs = make_wkv6_inputs(2, T, 3, 32, seed=11)
    mask = ragged_mask(T)
    y, state = metal_older.wkv6_metal(*inputs, mx.array(mask))
    y = np.array(y)

    r, w, k, v, u, s0 = as_float64(inputs)
    for row in range(2):
        valid = np.flatnonzero(mask[row])
        y_row, state_row = reference_wkv6(*(x[row, valid] for x in (r, w, k, v)), u, s0[row])
        assert_close(y[row, valid], y_row, 1e-5, f"y of row {row}")
        assert_close(np.array(state)[row], state_row, 1e-5, f"state of row {row}")
    assert (y[~mask] == 0).all()


def test_wkv6_forward_all_padding_keeps_state(kernels):
    inputs = make_wkv6_inputs(1, 5, 2, 32, seed=5)
    y, state = metal_older.wkv6_metal(*inputs, mx.zeros((1, 5), dtype=mx.bool_))
    assert (np.array(y) == 0).all()
    np.testing.assert_array_equal(np.array(state), np.array(inputs[5]))


def test_wkv6_forward_empty_sequence(kernels):
    inputs = make_wkv6_inputs(2, 0, 2, 32)
    y, state = metal_older.wkv6_metal(*inputs)
    assert y.shape == (2, 0, 2, 32)
    np.testing.assert_array_equal(np.array(state), np.array(inputs[5]))


# ---------------------------------------------------------------------------
# RWKV-5/6 backward
# ---------------------------------------------------------------------------


def wkv6_loss_weights(B, T, H, N, seed=99):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(B, T, H, N)), rng.normal(size=(B, H, N, N))


def wkv6_function(mask=None, config=metal_older.DEFAULT_WKV6_CONFIG, kernel=metal_older.wkv6_metal):
    mask = None if mask is None else mx.array(mask)
    return lambda *xs: kernel(*xs, mask, config=config)


@pytest.fixture(scope="module", params=GRADIENT_CASES)
def wkv6_gradient_case(request):
    """Return kernel gradients and finite differences for B = 1, T = 10, H = 2, N = 32.

    The checkpoint interval 4 splits the sequence into segments of 4, 4 and 2
    positions. The masked case pads the first two positions and position 6.
    """
    kind, masked = request.param
    B, T, H, N = 1, 10, 2, 32
    inputs = make_wkv6_inputs(B, T, H, N, seed=21)
    mask = None
    if masked:
        mask = np.ones((B, T), dtype=bool)
        mask[0, [0, 1, 6]] = False
    weights = wkv6_loss_weights(B, T, H, N)
    config = metal_older.WKV6KernelConfig(checkpoint_interval=4)
    with kernels_on(kind):
        grads = gradients(wkv6_function(mask, config), inputs, weights, tuple(range(6)))

    def reference(r, w, k, v, u, state):
        return reference_wkv6(r, w, k, v, u, state, mask)

    return grads, finite_differences(reference, inputs, weights), mask


@pytest.mark.parametrize("index", range(6), ids=WKV6_NAMES)
def test_wkv6_backward_matches_finite_differences(wkv6_gradient_case, index):
    grads, expected, mask = wkv6_gradient_case
    assert_gradient_close(grads[index], expected[index], f"d{WKV6_NAMES[index]}")
    if mask is not None and index < 4:
        assert (np.array(grads[index])[~mask] == 0).all(), "padding positions must get zero gradients"


def test_wkv5_backward_matches_finite_differences(kernels):
    # The [H, N] decay gets the sum of its per-position gradients.
    B, T, H, N = 1, 6, 2, 32
    inputs = make_wkv6_inputs(B, T, H, N, seed=23, decay_per_position=False)
    weights = wkv6_loss_weights(B, T, H, N)
    config = metal_older.WKV6KernelConfig(checkpoint_interval=4)
    grads = gradients(wkv6_function(config=config, kernel=metal_older.wkv5_metal), inputs, weights, tuple(range(6)))
    expected = finite_differences(reference_wkv6, inputs, weights)
    assert grads[1].shape == (H, N)
    for name, actual, reference in zip(WKV6_NAMES, grads, expected):
        assert_gradient_close(actual, reference, f"d{name}")


WKV6_BACKWARD_CONFIGS = {
    "default": metal_older.WKV6KernelConfig(),
    "interval_4": metal_older.WKV6KernelConfig(checkpoint_interval=4),
    "one_group": metal_older.WKV6KernelConfig(backward_groups=1, checkpoint_interval=4),
    "more_groups_than_heads": metal_older.WKV6KernelConfig(backward_groups=9),
    "fewer_groups_than_heads": metal_older.WKV6KernelConfig(backward_groups=4, rows_per_group=16, forward_groups=3),
}


@pytest.mark.parametrize("config", WKV6_BACKWARD_CONFIGS.values(), ids=WKV6_BACKWARD_CONFIGS.keys())
def test_wkv6_backward_launch_configurations(kernels, config):
    # N = 32 and the interval 4 reuse the kernels the other tests compile.
    B, T, H, N = 2, 17, 3, 32
    inputs = make_wkv6_inputs(B, T, H, N, seed=31)
    weights = wkv6_loss_weights(B, T, H, N)
    actual = gradients(wkv6_function(config=config), inputs, weights, tuple(range(6)))
    expected = gradients(wkv6_serial, inputs, weights, tuple(range(6)))
    for name, a, e in zip(WKV6_NAMES, actual, expected):
        assert_close(a, e, 1e-4, f"d{name}")


@pytest.mark.parametrize("T, N", [(100, 64), (33, 128)])
def test_wkv6_backward_long_sequences(kernels, T, N):
    B, H = 1, 2
    inputs = make_wkv6_inputs(B, T, H, N, seed=41)
    weights = wkv6_loss_weights(B, T, H, N)
    actual = gradients(wkv6_function(), inputs, weights, tuple(range(6)))
    expected = gradients(wkv6_serial, inputs, weights, tuple(range(6)))
    for name, a, e in zip(WKV6_NAMES, actual, expected):
        assert_close(a, e, 1e-4, f"d{name}")


def test_wkv6_backward_low_precision_gradient_dtypes(kernels):
    inputs = make_wkv6_inputs(1, 6, 2, 32, seed=51, dtype=mx.bfloat16)
    inputs[4] = inputs[4].astype(mx.float16)
    weights = wkv6_loss_weights(1, 6, 2, 32)
    grads = gradients(wkv6_function(), inputs, weights, tuple(range(6)))
    upcast = [x.astype(mx.float32) for x in inputs]
    expected = gradients(wkv6_function(), upcast, weights, tuple(range(6)))
    for name, x, actual, reference in zip(WKV6_NAMES, inputs, grads, expected):
        assert actual.dtype == x.dtype, f"d{name} has dtype {actual.dtype}, expected {x.dtype}"
        assert_close(actual.astype(mx.float32), reference, 1e-2, f"d{name}")


# ---------------------------------------------------------------------------
# RWKV-5/6 decode
# ---------------------------------------------------------------------------


def decode_inputs(inputs):
    """Return the first position of r, w, k, v and the unchanged u and state."""
    return [x[:, 0] for x in inputs[:4]] + inputs[4:]


@pytest.mark.parametrize("N", [32, 64, 128])
@pytest.mark.parametrize("H", [1, 3])
def test_wkv6_decode_matches_references(kernels, H, N):
    inputs = make_wkv6_inputs(2, 1, H, N, seed=H + N)
    y, state = metal_older.wkv6_metal_decode(*decode_inputs(inputs))
    y_ref, state_ref = reference_wkv6(*as_float64(inputs))
    y_mlx, state_mlx = wkv6_step(*decode_inputs(inputs))

    assert_close(y, y_ref[:, 0], 1e-5, "y vs float64")
    assert_close(state, state_ref, 1e-5, "state vs float64")
    assert_close(y, y_mlx, 1e-5, "y vs pure MLX")
    assert_close(state, state_mlx, 1e-5, "state vs pure MLX")


def test_wkv5_decode_matches_references(kernels):
    inputs = make_wkv6_inputs(2, 1, 3, 64, seed=62, decay_per_position=False)
    step = [inputs[0][:, 0], inputs[1], inputs[2][:, 0], inputs[3][:, 0], *inputs[4:]]
    y, state = metal_older.wkv5_metal_decode(*step)
    y_ref, state_ref = reference_wkv6(*as_float64(inputs))
    y_mlx, state_mlx = wkv5_step(*step)
    assert_close(y, y_ref[:, 0], 1e-5, "y vs float64")
    assert_close(state, state_ref, 1e-5, "state vs float64")
    assert_close(y, y_mlx, 1e-5, "y vs pure MLX")
    assert_close(state, state_mlx, 1e-5, "state vs pure MLX")


@pytest.mark.parametrize("rows", [1, 5, 32], ids=["one_row", "partial_last_group", "full_groups"])
def test_wkv6_decode_launch_configurations(kernels, rows):
    inputs = make_wkv6_inputs(2, 1, 3, 64, seed=61)
    config = metal_older.WKV6KernelConfig(decode_rows_per_group=rows)
    y, state = metal_older.wkv6_metal_decode(*decode_inputs(inputs), config=config)
    y_ref, state_ref = reference_wkv6(*as_float64(inputs))
    assert_close(y, y_ref[:, 0], 1e-5, "y")
    assert_close(state, state_ref, 1e-5, "state")


def test_wkv6_decode_mask_keeps_padded_rows(kernels):
    inputs = make_wkv6_inputs(3, 1, 2, 64, seed=71)
    mask = np.array([True, False, True])
    y, state = metal_older.wkv6_metal_decode(*decode_inputs(inputs), mx.array(mask))
    y_ref, state_ref = reference_wkv6(*as_float64(inputs), mask[:, None])
    assert_close(y, y_ref[:, 0], 1e-5, "y")
    assert_close(state, state_ref, 1e-5, "state")
    np.testing.assert_array_equal(np.array(state)[1], np.array(inputs[5])[1])


def test_wkv6_decode_head_size_not_multiple_of_32(kernels):
    inputs = make_wkv6_inputs(2, 1, 2, 16, seed=81)
    y, state = metal_older.wkv6_metal_decode(*decode_inputs(inputs))
    y_ref, state_ref = reference_wkv6(*as_float64(inputs))
    assert_close(y, y_ref[:, 0], 1e-5, "y")
    assert_close(state, state_ref, 1e-5, "state")


def test_wkv6_decode_steps_match_sequence(kernels):
    inputs = make_wkv6_inputs(2, 5, 2, 64, seed=91)
    y_sequence, state_sequence = metal_older.wkv6_metal(*inputs)
    r, w, k, v, u, state = inputs
    for t in range(5):
        y, state = metal_older.wkv6_metal_decode(r[:, t], w[:, t], k[:, t], v[:, t], u, state)
        assert_close(y, y_sequence[:, t], 1e-5, f"y at step {t}")
    assert_close(state, state_sequence, 1e-5, "state")


def test_wkv6_decode_gradients(kernels):
    inputs = make_wkv6_inputs(2, 1, 2, 32, seed=101)
    step = decode_inputs(inputs)
    weights = [np.random.default_rng(3).normal(size=s) for s in ((2, 2, 32), (2, 2, 32, 32))]
    actual = gradients(metal_older.wkv6_metal_decode, step, weights, tuple(range(6)))
    expected = gradients(wkv6_step, step, weights, tuple(range(6)))
    for name, a, e in zip(WKV6_NAMES, actual, expected):
        assert_close(a, e, 1e-5, f"d{name}")


# ---------------------------------------------------------------------------
# Selection, validation and provenance
# ---------------------------------------------------------------------------


@pytest.mark.skipif(METAL_PRESENT, reason="checks the path taken without Metal")
def test_selection_without_metal_uses_pure_mlx():
    wkv4_inputs = make_wkv4_inputs(2, 20, 16, seed=111)
    wkv5_inputs = make_wkv6_inputs(2, 20, 2, 32, seed=112, decay_per_position=False)
    wkv6_inputs = make_wkv6_inputs(2, 20, 2, 32, seed=113)
    mask = mx.array(ragged_mask(20))
    with metal.use_launcher(fail_on_launch):
        results = {
            "wkv4": ops.wkv4(*wkv4_inputs, mask),
            "wkv5": ops.wkv5(*wkv5_inputs),
            "wkv6": ops.wkv6(*wkv6_inputs),
            "wkv6 T=1": ops.wkv6(*[x[:, :1] for x in wkv6_inputs[:4]], *wkv6_inputs[4:]),
        }
    expected = {
        "wkv4": wkv4_serial(*wkv4_inputs, mask),
        "wkv5": wkv5_serial(*wkv5_inputs),
        "wkv6": wkv6_serial(*wkv6_inputs),
        "wkv6 T=1": wkv6_serial(*[x[:, :1] for x in wkv6_inputs[:4]], *wkv6_inputs[4:]),
    }
    for name, (y, state) in results.items():
        y_ref, state_ref = expected[name]
        if name == "wkv4":
            # The output at padding positions is undefined in the pure-MLX form.
            y, y_ref = np.array(y)[np.array(mask)], np.array(y_ref)[np.array(mask)]
        assert_close(y, y_ref, 1e-5, f"{name} y")
        assert_close(state, state_ref, 1e-5, f"{name} state")


@NEEDS_EMULATOR
def test_selection_hook_runs_kernels(monkeypatch):
    """With Metal reported available, the `rwkv_mlx.ops` entry points run the kernels (here emulated)."""
    launched = []
    emulate = metal_harness.launcher()

    def counting(launch):
        launched.append(launch.name)
        return emulate(launch)

    wkv4_inputs = make_wkv4_inputs(2, 6, 16, seed=141)
    wkv5_inputs = make_wkv6_inputs(2, 6, 2, 32, seed=142, decay_per_position=False)
    wkv6_inputs = make_wkv6_inputs(2, 6, 2, 32, seed=143)
    wkv6_step_inputs = [x[:, :1] for x in wkv6_inputs[:4]] + wkv6_inputs[4:]
    monkeypatch.setattr(metal, "metal_available", lambda: True)
    with metal.use_launcher(counting):
        results = {
            "wkv4": ops.wkv4(*wkv4_inputs),
            "wkv5": ops.wkv5(*wkv5_inputs),
            "wkv6": ops.wkv6(*wkv6_inputs),
            "wkv6 T=1": ops.wkv6(*wkv6_step_inputs),
        }
        mx.eval(results)
    assert launched == ["rwkv4_wkv_forward", "rwkv6_wkv_forward", "rwkv6_wkv_forward", "rwkv6_wkv_decode"]

    expected = {
        "wkv4": reference_wkv4(*as_float64(wkv4_inputs)),
        "wkv5": reference_wkv6(*as_float64(wkv5_inputs)),
        "wkv6": reference_wkv6(*as_float64(wkv6_inputs)),
        "wkv6 T=1": reference_wkv6(*as_float64(wkv6_step_inputs)),
    }
    for name, (y, state) in results.items():
        assert_close(y, expected[name][0], 1e-5, f"{name} y")
        assert_close(state, expected[name][1], 1e-5, f"{name} state")


@NEEDS_METAL
def test_selection_on_metal_uses_kernels():
    launched = []

    def counting(launch):
        launched.append(launch.name)
        return metal.run_on_metal(launch)

    wkv4_inputs = make_wkv4_inputs(1, 4, 16)
    wkv5_inputs = make_wkv6_inputs(1, 4, 2, 32, decay_per_position=False)
    wkv6_inputs = make_wkv6_inputs(1, 4, 2, 32)
    with metal.use_launcher(counting), mx.stream(mx.gpu):
        mx.eval(ops.wkv4(*wkv4_inputs))
        mx.eval(ops.wkv5(*wkv5_inputs))
        mx.eval(ops.wkv6(*wkv6_inputs))
        mx.eval(ops.wkv6(*[x[:, :1] for x in wkv6_inputs[:4]], *wkv6_inputs[4:]))
    assert launched == ["rwkv4_wkv_forward", "rwkv6_wkv_forward", "rwkv6_wkv_forward", "rwkv6_wkv_decode"]


def test_wkv4_invalid_inputs_rejected():
    k, v, w, u, state = make_wkv4_inputs(1, 3, 8)
    with pytest.raises(ValueError, match="input 'v' has shape"):
        metal_older.wkv4_metal(k, v[:, :2], w, u, state)
    with pytest.raises(ValueError, match="input 'u' has shape"):
        metal_older.wkv4_metal(k, v, w, u[:4], state)
    with pytest.raises(ValueError, match="state has shape"):
        metal_older.wkv4_metal(k, v, w, u, state[:, :2])
    with pytest.raises(ValueError, match="mask has shape"):
        metal_older.wkv4_metal(k, v, w, u, state, mx.ones((1, 4), dtype=mx.bool_))
    with pytest.raises(ValueError, match="checkpoint_interval must be at least 1 and at most 64"):
        metal_older.wkv4_metal(k, v, w, u, state, config=metal_older.WKV4KernelConfig(checkpoint_interval=65))
    with pytest.raises(ValueError, match="threads_per_group must be between 1 and 1024"):
        metal_older.wkv4_metal(k, v, w, u, state, config=metal_older.WKV4KernelConfig(threads_per_group=0))


def test_wkv6_invalid_inputs_rejected():
    r, w, k, v, u, state = make_wkv6_inputs(1, 3, 2, 32)
    with pytest.raises(ValueError, match="input 'k' has shape"):
        metal_older.wkv6_metal(r, w, k[:, :2], v, u, state)
    with pytest.raises(ValueError, match="input 'w' has shape"):
        metal_older.wkv6_metal(r, w[:, :, :, :4], k, v, u, state)
    with pytest.raises(ValueError, match="WKV-5 input 'u' has shape"):
        metal_older.wkv5_metal(r, w, k, v, u[:1], state)
    with pytest.raises(ValueError, match="state has shape"):
        metal_older.wkv6_metal(r, w, k, v, u, state[:, :1])
    with pytest.raises(ValueError, match="mask has shape"):
        metal_older.wkv6_metal(r, w, k, v, u, state, mx.ones((1, 4), dtype=mx.bool_))
    with pytest.raises(ValueError, match="rows_per_group 24 must divide"):
        metal_older.wkv6_forward_launch(r, w, k, v, u, state, None, metal_older.WKV6KernelConfig(rows_per_group=24), 0)
    big = make_wkv6_inputs(1, 1, 1, 2048)
    with pytest.raises(ValueError, match="head size 2048 .* threadgroup"):
        metal_older.wkv6_metal(*big)


@NEEDS_EMULATOR
def test_shipped_sources_run_in_harness():
    """The harness compiles and runs the .metal files of the package, unchanged."""
    wkv4_inputs = make_wkv4_inputs(1, 3, 8, seed=131)
    wkv6_inputs = make_wkv6_inputs(1, 3, 1, 32, seed=132)
    metal_harness.executed.clear()
    with kernels_on("emulated"):
        gradients(wkv4_function(), wkv4_inputs, wkv4_loss_weights(1, 3, 8), tuple(range(5)))
        gradients(wkv6_function(), wkv6_inputs, wkv6_loss_weights(1, 3, 1, 32), tuple(range(6)))
        mx.eval(metal_older.wkv6_metal_decode(*decode_inputs(wkv6_inputs)))

    package = resources.files("rwkv_mlx.metal")
    wkv4_header = (REPO_ROOT / "metal" / "wkv4_header.metal").read_text()
    assert package.joinpath("wkv4_header.metal").read_text() == wkv4_header
    expected_headers = {
        "wkv4_forward.metal": wkv4_header,
        "wkv4_backward.metal": wkv4_header,
        "wkv6_forward.metal": "",
        "wkv6_backward.metal": "",
        "wkv6_decode.metal": "",
    }
    for file_name, header in expected_headers.items():
        text = (REPO_ROOT / "metal" / file_name).read_text()
        assert package.joinpath(file_name).read_text() == text
        records = [record for record in metal_harness.executed if record.source_file == file_name]
        assert records, f"{file_name} was not executed"
        for record in records:
            assert record.source == text
            assert record.header == header
            assert record.orders == metal_harness.DEFAULT_ORDERS
