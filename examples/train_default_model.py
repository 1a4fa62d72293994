"""Train the small byte-level RWKV-7 model that ships as rwkv_mlx's default model.

The model learns from Jane Austen's six completed novels (public domain),
taken from the Debian package ``r-cran-janeaustenr``, which stores them for
GNU R. The script reads the texts out of that package (installed, or fetched
with ``apt-get download``) and trains from scratch. It writes a model
directory with ``config.json``, ``model.safetensors``, a byte-level
``tokenizer.json``, the loss curve ``loss_curve.png`` and ``MODEL_CARD.md``.
Two small files serve the tests: the training vocabulary ``vocabulary.txt``
and a short excerpt ``sample.txt``.

Usage:
    # The shipped model: about an hour on 2 CPU cores.
    python examples/train_default_model.py --output rwkv_mlx/default_model

    # Any local text, a few steps, without the plot:
    python examples/train_default_model.py --data book.txt --output /tmp/model --steps 50 --no-plot

Plotting needs matplotlib (``pip install matplotlib``), and ``--no-plot`` skips the plot.
"""

import argparse
import json
import logging
import math
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import rwkv_mlx  # noqa: F401  (before mlx: it loads an optimized BLAS on Linux)

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from tqdm import tqdm

from rwkv_mlx.loading import save_model
from rwkv_mlx.models import rwkv7
from rwkv_mlx.tokenizer import ByteTokenizer
from rwkv_mlx.tuner import TrainingArgs, TrainingHistory, evaluate, train

logger = logging.getLogger("train_default_model")

AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_RDATA = Path("usr/lib/R/site-library/janeaustenr/data/Rdata.rdb")
AUSTEN_SOURCE = (
    "Jane Austen's six completed novels (Sense and Sensibility, Pride and Prejudice, Mansfield Park, "
    "Emma, Northanger Abbey, Persuasion), public domain, as stored in the Debian package "
    "r-cran-janeaustenr (the R package janeaustenr by Julia Silge, MIT licence, with the texts "
    "from Project Gutenberg)"
)

# Type codes of R's serialization format, as the janeaustenr data files use them.
R_CHARSXP = 9
R_STRSXP = 16
R_NA_STRING_LENGTH = -1

VOCABULARY_SIZE = 256  # byte-level: token id = byte value
WORD_PATTERN = re.compile(r"[A-Za-z]+")


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def read_r_string_vectors(rdb_path: Path) -> List[List[str]]:
    """Read every character vector stored in an R lazy-load database (``.rdb``).

    An ``.rdb`` file is a sequence of records, each a 4-byte big-endian
    uncompressed length followed by a zlib stream of one object in R's XDR
    serialization: ``X\\n``, the format version (2 or 3), two R versions, for
    version 3 a native-encoding name, then the object. A character vector is
    a STRSXP header and its length, then one CHARSXP per element (header,
    byte length or -1 for NA, bytes). Objects of other types are skipped.

    Args:
        rdb_path (Path): The ``.rdb`` file.

    Returns:
        list[list[str]]: The character vectors in file order, NA elements as "".
    """
    data = rdb_path.read_bytes()
    vectors = []
    position = 0
    while position < len(data):
        if len(data) - position < 5:
            raise ValueError(f"{rdb_path}: truncated record at byte {position}")
        expected_length = struct.unpack(">I", data[position : position + 4])[0]
        decompressor = zlib.decompressobj()
        try:
            payload = decompressor.decompress(data[position + 4 :])
        except zlib.error as error:
            raise ValueError(f"{rdb_path}: record at byte {position} is not a zlib stream ({error})") from error
        if len(payload) != expected_length:
            raise ValueError(
                f"{rdb_path}: record at byte {position} contains {len(payload)} bytes, but its header gives {expected_length}"
            )
        position = len(data) - len(decompressor.unused_data)

        vector = parse_r_string_vector(payload)
        if vector is not None:
            vectors.append(vector)
    return vectors


def parse_r_string_vector(payload: bytes) -> Optional[List[str]]:
    """Decode one serialized R object if it is a plain character vector, else return None."""
    if payload[:2] != b"X\n":
        return None
    version = struct.unpack(">i", payload[2:6])[0]
    offset = 14
    if version == 3:
        encoding_length = struct.unpack(">i", payload[offset : offset + 4])[0]
        offset += 4 + encoding_length

    flags, length = struct.unpack(">ii", payload[offset : offset + 8])
    offset += 8
    if flags & 0xFF != R_STRSXP:
        return None

    strings = []
    for _ in range(length):
        flags, size = struct.unpack(">ii", payload[offset : offset + 8])
        offset += 8
        if flags & 0xFF != R_CHARSXP:
            raise ValueError(f"element {len(strings)} of a character vector has R type {flags & 0xFF}, expected CHARSXP")
        if size == R_NA_STRING_LENGTH:
            strings.append("")
            continue
        strings.append(payload[offset : offset + size].decode("utf-8"))
        offset += size
    return strings


def find_austen_rdata(download_directory: Path) -> Path:
    """Return the path of the novels' ``Rdata.rdb``, downloading the Debian package if needed.

    Raises:
        RuntimeError: The package is neither installed nor downloadable here.
    """
    installed = Path("/") / AUSTEN_RDATA
    if installed.exists():
        return installed

    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError(
            f"the training text comes from the Debian package {AUSTEN_PACKAGE}, but apt-get and dpkg-deb "
            "are not available here. Pass --data FILE with a plain-text file to train on instead"
        )
    logger.info("downloading the Debian package %s", AUSTEN_PACKAGE)
    result = subprocess.run(
        ["apt-get", "download", AUSTEN_PACKAGE], cwd=download_directory, capture_output=True, text=True
    )
    archives = list(download_directory.glob(f"{AUSTEN_PACKAGE}_*.deb"))
    if result.returncode != 0 or not archives:
        raise RuntimeError(
            f"'apt-get download {AUSTEN_PACKAGE}' failed ({result.stderr.strip() or 'no .deb file written'}). "
            "Run 'apt-get update' first, or pass --data FILE with a plain-text file"
        )
    subprocess.run(["dpkg-deb", "-x", str(archives[0]), str(download_directory / "root")], check=True)
    return download_directory / "root" / AUSTEN_RDATA


def load_austen_text() -> str:
    """Return the six novels as one text, one novel after another, lines joined by newlines."""
    with tempfile.TemporaryDirectory(prefix="janeaustenr-") as directory:
        rdata = find_austen_rdata(Path(directory))
        novels = read_r_string_vectors(rdata)
    if len(novels) != 6:
        raise RuntimeError(f"{rdata}: expected the 6 novels as character vectors, found {len(novels)}")
    return "\n\n\n".join("\n".join(lines).strip() for lines in novels) + "\n"


def load_text(data_path: Optional[Path]) -> Tuple[bytes, str]:
    """Read the training text: a local file, or the Austen novels when no file is given.

    Returns:
        tuple[bytes, str]: The text as UTF-8 bytes and a description of its source.
    """
    if data_path is None:
        return load_austen_text().encode("utf-8"), AUSTEN_SOURCE

    if not data_path.is_file():
        raise FileNotFoundError(f"--data {data_path}: file not found")
    data = data_path.read_bytes()
    if not data:
        raise ValueError(f"--data {data_path}: the file is empty")
    return data, f"the local file {data_path.name}"


def split_text(data: bytes, validation_fraction: float, sequence_length: int) -> Tuple[np.ndarray, np.ndarray]:
    """Split the bytes into a training part and the validation part at the end.

    Raises:
        ValueError: Either part is too short for one window.
    """
    tokens = np.frombuffer(data, dtype=np.uint8).astype(np.int32)
    validation_length = int(len(tokens) * validation_fraction)
    train, validation = tokens[: len(tokens) - validation_length], tokens[len(tokens) - validation_length :]
    for name, part in (("training", train), ("validation", validation)):
        if len(part) <= sequence_length:
            raise ValueError(
                f"the {name} part contains {len(part)} bytes, fewer than one window of {sequence_length + 1}. "
                "Use a longer text, a shorter --seq-len or another --validation-fraction"
            )
    return train, validation


def unigram_loss(train: np.ndarray, validation: np.ndarray) -> float:
    """Return the cross-entropy (nats per byte) on the validation bytes of the
    training bytes' unigram distribution, add-one smoothed."""
    counts = np.bincount(train, minlength=VOCABULARY_SIZE) + 1.0
    log_probabilities = np.log(counts / counts.sum())
    return float(-log_probabilities[validation].mean())


def cut_windows(tokens: np.ndarray, window: int, max_windows: Optional[int] = None) -> List[np.ndarray]:
    """Cut the bytes into consecutive, non-overlapping windows of ``window`` bytes,
    keeping ``max_windows`` of them spread evenly over the text when there are more."""
    count = len(tokens) // window
    selected = count if max_windows is None else min(count, max_windows)
    starts = np.linspace(0, count - 1, selected).astype(int) * window
    return [tokens[start : start + window] for start in starts]


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


def model_config(layers: int, hidden_size: int, head_size: int) -> Dict:
    """Return the ``ModelArgs`` fields of a byte-level RWKV-7 of the given size."""
    if hidden_size % head_size:
        raise ValueError(f"--hidden-size {hidden_size} is not a multiple of --head-size {head_size}")
    return dict(
        model_type="rwkv7",
        vocab_size=VOCABULARY_SIZE,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        norm_eps=1e-5,
        head_dim=head_size,
        num_hidden_layers=layers,
        a_low_rank_dim=16,
        v_low_rank_dim=16,
        gate_low_rank_dim=32,
        decay_low_rank_dim=16,
        tie_word_embeddings=False,
    )


def orthogonal(rng: np.random.Generator, shape: Tuple[int, int], gain: float) -> np.ndarray:
    """Return a random matrix with orthonormal rows or columns, times ``gain``."""
    rows, columns = shape
    q, r = np.linalg.qr(rng.standard_normal((max(shape), min(shape))))
    q = q * np.sign(np.diag(r))
    return gain * (q if rows >= columns else q.T)


def initial_weights(config: Dict, seed: int) -> Dict[str, np.ndarray]:
    """Return initial weights for training RWKV-7 from scratch.

    The values follow the RWKV-7 training code of BlinkDL's RWKV-LM
    (``RWKV-v7/train_temp/src/model.py``). Token-shift mixes fall from 1 to 0
    across the channels, more steeply in later layers. Decay biases rise from
    about -5.5 to 0.5 across the channels, plus a zigzag of up to ±2.5 within
    each head. Low-rank input matrices and the output projections start at
    zero, so every block begins as the identity. The receptance, key and value
    projections take the uniform ranges of that file's module constructors;
    its full-model initializer later replaces them with orthogonal matrices.
    """
    rng = np.random.default_rng(seed)
    C, N, L, V = config["hidden_size"], config["head_dim"], config["num_hidden_layers"], config["vocab_size"]
    H = C // N
    channel = np.arange(C)
    position = channel / C  # in [0, 1)
    linear = channel / (C - 1) - 0.5  # in [-0.5, 0.5]
    within_head = (channel % N - (N - 1) / 2) / ((N - 1) / 2)
    zigzag = within_head * np.abs(within_head)  # in [-1, 1], repeating per head

    def uniform(shape, bound):
        return rng.uniform(-bound, bound, shape)

    def low_rank(prefix, rank, bias):
        weights[f"{prefix}.lora.0.weight"] = np.zeros((rank, C))
        weights[f"{prefix}.lora.2.weight"] = orthogonal(rng, (C, rank), 0.1)
        if bias is not None:
            weights[f"{prefix}.lora.2.bias"] = bias

    weights = {
        "model.embeddings.weight": uniform((V, C), 1e-4),
        "model.norm.weight": np.ones(C),
        "model.norm.bias": np.zeros(C),
        "lm_head.weight": orthogonal(rng, (V, C), 0.5 * math.sqrt(max(V / C, 1.0))),
    }
    for i in range(L):
        depth = i / max(L - 1, 1)  # 0 in the first layer, 1 in the last
        remaining = 1.0 - i / L  # 1 in the first layer, 1/L in the last
        p = f"model.layers.{i}"

        norms = ["attn_norm", "ffn_norm"] + (["pre_norm"] if i == 0 else [])
        for norm in norms:
            weights[f"{p}.{norm}.weight"] = np.ones(C)
            weights[f"{p}.{norm}.bias"] = np.zeros(C)

        for name, power in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
            weights[f"{p}.attn.{name}"] = (1.0 - position ** (power * remaining)).reshape(1, 1, C)

        decay_bias = -6 + 6 * (channel / (C - 1)) ** (1 + depth**0.3) + 0.5 + 2.5 * zigzag
        low_rank(f"{p}.attn.w_lora", config["decay_low_rank_dim"], decay_bias)
        low_rank(f"{p}.attn.a_lora", config["a_low_rank_dim"], -0.19 + 0.3 * zigzag + 0.4 * linear)
        if i > 0:
            low_rank(f"{p}.attn.v_lora", config["v_low_rank_dim"], 0.73 - 0.4 * linear)
        low_rank(f"{p}.attn.g_lora", config["gate_low_rank_dim"], None)

        weights[f"{p}.attn.k_k"] = (0.71 - 0.1 * linear).reshape(H, N)
        weights[f"{p}.attn.k_a"] = np.full((H, N), 1.02)
        weights[f"{p}.attn.r_k"] = np.full((H, N), -0.04)
        weights[f"{p}.attn.r_proj.weight"] = uniform((C, C), 0.5 / math.sqrt(C))
        weights[f"{p}.attn.k_proj.weight"] = uniform((C, C), 0.05 / math.sqrt(C))
        weights[f"{p}.attn.v_proj.weight"] = uniform((C, C), 0.5 / math.sqrt(C))
        weights[f"{p}.attn.o_proj.weight"] = np.zeros((C, C))
        weights[f"{p}.attn.g_norm.weight"] = np.full((H, N), ((1 + i) / L) ** 0.7)
        weights[f"{p}.attn.g_norm.bias"] = np.zeros((H, N))

        weights[f"{p}.ffn.x_k"] = 1.0 - position ** (remaining**4)
        weights[f"{p}.ffn.key.weight"] = uniform((config["intermediate_size"], C), 0.5 / math.sqrt(C))
        weights[f"{p}.ffn.value.weight"] = np.zeros((C, config["intermediate_size"]))
    return weights


def build_initial_model(config: Dict, seed: int) -> rwkv7.Model:
    """Build a float32 model with ``initial_weights``, checking every name and shape."""
    model = rwkv7.Model(rwkv7.ModelArgs(**config))
    weights = {name: mx.array(value.astype(np.float32)) for name, value in initial_weights(config, seed).items()}
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model


def parameter_count(model: nn.Module) -> int:
    return sum(value.size for _, value in tree_flatten(model.parameters()))


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def learning_rate_schedule(peak: float, final: float, warmup: int, steps: int) -> Callable:
    """Return a linear warmup to ``peak`` over at most half the steps, then a
    cosine decay that reaches ``final`` one step after the last."""
    warmup = min(warmup, steps // 2)
    decay = optim.cosine_decay(peak, max(steps - warmup, 1), final)
    if warmup <= 0:
        return decay
    ramp = optim.linear_schedule(peak / warmup, peak, warmup)
    return optim.join_schedules([ramp, decay], [warmup])


def train_model(
    model: nn.Module,
    train_tokens: np.ndarray,
    validation_tokens: np.ndarray,
    arguments: argparse.Namespace,
) -> TrainingHistory:
    """Train every weight of the model with rwkv_mlx's trainer.

    The training bytes are cut into windows of ``--seq-len`` + 1 bytes, and
    every window starts from the zero state. Validation during training uses
    ``--eval-batches`` batches of windows spread over the validation part.

    Returns:
        TrainingHistory: The (step, loss) pairs of training and validation.
    """
    window = arguments.seq_len + 1
    train_set = cut_windows(train_tokens, window)
    validation_set = cut_windows(validation_tokens, window, arguments.eval_batches * arguments.batch_size)
    if len(train_set) < arguments.batch_size:
        raise ValueError(
            f"the training part makes {len(train_set)} windows of {window} bytes, fewer than --batch-size "
            f"{arguments.batch_size}. Use a longer text, a shorter --seq-len or a smaller --batch-size"
        )

    schedule = learning_rate_schedule(arguments.lr, arguments.final_lr, arguments.warmup, arguments.steps)
    optimizer = optim.AdamW(learning_rate=schedule, betas=[0.9, 0.99], eps=1e-8, weight_decay=0.0, bias_correction=True)
    training_args = TrainingArgs(
        batch_size=arguments.batch_size,
        iters=arguments.steps,
        val_batches=-1,
        steps_per_report=arguments.eval_every,
        steps_per_eval=arguments.eval_every,
        max_seq_length=window,
        adapter_file=None,
        max_grad_norm=1.0,
        seed=arguments.seed,
    )
    return train(model, train_set, validation_set, training_args, optimizer=optimizer)


# ---------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------


def write_byte_tokenizer(directory: Path) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` for the byte-level
    vocabulary (token id = byte value), loadable by ``tokenizers``, transformers
    and mlx-lm, which then streams the text exactly as rwkv_mlx does."""
    ByteTokenizer().save_pretrained(directory)


def write_vocabulary(data: bytes, path: Path) -> int:
    """Write the lowercased words (runs of ASCII letters) of the text, sorted, one a line.

    Returns:
        int: The number of distinct words.
    """
    words = sorted(set(WORD_PATTERN.findall(data.decode("utf-8", errors="replace").lower())))
    path.write_text("\n".join(words) + "\n")
    return len(words)


def write_sample(data: bytes, path: Path, size: int) -> None:
    """Write about ``size`` bytes from the start of the text, cut at a line end."""
    excerpt = data[:size].decode("utf-8", errors="ignore")
    path.write_text(excerpt[: excerpt.rfind("\n") + 1] or excerpt)


def plot_losses(history: TrainingHistory, unigram: float, data_name: str, path: Path) -> None:
    """Draw the training and validation losses with the unigram baseline into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=100)
    axes.plot(*zip(*history.train), label="training (mean since the previous point)")
    axes.plot(*zip(*history.valid), marker="o", markersize=3, label="validation")
    axes.axhline(unigram, color="gray", linestyle="--", label=f"unigram byte distribution ({unigram:.2f})")
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy (nats per byte)")
    axes.set_title(f"Byte-level RWKV-7 on {data_name}")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_model_card(path: Path, facts: Dict) -> None:
    """Write MODEL_CARD.md from the facts of a finished run."""
    f = facts
    config = f["config"]
    text = f"""# rwkv_mlx default model

A small byte-level RWKV-7 language model that ships inside rwkv_mlx, so that
`python -m rwkv_mlx.generate` works offline without `--model`. It writes
Austen-like English and nothing more: load a real RWKV model for real use.

## Data
{f["source"]}.
{f["train_bytes"]:,} bytes for training and the last {f["validation_bytes"]:,} bytes
({f["validation_fraction"]:.0%}) for validation.

## Model
RWKV-7, {config["num_hidden_layers"]} layers, hidden size {config["hidden_size"]},
head size {config["head_dim"]} ({config["hidden_size"] // config["head_dim"]} heads),
channel-mix size {config["intermediate_size"]}, byte-level vocabulary of 256
(token id = byte value). {f["parameters"]:,} parameters, stored as float32
(`model.safetensors`, {f["weights_bytes"] / 1e6:.1f} MB).

## Training
Trained from scratch with rwkv_mlx's trainer by `examples/train_default_model.py`
(arguments: `{f["arguments"]}`): {f["steps"]:,} steps of {f["batch_size"]} windows
of {f["sequence_length"]} bytes ({f["tokens"]:,} bytes seen, {f["epochs"]:.1f} passes
over the training part), AdamW, learning rate {f["learning_rate"]:g} with warmup
and cosine decay to {f["final_learning_rate"]:g}, gradient norm clipped to 1.
Wall time {f["minutes"]:.0f} minutes on {f["machine"]}.

## Results
Cross-entropy on all the validation bytes, in nats per byte (bits per byte in brackets):

| model | loss |
|---|---|
| this model, after the last step | {f["validation_loss"]:.3f} ({f["validation_loss"] / math.log(2):.2f} bits) |
| unigram byte distribution of the training part | {f["unigram_loss"]:.3f} ({f["unigram_loss"] / math.log(2):.2f} bits) |

![loss curve](loss_curve.png)

## Files
- `config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`: the model
- `loss_curve.png`: the losses above, over the steps
- `vocabulary.txt`: the {f["vocabulary_words"]:,} lowercased words of the whole text
- `sample.txt`: the first 8 KB of the text

## Limits
The model is tiny and saw only this text: it continues prompts with
plausible words and phrases, not with facts or coherent answers.
"""
    path.write_text(text)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def parse_arguments(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the small byte-level RWKV-7 default model of rwkv_mlx.")
    parser.add_argument("--data", type=Path, help="plain-text file to train on (default: Jane Austen's novels)")
    parser.add_argument("--output", type=Path, required=True, help="model directory to write")
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps (default: 800)")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per step (default: 16)")
    parser.add_argument("--seq-len", type=int, default=256, help="bytes per window (default: 256)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: 2e-3)")
    parser.add_argument("--final-lr", type=float, default=1e-4, help="learning rate the cosine decay ends at, one step after the last (default: 1e-4)")
    parser.add_argument("--warmup", type=int, default=50, help="warmup steps (default: 50)")
    parser.add_argument("--layers", type=int, default=4, help="number of layers (default: 4)")
    parser.add_argument("--hidden-size", type=int, default=192, help="model width (default: 192)")
    parser.add_argument("--head-size", type=int, default=32, help="channels per head (default: 32)")
    parser.add_argument("--validation-fraction", type=float, default=0.05,
                        help="fraction of the text, taken from its end, held out for validation (default: 0.05)")
    parser.add_argument("--eval-every", type=int, default=50, help="steps between validation losses (default: 50)")
    parser.add_argument("--eval-batches", type=int, default=12,
                        help="validation batches per evaluation during training (default: 12)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for weights and batches (default: 0)")
    parser.add_argument("--no-plot", action="store_true", help="skip loss_curve.png (needs no matplotlib)")
    arguments = parser.parse_args(argv)

    if arguments.steps < 1:
        parser.error(f"--steps must be at least 1, got {arguments.steps}")
    if not 0 < arguments.validation_fraction < 1:
        parser.error(f"--validation-fraction must lie between 0 and 1, got {arguments.validation_fraction}")
    return arguments


def main(argv: Optional[List[str]] = None) -> TrainingHistory:
    """Train a model and write its directory, as the command-line arguments request.

    Returns:
        TrainingHistory: The losses of the run.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    arguments = parse_arguments(argv)
    if not arguments.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError as error:
            raise SystemExit("loss_curve.png needs matplotlib: pip install matplotlib, or pass --no-plot") from error

    data, source = load_text(arguments.data)
    train_tokens, validation_tokens = split_text(data, arguments.validation_fraction, arguments.seq_len)
    unigram = unigram_loss(train_tokens, validation_tokens)
    logger.info(
        "%d training bytes, %d validation bytes, unigram loss %.4f nats per byte",
        len(train_tokens), len(validation_tokens), unigram,
    )

    config = model_config(arguments.layers, arguments.hidden_size, arguments.head_size)
    model = build_initial_model(config, arguments.seed)
    logger.info("model: %d parameters", parameter_count(model))

    start = time.perf_counter()
    history = train_model(model, train_tokens, validation_tokens, arguments)
    minutes = (time.perf_counter() - start) / 60

    window = arguments.seq_len + 1
    validation_loss = evaluate(model, cut_windows(validation_tokens, window), arguments.batch_size, -1, window)
    logger.info("validation loss over the whole validation part: %.4f nats per byte", validation_loss)

    # Everything is written into a staging directory first, so an interrupted
    # run never leaves a half-written model directory behind.
    output = arguments.output
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output, prefix=".training-") as staging:
        staging = Path(staging)
        save_model(staging, model, config)
        write_byte_tokenizer(staging)
        vocabulary_words = write_vocabulary(data, staging / "vocabulary.txt")
        write_sample(data, staging / "sample.txt", 8000)
        if not arguments.no_plot:
            data_name = arguments.data.name if arguments.data else "Jane Austen's novels"
            plot_losses(history, unigram, data_name, staging / "loss_curve.png")

        trained_bytes = arguments.steps * arguments.batch_size * arguments.seq_len
        facts = dict(
            source=source,
            config=config,
            arguments=" ".join(argv) if argv is not None else " ".join(sys.argv[1:]) or "(defaults)",
            train_bytes=len(train_tokens),
            validation_bytes=len(validation_tokens),
            validation_fraction=arguments.validation_fraction,
            parameters=parameter_count(model),
            weights_bytes=(staging / "model.safetensors").stat().st_size,
            steps=arguments.steps,
            batch_size=arguments.batch_size,
            sequence_length=arguments.seq_len,
            learning_rate=arguments.lr,
            final_learning_rate=arguments.final_lr,
            tokens=trained_bytes,
            epochs=trained_bytes / len(train_tokens),
            minutes=minutes,
            machine=f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, MLX {mx.__version__} CPU backend",
            validation_loss=validation_loss,
            unigram_loss=unigram,
            vocabulary_words=vocabulary_words,
        )
        write_model_card(staging / "MODEL_CARD.md", facts)
        for item in staging.iterdir():
            os.replace(item, output / item.name)

    logger.info(
        "wrote %s: validation loss %.4f nats per byte (unigram %.4f), %.1f minutes",
        output, validation_loss, unigram, minutes,
    )
    return history


if __name__ == "__main__":
    main()
