"""Time rwkv_mlx against mlx-lm's rwkv7 and BlinkDL's rwkv package on the same weights.

    python bench/bench_models.py [--formats float32 bfloat16 q4] [--lengths 512 4096]
                                 [--rounds 3] [--json results.json]

One random-weight RWKV-7 of the official 0.1B shape (12 layers, 768 wide,
vocabulary 65536) is made once; the MLX implementations run it in this
process. BlinkDL's package (``rwkv`` 0.8.32, ``strategy='cpu fp32'`` or
``'cpu bf16'``) is timed only where torch and rwkv are installed, on the same
weights in a child process without rwkv_mlx's OpenBLAS (see
``run_official_apart``). For each implementation and weight format the table
gives:

- prefill tokens/s: the whole prompt in one call, ending in the last
  position's logits, as a generator needs them; the best of ``--repeats``
  timed runs after an untimed one;
- decode: the median milliseconds per token over 128 greedy steps, and tokens/s;
- a LoRA training step at 512 tokens (rank 8 on every linear layer of every
  block, forward and backward), in tokens/s, the best of ``--repeats`` steps;
- peak memory in MB: MLX's peak allocation for the MLX implementations and
  the process's peak resident size for the official one;
- the decode roofline: weight bytes read per token over the machine's read
  bandwidth (measured here), and the fraction of it each implementation reaches.

With ``--rounds N`` every MLX implementation is timed N times, in an order
that alternates from round to round, and each figure's best counts. Each
round's ratios are printed as well, which shows the spread on a machine
shared with other jobs.

Every MLX implementation runs after ``import rwkv_mlx``, so all of them use
the same BLAS, and the same single-row products through gemv_forward where it
is loaded (see rwkv_mlx/_blas.py).
"""

import argparse
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import rwkv_mlx  # noqa: F401  (loads the optimized BLAS before mlx.core)

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map

from rwkv_mlx.models import rwkv7

from machine import describe as describe_machine, summary as machine_summary

SHAPE_0_1B = dict(
    model_type="rwkv7",
    vocab_size=65536,
    hidden_size=768,
    intermediate_size=3072,
    norm_eps=1e-5,
    head_dim=64,
    num_hidden_layers=12,
    a_low_rank_dim=64,
    v_low_rank_dim=32,
    gate_low_rank_dim=128,
    decay_low_rank_dim=64,
)
DECODE_STEPS = 128
TRAIN_LENGTH = 512


def random_canonical_weights(config: dict, seed: int = 0) -> dict:
    """Return float32 numpy weights in the canonical layout, with trained-like ranges."""
    rng = np.random.default_rng(seed)
    model = rwkv7.Model(rwkv7.ModelArgs(**config))
    weights = {}
    for name, value in tree_flatten(model.parameters()):
        shape = value.shape
        if name.endswith("norm.weight"):
            w = 1 + 0.1 * rng.standard_normal(shape)
        elif name.endswith("norm.bias"):
            w = 0.05 * rng.standard_normal(shape)
        elif ".x_" in name:
            w = rng.uniform(0, 1, shape)
        elif name.endswith("attn.k_k"):
            w = 0.85 + 0.05 * rng.standard_normal(shape)
        elif name.endswith("attn.k_a"):
            w = 1 + 0.05 * rng.standard_normal(shape)
        elif name.endswith("attn.r_k"):
            w = 0.3 * rng.standard_normal(shape)
        elif name.endswith("w_lora.lora.2.bias"):
            w = np.linspace(-7, 1, shape[0])
        elif name.endswith("lora.2.bias"):
            w = 0.3 * rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[-1])
        weights[name] = w.astype(np.float32)
    return weights


def canonical_to_official(weights: dict, config: dict) -> dict:
    """Invert rwkv_mlx.io.layout7's mapping, for BlinkDL's package."""
    from rwkv_mlx.io import layout7

    renamed = {v: k for k, v in layout7._RENAMED.items()}
    top = {v: k for k, v in layout7._TOP_LEVEL.items()}
    low_rank = {module: letter for letter, (module, _) in layout7._LOW_RANK.items()}
    C = config["hidden_size"]
    official = {}
    for name, value in weights.items():
        if name in top:
            official[top[name]] = value
            continue
        _, _, layer, rest = name.split(".", 3)
        prefix = f"blocks.{layer}."
        if rest in renamed:
            target = renamed[rest]
            if target in ("att.k_k", "att.k_a") or target.startswith("att.x_") or target == "ffn.x_k":
                value = value.reshape(1, 1, C)
            elif target.startswith("att.ln_x"):
                value = value.reshape(C)
            official[prefix + target] = value
            continue
        module, _, index, kind = rest.split(".")[1:]
        letter = low_rank[module]
        if kind == "bias":
            official[f"{prefix}att.{letter}0"] = value.reshape(1, 1, C)
        else:
            official[f"{prefix}att.{letter}{'1' if index == '0' else '2'}"] = value.T.copy()
    return official


def measure_read_bandwidth() -> float:
    """Return the machine's memory read bandwidth in bytes/s (sum over 1 GB, best of 3)."""
    data = np.ones(256 * 1024 * 1024, dtype=np.float32)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best


def decode_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decoded token reads: all but the unused embedding rows."""
    total = 0
    for name, value in tree_flatten(model.parameters()):
        if "embeddings" in name:
            total += value.nbytes // value.shape[0]
        else:
            total += value.nbytes
    return total


class MlxRunner:
    """Times an MLX model that follows mlx-lm's protocol (rwkv_mlx's or mlx-lm's)."""

    def __init__(self, name: str, model: nn.Module, repeats: int):
        self.name = name
        self.model = model
        self.repeats = repeats

    def prefill(self, ids: np.ndarray) -> float:
        tokens = mx.array(ids)[None]
        # One untimed run of the same length, so compilation is not timed.
        warmup = self.model.make_cache()
        mx.eval(self._head(self.model.model(tokens, warmup)[:, -1:]), [c.cache for c in warmup])

        best = math.inf
        for _ in range(self.repeats):
            cache = self.model.make_cache()
            start = time.perf_counter()
            hidden = self.model.model(tokens, cache)
            logits = self._head(hidden[:, -1:])
            mx.eval(logits, [c.cache for c in cache])
            best = min(best, time.perf_counter() - start)
        return len(ids) / best

    def decode(self, prompt: np.ndarray) -> list:
        cache = self.model.make_cache()
        logits = self.model(mx.array(prompt)[None], cache=cache)
        token = mx.argmax(logits[:, -1], axis=-1, keepdims=True)
        mx.eval(token)
        times = []
        for _ in range(DECODE_STEPS):
            start = time.perf_counter()
            logits = self.model(token, cache=cache)
            token = mx.argmax(logits[:, -1], axis=-1, keepdims=True)
            mx.eval(token)
            times.append(time.perf_counter() - start)
        return times

    def train_step(self, ids: np.ndarray) -> float:
        """Time one LoRA step, each implementation with its own training loss:
        rwkv_mlx's trainer (``sequence_loss`` as its training step calls it,
        chunked cross-entropy with the gradient taken in the forward pass) and
        mlx-lm's (the dense cross-entropy of ``mlx_lm.tuner.trainer``). Both
        get the same adapters, from mlx-lm's ``linear_to_lora_layers``."""
        from mlx_lm.tuner.utils import linear_to_lora_layers

        model = self.model
        model.freeze()
        linear_to_lora_layers(model, len(model.layers), {"rank": 8, "scale": 20.0, "dropout": 0.0})
        inputs = mx.array(ids[None, :-1])
        targets = mx.array(ids[None, 1:])

        if self.name == "rwkv_mlx":
            from rwkv_mlx.tuner.trainer import sequence_loss

            positions = mx.arange(inputs.size)

            def loss_fn(model):
                loss, _ = sequence_loss(model, inputs, targets, positions, None, inputs.size, gradient_in_forward=True)
                return loss

        else:

            def loss_fn(model):
                logits = model(inputs)
                return nn.losses.cross_entropy(logits.astype(mx.float32), targets).mean()

        value_and_grad = nn.value_and_grad(model, loss_fn)
        loss, grads = value_and_grad(model)
        mx.eval(loss, grads)
        best = math.inf
        for _ in range(self.repeats):
            start = time.perf_counter()
            loss, grads = value_and_grad(model)
            mx.eval(loss, grads)
            best = min(best, time.perf_counter() - start)
        return (len(ids) - 1) / best

    def _head(self, hidden):
        if getattr(self.model.args, "tie_word_embeddings", False):
            return self.model.model.embeddings.as_linear(hidden)
        return self.model.lm_head(hidden)


def build_mlx_model(kind: str, weights: dict, config: dict, fmt: str) -> nn.Module:
    if kind == "rwkv_mlx":
        model = rwkv7.Model(rwkv7.ModelArgs(**config))
    else:
        from mlx_lm.models import rwkv7 as mlx_lm_rwkv7

        model = mlx_lm_rwkv7.Model(mlx_lm_rwkv7.ModelArgs(**config))
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    if fmt == "bfloat16":
        model.update(tree_map(lambda p: p.astype(mx.bfloat16), model.parameters()))
    elif fmt == "q4":
        # Both implementations get the same quantized weights: rwkv_mlx's
        # recipe (what ``python -m rwkv_mlx.convert -q`` writes: embedding
        # and head at 8 bits, low-rank matrices unquantized). mlx-lm's own
        # recipe differs (head at 4 bits), so its weights would not be the same.
        predicate = rwkv7.Model.quant_predicate.fget(model)

        def quantize_predicate(path, module):
            if not hasattr(module, "to_quantized") or module.weight.shape[-1] % 64:
                return False
            return predicate(path, module)

        nn.quantize(model, group_size=64, bits=4, class_predicate=quantize_predicate)
    mx.eval(model.parameters())
    return model


OFFICIAL_STRATEGIES = {"float32": "cpu fp32", "bfloat16": "cpu bf16"}


def run_official(
    weights: dict, config: dict, lengths: list, prompt: np.ndarray, bandwidth: float, repeats: int, fmt: str
) -> Optional[dict]:
    """Time BlinkDL's rwkv package in one weight format, if torch and rwkv are installed.

    Returns:
        dict | None: The row of results, or None when the package is missing.
    """
    os.environ.setdefault("RWKV_V7_ON", "1")
    os.environ.setdefault("RWKV_JIT_ON", "1")
    os.environ.setdefault("RWKV_CUDA_ON", "0")
    try:
        import torch
        from rwkv.model import RWKV
    except ImportError as error:
        print(f"BlinkDL's rwkv package is not timed: {error}")
        return None

    official = canonical_to_official(weights, config)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rwkv7-0.1b"
        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)).to(torch.bfloat16) for k, v in official.items()}, f"{path}.pth")
        del official
        model = RWKV(model=str(path), strategy=OFFICIAL_STRATEGIES[fmt])

    row = {"implementation": "rwkv (official)", "format": fmt}
    with torch.no_grad():
        for length in lengths:
            ids = prompt[:length].tolist()
            model.forward(ids, None)
            best = math.inf
            for _ in range(repeats):
                start = time.perf_counter()
                model.forward(ids, None)
                best = min(best, time.perf_counter() - start)
            row[f"prefill_{length}"] = length / best

        logits, state = model.forward(prompt[:16].tolist(), None)
        token = int(torch.argmax(logits))
        times = []
        for _ in range(DECODE_STEPS):
            start = time.perf_counter()
            logits, state = model.forward([token], state)
            token = int(torch.argmax(logits))
            times.append(time.perf_counter() - start)
    row["decode_ms"] = 1e3 * statistics.median(times)
    row["decode_tps"] = 1e3 / row["decode_ms"]
    row["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # The official package keeps every weight in the strategy's dtype.
    weight_bytes = (4 if fmt == "float32" else 2) * sum(v.size for k, v in weights.items() if "embeddings" not in k)
    row["roofline_fraction"] = weight_bytes * row["decode_tps"] / bandwidth
    return row


def run_official_apart(args, bandwidth: float, fmt: str) -> Optional[dict]:
    """Run ``run_official`` in a child process without rwkv_mlx's OpenBLAS.

    Loading Debian's OpenBLAS into the process slowed the official package's
    decode on this machine from 35 to 179 ms per token (torch 2.13, 2 cores),
    so torch runs where ``RWKV_MLX_BLAS=0`` leaves MLX's bundled BLAS in place.
    """
    with tempfile.TemporaryDirectory() as tmp:
        row_file = Path(tmp) / "row.json"
        command = [sys.executable, __file__, "--official-row", str(row_file), "--official-format", fmt,
                   "--bandwidth", str(bandwidth), "--repeats", str(args.repeats), "--lengths", *map(str, args.lengths)]
        subprocess.run(command, env={**os.environ, "RWKV_MLX_BLAS": "0"}, check=True)
        return json.loads(row_file.read_text()) if row_file.exists() else None


def measure_mlx(kind: str, fmt: str, weights: dict, prompt: np.ndarray, bandwidth: float, args) -> dict:
    """Time one MLX implementation in one weight format and print its row.

    Args:
        kind (str): ``"rwkv_mlx"`` or ``"mlx_lm"``.
        fmt (str): ``"float32"``, ``"bfloat16"`` or ``"q4"``.
        weights (dict): The canonical weights.
        prompt (np.ndarray): Token ids, at least as long as the longest prefill.
        bandwidth (float): The measured read bandwidth in bytes/s.
        args: The parsed command line (``lengths``, ``repeats``, ``no_train``).

    Returns:
        dict: The row of the table.
    """
    model = build_mlx_model(kind, weights, SHAPE_0_1B, fmt)
    runner = MlxRunner(kind, model, args.repeats)
    row = {"implementation": kind, "format": fmt}

    mx.reset_peak_memory()
    for length in args.lengths:
        row[f"prefill_{length}"] = runner.prefill(prompt[:length])
    times = runner.decode(prompt[:16])
    row["decode_ms"] = 1e3 * statistics.median(times)
    row["decode_tps"] = 1e3 / row["decode_ms"]
    row["peak_mb"] = mx.get_peak_memory() / 2**20
    row["roofline_fraction"] = decode_bytes_per_token(model) * row["decode_tps"] / bandwidth
    if not args.no_train and fmt != "q4":
        row["train_tps"] = runner.train_step(prompt[: TRAIN_LENGTH + 1])

    print_row(row, args.lengths)
    del model, runner
    gc.collect()
    return row


def best_of_rounds(rounds: list) -> list:
    """Merge the rows of several rounds: each speed at its best, peak memory at its highest.

    Args:
        rounds (list): One list of rows per round, each row as ``measure_mlx`` returns it.

    Returns:
        list: One row per implementation and format, in the first round's order.
    """
    merged = {}
    for rows in rounds:
        for row in rows:
            key = (row["implementation"], row["format"])
            if key not in merged:
                merged[key] = dict(row)
                continue
            best = merged[key]
            for name, value in row.items():
                if name == "decode_ms":
                    best[name] = min(best[name], value)
                elif name.startswith("prefill_") or name in ("decode_tps", "train_tps", "roofline_fraction", "peak_mb"):
                    best[name] = max(best[name], value)
    return list(merged.values())


def print_row(row: dict, lengths: list) -> None:
    prefill = "  ".join(f"{row.get(f'prefill_{n}', float('nan')):9.1f}" for n in lengths)
    print(
        f"{row['implementation']:16s} {row['format']:9s} {prefill}  {row['decode_ms']:9.1f} {row['decode_tps']:8.1f}"
        f"  {row.get('train_tps', float('nan')):8.1f}  {row['peak_mb']:8.0f}  {row['roofline_fraction']:6.1%}",
        flush=True,
    )


def print_ratios(results: list, lengths: list) -> None:
    """Print rwkv_mlx's figures over each other implementation's, per weight format.

    Speeds are ratios of tokens/s (above 1: rwkv_mlx is faster); memory is
    rwkv_mlx's peak over the other MLX implementation's (below 1: rwkv_mlx
    needs less).
    """
    ours = {row["format"]: row for row in results if row["implementation"] == "rwkv_mlx"}
    others = [row for row in results if row["implementation"] != "rwkv_mlx"]
    for row in others:
        base = ours.get(row["format"])
        if base is None:
            continue
        figures = [f"prefill {n}: {base[f'prefill_{n}'] / row[f'prefill_{n}']:.2f}x" for n in lengths]
        figures.append(f"decode: {base['decode_tps'] / row['decode_tps']:.2f}x")
        if "train_tps" in base and "train_tps" in row:
            figures.append(f"LoRA step: {base['train_tps'] / row['train_tps']:.2f}x")
        if not row["implementation"].startswith("rwkv ("):
            # The official package's figure is the resident size, not comparable.
            figures.append(f"peak memory: {base['peak_mb'] / row['peak_mb']:.2f}")
        print(f"rwkv_mlx / {row['implementation']} ({row['format']}): " + ", ".join(figures))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--formats", nargs="+", default=["float32", "bfloat16", "q4"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[512, 4096], help="Prefill lengths in tokens.")
    parser.add_argument("--implementations", nargs="+", default=["rwkv_mlx", "mlx_lm", "official"])
    parser.add_argument("--no-train", action="store_true", help="Skip the LoRA training step.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs of each prefill and training step; the best counts.")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="Time every MLX implementation this many times, alternating their order, and keep each figure's best.",
    )
    parser.add_argument("--json", type=Path, help="Also write the results to this JSON file.")
    # Used by run_official_apart for its child process.
    parser.add_argument("--official-row", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--official-format", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--bandwidth", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()

    config = SHAPE_0_1B
    weights = random_canonical_weights(config)
    prompt = np.random.default_rng(1).integers(0, config["vocab_size"], max(args.lengths + [TRAIN_LENGTH + 1]))
    if args.official_row:
        row = run_official(weights, config, args.lengths, prompt, args.bandwidth, args.repeats, args.official_format)
        if row is not None:
            args.official_row.write_text(json.dumps(row))
        return 0
    bandwidth = measure_read_bandwidth()

    machine = describe_machine()
    print(f"machine: {machine_summary(machine)}")
    print(f"read bandwidth: {bandwidth / 1e9:.1f} GB/s")
    header = "  ".join(f"{f'prefill {n}':>9s}" for n in args.lengths)
    print(f"{'implementation':16s} {'format':9s} {header}  {'decode ms':>9s} {'tok/s':>8s}  {'train':>8s}  {'peak MB':>8s}  roofline")

    kinds = [k for k in args.implementations if k != "official"]
    rounds = []
    for round_index in range(args.rounds):
        # Alternate the order, so that a machine that slows down during the
        # run does not always slow the same implementation.
        order = kinds if round_index % 2 == 0 else kinds[::-1]
        if args.rounds > 1:
            print(f"round {round_index + 1} of {args.rounds}")
        rows = [measure_mlx(kind, fmt, weights, prompt, bandwidth, args) for kind in order for fmt in args.formats]
        if args.rounds > 1:
            print_ratios(rows, args.lengths)
        rounds.append(rows)
    results = best_of_rounds(rounds)
    if args.rounds > 1:
        print(f"best of {args.rounds} rounds")
        for row in results:
            print_row(row, args.lengths)

    if "official" in args.implementations:
        for fmt in [f for f in args.formats if f in OFFICIAL_STRATEGIES]:
            row = run_official_apart(args, bandwidth, fmt)
            if row is not None:
                results.append(row)
                print_row(row, args.lengths)
    print_ratios(results, args.lengths)

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {**machine, "bandwidth_gbs": bandwidth / 1e9, "repeats": args.repeats, "rounds": args.rounds}
        args.json.write_text(json.dumps({"meta": meta, "results": results, "rounds": rounds}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
