"""The RWKV-7 WKV recurrence in pure MLX ops: a serial form and a chunked form.

Both forms share one contract. For every batch row and head, with the state
``S`` of shape [N, N] indexed as ``S[value, key]``:

    S_t = S_{t-1} diag(exp(w_t)) + (S_{t-1} a_t) b_t^T + v_t k_t^T
    y_t = S_t r_t

Inputs ``r, k, v, a, b`` have shape [B, T, H, N] and any float dtype. ``w`` is
the log of the decay (so ``w <= 0``), shape [B, T, H, N], and is used in
float32. ``state`` is the state before the first step, [B, H, N, N] float32.
Both functions return ``y`` [B, T, H, N] float32 and the state after the last
step, [B, H, N, N] float32.

A position whose ``w, k, v, a, b`` are all zero leaves the state unchanged;
the model uses that to skip padding.
"""

from functools import partial

import mlx.core as mx

from .chunks import unstack_chunks
from .fast_math import exp

DEFAULT_CHUNK_LENGTH = 16


@mx.compile
def wkv7_step(r, w, k, v, a, b, state):
    """Advance the state by one token.

    Args:
        r, w, k, v, a, b (mx.array): One position each, shape [B, H, N].
        state (mx.array): State before the step, [B, H, N, N] float32.

    Returns:
        tuple[mx.array, mx.array]: ``y`` [B, H, N] and the new state, both float32.
    """
    r, k, v, a, b = (x.astype(mx.float32) for x in (r, k, v, a, b))
    decay = mx.exp(w.astype(mx.float32))

    sa = state @ a[..., None]
    state = state * decay[..., None, :] + sa * b[..., None, :] + v[..., None] * k[..., None, :]
    y = (state @ r[..., None])[..., 0]
    return y, state


def wkv7_serial(r, w, k, v, a, b, state):
    """Run the recurrence one position at a time.

    Args:
        r, w, k, v, a, b (mx.array): Shape [B, T, H, N]; ``w`` is the log decay.
        state (mx.array): Initial state, [B, H, N, N] float32.

    Returns:
        tuple[mx.array, mx.array]: ``y`` [B, T, H, N] and the final state, both float32.
    """
    ys = []
    for t in range(r.shape[1]):
        y, state = wkv7_step(r[:, t], w[:, t], k[:, t], v[:, t], a[:, t], b[:, t], state)
        ys.append(y)
    return mx.stack(ys, axis=1), state


def _inverse_unit_lower(m: mx.array, length: int) -> mx.array:
    """Return (I - m)^-1 for strictly lower-triangular ``m`` of size ``length``.

    Because m is nilpotent, (I - m)^-1 = I + m + ... + m^(L-1), which the
    product (I + m)(I + m^2)(I + m^4)... forms in log2(L) matrix products.
    This needs no triangular solve, which MLX offers on the CPU only.
    """
    eye = mx.eye(length, dtype=m.dtype)
    inverse = eye + m
    power = m
    span = 2
    while span < length:
        power = power @ power
        inverse = inverse @ (eye + power)
        span *= 2
    return inverse


def _chunk_tensors(x, chunk_length):
    """Reshape [B, T, H, N] (T a multiple of L) to [B, H, C, L, N]."""
    B, T, H, N = x.shape
    return x.reshape(B, T // chunk_length, chunk_length, H, N).transpose(0, 3, 1, 2, 4)


@partial(mx.compile, shapeless=False)
def _chunk_inner(r, w, k, v, a, b):
    """Compute everything within each chunk that does not depend on the state.

    All inputs are [B, H, C, L, N] float32. Let g_t be the cumulative sum of
    w inside the chunk (g_0 = 0 before the first position). Then, with
    ``x * e^{g}`` scaling every key-dimension component:

        u_t = S_{t-1} a_t = S_0 (a_t e^{g_{t-1}})
                            + sum_{s<t} [u_s (b_s e^{-g_s}) + v_s (k_s e^{-g_s})] . (a_t e^{g_{t-1}})

    which is a unit lower-triangular system in the rows u_t. The factors
    e^{-g_s} grow at most to exp(L * max|w|); for RWKV-7, |w| <= exp(-0.5),
    so with L = 16 they stay below 2e4, far from the float32 range.

    Returns the operands of ``_chunk_step``, each [B, H, C, ...]: the rows
    that read the chunk's initial state (``u`` then ``y``, [2L, N]), the
    part of ``u`` from the chunk's own values [L, N], the matrix that maps
    ``[u; v]`` to ``y`` [L, 2L], the rows that write ``[u; v]`` into the
    state [2L, N], and the decay of the whole chunk [N].
    """
    L = r.shape[-2]

    # One exponential: e^{g_{t-1}} is e^{g} shifted by one position and
    # e^{-g} its reciprocal (see fast_math for what exponentials cost).
    decay_to = exp(mx.cumsum(w, axis=-2))
    decay_before = mx.concatenate([mx.ones_like(decay_to[..., :1, :]), decay_to[..., :-1, :]], axis=-2)
    growth = 1 / decay_to
    decay_last = decay_to[..., -1:, :]

    # All four products between positions in one matrix product:
    # [a e^{g-}; r e^{g}] against [b e^{-g}; k e^{-g}].
    read = mx.concatenate([a * decay_before, r * decay_to], axis=-2)
    b_and_k = mx.stack([b, k], axis=-3)  # [..., 2, L, N]
    write = (b_and_k * growth[..., None, :, :]).reshape(read.shape)
    products = read @ write.swapaxes(-1, -2)
    strict = mx.tril(mx.ones((L, L), dtype=mx.bool_), k=-1)
    inclusive = mx.tril(mx.ones((L, L), dtype=mx.bool_))
    zero = mx.array(0.0, dtype=mx.float32)
    m_ab = mx.where(strict, products[..., :L, :L], zero)
    m_ak = mx.where(strict, products[..., :L, L:], zero)
    m_out = mx.where(mx.concatenate([inclusive, inclusive], axis=-1), products[..., L:, :], zero)

    # u = solve (a e^{g-} S0^T + m_ak v): the first term waits for the state.
    solve = _inverse_unit_lower(m_ab, L)
    u_from_state = solve @ read[..., :L, :]
    u_from_values = solve @ (m_ak @ v)

    state_readers = mx.concatenate([u_from_state, read[..., L:, :]], axis=-2)
    to_end = (b_and_k * (decay_last * growth)[..., None, :, :]).reshape(read.shape)
    return state_readers, u_from_values, m_out, to_end, decay_last[..., 0, :]


@mx.compile
def _chunk_step(state, v, state_readers, u_from_values, m_out, to_end, decay_last):
    """Apply one chunk to the state: inputs are one chunk index of `_chunk_inner`.

    It makes three matrix products per chunk, where seven smaller ones would
    do, because on MLX's CPU backend each product is one BLAS call per head.
    """
    L = v.shape[-2]
    from_state = state_readers @ state.swapaxes(-1, -2)  # [.., 2L, N_value]
    u = from_state[..., :L, :] + u_from_values
    uv = mx.concatenate([u, v], axis=-2)
    y = from_state[..., L:, :] + m_out @ uv
    state = state * decay_last[..., None, :] + uv.swapaxes(-1, -2) @ to_end
    return y, state


def wkv7_chunked(r, w, k, v, a, b, state, chunk_length: int = DEFAULT_CHUNK_LENGTH):
    """Run the recurrence in chunks: matrix products inside each chunk, a short
    loop over chunks for the state.

    Any T works: the tail is padded with positions that leave the state
    unchanged, and their outputs are dropped.

    Args:
        r, w, k, v, a, b (mx.array): Shape [B, T, H, N]; ``w`` is the log decay.
        state (mx.array): Initial state, [B, H, N, N] float32.
        chunk_length (int): Positions per chunk.

    Returns:
        tuple[mx.array, mx.array]: ``y`` [B, T, H, N] and the final state, both float32.
    """
    B, T, H, N = r.shape
    padded_length = -(-T // chunk_length) * chunk_length
    inputs = [x.astype(mx.float32) for x in (r, w, k, v, a, b)]
    if padded_length != T:
        pad = [(0, 0), (0, padded_length - T), (0, 0), (0, 0)]
        inputs = [mx.pad(x, pad) for x in inputs]
    r, w, k, v, a, b = (_chunk_tensors(x, chunk_length) for x in inputs)

    inner = _chunk_inner(r, w, k, v, a, b)

    ys = []
    for operands in zip(*(unstack_chunks(x, 2) for x in (v, *inner))):
        y, state = _chunk_step(state, *operands)
        ys.append(y)

    y = mx.stack(ys, axis=2)  # [B, H, C, L, N]
    y = y.transpose(0, 2, 3, 1, 4).reshape(B, padded_length, H, N)
    return y[:, :T], state
