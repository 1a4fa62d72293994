"""The RWKV-7 WKV recurrence as custom Metal kernels, with automatic selection.

The kernels (``metal/wkv7_*.metal``, shipped as ``rwkv_mlx.metal``) honour
the contract of `rwkv_mlx.ops.wkv7`, plus an optional ``mask`` [B, T] of valid
positions: a padding position leaves the state unchanged and outputs 0.

Every kernel call goes through a `KernelLaunch`, a complete description of one
``mx.fast.metal_kernel`` call. The active launcher runs it: `run_on_metal` on
a Mac GPU, or a CPU emulator installed with `use_launcher` in tests, so one
description drives both the real kernel and its emulation.

Entry points:
    `wkv7`, `wkv7_decode`: Metal kernels when MLX runs on a Metal GPU, the
        pure-MLX recurrence otherwise.
    `wkv7_metal`, `wkv7_metal_decode`: always the kernels (differentiable).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import mlx.core as mx

from .wkv7 import wkv7_chunked, wkv7_step

# Threadgroup memory of one Metal threadgroup, in bytes.
MAX_THREADGROUP_MEMORY = 32768
MAX_THREADS_PER_THREADGROUP = 1024
SIMD_WIDTH = 32
# The kernels index with 32-bit unsigned integers.
MAX_ELEMENTS = 2**32 - 1

DEFAULT_CHECKPOINT_INTERVAL = 16
# NOTE: not tuned on Metal hardware. The backward pass needs
# (checkpoint_interval + 1) * N * N floats of scratch per threadgroup, so the
# default caps the number of threadgroups instead of launching one per head.
DEFAULT_BACKWARD_GROUPS = 256
DEFAULT_DECODE_ROWS_PER_GROUP = 8


@dataclass(frozen=True)
class KernelLaunch:
    """One call of a kernel built with ``mx.fast.metal_kernel``.

    The fields are the arguments of ``mx.fast.metal_kernel`` and of the call
    of the kernel it returns. ``source_file`` and ``header_file`` name the
    files the source and header came from, for messages.
    """

    name: str
    source: str
    header: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    inputs: tuple[mx.array, ...]
    output_shapes: tuple[tuple[int, ...], ...]
    output_dtypes: tuple[mx.Dtype, ...]
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    template: tuple[tuple[str, int | bool | mx.Dtype], ...] = ()
    init_value: float | None = None
    ensure_row_contiguous: bool = True
    atomic_outputs: bool = False
    source_file: str = ""
    header_file: str = ""


@dataclass(frozen=True)
class WKV7KernelConfig:
    """Launch configuration of the WKV-7 kernels, and of the WKV-5/6 kernels
    (``metal_older.WKV6KernelConfig`` is this class).

    Attributes:
        rows_per_group: Threads per threadgroup of the sequence forward kernel,
            one per value row of the state; must divide the head size.
            None: the head size.
        forward_groups: Threadgroups of the sequence forward kernel; they loop
            over the B * H * (N / rows_per_group) work items. None: one per item.
        backward_groups: Threadgroups of the backward kernel (N threads each);
            they loop over the B * H heads. None: min(B * H, DEFAULT_BACKWARD_GROUPS).
        checkpoint_interval: Steps between the states the forward pass saves
            for the backward pass.
        decode_rows_per_group: Value rows (one simdgroup each) per threadgroup
            of the decode kernel.
    """

    rows_per_group: int | None = None
    forward_groups: int | None = None
    backward_groups: int | None = None
    checkpoint_interval: int = DEFAULT_CHECKPOINT_INTERVAL
    decode_rows_per_group: int = DEFAULT_DECODE_ROWS_PER_GROUP


DEFAULT_CONFIG = WKV7KernelConfig()


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _metal_kernel(name, input_names, output_names, source, header, ensure_row_contiguous, atomic_outputs):
    return mx.fast.metal_kernel(
        name=name,
        input_names=list(input_names),
        output_names=list(output_names),
        source=source,
        header=header,
        ensure_row_contiguous=ensure_row_contiguous,
        atomic_outputs=atomic_outputs,
    )


def run_on_metal(launch: KernelLaunch, verbose: bool = False) -> list[mx.array]:
    """Run ``launch`` with ``mx.fast.metal_kernel``.

    NOTE: the kernels have been compiled and run only by the CPU emulation
    harness (tests/metal_harness) so far, never by Apple's Metal compiler.

    Args:
        launch (KernelLaunch): The kernel call.
        verbose (bool): Print the generated Metal source (MLX's own output).

    Returns:
        list[mx.array]: The kernel's outputs.
    """
    kernel = _metal_kernel(
        launch.name,
        launch.input_names,
        launch.output_names,
        launch.source,
        launch.header,
        launch.ensure_row_contiguous,
        launch.atomic_outputs,
    )
    return kernel(
        inputs=list(launch.inputs),
        template=list(launch.template),
        grid=launch.grid,
        threadgroup=launch.threadgroup,
        output_shapes=list(launch.output_shapes),
        output_dtypes=list(launch.output_dtypes),
        init_value=launch.init_value,
        verbose=verbose,
    )


Launcher = Callable[[KernelLaunch], list[mx.array]]
_launcher: Launcher = run_on_metal


def launch(description: KernelLaunch) -> list[mx.array]:
    """Run a kernel launch with the current launcher: Metal, or the one `use_launcher` installed."""
    return _launcher(description)


@contextlib.contextmanager
def use_launcher(launcher: Launcher) -> Iterator[None]:
    """Run the kernels of this module with ``launcher`` inside the ``with`` block.

    Tests use it to run the kernels in the CPU emulator. The launcher is read
    when a kernel is called, including in the backward pass, so gradients must
    be computed inside the block too.
    """
    global _launcher
    previous = _launcher
    _launcher = launcher
    try:
        yield
    finally:
        _launcher = previous


def metal_available() -> bool:
    """Return True when MLX runs on a Metal GPU, where the kernels are used."""
    return mx.metal.is_available() and mx.default_device() == mx.gpu


@lru_cache(maxsize=None)
def kernel_source(file_name: str) -> str:
    """Return the text of a kernel source file shipped in ``rwkv_mlx.metal``."""
    return resources.files("rwkv_mlx.metal").joinpath(file_name).read_text()


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------


def _check_inputs(r, w, k, v, a, b, state, mask, sequence: bool):
    """Validate shapes and return (state as float32, mask as bool or None)."""
    names = ("r", "w", "k", "v", "a", "b")
    rank = 4 if sequence else 3
    layout = "[B, T, H, N]" if sequence else "[B, H, N]"
    for name, x in zip(names, (r, w, k, v, a, b)):
        if x.ndim != rank or x.shape != r.shape:
            raise ValueError(
                f"WKV-7 input '{name}' has shape {tuple(x.shape)}; expected {layout} like r {tuple(r.shape)}"
            )
        if not mx.issubdtype(x.dtype, mx.floating):
            raise ValueError(f"WKV-7 input '{name}' has dtype {x.dtype}; expected a float dtype")

    B = r.shape[0]
    H, N = r.shape[-2], r.shape[-1]
    if state.shape != (B, H, N, N):
        raise ValueError(f"WKV-7 state has shape {tuple(state.shape)}; expected [B, H, N, N] = {(B, H, N, N)}")
    state = state.astype(mx.float32)

    if mask is not None:
        expected = (B, r.shape[1]) if sequence else (B,)
        if mask.shape != expected:
            raise ValueError(f"WKV-7 mask has shape {tuple(mask.shape)}; expected {expected}")
        mask = mask if mask.dtype == mx.bool_ else mask != 0
    return state, mask


def check_size(description: str, count: int) -> None:
    """Raise ValueError when a buffer has more elements than the kernels can index."""
    if count > MAX_ELEMENTS:
        raise ValueError(
            f"{description} has {count} elements, more than the 2^32 - 1 the kernels can index; "
            "split the batch or the sequence"
        )


def mask_argument(mask: mx.array | None) -> mx.array:
    # A kernel input cannot be left out, so without a mask the kernels get a
    # one-element placeholder and HAS_MASK = false keeps them from reading it.
    return mx.ones((1,), dtype=mx.bool_) if mask is None else mask


# ---------------------------------------------------------------------------
# Launch descriptions
# ---------------------------------------------------------------------------


def forward_launch(r, w, k, v, a, b, state, mask, config: WKV7KernelConfig, checkpoint_interval: int) -> KernelLaunch:
    """Describe the sequence forward kernel for inputs [B, T, H, N].

    ``checkpoint_interval`` 0 saves no checkpoints (the third output is a
    one-element placeholder).
    """
    B, T, H, N = r.shape
    rows = config.rows_per_group or N
    if N % rows != 0 or rows > MAX_THREADS_PER_THREADGROUP:
        raise ValueError(f"rows_per_group {rows} must divide the head size {N} and be at most 1024")
    items = B * H * (N // rows)
    groups = config.forward_groups or items
    segments = -(-T // checkpoint_interval) if checkpoint_interval else 0

    check_size("WKV-7 input", B * T * H * N)
    check_size("WKV-7 checkpoints", B * H * segments * N * N)
    checkpoint_shape = (B, H, segments, N, N) if checkpoint_interval else (1,)
    return KernelLaunch(
        name="rwkv7_wkv_forward",
        source=kernel_source("wkv7_forward.metal"),
        header=kernel_source("wkv7_header.metal"),
        source_file="wkv7_forward.metal",
        header_file="wkv7_header.metal",
        input_names=("r", "w", "k", "v", "a", "b", "state_in", "mask"),
        output_names=("y", "state_out", "checkpoints"),
        inputs=(r, w, k, v, a, b, state, mask_argument(mask)),
        output_shapes=((B, T, H, N), (B, H, N, N), checkpoint_shape),
        output_dtypes=(mx.float32, mx.float32, mx.float32),
        grid=(groups * rows, 1, 1),
        threadgroup=(rows, 1, 1),
        template=(("N", N), ("CHECKPOINT", checkpoint_interval), ("HAS_MASK", mask is not None)),
    )


def backward_launch(r, w, k, v, a, b, mask, checkpoints, dy, dstate, config: WKV7KernelConfig) -> KernelLaunch:
    """Describe the backward kernel for inputs [B, T, H, N] and saved checkpoints."""
    B, T, H, N = r.shape
    interval = config.checkpoint_interval
    groups = config.backward_groups or min(B * H, DEFAULT_BACKWARD_GROUPS)
    check_size("WKV-7 backward scratch", groups * (interval + 1) * N * N)
    return KernelLaunch(
        name="rwkv7_wkv_backward",
        source=kernel_source("wkv7_backward.metal"),
        header=kernel_source("wkv7_header.metal"),
        source_file="wkv7_backward.metal",
        header_file="wkv7_header.metal",
        input_names=("r", "w", "k", "v", "a", "b", "mask", "checkpoints", "dy", "dstate_out"),
        output_names=("dr", "dw", "dk", "dv", "da", "db", "dstate_in", "scratch"),
        inputs=(r, w, k, v, a, b, mask_argument(mask), checkpoints, dy, dstate),
        output_shapes=(*([(B, T, H, N)] * 6), (B, H, N, N), (groups, interval + 1, N, N)),
        output_dtypes=(mx.float32,) * 8,
        grid=(groups * N, 1, 1),
        threadgroup=(N, 1, 1),
        template=(("N", N), ("CHECKPOINT", interval), ("HAS_MASK", mask is not None)),
    )


def decode_launch(r, w, k, v, a, b, state, mask, config: WKV7KernelConfig) -> KernelLaunch:
    """Describe the single-token kernel for inputs [B, H, N] (N a multiple of 32)."""
    B, H, N = r.shape
    rows_per_group = config.decode_rows_per_group
    if rows_per_group < 1 or SIMD_WIDTH * rows_per_group > MAX_THREADS_PER_THREADGROUP:
        raise ValueError(f"decode_rows_per_group {rows_per_group} must be between 1 and 32")
    check_size("WKV-7 state", B * H * N * N)
    return KernelLaunch(
        name="rwkv7_wkv_decode",
        source=kernel_source("wkv7_decode.metal"),
        header=kernel_source("wkv7_header.metal"),
        source_file="wkv7_decode.metal",
        header_file="wkv7_header.metal",
        input_names=("r", "w", "k", "v", "a", "b", "state_in", "mask"),
        output_names=("y", "state_out"),
        inputs=(r, w, k, v, a, b, state, mask_argument(mask)),
        output_shapes=((B, H, N), (B, H, N, N)),
        output_dtypes=(mx.float32, mx.float32),
        grid=(SIMD_WIDTH, B * H * N, 1),
        threadgroup=(SIMD_WIDTH, rows_per_group, 1),
        template=(("N", N), ("HAS_MASK", mask is not None)),
    )


def _check_kernel_limits(N: int, config: WKV7KernelConfig) -> None:
    interval = config.checkpoint_interval
    if interval < 1:
        raise ValueError(f"checkpoint_interval must be at least 1, got {interval}")
    memory = (8 + interval) * N * 4
    if N > MAX_THREADS_PER_THREADGROUP or memory > MAX_THREADGROUP_MEMORY:
        raise ValueError(
            f"head size {N} with checkpoint_interval {interval} needs {memory} bytes of threadgroup memory "
            f"in the backward kernel (at most {MAX_THREADGROUP_MEMORY}); lower checkpoint_interval or use "
            "rwkv_mlx.ops.wkv7.wkv7_chunked"
        )


# ---------------------------------------------------------------------------
# Differentiable kernel calls
# ---------------------------------------------------------------------------


def _sequence_gradients(primals, dy, dstate, has_mask: bool, config: WKV7KernelConfig):
    """Return the gradients of a sequence call for inputs [B, T, H, N].

    Runs the forward kernel again, this time saving checkpoints, then the
    backward kernel. Gradients of r, w, k, v, a, b have their input's dtype.
    """
    r, w, k, v, a, b, state, mask = primals
    mask = mask if has_mask else None
    interval = config.checkpoint_interval

    checkpoints = _launcher(forward_launch(r, w, k, v, a, b, state, mask, config, interval))[2]
    launch = backward_launch(r, w, k, v, a, b, mask, checkpoints, dy, dstate, config)
    dr, dw, dk, dv, da, db, dstate_in, _ = _launcher(launch)

    grads = [g.astype(x.dtype) for g, x in zip((dr, dw, dk, dv, da, db), (r, w, k, v, a, b))]
    return (*grads, dstate_in)


def cotangent_or_zeros(cotangent, like: mx.array) -> mx.array:
    """Return the cotangent in float32, or zeros shaped like ``like`` when MLX passes None."""
    return mx.zeros_like(like) if cotangent is None else cotangent.astype(mx.float32)


@lru_cache(maxsize=None)
def _sequence_function(config: WKV7KernelConfig, has_mask: bool):
    """Build the differentiable sequence kernel call for one configuration.

    The forward call saves no checkpoints, so inference writes nothing extra;
    the vjp recomputes the forward pass with checkpoints before the backward
    kernel. Without a mask the ``mask`` argument is the placeholder.
    """

    @mx.custom_function
    def sequence(r, w, k, v, a, b, state, mask):
        launch = forward_launch(r, w, k, v, a, b, state, mask if has_mask else None, config, 0)
        y, state_out, _ = _launcher(launch)
        return y, state_out

    @sequence.vjp
    def sequence_vjp(primals, cotangents, outputs):
        dy = cotangent_or_zeros(cotangents[0], outputs[0])
        dstate = cotangent_or_zeros(cotangents[1], outputs[1])
        grads = _sequence_gradients(primals, dy, dstate, has_mask, config)
        return (*grads, mx.zeros_like(primals[7]))

    return sequence


@lru_cache(maxsize=None)
def _decode_function(config: WKV7KernelConfig, has_mask: bool):
    """Build the differentiable single-token kernel call for one configuration.

    Its vjp runs the sequence kernels with T = 1.
    """

    @mx.custom_function
    def decode(r, w, k, v, a, b, state, mask):
        launch = decode_launch(r, w, k, v, a, b, state, mask if has_mask else None, config)
        y, state_out = _launcher(launch)
        return y, state_out

    @decode.vjp
    def decode_vjp(primals, cotangents, outputs):
        *vectors, state, mask = primals
        sequence_primals = (*[x[:, None] for x in vectors], state, mask[:, None] if has_mask else mask)
        dy = cotangent_or_zeros(cotangents[0], outputs[0])[:, None]
        dstate = cotangent_or_zeros(cotangents[1], outputs[1])
        grads = _sequence_gradients(sequence_primals, dy, dstate, has_mask, config)
        return (*[g[:, 0] for g in grads[:6]], grads[6], mx.zeros_like(mask))

    return decode


def wkv7_metal(
    r: mx.array,
    w: mx.array,
    k: mx.array,
    v: mx.array,
    a: mx.array,
    b: mx.array,
    state: mx.array,
    mask: mx.array | None = None,
    *,
    config: WKV7KernelConfig = DEFAULT_CONFIG,
) -> tuple[mx.array, mx.array]:
    """Run the recurrence over a sequence with the Metal kernels (differentiable).

    Args:
        r, w, k, v, a, b (mx.array): Shape [B, T, H, N], any float dtype;
            ``w`` is the log decay.
        state (mx.array): Initial state, [B, H, N, N], used in float32.
        mask (mx.array | None): [B, T], True (or nonzero) at valid positions.
            A padding position leaves the state unchanged and outputs 0.
        config (WKV7KernelConfig): Launch configuration.

    Returns:
        tuple[mx.array, mx.array]: ``y`` [B, T, H, N] and the final state,
        both float32.
    """
    state, mask = _check_inputs(r, w, k, v, a, b, state, mask, sequence=True)
    B, T, H, N = r.shape
    _check_kernel_limits(N, config)
    if B * T * H * N == 0:
        return mx.zeros((B, T, H, N), dtype=mx.float32), state

    function = _sequence_function(config, mask is not None)
    return function(r, w, k, v, a, b, state, mask_argument(mask))


def wkv7_metal_decode(
    r: mx.array,
    w: mx.array,
    k: mx.array,
    v: mx.array,
    a: mx.array,
    b: mx.array,
    state: mx.array,
    mask: mx.array | None = None,
    *,
    config: WKV7KernelConfig = DEFAULT_CONFIG,
) -> tuple[mx.array, mx.array]:
    """Advance the state by one token with the Metal kernels (differentiable).

    Head sizes that are not a multiple of 32 run the sequence kernel with T = 1.

    Args:
        r, w, k, v, a, b (mx.array): One position each, shape [B, H, N], any
            float dtype; ``w`` is the log decay.
        state (mx.array): State before the step, [B, H, N, N], used in float32.
        mask (mx.array | None): [B], True (or nonzero) for batch rows to
            advance; the other rows keep their state and output 0.
        config (WKV7KernelConfig): Launch configuration.

    Returns:
        tuple[mx.array, mx.array]: ``y`` [B, H, N] and the new state, both float32.
    """
    state, mask = _check_inputs(r, w, k, v, a, b, state, mask, sequence=False)
    B, H, N = r.shape
    _check_kernel_limits(N, config)
    if B * H * N == 0:
        return mx.zeros((B, H, N), dtype=mx.float32), state

    if N % SIMD_WIDTH != 0:
        vectors = [x[:, None] for x in (r, w, k, v, a, b)]
        sequence_mask = None if mask is None else mask[:, None]
        y, state = wkv7_metal(*vectors, state, sequence_mask, config=config)
        return y[:, 0], state

    function = _decode_function(config, mask is not None)
    return function(r, w, k, v, a, b, state, mask_argument(mask))


# ---------------------------------------------------------------------------
# Automatic selection
# ---------------------------------------------------------------------------


def _apply_mask(mask: mx.array, *xs: mx.array) -> list[mx.array]:
    """Zero ``xs`` where ``mask`` is False (mask broadcast over the trailing [H, N])."""
    keep = mask.reshape(*mask.shape, 1, 1)
    return [mx.where(keep, x, mx.zeros_like(x)) for x in xs]


def wkv7(
    r: mx.array,
    w: mx.array,
    k: mx.array,
    v: mx.array,
    a: mx.array,
    b: mx.array,
    state: mx.array,
    mask: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """Run the recurrence over a sequence on the best path for the device.

    On a Metal GPU this is `wkv7_metal`, elsewhere `wkv7_chunked`. There a
    padding position gets zero w, k, v, a, b, which leaves the state
    unchanged, and its output is set to 0. Arguments and returns are those of
    `wkv7_metal`.
    """
    if metal_available():
        return wkv7_metal(r, w, k, v, a, b, state, mask)

    state, mask = _check_inputs(r, w, k, v, a, b, state, mask, sequence=True)
    if mask is None:
        return wkv7_chunked(r, w, k, v, a, b, state)
    w, k, v, a, b = _apply_mask(mask, w, k, v, a, b)
    y, state = wkv7_chunked(r, w, k, v, a, b, state)
    return _apply_mask(mask, y)[0], state


def wkv7_decode(
    r: mx.array,
    w: mx.array,
    k: mx.array,
    v: mx.array,
    a: mx.array,
    b: mx.array,
    state: mx.array,
    mask: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """Advance the state by one token on the best path for the device.

    On a Metal GPU this is `wkv7_metal_decode`; elsewhere `wkv7_step`.
    Arguments and returns are those of `wkv7_metal_decode`.
    """
    if metal_available():
        return wkv7_metal_decode(r, w, k, v, a, b, state, mask)

    state, mask = _check_inputs(r, w, k, v, a, b, state, mask, sequence=False)
    if mask is None:
        return wkv7_step(r, w, k, v, a, b, state)
    y, new_state = wkv7_step(r, w, k, v, a, b, state)
    keep = mask.reshape(-1, 1, 1)
    return mx.where(keep, y, 0.0), mx.where(keep[..., None], new_state, state)
