"""WKV recurrences, one entry point per RWKV version.

Each entry point picks an implementation for the inputs it gets: the Metal
kernels on a Mac GPU, and the pure-MLX forms everywhere else.
"""

import mlx.core as mx

from . import metal
from .wkv7 import wkv7_chunked, wkv7_serial, wkv7_step

# Below this many positions the serial loop is at least as fast as the chunked
# form, whose chunk is padded to DEFAULT_CHUNK_LENGTH positions.
SERIAL_MAX_LENGTH = 4


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
        return wkv7_serial(r, w, k, v, a, b, state)
    return wkv7_chunked(r, w, k, v, a, b, state)


__all__ = ["wkv7", "wkv7_chunked", "wkv7_serial", "wkv7_step"]
