"""Measure what quantization costs trained RWKV-7 models: perplexity and KL against float32.

    python bench/bench_quantization.py [--text FILE] [--json OUT]

Each model is quantized as ``python -m rwkv_mlx.convert -q`` does (the
model's ``quant_predicate``: embedding and head at 8 bits, low-rank matrices
left at full precision, the rest at the given bits), then run over the text.
The table gives perplexity per byte and the mean KL divergence of the
quantized model's next-token distribution from the float32 one.

Models: the bundled default model, and rwkv.cpp's tiny RWKV-7 when
``../shared/fixtures/rwkv-cpp-tiny/`` is present beside the repository. Both
are byte-level, and the text is fed to them as bytes: the last
``--max-bytes`` bytes of ``--text``, by default of
``tests/tokenizer/corpus/english.txt``.
"""

import argparse
import copy
import json
from pathlib import Path

import rwkv_mlx

import mlx.core as mx
import numpy as np
from mlx_lm.utils import quantize_model

from rwkv_mlx.loading import load_model

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "rwkv_mlx" / "default_model"
TINY_V7 = REPO.parent / "shared" / "fixtures" / "rwkv-cpp-tiny" / "tiny-rwkv-7v0-834K-FP32.bin"
SETTINGS = [("float32", None, None), ("8-bit, group 64", 8, 64), ("4-bit, group 64", 4, 64), ("4-bit, group 32", 4, 32)]


def log_probs(model, tokens: np.ndarray) -> np.ndarray:
    """Return log-softmax outputs for every position but the last, in float64."""
    logits = model(mx.array(tokens[:-1])[None]).astype(mx.float32)
    logits = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return np.array(logits[0]).astype(np.float64)


def measure(source: str, tokens: np.ndarray) -> list:
    base, config, _ = load_model(source, dtype=mx.float32)
    reference = log_probs(base, tokens)
    rows = []
    for name, bits, group_size in SETTINGS:
        model = base
        if bits is not None:
            model, _, _ = load_model(source, dtype=mx.float32)
            model, _ = quantize_model(model, copy.deepcopy(config), group_size, bits)
        lp = log_probs(model, tokens)
        nll = -lp[np.arange(len(tokens) - 1), tokens[1:]].mean()
        kl = (np.exp(reference) * (reference - lp)).sum(-1).mean()
        rows.append({"model": Path(source).name, "setting": name, "perplexity": float(np.exp(nll)), "kl": float(kl)})
        print(f"{Path(source).name:32s} {name:16s} {np.exp(nll):10.4f} {kl:12.2e}", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text", type=Path, help="A UTF-8 text file to measure on.")
    parser.add_argument("--max-bytes", type=int, default=16384, help="Bytes of the text to use (default: 16384).")
    parser.add_argument("--json", type=Path, help="Also write the results to this JSON file.")
    args = parser.parse_args()
    if args.max_bytes < 2:
        parser.error(f"--max-bytes must be at least 2, got {args.max_bytes}")
    text_path = args.text or REPO / "tests" / "tokenizer" / "corpus" / "english.txt"
    if not text_path.is_file():
        parser.error(f"--text {text_path}: file not found")

    data = text_path.read_bytes()[-args.max_bytes :]
    tokens = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    print(f"text: {text_path} ({len(tokens)} bytes)")
    print(f"{'model':32s} {'weights':16s} {'perplexity':>10s} {'KL vs fp32':>12s}")

    rows = measure(str(DEFAULT_MODEL), tokens)
    if TINY_V7.exists():
        rows += measure(str(TINY_V7), tokens)
    else:
        print(f"rwkv.cpp's tiny RWKV-7 is not measured: {TINY_V7} not found")
    if args.json:
        args.json.write_text(json.dumps({"text": str(text_path), "bytes": len(tokens), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
