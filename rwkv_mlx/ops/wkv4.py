"""The RWKV-4 WKV recurrence in pure MLX ops: a serial form and a chunked form.

Every channel runs on its own. With ``w <= 0`` the log of the per-step decay
(``-exp(time_decay)`` in the official checkpoints), ``u`` the bonus of the
current token (``time_first``), keys ``k_t`` and values ``v_t``:

    wkv_t = (A_{t-1} + e^{u + k_t} v_t) / (B_{t-1} + e^{u + k_t})
    A_t   = e^{w} A_{t-1} + e^{k_t} v_t
    B_t   = e^{w} B_{t-1} + e^{k_t}

``A`` and ``B`` leave the float32 range once a key passes about 88, so the
state keeps them relative to a running maximum exponent ``p``. It stores
``(a, b, p)`` with ``A = a e^p`` and ``B = b e^p``. Every step takes
exponentials of differences to the largest exponent only, each at most e^0.

Shapes: ``k`` and ``v`` are [B, T, C] in any float dtype and used in
float32; ``w`` and ``u`` are [C]; ``state`` is [B, 3, C] float32 holding
``a``, ``b`` and ``p`` in that order. The empty state is ``a = b = 0`` and
``p = EMPTY_EXPONENT`` (``empty_state``). ``mask`` [B, T] bool, when given,
marks the valid positions; a padding position leaves the state unchanged.
Both forms return ``wkv`` [B, T, C] float32 and the state after the last
step; ``wkv`` at padding positions is undefined.
"""

from functools import partial
from typing import Optional, Tuple

import mlx.core as mx

from .chunks import unstack_chunks
from .fast_math import exp

DEFAULT_CHUNK_LENGTH = 8

# The exponent ``p`` of the empty state: e^p is 0 in float32, while sums such
# as ``p + w`` stay finite, so no step ever computes inf - inf.
EMPTY_EXPONENT = -1e30


def empty_state(batch_size: int, channels: int) -> mx.array:
    """Return the state before any token: ``a = b = 0`` and ``p = EMPTY_EXPONENT``.

    Args:
        batch_size (int): Batch rows B.
        channels (int): Channels C.

    Returns:
        mx.array: The state, [B, 3, C] float32.
    """
    zeros = mx.zeros((batch_size, 2, channels), dtype=mx.float32)
    exponent = mx.full((batch_size, 1, channels), EMPTY_EXPONENT, dtype=mx.float32)
    return mx.concatenate([zeros, exponent], axis=1)


@mx.compile
def wkv4_step(k: mx.array, v: mx.array, w: mx.array, u: mx.array, state: mx.array) -> Tuple[mx.array, mx.array]:
    """Advance the state by one token.

    Args:
        k, v (mx.array): One position each, [B, C].
        w, u (mx.array): Log decay and bonus, [C] float32.
        state (mx.array): ``(a, b, p)`` before the step, [B, 3, C] float32.

    Returns:
        tuple[mx.array, mx.array]: ``wkv`` [B, C] and the new state, both float32.
    """
    k = k.astype(mx.float32)
    v = v.astype(mx.float32)
    a, b, p = state[:, 0], state[:, 1], state[:, 2]

    # Output: the state plus the current token weighted by e^{u + k}.
    bonus = u + k
    top = mx.maximum(p, bonus)
    from_state = exp(p - top)
    from_token = exp(bonus - top)
    wkv = (from_state * a + from_token * v) / (from_state * b + from_token)

    # Update: decay the state, then add the current token weighted by e^k.
    decayed = p + w
    top = mx.maximum(decayed, k)
    from_state = exp(decayed - top)
    from_token = exp(k - top)
    state = mx.stack([from_state * a + from_token * v, from_state * b + from_token, top], axis=1)
    return wkv, state


def wkv4_serial(
    k: mx.array, v: mx.array, w: mx.array, u: mx.array, state: mx.array, mask: Optional[mx.array] = None
) -> Tuple[mx.array, mx.array]:
    """Run the recurrence one position at a time.

    Args:
        k, v (mx.array): Keys and values, [B, T, C].
        w, u (mx.array): Log decay and bonus, [C].
        state (mx.array): Initial state ``(a, b, p)``, [B, 3, C] float32.
        mask (mx.array, optional): Valid positions, [B, T] bool.

    Returns:
        tuple[mx.array, mx.array]: ``wkv`` [B, T, C] and the final state, both float32.
    """
    w = w.astype(mx.float32)
    u = u.astype(mx.float32)
    outputs = []
    for t in range(k.shape[1]):
        wkv, new_state = wkv4_step(k[:, t], v[:, t], w, u, state)
        state = new_state if mask is None else mx.where(mask[:, t, None, None], new_state, state)
        outputs.append(wkv)
    return mx.stack(outputs, axis=1), state


@partial(mx.compile, shapeless=False)
def _chunk_inner(k, v, log_decay, valid, u):
    """Compute everything within each chunk that does not depend on the state.

    Inputs are [B, C', L, C] float32 (C' chunks of L positions), except
    ``valid``, which is [B, C', L, 1], and ``u``, which is [C].
    With D_t the sum of the log decays of positions 1..t of the chunk (D_0 =
    0), the unscaled sums that reach position t from inside the chunk are

        sum_{s<t} e^{k_s + D_{t-1} - D_s} v_s + e^{u + k_t} v_t     (and with 1 for v)

    and those that reach the end of the chunk are sum_s e^{k_s + D_L - D_s} v_s.
    Each sum is returned relative to its own largest exponent, which is
    returned beside it, so every exponential here is at most e^0. Each
    exponent is a difference of cumulative sums over at most L positions, so
    none needs the exponential of a large positive number. The pairwise
    exponents take L times the memory of ``k``; that is the price of decays
    with no lower bound, which the factorised e^{-D_s} of ``wkv7`` could
    not survive.
    """
    L = k.shape[-2]
    # Both prefix sums come from cumsum, so D_{t-1} - D_s cancels their
    # shared prefix exactly; D - log_decay would not, where one decay is large.
    D = mx.cumsum(log_decay, axis=-2)
    D_before = mx.cumsum(log_decay, axis=-2, inclusive=False)
    D_end = D[..., -1:, :]

    # Exponent of source s at target t (s < t), [.., L(t), L(s), C].
    strict = mx.tril(mx.ones((L, L), dtype=mx.bool_), k=-1)[..., None]
    pair = k[..., None, :, :] + D_before[..., :, None, :] - D[..., None, :, :]
    pair = mx.where(strict, pair, EMPTY_EXPONENT)
    diagonal = u + k

    top = mx.maximum(mx.max(pair, axis=-2), diagonal)
    pair_weight = exp(pair - top[..., :, None, :]) * valid[..., None, :, :]
    diagonal_weight = exp(diagonal - top) * valid
    numerator = (pair_weight * v[..., None, :, :]).sum(axis=-2) + diagonal_weight * v
    denominator = pair_weight.sum(axis=-2) + diagonal_weight

    to_end = k + D_end - D
    end_top = mx.max(to_end, axis=-2)
    end_weight = exp(to_end - end_top[..., None, :]) * valid
    end_numerator = (end_weight * v).sum(axis=-2)
    end_denominator = end_weight.sum(axis=-2)
    return D_before, top, numerator, denominator, D_end[..., 0, :], end_top, end_numerator, end_denominator


@mx.compile
def _chunk_step(state, D_before, top, numerator, denominator, D_end, end_top, end_numerator, end_denominator):
    """Apply one chunk to the state; inputs are one chunk index of `_chunk_inner`."""
    a, b, p = state[:, 0:1], state[:, 1:2], state[:, 2:3]

    # Outputs: the state's sums decayed to each position, joined to the chunk's.
    from_state = p + D_before
    joint = mx.maximum(from_state, top)
    state_scale = exp(from_state - joint)
    chunk_scale = exp(top - joint)
    wkv = (a * state_scale + numerator * chunk_scale) / (b * state_scale + denominator * chunk_scale)

    # New state: the old one decayed over the chunk plus the chunk's sums.
    decayed = p[:, 0] + D_end
    new_p = mx.maximum(decayed, end_top)
    state_scale = exp(decayed - new_p)
    chunk_scale = exp(end_top - new_p)
    new_a = a[:, 0] * state_scale + end_numerator * chunk_scale
    new_b = b[:, 0] * state_scale + end_denominator * chunk_scale
    return wkv, mx.stack([new_a, new_b, new_p], axis=1)


def wkv4_chunked(
    k: mx.array,
    v: mx.array,
    w: mx.array,
    u: mx.array,
    state: mx.array,
    mask: Optional[mx.array] = None,
    chunk_length: int = DEFAULT_CHUNK_LENGTH,
) -> Tuple[mx.array, mx.array]:
    """Run the recurrence in chunks: all pairs inside a chunk at once, a short
    loop over chunks for the state.

    Any T works: the tail is padded with invalid positions, whose outputs are dropped.

    Args:
        k, v (mx.array): Keys and values, [B, T, C].
        w, u (mx.array): Log decay and bonus, [C].
        state (mx.array): Initial state ``(a, b, p)``, [B, 3, C] float32.
        mask (mx.array, optional): Valid positions, [B, T] bool.
        chunk_length (int): Positions per chunk.

    Returns:
        tuple[mx.array, mx.array]: ``wkv`` [B, T, C] and the final state, both float32.
    """
    B, T, C = k.shape
    padded_length = -(-T // chunk_length) * chunk_length
    chunks = padded_length // chunk_length

    valid = mx.ones((B, T), dtype=mx.bool_) if mask is None else mask
    k = k.astype(mx.float32)
    v = v.astype(mx.float32)
    if padded_length != T:
        pad = padded_length - T
        k, v = (mx.pad(x, [(0, 0), (0, pad), (0, 0)]) for x in (k, v))
        valid = mx.pad(valid, [(0, 0), (0, pad)], constant_values=False)

    # A padding position neither decays the state nor adds to it.
    valid = valid[..., None]
    log_decay = mx.where(valid, w.astype(mx.float32), 0.0)
    k = mx.where(valid, k, EMPTY_EXPONENT)

    def chunked(x):
        return x.reshape(B, chunks, chunk_length, x.shape[-1])

    inner = _chunk_inner(chunked(k), chunked(v), chunked(log_decay), chunked(valid.astype(mx.float32)), u.astype(mx.float32))

    outputs = []
    for operands in zip(*(unstack_chunks(x, 1) for x in inner)):
        wkv, state = _chunk_step(state, *operands)
        outputs.append(wkv)
    return mx.concatenate(outputs, axis=1)[:, :T], state
