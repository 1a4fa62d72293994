"""Time the CPU operations behind rwkv_mlx.ops.fast_math and rwkv_mlx.ops.linear,
and the matrix products that bound a LoRA training step.

    python bench/bench_cpu_ops.py

Three tables:

- elementwise functions on 393,216 float32 elements (one layer's [512, 768]
  activations at 512 tokens): ``mx.exp`` and ``mx.sigmoid`` against the
  power-of-two forms of ``fast_math``, with a product as the floor, in ns per
  element, best of 7;
- a linear layer applied to one row (decoding one token) for the weight
  shapes of the 0.1B RWKV-7: ``x @ W^T`` as ``nn.Linear`` computes it, against
  ``W @ x^T`` and blocks of 4,096 rows, and ``x @ W^T`` with bf16 and 4-bit
  weights, in microseconds, best of 15. Each
  timing cycles through enough copies of the weight that it comes from memory,
  not from the cache. The script runs this table twice: in its own process,
  with rwkv_mlx/gemv_forward.c loaded where it can be, and the float32 forms
  again in a child process with ``RWKV_MLX_GEMV=0``;
- the matrix products that a LoRA step of the 0.1B shape at 512 tokens cannot
  avoid, with the base weights frozen: every layer's products forward and the
  products for the gradient of their inputs backward, and the output head
  twice (forward and backward). rwkv_mlx's trainer does the head's two
  products in its forward pass, a chunk of tokens at a time (see
  rwkv_mlx/tuner/losses.py). Best of 3, in seconds, as one graph.

The last line printed is all results as JSON, and ``--json PATH`` also
writes them to a file.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import rwkv_mlx  # first: loads the optimized BLAS before mlx.core

import mlx.core as mx

from rwkv_mlx.ops import fast_math

from machine import describe as describe_machine, summary as machine_summary

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


def single_row(output_dims: int, input_dims: int, copies: int, low_precision: bool) -> dict:
    weights = [mx.random.normal((output_dims, input_dims)) for _ in range(copies)]
    x = mx.random.normal((1, input_dims))
    mx.eval(weights, x)
    forms = {
        "x @ W^T": lambda w: x @ w.T,
        "W @ x^T": lambda w: w @ x.T,
        "blocks of 4096 rows": lambda w: mx.concatenate([x @ w[i : i + 4096].T for i in range(0, output_dims, 4096)], axis=-1),
    }
    times = {name: 1e6 * best_time(lambda: [form(w) for w in weights], 15) / copies for name, form in forms.items()}
    if not low_precision:
        return times

    # The same product with bf16 and 4-bit weights, as nn.Linear and
    # nn.QuantizedLinear (group 64) compute it.
    halves = [w.astype(mx.bfloat16) for w in weights]
    quarters = [mx.quantize(w, group_size=64, bits=4) for w in weights]
    mx.eval(halves, quarters)
    x_half = x.astype(mx.bfloat16)
    times["bf16 x @ W^T"] = 1e6 * best_time(lambda: [x_half @ w.T for w in halves], 15) / copies
    times["4-bit x @ W^T"] = 1e6 * best_time(
        lambda: [mx.quantized_matmul(x, *q, transpose=True, group_size=64, bits=4) for q in quarters], 15
    ) / copies
    return times


def single_row_table(low_precision: bool = True) -> dict:
    shapes = [(768, 3072, 12), (3072, 768, 12), (768, 768, 48), (65536, 768, 2)]
    return {f"{o}x{i}": single_row(o, i, copies, low_precision) for o, i, copies in shapes}


def print_single_row(table: dict, label: str) -> None:
    print(f"one row through a linear layer, us (best of 15), {label}; weights are [out, in]")
    for shape, row in table.items():
        cells = "  ".join(f"{name}: {value:8.0f}" for name, value in row.items())
        weight = f"[{shape.replace('x', ', ')}]"
        print(f"  {weight:13s}  {cells}")


# The [out, in] weights of one RWKV-7 layer of the 0.1B shape. First the
# receptance, key, value and output, then the channel-mix key and value.
# Last come the low-rank pairs of the decay, in-context learning rate, value
# residual and gate.
LAYER_WEIGHTS = [(768, 768)] * 4 + [(3072, 768), (768, 3072)] + [
    (64, 768), (768, 64), (64, 768), (768, 64), (32, 768), (768, 32), (128, 768), (768, 128)
]


def lora_step_products(tokens: int = 512, layers: int = 12, vocabulary: int = 65536) -> float:
    """Return the best of 3 times of the products a LoRA step cannot avoid, in seconds."""
    weights = [mx.random.normal(shape) * 0.01 for shape in LAYER_WEIGHTS]
    head = mx.random.normal((vocabulary, 768)) * 0.01
    mx.eval(weights, head)

    def products():
        results = []
        for layer in range(layers):
            for weight in weights:
                output_dims, input_dims = weight.shape
                x = mx.full((tokens, input_dims), 0.01 * (layer + 1))
                gradient = mx.full((tokens, output_dims), 0.01)
                results += [(x @ weight.T).sum(), (gradient @ weight).sum()]
        hidden = mx.full((tokens, 768), 0.01)
        results.append((hidden @ head.T).sum())
        results.append((mx.full((tokens, vocabulary), 1e-4) @ head).sum())
        return results

    return best_time(products, 3)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="Also write the results to this JSON file.")
    # Used for the child process that times single rows without gemv_forward.
    parser.add_argument("--single-row-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single_row_only:
        print(json.dumps(single_row_table(low_precision=False)))
        return

    machine = describe_machine()
    print(f"machine: {machine_summary(machine)}")
    times = elementwise()
    print(f"elementwise, ns per element ({ELEMENTS} float32 elements, best of 7)")
    for name, value in times.items():
        print(f"  {name:18s} {value:6.2f}")

    forwarded = rwkv_mlx._blas.gemv_forward is not None
    products = {"gemv_forward" if forwarded else "sgemm": single_row_table()}
    if forwarded:
        child = subprocess.run(
            [sys.executable, __file__, "--single-row-only"],
            env=dict(os.environ, RWKV_MLX_GEMV="0"), capture_output=True, text=True, check=True,
        )
        products["sgemm"] = json.loads(child.stdout.splitlines()[-1])
    for label, table in products.items():
        print_single_row(table, "with gemv_forward" if label == "gemv_forward" else "without gemv_forward")

    floor = lora_step_products()
    print(f"products of a LoRA step at 512 tokens (best of 3): {floor:.2f} s")
    results = json.dumps(
        {"machine": machine, "elementwise_ns": times, "single_row_us": products, "lora_step_products_s": floor}
    )
    print(results)
    if args.json:
        args.json.write_text(results + "\n")


if __name__ == "__main__":
    main()
