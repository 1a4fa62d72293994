"""Exponential and sigmoid written as powers of two.

On the 2-core x86 Linux machine of docs/benchmarks.md, MLX 0.32.4's CPU
backend takes 11.6 ns per float32 element for ``mx.exp`` and 15.8 ns for
``mx.sigmoid``, against 4.5 and 5.1 ns for these forms and 0.26 ns for a
product (bench/bench_cpu_ops.py). With them, and one exponential per chunk
in the chunked WKV form, the RWKV-7 prefill of the 0.1B shape at 512 tokens
went from 405 to 525-595 tokens/s (bench/bench_models.py). The results differ from ``mx.exp`` by about 1e-7 relative
error. NOTE: on a Mac GPU both forms are single fused kernels; the choice is
expected not to matter there, but that is not measured.
"""

import math

import mlx.core as mx

LOG2_E = 1 / math.log(2)

# Below this many elements the extra operations of the power form cost more
# than they save (one decoded token's 768 decays, say), so MLX's own functions run.
SMALL_SIZE = 16384

# The lowest input that ``sigmoid`` follows, so that e^-x stays finite:
# e^80 and e^11 are below the largest float32 and float16.
SIGMOID_FLOOR = -80.0
SIGMOID_FLOOR_FLOAT16 = -11.0


def exp(x: mx.array) -> mx.array:
    """Return e^x, computed as 2^(x log2 e).

    Float64 arrays, which the package uses only for reference computations,
    go to ``mx.exp``.

    Args:
        x (mx.array): Any float array.

    Returns:
        mx.array: e^x, in the dtype of ``x``.
    """
    if x.dtype == mx.float64 or x.size < SMALL_SIZE:
        return mx.exp(x)
    return mx.power(mx.array(2.0, dtype=x.dtype), x * LOG2_E)


def sigmoid(x: mx.array) -> mx.array:
    """Return 1 / (1 + e^-x), with the exponential from ``exp``.

    Inputs below ``SIGMOID_FLOOR`` are raised to it (a sigmoid of 2e-35;
    1.7e-5 for float16) so that e^-x stays finite: otherwise the gradient
    would multiply 0 by inf. Written without a custom gradient, it works
    inside shapeless ``mx.compile``.

    Args:
        x (mx.array): Any float array.

    Returns:
        mx.array: The logistic sigmoid of ``x``, in the dtype of ``x``.
    """
    if x.size < SMALL_SIZE:
        return mx.sigmoid(x)
    floor = SIGMOID_FLOOR_FLOAT16 if x.dtype == mx.float16 else SIGMOID_FLOOR
    return 1 / (1 + exp(-mx.maximum(x, floor)))


def logsumexp(x: mx.array, axis: int = -1) -> mx.array:
    """Return log(sum(e^x)) along one axis, with the exponential from ``exp``.

    Args:
        x (mx.array): Finite float array.
        axis (int): The axis to reduce.

    Returns:
        mx.array: ``x`` with ``axis`` reduced.
    """
    top = mx.stop_gradient(mx.max(x, axis=axis, keepdims=True))
    return (top + mx.log(exp(x - top).sum(axis=axis, keepdims=True))).squeeze(axis)


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    """Return e^x / sum(e^x) along one axis, with the exponential from ``exp``.

    Args:
        x (mx.array): Finite float array.
        axis (int): The axis to normalise.

    Returns:
        mx.array: The softmax, shaped like ``x``.
    """
    weights = exp(x - mx.max(x, axis=axis, keepdims=True))
    return weights / weights.sum(axis=axis, keepdims=True)
