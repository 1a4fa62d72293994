"""The RWKV-4, RWKV-5 and RWKV-6 WKV recurrences as custom Metal kernels.

The kernels (``metal/wkv4_*.metal`` and ``metal/wkv6_*.metal``, shipped as
``rwkv_mlx.metal``) honour the contracts of `rwkv_mlx.ops.wkv4` and
`rwkv_mlx.ops.wkv6`. They keep the state and all sums in float32 for any
input dtype. An optional ``mask`` [B, T] marks the valid positions, and a
padding position leaves the state unchanged and outputs 0. RWKV-5 runs the
RWKV-6 kernels with its position-independent decay broadcast over the
positions.

Every kernel call is a `rwkv_mlx.ops.metal.KernelLaunch` run by the launcher
that `rwkv_mlx.ops.metal.use_launcher` installs (Metal by default), so tests
run the same launches in the CPU emulator. Each sequence call is an
``mx.custom_function`` whose vjp reruns the forward kernel, this time saving
the state every ``checkpoint_interval`` steps, and then runs the backward
kernel, which recomputes the states of each segment from its checkpoint.

Entry points (always the kernels, differentiable). `rwkv_mlx.ops` selects
them when `rwkv_mlx.ops.metal.metal_available` is true:
    `wkv4_metal`, `wkv4_metal_decode`
    `wkv5_metal`, `wkv5_metal_decode`
    `wkv6_metal`, `wkv6_metal_decode`

NOTE: like the WKV-7 kernels, these have run only in the CPU emulation
harness (tests/metal_harness), never through Apple's Metal compiler, and
their speed on a Mac GPU is not measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx

from . import metal
from .metal import (
    DEFAULT_BACKWARD_GROUPS,
    DEFAULT_CHECKPOINT_INTERVAL,
    MAX_THREADGROUP_MEMORY,
    MAX_THREADS_PER_THREADGROUP,
    SIMD_WIDTH,
    KernelLaunch,
    WKV7KernelConfig,
    check_size,
    cotangent_or_zeros,
    kernel_source,
    mask_argument,
)

# NOTE: not tuned on Metal hardware.
DEFAULT_WKV4_THREADS_PER_GROUP = 256
# The WKV-4 backward kernel keeps the recomputed (a, b, p) of every step of a
# segment in thread memory, 12 bytes per step.
MAX_WKV4_CHECKPOINT_INTERVAL = 64
# Threadgroup arrays of N floats in the WKV-6 backward kernel.
WKV6_BACKWARD_SHARED_VECTORS = 6


@dataclass(frozen=True)
class WKV4KernelConfig:
    """Launch configuration of the WKV-4 kernels.

    Attributes:
        threads_per_group: Threads per threadgroup, one (batch, channel) pair
            each at a time.
        groups: Threadgroups; their threads loop over the B * C pairs.
            None: enough threadgroups for one pair per thread.
        checkpoint_interval: Steps between the states the forward pass saves
            for the backward pass, at most MAX_WKV4_CHECKPOINT_INTERVAL.
    """

    threads_per_group: int = DEFAULT_WKV4_THREADS_PER_GROUP
    groups: int | None = None
    checkpoint_interval: int = DEFAULT_CHECKPOINT_INTERVAL


# The WKV-5/6 kernels lay out their threads as the WKV-7 kernels do (one per
# value row of a head's state), so they take the same launch configuration.
WKV6KernelConfig = WKV7KernelConfig


DEFAULT_WKV4_CONFIG = WKV4KernelConfig()
DEFAULT_WKV6_CONFIG = WKV6KernelConfig()


# ---------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------


def _check_mask(version: str, mask: mx.array | None, expected: tuple[int, ...]) -> mx.array | None:
    """Validate the mask's shape and return it as bool (or None)."""
    if mask is None:
        return None
    if mask.shape != expected:
        raise ValueError(f"{version} mask has shape {tuple(mask.shape)}; expected {expected}")
    return mask if mask.dtype == mx.bool_ else mask != 0


def _check_float(version: str, name: str, x: mx.array) -> None:
    if not mx.issubdtype(x.dtype, mx.floating):
        raise ValueError(f"{version} input '{name}' has dtype {x.dtype}; expected a float dtype")


def _check_interval(interval: int, maximum: int | None = None) -> None:
    if interval < 1 or (maximum is not None and interval > maximum):
        upper = f" and at most {maximum}" if maximum is not None else ""
        raise ValueError(f"checkpoint_interval must be at least 1{upper}, got {interval}")


# ---------------------------------------------------------------------------
# RWKV-4
# ---------------------------------------------------------------------------


def _check_wkv4_inputs(k, v, w, u, state, mask, sequence: bool):
    """Validate WKV-4 shapes and return (state as float32, mask as bool or None)."""
    rank = 3 if sequence else 2
    layout = "[B, T, C]" if sequence else "[B, C]"
    for name, x in (("k", k), ("v", v)):
        if x.ndim != rank or x.shape != k.shape:
            raise ValueError(
                f"WKV-4 input '{name}' has shape {tuple(x.shape)}; expected {layout} like k {tuple(k.shape)}"
            )
    B, C = k.shape[0], k.shape[-1]
    for name, x in (("w", w), ("u", u)):
        if x.shape != (C,):
            raise ValueError(f"WKV-4 input '{name}' has shape {tuple(x.shape)}; expected [C] = {(C,)}")
    for name, x in (("k", k), ("v", v), ("w", w), ("u", u)):
        _check_float("WKV-4", name, x)
    if state.shape != (B, 3, C):
        raise ValueError(f"WKV-4 state has shape {tuple(state.shape)}; expected [B, 3, C] = {(B, 3, C)}")

    expected_mask = (B, k.shape[1]) if sequence else (B,)
    return state.astype(mx.float32), _check_mask("WKV-4", mask, expected_mask)


def _check_wkv4_config(config: WKV4KernelConfig) -> None:
    threads = config.threads_per_group
    if not 1 <= threads <= MAX_THREADS_PER_THREADGROUP:
        raise ValueError(f"threads_per_group must be between 1 and {MAX_THREADS_PER_THREADGROUP}, got {threads}")
    if config.groups is not None and config.groups < 1:
        raise ValueError(f"groups must be at least 1, got {config.groups}")
    _check_interval(config.checkpoint_interval, MAX_WKV4_CHECKPOINT_INTERVAL)


def _wkv4_grid(channels: int, config: WKV4KernelConfig) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    threads = config.threads_per_group
    size = config.groups * threads if config.groups else channels
    return (size, 1, 1), (threads, 1, 1)


def wkv4_forward_launch(k, v, w, u, state, mask, config: WKV4KernelConfig, checkpoint_interval: int) -> KernelLaunch:
    """Describe the WKV-4 forward kernel for inputs [B, T, C].

    ``checkpoint_interval`` 0 saves no checkpoints (the third output is a
    one-element placeholder).
    """
    B, T, C = k.shape
    segments = -(-T // checkpoint_interval) if checkpoint_interval else 0
    check_size("WKV-4 input", B * T * C)
    check_size("WKV-4 checkpoints", B * segments * 3 * C)

    grid, threadgroup = _wkv4_grid(B * C, config)
    checkpoint_shape = (B, segments, 3, C) if checkpoint_interval else (1,)
    return KernelLaunch(
        name="rwkv4_wkv_forward",
        source=kernel_source("wkv4_forward.metal"),
        header=kernel_source("wkv4_header.metal"),
        source_file="wkv4_forward.metal",
        header_file="wkv4_header.metal",
        input_names=("k", "v", "w", "u", "state_in", "mask"),
        output_names=("y", "state_out", "checkpoints"),
        inputs=(k, v, w, u, state, mask_argument(mask)),
        output_shapes=((B, T, C), (B, 3, C), checkpoint_shape),
        output_dtypes=(mx.float32, mx.float32, mx.float32),
        grid=grid,
        threadgroup=threadgroup,
        template=(("CHECKPOINT", checkpoint_interval), ("HAS_MASK", mask is not None)),
    )


def wkv4_backward_launch(k, v, w, u, mask, checkpoints, dy, dstate, config: WKV4KernelConfig) -> KernelLaunch:
    """Describe the WKV-4 backward kernel for inputs [B, T, C] and saved checkpoints."""
    B, T, C = k.shape
    grid, threadgroup = _wkv4_grid(B * C, config)
    return KernelLaunch(
        name="rwkv4_wkv_backward",
        source=kernel_source("wkv4_backward.metal"),
        header=kernel_source("wkv4_header.metal"),
        source_file="wkv4_backward.metal",
        header_file="wkv4_header.metal",
        input_names=("k", "v", "w", "u", "mask", "checkpoints", "dy", "dstate_out"),
        output_names=("dk", "dv", "dw", "du", "dstate_in"),
        inputs=(k, v, w, u, mask_argument(mask), checkpoints, dy, dstate),
        output_shapes=((B, T, C), (B, T, C), (B, C), (B, C), (B, 3, C)),
        output_dtypes=(mx.float32,) * 5,
        grid=grid,
        threadgroup=threadgroup,
        template=(("CHECKPOINT", config.checkpoint_interval), ("HAS_MASK", mask is not None)),
    )


@lru_cache(maxsize=None)
def _wkv4_sequence_function(config: WKV4KernelConfig, has_mask: bool):
    """Build the differentiable WKV-4 kernel call for one configuration.

    The forward call saves no checkpoints; the vjp recomputes the forward
    pass with checkpoints before the backward kernel. Gradients of k, v, w, u
    have their input's dtype. Without a mask the ``mask`` argument is the
    placeholder.
    """

    @mx.custom_function
    def sequence(k, v, w, u, state, mask):
        launch = wkv4_forward_launch(k, v, w, u, state, mask if has_mask else None, config, 0)
        y, state_out, _ = metal.launch(launch)
        return y, state_out

    @sequence.vjp
    def sequence_vjp(primals, cotangents, outputs):
        k, v, w, u, state, mask = primals
        mask = mask if has_mask else None
        dy = cotangent_or_zeros(cotangents[0], outputs[0])
        dstate = cotangent_or_zeros(cotangents[1], outputs[1])

        interval = config.checkpoint_interval
        checkpoints = metal.launch(wkv4_forward_launch(k, v, w, u, state, mask, config, interval))[2]
        launch = wkv4_backward_launch(k, v, w, u, mask, checkpoints, dy, dstate, config)
        dk, dv, dw_rows, du_rows, dstate_in = metal.launch(launch)

        return (
            dk.astype(k.dtype),
            dv.astype(v.dtype),
            dw_rows.sum(axis=0).astype(w.dtype),
            du_rows.sum(axis=0).astype(u.dtype),
            dstate_in,
            mx.zeros_like(primals[5]),
        )

    return sequence


def wkv4_metal(
    k: mx.array,
    v: mx.array,
    w: mx.array,
    u: mx.array,
    state: mx.array,
    mask: mx.array | None = None,
    *,
    config: WKV4KernelConfig = DEFAULT_WKV4_CONFIG,
) -> tuple[mx.array, mx.array]:
    """Run the WKV-4 recurrence over a sequence with the Metal kernels (differentiable).

    Args:
        k, v (mx.array): Keys and values, [B, T, C], any float dtype.
        w, u (mx.array): Log decay and bonus, [C], any float dtype.
        state (mx.array): Initial state ``(a, b, p)``, [B, 3, C], used in float32.
        mask (mx.array | None): [B, T], True (or nonzero) at valid positions.
            A padding position leaves the state unchanged and outputs 0.
        config (WKV4KernelConfig): Launch configuration.

    Returns:
        tuple[mx.array, mx.array]: ``wkv`` [B, T, C] and the final state, both float32.
    """
    state, mask = _check_wkv4_inputs(k, v, w, u, state, mask, sequence=True)
    _check_wkv4_config(config)
    B, T, C = k.shape
    if B * T * C == 0:
        return mx.zeros((B, T, C), dtype=mx.float32), state

    function = _wkv4_sequence_function(config, mask is not None)
    return function(k, v, w, u, state, mask_argument(mask))


def wkv4_metal_decode(
    k: mx.array,
    v: mx.array,
    w: mx.array,
    u: mx.array,
    state: mx.array,
    mask: mx.array | None = None,
    *,
    config: WKV4KernelConfig = DEFAULT_WKV4_CONFIG,
) -> tuple[mx.array, mx.array]:
    """Advance the WKV-4 state by one token with the Metal kernels (differentiable).

    The sequence kernel already runs one thread per channel, so a step is
    that kernel with T = 1.

    Args:
        k, v (mx.array): One position each, [B, C], any float dtype.
        w, u (mx.array): Log decay and bonus, [C], any float dtype.
        state (mx.array): ``(a, b, p)`` before the step, [B, 3, C], used in float32.
        mask (mx.array | None): [B], True (or nonzero) for batch rows to
            advance; the other rows keep their state and output 0.
        config (WKV4KernelConfig): Launch configuration.

    Returns:
        tuple[mx.array, mx.array]: ``wkv`` [B, C] and the new state, both float32.
    """
    state, mask = _check_wkv4_inputs(k, v, w, u, state, mask, sequence=False)
    sequence_mask = None if mask is None else mask[:, None]
    y, state = wkv4_metal(k[:, None], v[:, None], w, u, state, sequence_mask, config=config)
    return y[:, 0], state


# ---------------------------------------------------------------------------
# RWKV-6 (and RWKV-5)
# ---------------------------------------------------------------------------


def _check_wkv6_inputs(version, r, w, k, v, u, state, mask, sequence: bool):
    """Validate WKV-5/6 shapes and return (w broadcast to r's shape, state as float32, mask as bool or None)."""
    rank = 4 if sequence else 3
    layout = "[B, T, H, N]" if sequence else "[B, H, N]"
    for name, x in (("r", r), ("k", k), ("v", v)):
        if x.ndim != rank or x.shape != r.shape:
            raise ValueError(
                f"{version} input '{name}' has shape {tuple(x.shape)}; expected {layout} like r {tuple(r.shape)}"
            )
    B = r.shape[0]
    H, N = r.shape[-2], r.shape[-1]
    try:
        w = mx.broadcast_to(w, r.shape)
    except ValueError:
        raise ValueError(
            f"{version} input 'w' has shape {tuple(w.shape)}; expected {layout} like r {tuple(r.shape)} "
            "or a shape that broadcasts to it, such as [H, N]"
        ) from None
    if u.shape != (H, N):
        raise ValueError(f"{version} input 'u' has shape {tuple(u.shape)}; expected [H, N] = {(H, N)}")
    for name, x in (("r", r), ("w", w), ("k", k), ("v", v), ("u", u)):
        _check_float(version, name, x)
    if state.shape != (B, H, N, N):
        raise ValueError(f"{version} state has shape {tuple(state.shape)}; expected [B, H, N, N] = {(B, H, N, N)}")

    expected_mask = (B, r.shape[1]) if sequence else (B,)
    return w, state.astype(mx.float32), _check_mask(version, mask, expected_mask)


def _check_wkv6_limits(N: int, config: WKV6KernelConfig) -> None:
    _check_interval(config.checkpoint_interval)
    memory = WKV6_BACKWARD_SHARED_VECTORS * N * 4
    if N > MAX_THREADS_PER_THREADGROUP or memory > MAX_THREADGROUP_MEMORY:
        raise ValueError(
            f"head size {N} needs {N} threads per threadgroup and {memory} bytes of threadgroup memory in the "
            f"WKV-6 backward kernel (at most {MAX_THREADS_PER_THREADGROUP} and {MAX_THREADGROUP_MEMORY}); "
            "use rwkv_mlx.ops.wkv6.wkv6_chunked"
        )


def wkv6_forward_launch(r, w, k, v, u, state, mask, config: WKV6KernelConfig, checkpoint_interval: int) -> KernelLaunch:
    """Describe the WKV-6 sequence forward kernel for inputs [B, T, H, N].

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

    check_size("WKV-6 input", B * T * H * N)
    check_size("WKV-6 checkpoints", B * H * segments * N * N)
    checkpoint_shape = (B, H, segments, N, N) if checkpoint_interval else (1,)
    return KernelLaunch(
        name="rwkv6_wkv_forward",
        source=kernel_source("wkv6_forward.metal"),
        header="",
        source_file="wkv6_forward.metal",
        input_names=("r", "w", "k", "v", "u", "state_in", "mask"),
        output_names=("y", "state_out", "checkpoints"),
        inputs=(r, w, k, v, u, state, mask_argument(mask)),
        output_shapes=((B, T, H, N), (B, H, N, N), checkpoint_shape),
        output_dtypes=(mx.float32, mx.float32, mx.float32),
        grid=(groups * rows, 1, 1),
        threadgroup=(rows, 1, 1),
        template=(("N", N), ("CHECKPOINT", checkpoint_interval), ("HAS_MASK", mask is not None)),
    )


def wkv6_backward_launch(r, w, k, v, u, mask, checkpoints, dy, dstate, config: WKV6KernelConfig) -> KernelLaunch:
    """Describe the WKV-6 backward kernel for inputs [B, T, H, N] and saved checkpoints."""
    B, T, H, N = r.shape
    interval = config.checkpoint_interval
    groups = config.backward_groups or min(B * H, DEFAULT_BACKWARD_GROUPS)
    check_size("WKV-6 backward scratch", groups * interval * N * N)
    return KernelLaunch(
        name="rwkv6_wkv_backward",
        source=kernel_source("wkv6_backward.metal"),
        header="",
        source_file="wkv6_backward.metal",
        input_names=("r", "w", "k", "v", "u", "mask", "checkpoints", "dy", "dstate_out"),
        output_names=("dr", "dw", "dk", "dv", "du", "dstate_in", "scratch"),
        inputs=(r, w, k, v, u, mask_argument(mask), checkpoints, dy, dstate),
        output_shapes=(*([(B, T, H, N)] * 4), (B, H, N), (B, H, N, N), (groups, interval, N, N)),
        output_dtypes=(mx.float32,) * 7,
        grid=(groups * N, 1, 1),
        threadgroup=(N, 1, 1),
        template=(("N", N), ("CHECKPOINT", interval), ("HAS_MASK", mask is not None)),
    )


def wkv6_decode_launch(r, w, k, v, u, state, mask, config: WKV6KernelConfig) -> KernelLaunch:
    """Describe the WKV-6 single-token kernel for inputs [B, H, N] (N a multiple of 32)."""
    B, H, N = r.shape
    rows_per_group = config.decode_rows_per_group
    if rows_per_group < 1 or SIMD_WIDTH * rows_per_group > MAX_THREADS_PER_THREADGROUP:
        raise ValueError(f"decode_rows_per_group {rows_per_group} must be between 1 and 32")
    check_size("WKV-6 state", B * H * N * N)
    return KernelLaunch(
        name="rwkv6_wkv_decode",
        source=kernel_source("wkv6_decode.metal"),
        header="",
        source_file="wkv6_decode.metal",
        input_names=("r", "w", "k", "v", "u", "state_in", "mask"),
        output_names=("y", "state_out"),
        inputs=(r, w, k, v, u, state, mask_argument(mask)),
        output_shapes=((B, H, N), (B, H, N, N)),
        output_dtypes=(mx.float32, mx.float32),
        grid=(SIMD_WIDTH, B * H * N, 1),
        threadgroup=(SIMD_WIDTH, rows_per_group, 1),
        template=(("N", N), ("HAS_MASK", mask is not None)),
    )


def _wkv6_sequence_gradients(primals, dy, dstate, has_mask: bool, config: WKV6KernelConfig):
    """Return the gradients of a WKV-6 sequence call for inputs [B, T, H, N].

    Runs the forward kernel again, this time saving checkpoints, then the
    backward kernel. Gradients of r, w, k, v, u have their input's dtype.
    """
    r, w, k, v, u, state, mask = primals
    mask = mask if has_mask else None
    interval = config.checkpoint_interval

    checkpoints = metal.launch(wkv6_forward_launch(r, w, k, v, u, state, mask, config, interval))[2]
    launch = wkv6_backward_launch(r, w, k, v, u, mask, checkpoints, dy, dstate, config)
    dr, dw, dk, dv, du_rows, dstate_in, _ = metal.launch(launch)

    grads = [g.astype(x.dtype) for g, x in zip((dr, dw, dk, dv), (r, w, k, v))]
    return (*grads, du_rows.sum(axis=0).astype(u.dtype), dstate_in)


@lru_cache(maxsize=None)
def _wkv6_sequence_function(config: WKV6KernelConfig, has_mask: bool):
    """Build the differentiable WKV-6 sequence kernel call for one configuration.

    The forward call saves no checkpoints, so inference writes nothing extra.
    Without a mask the ``mask`` argument is the placeholder.
    """

    @mx.custom_function
    def sequence(r, w, k, v, u, state, mask):
        launch = wkv6_forward_launch(r, w, k, v, u, state, mask if has_mask else None, config, 0)
        y, state_out, _ = metal.launch(launch)
        return y, state_out

    @sequence.vjp
    def sequence_vjp(primals, cotangents, outputs):
        dy = cotangent_or_zeros(cotangents[0], outputs[0])
        dstate = cotangent_or_zeros(cotangents[1], outputs[1])
        grads = _wkv6_sequence_gradients(primals, dy, dstate, has_mask, config)
        return (*grads, mx.zeros_like(primals[6]))

    return sequence


@lru_cache(maxsize=None)
def _wkv6_decode_function(config: WKV6KernelConfig, has_mask: bool):
    """Build the differentiable WKV-6 single-token kernel call for one configuration.

    Its vjp runs the sequence kernels with T = 1.
    """

    @mx.custom_function
    def decode(r, w, k, v, u, state, mask):
        launch = wkv6_decode_launch(r, w, k, v, u, state, mask if has_mask else None, config)
        y, state_out = metal.launch(launch)
        return y, state_out

    @decode.vjp
    def decode_vjp(primals, cotangents, outputs):
        r, w, k, v, u, state, mask = primals
        vectors = [x[:, None] for x in (r, w, k, v)]
        sequence_primals = (*vectors, u, state, mask[:, None] if has_mask else mask)
        dy = cotangent_or_zeros(cotangents[0], outputs[0])[:, None]
        dstate = cotangent_or_zeros(cotangents[1], outputs[1])
        dr, dw, dk, dv, du, dstate_in = _wkv6_sequence_gradients(sequence_primals, dy, dstate, has_mask, config)
        return (dr[:, 0], dw[:, 0], dk[:, 0], dv[:, 0], du, dstate_in, mx.zeros_like(mask))

    return decode


def _wkv6_sequence(version, r, w, k, v, u, state, mask, config):
    w, state, mask = _check_wkv6_inputs(version, r, w, k, v, u, state, mask, sequence=True)
    B, T, H, N = r.shape
    _check_wkv6_limits(N, config)
    if B * T * H * N == 0:
        return mx.zeros((B, T, H, N), dtype=mx.float32), state

    function = _wkv6_sequence_function(config, mask is not None)
    return function(r, w, k, v, u, state, mask_argument(mask))


def _wkv6_decode(version, r, w, k, v, u, state, mask, config):
    w, state, mask = _check_wkv6_inputs(version, r, w, k, v, u, state, mask, sequence=False)
    B, H, N = r.shape
    _check_wkv6_limits(N, config)
    if B * H * N == 0:
        return mx.zeros((B, H, N), dtype=mx.float32), state

    if N % SIMD_WIDTH != 0:
        vectors = [x[:, None] for x in (r, w, k, v)]
        sequence_mask = None if mask is None else mask[:, None]
        y, state = _wkv6_sequence(version, *vectors, u, state, sequence_mask, config)
        return y[:, 0], state

    function = _wkv6_decode_function(config, mask is not None)
    return function(r, w, k, v, u, state, mask_argument(mask))


def wkv6_metal(
    r: mx.array,
    w: mx.array,
    k: mx.array,
    v: mx.array,
    u: mx.array,
    state: mx.array,
    mask: mx.array | None = None,
    *,
    config: WKV6KernelConfig = DEFAULT_WKV6_CONFIG,
) -> tuple[mx.array, mx.array]:
    """Run the WKV-6 recurrence over a sequence with the Metal kernels (differentiable).

    Args:
        r, k, v (mx.array): [B, T, H, N], any float dtype.
        w (mx.array): Log decay, [B, T, H, N] or a shape that broadcasts to
            it, any float dtype.
        u (mx.array): Bonus, [H, N], any float dtype.
        state (mx.array): Initial state, [B, H, N, N], used in float32.
        mask (mx.array | None): [B, T], True (or nonzero) at valid positions.
            A padding position leaves the state unchanged and outputs 0.
        config (WKV6KernelConfig): Launch configuration.

    Returns:
        tuple[mx.array, mx.array]: ``y`` [B, T, H, N] and the final state, both float32.
    """
    return _wkv6_sequence("WKV-6", r, w, k, v, u, state, mask, config)


def wkv6_metal_decode(
    r: mx.array,
    w: mx.array,
    k: mx.array,
    v: mx.array,
    u: mx.array,
    state: mx.array,
    mask: mx.array | None = None,
    *,
    config: WKV6KernelConfig = DEFAULT_WKV6_CONFIG,
) -> tuple[mx.array, mx.array]:
    """Advance the WKV-6 state by one token with the Metal kernels (differentiable).

    Head sizes that are not a multiple of 32 run the sequence kernel with T = 1.

    Args:
        r, k, v (mx.array): One position each, [B, H, N], any float dtype.
        w (mx.array): Log decay, [B, H, N] or a shape that broadcasts to it.
        u (mx.array): Bonus, [H, N].
        state (mx.array): State before the step, [B, H, N, N], used in float32.
        mask (mx.array | None): [B], True (or nonzero) for batch rows to
            advance; the other rows keep their state and output 0.
        config (WKV6KernelConfig): Launch configuration.

    Returns:
        tuple[mx.array, mx.array]: ``y`` [B, H, N] and the new state, both float32.
    """
    return _wkv6_decode("WKV-6", r, w, k, v, u, state, mask, config)


def wkv5_metal(
    r: mx.array,
    w: mx.array,
    k: mx.array,
    v: mx.array,
    u: mx.array,
    state: mx.array,
    mask: mx.array | None = None,
    *,
    config: WKV6KernelConfig = DEFAULT_WKV6_CONFIG,
) -> tuple[mx.array, mx.array]:
    """Run the WKV-5 recurrence over a sequence with the WKV-6 Metal kernels (differentiable).

    NOTE: the kernels read the decay per position, so the [H, N] decay is
    broadcast and copied to [B, T, H, N] before the launch.

    Args:
        r, k, v (mx.array): [B, T, H, N], any float dtype.
        w (mx.array): Log decay, [H, N], or [B, T, H, N] with 0 at padding.
        u (mx.array): Bonus, [H, N].
        state (mx.array): Initial state, [B, H, N, N], used in float32.
        mask (mx.array | None): [B, T], True (or nonzero) at valid positions.
        config (WKV6KernelConfig): Launch configuration.

    Returns:
        tuple[mx.array, mx.array]: ``y`` [B, T, H, N] and the final state, both float32.
    """
    return _wkv6_sequence("WKV-5", r, w, k, v, u, state, mask, config)


def wkv5_metal_decode(
    r: mx.array,
    w: mx.array,
    k: mx.array,
    v: mx.array,
    u: mx.array,
    state: mx.array,
    mask: mx.array | None = None,
    *,
    config: WKV6KernelConfig = DEFAULT_WKV6_CONFIG,
) -> tuple[mx.array, mx.array]:
    """Advance the WKV-5 state by one token with the WKV-6 Metal kernels (differentiable).

    Args:
        r, k, v (mx.array): One position each, [B, H, N].
        w (mx.array): Log decay, [H, N] or [B, H, N].
        u (mx.array): Bonus, [H, N].
        state (mx.array): State before the step, [B, H, N, N], used in float32.
        mask (mx.array | None): [B], True (or nonzero) for batch rows to advance.
        config (WKV6KernelConfig): Launch configuration.

    Returns:
        tuple[mx.array, mx.array]: ``y`` [B, H, N] and the new state, both float32.
    """
    return _wkv6_decode("WKV-5", r, w, k, v, u, state, mask, config)
