"""Tests of the WKV-7 Metal kernels, run through the CPU emulation harness
everywhere and on the Metal GPU where there is one.

References: a float64 numpy loop (`reference_wkv7`), finite differences of
it, and the pure-MLX recurrence of `rwkv_mlx.ops.wkv7`.
"""

from importlib import resources

import mlx.core as mx
import numpy as np
import pytest

import metal_harness
from metal_kernels import METAL_PRESENT, NEEDS_EMULATOR, NEEDS_METAL, REPO_ROOT, kernels_on
from rwkv_mlx.ops import metal
from rwkv_mlx.ops.wkv7 import wkv7_chunked, wkv7_serial, wkv7_step

# ---------------------------------------------------------------------------
# Inputs and references
# ---------------------------------------------------------------------------


def make_inputs(B, T, H, N, seed=0, dtype=mx.float32):
    """Return RWKV-7-like inputs r, w, k, v, a, b (dtype ``dtype``) and a float32 state.

    As in the model, a = -kappa and b = kappa * gate with a unit vector kappa,
    and the log decay w lies in [-exp(-0.5), 0). The initial state is a
    random, non-symmetric matrix.
    """
    rng = np.random.default_rng(seed)
    shape = (B, T, H, N)
    kappa = rng.normal(size=shape)
    kappa /= np.linalg.norm(kappa, axis=-1, keepdims=True)
    vectors = {
        "r": rng.normal(size=shape),
        "w": -np.exp(-0.5 - np.log1p(np.exp(rng.normal(size=shape)))),
        "k": rng.normal(size=shape) * 0.5,
        "v": rng.normal(size=shape),
        "a": -kappa,
        "b": kappa * rng.uniform(size=shape),
    }
    state = rng.normal(size=(B, H, N, N)) * 0.3
    arrays = [mx.array(vectors[name].astype(np.float32)).astype(dtype) for name in "rwkvab"]
    return [*arrays, mx.array(state.astype(np.float32))]


def as_float64(arrays):
    return [np.array(x.astype(mx.float32), dtype=np.float64) for x in arrays]


def reference_wkv7(r, w, k, v, a, b, state, mask=None):
    """Run the recurrence in float64, one position at a time (numpy arrays)."""
    B, T, H, N = r.shape
    S = state.copy()
    y = np.zeros((B, T, H, N))
    for t in range(T):
        sa = (S @ a[:, t][..., None])[..., 0]
        new = S * np.exp(w[:, t])[:, :, None, :]
        new += sa[..., None] * b[:, t][:, :, None, :]
        new += v[:, t][..., None] * k[:, t][:, :, None, :]
        out = (new @ r[:, t][..., None])[..., 0]
        if mask is not None:
            keep = mask[:, t]
            new = np.where(keep[:, None, None, None], new, S)
            out = np.where(keep[:, None, None], out, 0.0)
        S = new
        y[:, t] = out
    return y, S


def assert_close(actual, expected, tolerance, label):
    """Check max |actual - expected| <= tolerance * max(1, max |expected|)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{label}: shape {actual.shape} != {expected.shape}"
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    error = float(np.abs(actual - expected).max(initial=0.0))
    assert error <= tolerance * scale, f"{label}: max error {error:.3g} exceeds {tolerance:g} x {scale:.3g}"


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("N", [32, 64, 128])
@pytest.mark.parametrize("H", [1, 3])
@pytest.mark.parametrize("T", [1, 2, 15, 16, 17, 100])
def test_forward_matches_references(kernels, T, H, N):
    inputs = make_inputs(2, T, H, N, seed=T * 100 + H * 10 + N)
    y, state = metal.wkv7_metal(*inputs)
    y_ref, state_ref = reference_wkv7(*as_float64(inputs))
    y_mlx, state_mlx = wkv7_serial(*inputs)

    assert y.dtype == mx.float32
    assert state.dtype == mx.float32
    assert_close(y, y_ref, 1e-5, "y vs float64")
    assert_close(state, state_ref, 1e-5, "state vs float64")
    assert_close(y, y_mlx, 1e-5, "y vs pure MLX")
    assert_close(state, state_mlx, 1e-5, "state vs pure MLX")


FORWARD_CONFIGS = {
    "half_rows": metal.WKV7KernelConfig(rows_per_group=32),
    "half_rows_fewer_groups": metal.WKV7KernelConfig(rows_per_group=32, forward_groups=5),
    "one_group": metal.WKV7KernelConfig(forward_groups=1),
    "more_groups_than_heads": metal.WKV7KernelConfig(forward_groups=9),
    "half_rows_more_groups": metal.WKV7KernelConfig(rows_per_group=32, forward_groups=20),
}


@pytest.mark.parametrize("config", FORWARD_CONFIGS.values(), ids=FORWARD_CONFIGS.keys())
def test_forward_launch_configurations(kernels, config):
    inputs = make_inputs(2, 17, 3, 64, seed=7)
    y, state = metal.wkv7_metal(*inputs, config=config)
    y_ref, state_ref = reference_wkv7(*as_float64(inputs))
    assert_close(y, y_ref, 1e-5, "y")
    assert_close(state, state_ref, 1e-5, "state")


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16], ids=["bfloat16", "float16"])
def test_forward_low_precision_inputs(kernels, dtype):
    inputs = make_inputs(2, 17, 2, 64, seed=3, dtype=dtype)
    y, state = metal.wkv7_metal(*inputs)
    # The kernel must compute in float32 from the rounded inputs.
    y_ref, state_ref = reference_wkv7(*as_float64(inputs))
    assert y.dtype == mx.float32
    assert state.dtype == mx.float32
    assert_close(y, y_ref, 1e-5, "y")
    assert_close(state, state_ref, 1e-5, "state")


def ragged_mask(T):
    """Mask of a ragged batch: row 0 left-padded by 3, row 1 right-padded by 4 with a gap at 5."""
    mask = np.ones((2, T), dtype=bool)
    mask[0, :3] = False
    mask[1, T - 4:] = False
    mask[1, 5] = False
    return mask


def test_forward_ragged_batch(kernels):
    T = 12
    inputs = make_inputs(2, T, 3, 32, seed=11)
    mask = ragged_mask(T)
    y, state = metal.wkv7_metal(*inputs, mx.array(mask))
    y = np.array(y)

    r, w, k, v, a, b, s0 = as_float64(inputs)
    for row in range(2):
        valid = np.flatnonzero(mask[row])
        y_row, state_row = reference_wkv7(*(x[row:row + 1, valid] for x in (r, w, k, v, a, b)), s0[row:row + 1])
        assert_close(y[row:row + 1, valid], y_row, 1e-5, f"y of row {row}")
        assert_close(np.array(state)[row:row + 1], state_row, 1e-5, f"state of row {row}")
    assert (y[~mask] == 0).all()


def test_forward_all_padding_keeps_state(kernels):
    inputs = make_inputs(1, 5, 2, 32, seed=5)
    y, state = metal.wkv7_metal(*inputs, mx.zeros((1, 5), dtype=mx.bool_))
    assert (np.array(y) == 0).all()
    np.testing.assert_array_equal(np.array(state), np.array(inputs[6]))


def test_forward_empty_sequence(kernels):
    inputs = make_inputs(2, 0, 2, 32)
    y, state = metal.wkv7_metal(*inputs)
    assert y.shape == (2, 0, 2, 32)
    np.testing.assert_array_equal(np.array(state), np.array(inputs[6]))


# ---------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------

INPUT_NAMES = ("r", "w", "k", "v", "a", "b", "state")


def loss_weights(B, T, H, N, seed=99):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(B, T, H, N)), rng.normal(size=(B, H, N, N))


def kernel_gradients(inputs, mask, weights, config=metal.DEFAULT_CONFIG):
    """Return the kernels' gradients of sum(y * dy) + sum(state * dstate) for all seven inputs."""
    dy, dstate = (mx.array(x.astype(np.float32)) for x in weights)
    mask = None if mask is None else mx.array(mask)

    def loss(*xs):
        y, state = metal.wkv7_metal(*xs, mask, config=config)
        return (y * dy).sum() + (state * dstate).sum()

    grads = mx.grad(loss, argnums=tuple(range(7)))(*inputs)
    mx.eval(grads)
    return grads


def finite_difference_gradients(inputs, mask, weights, epsilon=1e-6, chunk=256):
    """Return central differences of the float64 loss for every element of every input (B = 1).

    The perturbations of an input run through the reference in batches of
    ``chunk`` elements, each perturbed up and down. Small batches keep the
    reference's temporaries small enough for malloc to reuse them, which
    avoids page faults on fresh memory at every step.
    """
    dy, dstate = weights
    base = as_float64(inputs)
    batch_mask = None if mask is None else np.repeat(mask, 2 * chunk, axis=0)
    grads = []
    for index, x in enumerate(base):
        flat_grad = np.zeros(x.size)
        for start in range(0, x.size, chunk):
            elements = np.arange(start, min(start + chunk, x.size))
            count = elements.size
            perturbed = [np.repeat(y, 2 * count, axis=0) for y in base]
            flat = perturbed[index].reshape(2 * count, -1)
            flat[np.arange(count), elements] += epsilon
            flat[count + np.arange(count), elements] -= epsilon
            y, state = reference_wkv7(*perturbed, None if mask is None else batch_mask[: 2 * count])
            loss = (y * dy).reshape(2 * count, -1).sum(axis=1) + (state * dstate).reshape(2 * count, -1).sum(axis=1)
            flat_grad[elements] = (loss[:count] - loss[count:]) / (2 * epsilon)
        grads.append(flat_grad.reshape(x.shape))
    return grads


GRADIENT_CASES = [
    pytest.param((kind, masked), id=f"{kind}-{'mask' if masked else 'no_mask'}", marks=marks)
    for kind, marks in (("emulated", NEEDS_EMULATOR), ("metal", NEEDS_METAL))
    for masked in (False, True)
]


@pytest.fixture(scope="module", params=GRADIENT_CASES)
def gradient_case(request):
    """Return kernel gradients and finite differences for B = 1, T = 10, H = 2, N = 32.

    The checkpoint interval 4 splits the sequence into segments of 4, 4 and 2
    positions. The masked case pads the first two positions and position 6.
    """
    kind, masked = request.param
    B, T, H, N = 1, 10, 2, 32
    inputs = make_inputs(B, T, H, N, seed=21)
    mask = None
    if masked:
        mask = np.ones((B, T), dtype=bool)
        mask[0, [0, 1, 6]] = False
    weights = loss_weights(B, T, H, N)
    config = metal.WKV7KernelConfig(checkpoint_interval=4)
    with kernels_on(kind):
        grads = kernel_gradients(inputs, mask, weights, config)
    return grads, finite_difference_gradients(inputs, mask, weights), mask


@pytest.mark.parametrize("index", range(7), ids=INPUT_NAMES)
def test_backward_matches_finite_differences(gradient_case, index):
    grads, expected, mask = gradient_case
    actual = np.array(grads[index], dtype=np.float64)
    scale = np.abs(expected[index]).max()
    error = np.abs(actual - expected[index]).max()
    assert error <= 1e-4 * scale, f"d{INPUT_NAMES[index]}: max error {error:.3g} vs max |gradient| {scale:.3g}"
    if mask is not None and index < 6:
        assert (actual[~mask] == 0).all(), "padding positions must get zero gradients"


BACKWARD_CONFIGS = {
    "default": metal.WKV7KernelConfig(),
    "interval_5": metal.WKV7KernelConfig(checkpoint_interval=5),
    "one_group": metal.WKV7KernelConfig(backward_groups=1, checkpoint_interval=5),
    "more_groups_than_heads": metal.WKV7KernelConfig(backward_groups=9),
    "fewer_groups_than_heads": metal.WKV7KernelConfig(backward_groups=4, rows_per_group=32, forward_groups=3),
}


@pytest.mark.parametrize("config", BACKWARD_CONFIGS.values(), ids=BACKWARD_CONFIGS.keys())
def test_backward_launch_configurations(kernels, config):
    B, T, H, N = 2, 17, 3, 64
    inputs = make_inputs(B, T, H, N, seed=31)
    weights = loss_weights(B, T, H, N)
    grads = kernel_gradients(inputs, None, weights, config)

    dy, dstate = (mx.array(x.astype(np.float32)) for x in weights)

    def loss(*xs):
        y, state = wkv7_serial(*xs)
        return (y * dy).sum() + (state * dstate).sum()

    expected = mx.grad(loss, argnums=tuple(range(7)))(*inputs)
    for name, actual, reference in zip(INPUT_NAMES, grads, expected):
        assert_close(actual, reference, 1e-4, f"d{name}")


@pytest.mark.parametrize("T, N", [(100, 64), (33, 128)])
def test_backward_long_sequences(kernels, T, N):
    B, H = 1, 2
    inputs = make_inputs(B, T, H, N, seed=41)
    weights = loss_weights(B, T, H, N)
    grads = kernel_gradients(inputs, None, weights)

    dy, dstate = (mx.array(x.astype(np.float32)) for x in weights)

    def loss(*xs):
        y, state = wkv7_serial(*xs)
        return (y * dy).sum() + (state * dstate).sum()

    expected = mx.grad(loss, argnums=tuple(range(7)))(*inputs)
    for name, actual, reference in zip(INPUT_NAMES, grads, expected):
        assert_close(actual, reference, 1e-4, f"d{name}")


def test_backward_low_precision_gradient_dtypes(kernels):
    inputs = make_inputs(1, 6, 2, 32, seed=51, dtype=mx.bfloat16)
    weights = loss_weights(1, 6, 2, 32)
    grads = kernel_gradients(inputs, None, weights)
    upcast = [x.astype(mx.float32) for x in inputs]
    expected = kernel_gradients(upcast, None, weights)
    for name, x, actual, reference in zip(INPUT_NAMES, inputs, grads, expected):
        assert actual.dtype == x.dtype, f"d{name} has dtype {actual.dtype}, expected {x.dtype}"
        assert_close(actual.astype(mx.float32), reference, 1e-2, f"d{name}")


# ---------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("N", [32, 64, 128])
@pytest.mark.parametrize("H", [1, 3])
def test_decode_matches_references(kernels, H, N):
    inputs = make_inputs(2, 1, H, N, seed=H + N)
    step = [x[:, 0] for x in inputs[:6]]
    y, state = metal.wkv7_metal_decode(*step, inputs[6])
    y_ref, state_ref = reference_wkv7(*as_float64(inputs))
    y_mlx, state_mlx = wkv7_step(*step, inputs[6])

    assert_close(y, y_ref[:, 0], 1e-5, "y vs float64")
    assert_close(state, state_ref, 1e-5, "state vs float64")
    assert_close(y, y_mlx, 1e-5, "y vs pure MLX")
    assert_close(state, state_mlx, 1e-5, "state vs pure MLX")


@pytest.mark.parametrize("rows", [1, 5, 32], ids=["one_row", "partial_last_group", "full_groups"])
def test_decode_launch_configurations(kernels, rows):
    inputs = make_inputs(2, 1, 3, 64, seed=61)
    config = metal.WKV7KernelConfig(decode_rows_per_group=rows)
    y, state = metal.wkv7_metal_decode(*[x[:, 0] for x in inputs[:6]], inputs[6], config=config)
    y_ref, state_ref = reference_wkv7(*as_float64(inputs))
    assert_close(y, y_ref[:, 0], 1e-5, "y")
    assert_close(state, state_ref, 1e-5, "state")


def test_decode_mask_keeps_padded_rows(kernels):
    inputs = make_inputs(3, 1, 2, 64, seed=71)
    mask = np.array([True, False, True])
    y, state = metal.wkv7_metal_decode(*[x[:, 0] for x in inputs[:6]], inputs[6], mx.array(mask))
    y_ref, state_ref = reference_wkv7(*as_float64(inputs), mask[:, None])
    assert_close(y, y_ref[:, 0], 1e-5, "y")
    assert_close(state, state_ref, 1e-5, "state")
    np.testing.assert_array_equal(np.array(state)[1], np.array(inputs[6])[1])


def test_decode_head_size_not_multiple_of_32(kernels):
    inputs = make_inputs(2, 1, 2, 16, seed=81)
    y, state = metal.wkv7_metal_decode(*[x[:, 0] for x in inputs[:6]], inputs[6])
    y_ref, state_ref = reference_wkv7(*as_float64(inputs))
    assert_close(y, y_ref[:, 0], 1e-5, "y")
    assert_close(state, state_ref, 1e-5, "state")


def test_decode_steps_match_sequence(kernels):
    inputs = make_inputs(2, 5, 2, 64, seed=91)
    y_sequence, state_sequence = metal.wkv7_metal(*inputs)
    state = inputs[6]
    for t in range(5):
        y, state = metal.wkv7_metal_decode(*[x[:, t] for x in inputs[:6]], state)
        assert_close(y, y_sequence[:, t], 1e-5, f"y at step {t}")
    assert_close(state, state_sequence, 1e-5, "state")


def test_decode_gradients(kernels):
    inputs = make_inputs(2, 1, 2, 32, seed=101)
    step = [x[:, 0] for x in inputs[:6]]
    weights = [np.random.default_rng(3).normal(size=s).astype(np.float32) for s in ((2, 2, 32), (2, 2, 32, 32))]
    dy, dstate = (mx.array(x) for x in weights)

    def loss(function):
        def value(*xs):
            y, state = function(*xs)
            return (y * dy).sum() + (state * dstate).sum()

        return value

    actual = mx.grad(loss(metal.wkv7_metal_decode), argnums=tuple(range(7)))(*step, inputs[6])
    expected = mx.grad(loss(wkv7_step), argnums=tuple(range(7)))(*step, inputs[6])
    for name, a, e in zip(INPUT_NAMES, actual, expected):
        assert_close(a, e, 1e-5, f"d{name}")


# ---------------------------------------------------------------------------
# Selection, validation and provenance
# ---------------------------------------------------------------------------


def fail_on_launch(launch):
    raise AssertionError(f"kernel {launch.name} launched on a machine without Metal")


@pytest.mark.skipif(METAL_PRESENT, reason="checks the path taken without Metal")
def test_selection_without_metal_uses_pure_mlx():
    inputs = make_inputs(2, 20, 2, 32, seed=111)
    with metal.use_launcher(fail_on_launch):
        y, state = metal.wkv7(*inputs)
        y_step, state_step = metal.wkv7_decode(*[x[:, 0] for x in inputs[:6]], inputs[6])
    y_ref, state_ref = wkv7_chunked(*inputs)
    assert_close(y, y_ref, 1e-6, "y")
    assert_close(state, state_ref, 1e-6, "state")
    y1_ref, state1_ref = wkv7_step(*[x[:, 0] for x in inputs[:6]], inputs[6])
    assert_close(y_step, y1_ref, 1e-6, "decode y")
    assert_close(state_step, state1_ref, 1e-6, "decode state")


@pytest.mark.skipif(METAL_PRESENT, reason="checks the path taken without Metal")
def test_selection_without_metal_honours_mask():
    T = 12
    inputs = make_inputs(2, T, 2, 32, seed=121)
    mask = ragged_mask(T)
    with metal.use_launcher(fail_on_launch):
        y, state = metal.wkv7(*inputs, mx.array(mask))
        decode_mask = np.array([True, False])
        y_step, state_step = metal.wkv7_decode(*[x[:, 0] for x in inputs[:6]], inputs[6], mx.array(decode_mask))
    y_ref, state_ref = reference_wkv7(*as_float64(inputs), mask)
    assert_close(y, y_ref, 1e-5, "y")
    assert_close(state, state_ref, 1e-5, "state")
    y1_ref, state1_ref = reference_wkv7(*as_float64([x[:, :1] for x in inputs[:6]] + [inputs[6]]), decode_mask[:, None])
    assert_close(y_step, y1_ref[:, 0], 1e-5, "decode y")
    assert_close(state_step, state1_ref, 1e-5, "decode state")


@NEEDS_METAL
def test_selection_on_metal_uses_kernels():
    launched = []

    def counting(launch):
        launched.append(launch.name)
        return metal.run_on_metal(launch)

    inputs = make_inputs(1, 4, 2, 32)
    with metal.use_launcher(counting), mx.stream(mx.gpu):
        mx.eval(metal.wkv7(*inputs))
        mx.eval(metal.wkv7_decode(*[x[:, 0] for x in inputs[:6]], inputs[6]))
    assert launched == ["rwkv7_wkv_forward", "rwkv7_wkv_decode"]


def test_invalid_inputs_rejected():
    inputs = make_inputs(1, 3, 2, 32)
    with pytest.raises(ValueError, match="input 'k' has shape"):
        metal.wkv7_metal(*inputs[:2], inputs[2][:, :2], *inputs[3:])
    with pytest.raises(ValueError, match="state has shape"):
        metal.wkv7_metal(*inputs[:6], inputs[6][:, :1])
    with pytest.raises(ValueError, match="mask has shape"):
        metal.wkv7_metal(*inputs, mx.ones((1, 4), dtype=mx.bool_))
    with pytest.raises(ValueError, match="rows_per_group 24 must divide"):
        metal.forward_launch(*inputs, None, metal.WKV7KernelConfig(rows_per_group=24), 0)
    big = make_inputs(1, 1, 1, 512)
    with pytest.raises(ValueError, match="head size 512 .* threadgroup memory"):
        metal.wkv7_metal(*big)


@NEEDS_EMULATOR
def test_shipped_sources_run_in_harness():
    """The harness compiles and runs the .metal files of the package, unchanged."""
    inputs = make_inputs(1, 3, 1, 32, seed=131)
    metal_harness.executed.clear()
    with kernels_on("emulated"):
        mx.eval(kernel_gradients(inputs, None, loss_weights(1, 3, 1, 32)))
        mx.eval(metal.wkv7_metal_decode(*[x[:, 0] for x in inputs[:6]], inputs[6]))

    package = resources.files("rwkv_mlx.metal")
    header = (REPO_ROOT / "metal" / "wkv7_header.metal").read_text()
    assert package.joinpath("wkv7_header.metal").read_text() == header
    for file_name in ("wkv7_forward.metal", "wkv7_backward.metal", "wkv7_decode.metal"):
        text = (REPO_ROOT / "metal" / file_name).read_text()
        assert package.joinpath(file_name).read_text() == text
        records = [record for record in metal_harness.executed if record.source_file == file_name]
        assert records, f"{file_name} was not executed"
        for record in records:
            assert record.source == text
            assert record.header == header
            assert record.orders == metal_harness.DEFAULT_ORDERS
