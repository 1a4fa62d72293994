"""Linear layers applied to a single row, as decoding one token does.

MLX's CPU backend sends every matrix product to the BLAS as a general
product, and OpenBLAS 0.3.21 reads a weight for one input row at well below
the memory bandwidth. On the 2-core x86 machine of docs/benchmarks.md
(bench/bench_cpu_ops.py, float32):

    weight [out, in]    x @ W^T    W @ x^T    x @ W^T in blocks of 4096 rows
    [768, 3072]         850 us     498 us     852 us
    [3072, 768]         562 us     672 us     566 us
    [768, 768]          149 us     163 us     173 us
    [65536, 768]        17.3 ms    20.5 ms    12.5 ms

So a single row takes the matrix-vector form when the layer narrows its
input, and a tall output head is applied in blocks of rows. Every other
input, and every layer on a GPU, goes through the layer itself.

When rwkv_mlx/_blas.py has loaded ``gemv_forward``, single-row products reach
OpenBLAS's matrix-vector product whatever their form, and the layer itself
is as fast as any of these (bench/bench_cpu_ops.py: 256 and 336 us for the
two channel-mix weights, 7.5 ms for the head, 7.9 ms in blocks), so every
input goes through the layer.
"""

import mlx.core as mx
import mlx.nn as nn

from .. import _blas

# Output heads at least this tall are applied in blocks of BLOCK_ROWS rows.
BLOCK_MIN_ROWS = 16384
BLOCK_ROWS = 4096


def linear(layer: nn.Module, x: mx.array) -> mx.array:
    """Apply a linear layer, choosing the product's form for a single row on the CPU.

    Args:
        layer (nn.Module): Any layer; only a dense ``nn.Linear`` without bias
            gets another form, every other layer is called as it is.
        x (mx.array): Input, [..., input_dims].

    Returns:
        mx.array: ``layer(x)``, [..., output_dims].
    """
    if type(layer) is not nn.Linear or "bias" in layer or x.size != x.shape[-1]:
        return layer(x)
    if mx.default_device() != mx.cpu or _blas.gemv_forward is not None:
        return layer(x)

    weight = layer.weight
    output_dims, input_dims = weight.shape
    if input_dims > output_dims:
        return (weight @ x.reshape(input_dims, 1)).reshape(*x.shape[:-1], output_dims)
    if output_dims >= BLOCK_MIN_ROWS:
        blocks = [x @ weight[start : start + BLOCK_ROWS].T for start in range(0, output_dims, BLOCK_ROWS)]
        return mx.concatenate(blocks, axis=-1)
    return layer(x)
