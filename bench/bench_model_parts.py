"""Split rwkv_mlx's prefill, decode and LoRA step time into matrix products,
the WKV recurrence and the rest, by timing the model with parts replaced.

    python bench/bench_model_parts.py

The model is bench_models.py's random RWKV-7 of the 0.1B shape in float32.
Each variant runs in its own process, because it replaces functions for the
whole process:

- ``full``: the model as it is;
- ``no products``: every linear layer, and the output head inside the
  training loss, returns a zero array of its output shape instead of its
  product (the LoRA adapters' own small products remain);
- ``no WKV``: the WKV recurrence returns the receptance as its output and
  leaves the state as it is;
- ``neither``: both replaced.

Prefill is 512 tokens, the best of 5 after one untimed run; decode is the
median of 64 tokens after 10 untimed ones; the LoRA step is bench_models.py's
(512 tokens, rank-8 adapters on every linear layer), the best of 3 after one
untimed run. The differences estimate what the products and the recurrence
cost. The parts overlap a little (the rest of a layer reads the products'
outputs), so the differences need not add up.
The last line printed is all results as JSON, and ``--json PATH`` also
writes them to a file.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import rwkv_mlx  # first: loads the optimized BLAS before mlx.core

import mlx.core as mx
import mlx.nn as nn
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_models import SHAPE_0_1B, TRAIN_LENGTH, MlxRunner, build_mlx_model, random_canonical_weights  # noqa: E402
from machine import describe as describe_machine, summary as machine_summary  # noqa: E402

VARIANTS = ["full", "no products", "no WKV", "neither"]


def zero_product(layer: nn.Module, x: mx.array) -> mx.array:
    """Return zeros shaped like ``layer(x)``, still depending on ``x``.

    A LoRA-wrapped layer runs its own call, which reaches the replaced
    ``nn.Linear`` for its base product and keeps the adapter's products.
    """
    if not isinstance(layer, nn.Linear):
        return layer(x)
    return x[..., :1] * mx.zeros((layer.weight.shape[0],), dtype=x.dtype)


def zero_head_product(hidden: mx.array, head, arrays) -> mx.array:
    """Return zeros shaped like the logits of ``hidden``, still depending on it."""
    return hidden[..., :1] * mx.zeros((arrays[0].shape[0],), dtype=hidden.dtype)


def zero_head_product_back(grad_logits: mx.array, head, arrays) -> mx.array:
    """Return zeros shaped like the hidden states' gradient, still depending on ``grad_logits``."""
    return grad_logits[..., :1] * mx.zeros((arrays[0].shape[1],), dtype=grad_logits.dtype)


def measure(variant: str, train: bool) -> dict:
    from rwkv_mlx.models import rwkv7
    from rwkv_mlx.tuner import losses

    if variant in ("no products", "neither"):
        nn.Linear.__call__ = zero_product
        rwkv7.linear = zero_product
        losses._project = zero_head_product
        losses._project_back = zero_head_product_back
    if variant in ("no WKV", "neither"):
        rwkv7.wkv7 = lambda r, w, k, v, a, b, state: (r.astype(mx.float32), state)

    model = build_mlx_model("rwkv_mlx", random_canonical_weights(SHAPE_0_1B), SHAPE_0_1B, "float32")
    prompt = np.random.default_rng(1).integers(0, SHAPE_0_1B["vocab_size"], 512)
    prefill_seconds = 512 / MlxRunner("rwkv_mlx", model, 5).prefill(prompt)

    cache = model.make_cache()
    token = mx.array([[1]])
    for _ in range(10):
        mx.eval(model(token, cache=cache))
    times = []
    for _ in range(64):
        start = time.perf_counter()
        mx.eval(model(token, cache=cache))
        times.append(time.perf_counter() - start)
    result = {"prefill_512_s": prefill_seconds, "decode_ms": 1e3 * statistics.median(times)}

    if train:
        ids = np.random.default_rng(2).integers(0, SHAPE_0_1B["vocab_size"], TRAIN_LENGTH + 1)
        result["lora_step_s"] = TRAIN_LENGTH / MlxRunner("rwkv_mlx", model, 3).train_step(ids)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="Also write the results to this JSON file.")
    parser.add_argument("--no-train", action="store_true", help="Skip the LoRA step.")
    # Used for the child process of each variant.
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, not args.no_train)))
        return

    machine = describe_machine()
    print(f"machine: {machine_summary(machine)}")
    results = {}
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--variant", variant] + (["--no-train"] if args.no_train else [])
        child = subprocess.run(command, capture_output=True, text=True, check=True)
        results[variant] = result = json.loads(child.stdout.splitlines()[-1])
        line = f"{variant:12s} prefill 512: {result['prefill_512_s']:.3f} s   decode: {result['decode_ms']:.1f} ms"
        if "lora_step_s" in result:
            line += f"   LoRA step: {result['lora_step_s']:.2f} s"
        print(line)

    full, no_products, no_wkv = results["full"], results["no products"], results["no WKV"]
    figures = [("prefill_512_s", "s"), ("decode_ms", "ms")] + ([] if args.no_train else [("lora_step_s", "s")])
    for key, unit in figures:
        print(
            f"{key}: products about {full[key] - no_products[key]:.3f} {unit}, "
            f"WKV about {full[key] - no_wkv[key]:.3f} {unit}, the rest about {results['neither'][key]:.3f} {unit}"
        )
    print(json.dumps(results))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
