"""The RWKV-5 WKV recurrence in pure MLX ops: a serial form and a chunked form.

RWKV-5 (5.0, 5.1 and 5.2) runs the RWKV-6 recurrence of ``rwkv_mlx.ops.wkv6``
with a decay that does not depend on the position: ``w_t = w`` for every t,
one value per head in 5.0 and 5.1 and one per channel in 5.2. The functions
here take that decay as [H, N], or as [B, T, H, N] where padding positions
carry a log decay of 0, and run the RWKV-6 forms on it. Shapes and returns
are those of ``wkv6``.
"""

import mlx.core as mx

from .wkv6 import DEFAULT_CHUNK_LENGTH, wkv6_chunked, wkv6_serial, wkv6_step


def wkv5_step(r, w, k, v, u, state):
    """Advance the state by one token.

    Args:
        r, k, v (mx.array): One position each, [B, H, N].
        w (mx.array): Log decay, [H, N] or [B, H, N].
        u (mx.array): Bonus, [H, N].
        state (mx.array): State before the step, [B, H, N, N] float32.

    Returns:
        tuple[mx.array, mx.array]: ``y`` [B, H, N] and the new state, both float32.
    """
    return wkv6_step(r, mx.broadcast_to(w, r.shape), k, v, u, state)


def wkv5_serial(r, w, k, v, u, state):
    """Run the recurrence one position at a time; arguments as ``wkv6_serial``,
    with ``w`` [H, N] or [B, T, H, N]."""
    return wkv6_serial(r, w, k, v, u, state)


def wkv5_chunked(r, w, k, v, u, state, chunk_length: int = DEFAULT_CHUNK_LENGTH):
    """Run the recurrence in chunks; arguments as ``wkv6_chunked``, with ``w``
    [H, N] or [B, T, H, N]."""
    return wkv6_chunked(r, w, k, v, u, state, chunk_length)
