"""Peak memory and time of the chunked cross-entropy against the dense one.

The shape is the output head of RWKV-7 0.1B (width 768, vocabulary 65536)
with 512 tokens. For each case the script computes the summed loss and its
gradient. The gradient is taken with respect to the hidden states (a frozen
head, as in LoRA and state tuning) or to the hidden states and the head
weight (a full fine-tune). It reports the peak memory above the inputs, the
time, and the largest difference from the dense loss and gradients.

    python bench/bench_cross_entropy_memory.py [--tokens 512] [--dtype float32]
"""

import argparse
import time

import rwkv_mlx  # noqa: F401  (loads an optimized BLAS before mlx.core on Linux)

import mlx.core as mx
import mlx.nn as nn

from rwkv_mlx.tuner.losses import OutputHead, chunked_cross_entropy, dense_cross_entropy

WIDTH = 768
VOCAB_SIZE = 65536


def measure(loss_function, hidden, weight, targets, weight_grad):
    """Return (loss, gradients, peak bytes above the inputs, seconds)."""
    argnums = (0, 1) if weight_grad else 0
    value_and_grad = mx.value_and_grad(loss_function, argnums=argnums)
    mx.eval(hidden, weight, targets)
    mx.clear_cache()
    mx.reset_peak_memory()
    baseline = mx.get_active_memory()

    tic = time.perf_counter()
    loss, grads = value_and_grad(hidden, weight)
    mx.eval(loss, grads)
    seconds = time.perf_counter() - tic

    grads = grads if weight_grad else (grads,)
    return loss, grads, mx.get_peak_memory() - baseline, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512, help="Tokens in the batch.")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--chunk-sizes", default="64,128,256", help="Comma-separated tokens per chunk.")
    options = parser.parse_args()

    dtype = getattr(mx, options.dtype)
    mx.random.seed(0)
    hidden = mx.random.normal((options.tokens, WIDTH)).astype(dtype)
    weight = (mx.random.normal((VOCAB_SIZE, WIDTH)) / WIDTH**0.5).astype(dtype)
    targets = mx.random.randint(0, VOCAB_SIZE, (options.tokens,))
    head = nn.Linear(WIDTH, VOCAB_SIZE, bias=False)

    def dense(h, w):
        head.weight = w
        return dense_cross_entropy(h, targets, head)

    print(f"device {mx.default_device()}, {options.tokens} tokens, width {WIDTH}, vocabulary {VOCAB_SIZE}, {options.dtype}")
    print("| gradient of | loss | chunk | peak memory above inputs (MiB) | time (s) | max loss diff | max grad diff |")
    print("|---|---|---|---|---|---|---|")
    for weight_grad in (False, True):
        wrt = "hidden, head weight" if weight_grad else "hidden"
        reference = measure(dense, hidden, weight, targets, weight_grad)
        print(f"| {wrt} | dense | - | {reference[2] / 2**20:.0f} | {reference[3]:.1f} | - | - |")
        for chunk in (int(c) for c in options.chunk_sizes.split(",")):

            def chunked(h, w, chunk=chunk):
                return chunked_cross_entropy(h, targets, OutputHead(w), chunk_size=chunk, weight_grad=weight_grad)

            loss, grads, peak, seconds = measure(chunked, hidden, weight, targets, weight_grad)
            loss_diff = abs(loss.item() - reference[0].item())
            grad_diff = max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item() for a, b in zip(grads, reference[1]))
            print(f"| {wrt} | chunked | {chunk} | {peak / 2**20:.0f} | {seconds:.1f} | {loss_diff:.2e} | {grad_diff:.2e} |")


if __name__ == "__main__":
    main()
