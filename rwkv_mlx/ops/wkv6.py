"""The RWKV-6 WKV recurrence in pure MLX ops: a serial form and a chunked form.

RWKV-5 runs the same recurrence with a decay that does not depend on the
position (see ``rwkv_mlx.ops.wkv5``). For every batch row and head, with the
state ``S`` of shape [N, N] indexed as ``S[value, key]``, the log decay
``w_t <= 0`` and the bonus ``u`` (``time_faaaa``) of the current token:

    y_t = S_{t-1} r_t + v_t (r_t . (u * k_t))
    S_t = S_{t-1} diag(exp(w_t)) + v_t k_t^T

Inputs ``r, k, v`` have shape [B, T, H, N] and any float dtype. ``w`` is
[B, T, H, N], or broadcastable to it, and used in float32. ``u`` is [H, N],
and ``state`` is the state before the first step, [B, H, N, N] float32. Both
functions return ``y`` [B, T, H, N] float32 and the state after the last
step, [B, H, N, N] float32.

A position whose ``w, k, v`` are all zero leaves the state unchanged; the
models use that to skip padding.

The official ``rwkv`` package (0.8.32) keeps this state as [key, value]; the
index order here is the transpose, the same as for RWKV-7, and the order of
the ``att.time_state`` tensors of state-tuned official checkpoints.
"""

from functools import partial
from typing import Tuple

import mlx.core as mx

from .chunks import unstack_chunks
from .fast_math import exp

# Measured on the Linux CPU backend (2 cores, B=1, T=512, H=16, N=64): 0.14 s
# with chunks of 8 against 0.20 s (4), 0.45 s (16) and 0.38 s serial.
DEFAULT_CHUNK_LENGTH = 8


@mx.compile
def wkv6_step(r, w, k, v, u, state):
    """Advance the state by one token.

    Args:
        r, w, k, v (mx.array): One position each, [B, H, N]; ``w`` is the log decay.
        u (mx.array): Bonus, [H, N].
        state (mx.array): State before the step, [B, H, N, N] float32.

    Returns:
        tuple[mx.array, mx.array]: ``y`` [B, H, N] and the new state, both float32.
    """
    r, k, v = (x.astype(mx.float32) for x in (r, k, v))
    decay = exp(w.astype(mx.float32))

    y = (state @ r[..., None])[..., 0] + v * (r * u * k).sum(axis=-1, keepdims=True)
    state = state * decay[..., None, :] + v[..., None] * k[..., None, :]
    return y, state


def wkv6_serial(r, w, k, v, u, state):
    """Run the recurrence one position at a time.

    Args:
        r, w, k, v (mx.array): [B, T, H, N]; ``w`` is the log decay.
        u (mx.array): Bonus, [H, N].
        state (mx.array): Initial state, [B, H, N, N] float32.

    Returns:
        tuple[mx.array, mx.array]: ``y`` [B, T, H, N] and the final state, both float32.
    """
    w = mx.broadcast_to(w, r.shape)
    u = u.astype(mx.float32)
    outputs = []
    for t in range(r.shape[1]):
        y, state = wkv6_step(r[:, t], w[:, t], k[:, t], v[:, t], u, state)
        outputs.append(y)
    return mx.stack(outputs, axis=1), state


def _chunk_tensors(x, chunk_length):
    """Reshape [B, T, H, N] (T a multiple of L) to [B, H, C, L, N]."""
    B, T, H, N = x.shape
    return x.reshape(B, T // chunk_length, chunk_length, H, N).transpose(0, 3, 1, 2, 4)


@partial(mx.compile, shapeless=False)
def _chunk_inner(r, w, k, v, u):
    """Compute everything within each chunk that does not depend on the state.

    Inputs are [B, H, C, L, N] float32 and ``u`` is [H, N]. With g_t the sum
    of the log decays of positions 1..t of the chunk (g_0 = 0), the part of
    ``y_t`` from inside the chunk is

        sum_{s<t} v_s (r_t . (k_s * exp(g_{t-1} - g_s))) + v_t (r_t . (u * k_t))

    which is computed pairwise over [L, L, N]. The log decay has no lower
    bound in RWKV-5/6 (decays near 0 give w of -20 and less), so splitting
    exp(g_{t-1} - g_s) into exp(g_{t-1}) exp(-g_s), as ``wkv7`` does, would
    overflow float32 within a few positions; every exponent used here is a
    sum of log decays, at most 0. The pairwise form takes L times the memory
    of ``r``.
    """
    L = r.shape[-2]
    # Both prefix sums come from cumsum, so g_before_t - g_s cancels their
    # shared prefix exactly; g - w would not, where one w is large.
    g = mx.cumsum(w, axis=-2)
    g_before = mx.cumsum(w, axis=-2, inclusive=False)
    g_end = g[..., -1:, :]

    strict = mx.tril(mx.ones((L, L), dtype=mx.bool_), k=-1)[..., None]
    pair_decay = exp(mx.where(strict, g_before[..., :, None, :] - g[..., None, :, :], -mx.inf))
    scores = (r[..., :, None, :] * k[..., None, :, :] * pair_decay).sum(axis=-1)
    bonus = (r * u[:, None, None, :] * k).sum(axis=-1, keepdims=True)
    y_inner = scores @ v + bonus * v

    r_decayed = r * exp(g_before)
    k_to_end = k * exp(g_end - g)
    decay_to_end = exp(g_end)[..., 0, :]
    return y_inner, r_decayed, k_to_end, decay_to_end


@mx.compile
def _chunk_step(state, v, y_inner, r_decayed, k_to_end, decay_to_end):
    """Apply one chunk to the state; inputs are one chunk index of `_chunk_inner`."""
    y = y_inner + r_decayed @ state.swapaxes(-1, -2)
    state = state * decay_to_end[..., None, :] + v.swapaxes(-1, -2) @ k_to_end
    return y, state


def wkv6_chunked(r, w, k, v, u, state, chunk_length: int = DEFAULT_CHUNK_LENGTH) -> Tuple[mx.array, mx.array]:
    """Run the recurrence in chunks: all pairs inside a chunk at once, a short
    loop over chunks for the state.

    Any T works: the tail is padded with positions that leave the state
    unchanged, and their outputs are dropped.

    Args:
        r, w, k, v (mx.array): [B, T, H, N]; ``w`` is the log decay.
        u (mx.array): Bonus, [H, N].
        state (mx.array): Initial state, [B, H, N, N] float32.
        chunk_length (int): Positions per chunk.

    Returns:
        tuple[mx.array, mx.array]: ``y`` [B, T, H, N] and the final state, both float32.
    """
    B, T, H, N = r.shape
    padded_length = -(-T // chunk_length) * chunk_length
    w = mx.broadcast_to(w, r.shape)
    inputs = [x.astype(mx.float32) for x in (r, w, k, v)]
    if padded_length != T:
        pad = [(0, 0), (0, padded_length - T), (0, 0), (0, 0)]
        inputs = [mx.pad(x, pad) for x in inputs]
    r, w, k, v = (_chunk_tensors(x, chunk_length) for x in inputs)

    inner = _chunk_inner(r, w, k, v, u.astype(mx.float32))

    outputs = []
    for operands in zip(*(unstack_chunks(x, 2) for x in (v, *inner))):
        y, state = _chunk_step(state, *operands)
        outputs.append(y)

    y = mx.stack(outputs, axis=2)  # [B, H, C, L, N]
    y = y.transpose(0, 2, 3, 1, 4).reshape(B, padded_length, H, N)
    return y[:, :T], state
