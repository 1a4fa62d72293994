"""WKV recurrences, one entry point per RWKV version.

Each entry point picks an implementation for the inputs it gets: the Metal
kernels on a Mac GPU, and the pure-MLX forms everywhere else.
"""

import mlx.core as mx

from . import metal, metal_older
from .wkv7 import wkv7_chunked, wkv7_serial, wkv7_step
from .wkv4 import wkv4_chunked, wkv4_serial, wkv4_step
from .wkv5 import wkv5_chunked, wkv5_serial, wkv5_step
from .wkv6 import wkv6_chunked, wkv6_serial, wkv6_step

# Below this many positions the serial loop is at least as fast as the chunked
# form, whose chunk is padded to DEFAULT_CHUNK_LENGTH positions.
SERIAL_MAX_LENGTH = 4


def _state_before_output(y: mx.array, state: mx.array) -> tuple:
    """Make ``y`` depend on the final state, so MLX computes the state as the
    layer runs. MLX computes an array that only the cache refers to after the
    whole model, and the state computed late keeps the layer's [B, T, ...]
    inputs alive until the end. For a 1,024-token prefill of 16 RWKV-7 layers
    256 wide, that cost 1.4 MB per layer (tests/test_model_rwkv7.py)."""
    return mx.depends(y, state), state


def wkv7(r, w, k, v, a, b, state):
    """Run the RWKV-7 WKV recurrence over a sequence.

    See ``rwkv_mlx.ops.wkv7`` for the equation and the shapes.

    Args:
        r, w, k, v, a, b (mx.array): Shape [B, T, H, N]; ``w`` is the log decay.
        state (mx.array): Initial state, [B, H, N, N] float32.

    Returns:
        tuple[mx.array, mx.array]: ``y`` [B, T, H, N] and the final state, both float32.
    """
    T = r.shape[1]
    if metal.metal_available():
        if T == 1:
            y, state = metal.wkv7_metal_decode(r[:, 0], w[:, 0], k[:, 0], v[:, 0], a[:, 0], b[:, 0], state)
            return y[:, None], state
        return metal.wkv7_metal(r, w, k, v, a, b, state)

    if T == 1:
        y, state = wkv7_step(r[:, 0], w[:, 0], k[:, 0], v[:, 0], a[:, 0], b[:, 0], state)
        return y[:, None], state
    if T <= SERIAL_MAX_LENGTH:
        return _state_before_output(*wkv7_serial(r, w, k, v, a, b, state))
    return _state_before_output(*wkv7_chunked(r, w, k, v, a, b, state))


# RWKV-4, 5 and 6 entry points.


def wkv4(k, v, w, u, state, mask=None):
    """Run the RWKV-4 WKV recurrence over a sequence.

    See ``rwkv_mlx.ops.wkv4`` for the equation and the shapes.

    Args:
        k, v (mx.array): Keys and values, [B, T, C].
        w, u (mx.array): Log decay and bonus, [C].
        state (mx.array): Initial state ``(a, b, p)``, [B, 3, C] float32.
        mask (mx.array, optional): Valid positions, [B, T] bool.

    Returns:
        tuple[mx.array, mx.array]: ``wkv`` [B, T, C] and the final state, both float32.
    """
    if metal.metal_available():
        return metal_older.wkv4_metal(k, v, w, u, state, mask)

    # On the Linux CPU backend the serial loop is the faster form: 0.13 s
    # against 0.15 s for chunks of 4 and 0.23 s for chunks of 8 (B=1, T=512,
    # C=1024, 2 cores). The chunked form trades L times the work for T/L
    # steps, which suits a GPU.
    # NOTE: the GPU choice is not measured on Metal.
    if k.shape[1] > SERIAL_MAX_LENGTH and mx.default_device().type == mx.DeviceType.gpu:
        return _state_before_output(*wkv4_chunked(k, v, w, u, state, mask))
    return _state_before_output(*wkv4_serial(k, v, w, u, state, mask))


def wkv5(r, w, k, v, u, state):
    """Run the RWKV-5 WKV recurrence over a sequence.

    See ``rwkv_mlx.ops.wkv6`` for the equation and the shapes.

    Args:
        r, k, v (mx.array): [B, T, H, N].
        w (mx.array): Log decay, [H, N], or [B, T, H, N] with 0 at padding.
        u (mx.array): Bonus, [H, N].
        state (mx.array): Initial state, [B, H, N, N] float32.

    Returns:
        tuple[mx.array, mx.array]: ``y`` [B, T, H, N] and the final state, both float32.
    """
    return wkv6(r, mx.broadcast_to(w, r.shape), k, v, u, state)


def wkv6(r, w, k, v, u, state):
    """Run the RWKV-6 WKV recurrence over a sequence.

    See ``rwkv_mlx.ops.wkv6`` for the equation and the shapes.

    Args:
        r, w, k, v (mx.array): [B, T, H, N]; ``w`` is the log decay.
        u (mx.array): Bonus, [H, N].
        state (mx.array): Initial state, [B, H, N, N] float32.

    Returns:
        tuple[mx.array, mx.array]: ``y`` [B, T, H, N] and the final state, both float32.
    """
    T = r.shape[1]
    if metal.metal_available():
        if T == 1:
            y, state = metal_older.wkv6_metal_decode(r[:, 0], w[:, 0], k[:, 0], v[:, 0], u, state)
            return y[:, None], state
        return metal_older.wkv6_metal(r, w, k, v, u, state)

    if T == 1:
        y, state = wkv6_step(r[:, 0], w[:, 0], k[:, 0], v[:, 0], u.astype(mx.float32), state)
        return y[:, None], state
    if T <= SERIAL_MAX_LENGTH:
        return _state_before_output(*wkv6_serial(r, w, k, v, u, state))
    return _state_before_output(*wkv6_chunked(r, w, k, v, u, state))


__all__ = [
    "wkv7", "wkv7_chunked", "wkv7_serial", "wkv7_step",
    "wkv4", "wkv4_chunked", "wkv4_serial", "wkv4_step",
    "wkv5", "wkv5_chunked", "wkv5_serial", "wkv5_step",
    "wkv6", "wkv6_chunked", "wkv6_serial", "wkv6_step",
]  # fmt: skip
