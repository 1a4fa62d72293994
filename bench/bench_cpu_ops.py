"""Time the CPU operations behind rwkv_mlx.ops.fast_math and rwkv_mlx.ops.linear.

    python bench/bench_cpu_ops.py

Two tables, each against MLX's own operation in the same process:

- elementwise functions on 393,216 float32 elements (one layer's [512, 768]
  activations at 512 tokens): ``mx.exp`` and ``mx.sigmoid`` against the
  power-of-two forms of ``fast_math``, with a product as the floor, in ns per
  element, best of 7;
- a linear layer applied to one row (decoding one token) for the weight
  shapes of the 0.1B RWKV-7: ``x @ W^T`` as ``nn.Linear`` computes it, against
  ``W @ x^T`` and blocks of 4,096 rows, in microseconds, best of 15. Each
  timing cycles through enough copies of the weight that it comes from memory,
  not from the cache.
"""

import json
import time

import rwkv_mlx  # noqa: F401  (loads the optimized BLAS before mlx.core)

import mlx.core as mx

from rwkv_mlx.ops import fast_math

ELEMENTS = 393_216


def best_time(function, repeats: int) -> float:
    """Return the shortest wall time of ``repeats`` evaluations of ``function()``, in seconds."""
    mx.eval(function())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(function())
        best = min(best, time.perf_counter() - start)
    return best


def elementwise() -> dict:
    x = mx.random.normal((ELEMENTS,))
    mx.eval(x)
    functions = {
        "multiply": lambda: x * x,
        "mx.exp": lambda: mx.exp(x),
        "fast_math.exp": lambda: fast_math.exp(x),
        "mx.sigmoid": lambda: mx.sigmoid(x),
        "fast_math.sigmoid": lambda: fast_math.sigmoid(x),
    }
    return {name: 1e9 * best_time(function, 7) / ELEMENTS for name, function in functions.items()}


def single_row(output_dims: int, input_dims: int, copies: int) -> dict:
    weights = [mx.random.normal((output_dims, input_dims)) for _ in range(copies)]
    x = mx.random.normal((1, input_dims))
    mx.eval(weights, x)
    forms = {
        "x @ W^T": lambda w: x @ w.T,
        "W @ x^T": lambda w: w @ x.T,
        "blocks of 4096 rows": lambda w: mx.concatenate([x @ w[i : i + 4096].T for i in range(0, output_dims, 4096)], axis=-1),
    }
    return {name: 1e6 * best_time(lambda: [form(w) for w in weights], 15) / copies for name, form in forms.items()}


def main():
    times = elementwise()
    print(f"elementwise, ns per element ({ELEMENTS} float32 elements, best of 7)")
    for name, value in times.items():
        print(f"  {name:18s} {value:6.2f}")

    shapes = [(768, 3072, 12), (3072, 768, 12), (768, 768, 48), (65536, 768, 2)]
    products = {}
    print("one row through a linear layer, us (best of 15)")
    for output_dims, input_dims, copies in shapes:
        row = single_row(output_dims, input_dims, copies)
        products[f"{output_dims}x{input_dims}"] = row
        cells = "  ".join(f"{name}: {value:8.0f}" for name, value in row.items())
        print(f"  weight [{output_dims}, {input_dims}]  {cells}")
    print(json.dumps({"elementwise_ns": times, "single_row_us": products}))


if __name__ == "__main__":
    main()
