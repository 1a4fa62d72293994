"""Time rwkv_mlx's LoRA step with the head's input gradient taken in the
forward pass of the loss and in its backward pass.

    python bench/bench_training_loss.py [--repeats 3] [--json results.json]

The model and the step are bench_models.py's (random RWKV-7 of the 0.1B shape
in float32, 512 tokens, rank-8 adapters on every linear layer). The two forms
of ``sequence_loss`` (``gradient_in_forward`` True and False) take turns, each
after one untimed step, so that a machine that slows down during the run
slows both. The script prints each step's time and peak MLX memory, the best
of each form, and their loss and largest gradient difference.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import rwkv_mlx  # noqa: F401  (loads the optimized BLAS before mlx.core)

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).parent))
from bench_models import SHAPE_0_1B, TRAIN_LENGTH, build_mlx_model, random_canonical_weights  # noqa: E402
from machine import describe as describe_machine, summary as machine_summary  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="Timed steps of each form; the best counts.")
    parser.add_argument("--json", type=Path, help="Also write the results to this JSON file.")
    args = parser.parse_args()

    from mlx_lm.tuner.utils import linear_to_lora_layers
    from rwkv_mlx.tuner.trainer import sequence_loss

    machine = describe_machine()
    print(f"machine: {machine_summary(machine)}")
    model = build_mlx_model("rwkv_mlx", random_canonical_weights(SHAPE_0_1B), SHAPE_0_1B, "float32")
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": 8, "scale": 20.0, "dropout": 0.0})
    ids = np.random.default_rng(1).integers(0, SHAPE_0_1B["vocab_size"], TRAIN_LENGTH + 1)
    inputs, targets = mx.array(ids[None, :-1]), mx.array(ids[None, 1:])
    positions = mx.arange(TRAIN_LENGTH)

    steps = {}
    for in_forward in (False, True):

        def loss_fn(model, in_forward=in_forward):
            loss, _ = sequence_loss(
                model, inputs, targets, positions, None, TRAIN_LENGTH, gradient_in_forward=in_forward
            )
            return loss

        steps[in_forward] = nn.value_and_grad(model, loss_fn)

    first = {}
    for in_forward, step in steps.items():
        loss, grads = step(model)
        mx.eval(loss, grads)
        first[in_forward] = (loss.item(), grads)

    times = {False: [], True: []}
    peaks = {False: [], True: []}
    for _ in range(args.repeats):
        for in_forward, step in steps.items():
            mx.reset_peak_memory()
            start = time.perf_counter()
            loss, grads = step(model)
            mx.eval(loss, grads)
            times[in_forward].append(time.perf_counter() - start)
            peaks[in_forward].append(mx.get_peak_memory() / 2**20)
            print(f"gradient_in_forward={in_forward!s:5s}  {times[in_forward][-1]:6.2f} s  {peaks[in_forward][-1]:6.0f} MB", flush=True)

    pairs = zip(tree_flatten(first[False][1]), tree_flatten(first[True][1]))
    gradient_difference = max(mx.abs(a - b).max().item() for (_, a), (_, b) in pairs)
    results = {
        "machine": machine,
        "step_s": {"backward": min(times[False]), "forward": min(times[True])},
        "peak_mb": {"backward": max(peaks[False]), "forward": max(peaks[True])},
        "loss": {"backward": first[False][0], "forward": first[True][0]},
        "max_gradient_difference": gradient_difference,
    }
    print(
        f"best step: {results['step_s']['backward']:.2f} s with the gradient in the backward pass, "
        f"{results['step_s']['forward']:.2f} s in the forward pass; peak {results['peak_mb']['backward']:.0f} "
        f"and {results['peak_mb']['forward']:.0f} MB; largest gradient difference {gradient_difference:.2e}"
    )
    print(json.dumps(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
