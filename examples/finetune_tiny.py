"""Fine-tune a tiny byte-level RWKV-7 model on English text and measure the held-out loss.

The text is the King James Version of the Bible (public domain), printed by
the ``bible`` program of Debian's packages ``bible-kjv`` and
``bible-kjv-text``::

    apt-get install bible-kjv
    bible -l0 "Genesis 1:1-Revelation 22:21" > kjv.txt

The script makes one record per verse, without the verse numbers, and holds
out every twentieth chapter: half of them for validation, half for test. Then,
for LoRA and for state tuning, it trains the model with ``rwkv_mlx.tuner``
and reports the test loss before and after. Verses longer than
``--max-seq-length`` bytes are trained in chunks with the state carried
between them. The data folder it writes also works with
``python -m rwkv_mlx.lora --data``.

Usage::

    python examples/finetune_tiny.py --model tiny-rwkv-7v0-834K-FP32.bin --text kjv.txt --iters 300
"""

import argparse
import json
import math
import re
import time
from pathlib import Path
from typing import Dict, List

import rwkv_mlx  # noqa: F401  (before mlx: it loads an optimized BLAS on Linux)

import mlx.core as mx

from rwkv_mlx.loading import load_model
from rwkv_mlx.tokenizer import load_tokenizer
from rwkv_mlx.tuner import FINE_TUNE_TYPES, TrainingArgs, evaluate, load_jsonl_dataset, prepare_for_training, train
from rwkv_mlx.tuner.adapters import run_files

CHAPTER_HEADING = re.compile(r"^\S.* \d+$")
VERSE = re.compile(r"^\s*\d+\s+(.*\S)\s*$")


def chapters_of(text: str) -> List[List[str]]:
    """Split the ``bible`` program's output into chapters of verse texts."""
    chapters: List[List[str]] = []
    for line in text.splitlines():
        if CHAPTER_HEADING.match(line):
            chapters.append([])
        elif (verse := VERSE.match(line)) and chapters:
            chapters[-1].append(verse.group(1))
    return [c for c in chapters if c]


def records_of(chapter: List[str], record_bytes: int) -> List[Dict[str, str]]:
    """Join consecutive verses into records of at most about ``record_bytes``
    bytes; 0 makes one record per verse."""
    if record_bytes <= 0:
        return [{"text": verse} for verse in chapter]
    records, current = [], ""
    for verse in chapter:
        if current and len(current) + 1 + len(verse) > record_bytes:
            records.append({"text": current})
            current = ""
        current = f"{current} {verse}" if current else verse
    if current:
        records.append({"text": current})
    return records


def write_data(text_file: Path, folder: Path, record_bytes: int) -> Dict[str, int]:
    """Write train/valid/test.jsonl; returns the record count of each."""
    chapters = chapters_of(text_file.read_text())
    if not chapters:
        raise SystemExit(f"{text_file}: no chapters found; make it with: bible -l0 \"Genesis 1:1-Revelation 22:21\"")
    if len(chapters) < 31:
        raise SystemExit(
            f"{text_file}: {len(chapters)} chapters found, but the test split needs at least 31 "
            "(chapters 11 and 31 of every 40 are held out); use a longer text"
        )
    splits: Dict[str, list] = {"train": [], "valid": [], "test": []}
    for index, chapter in enumerate(chapters):
        split = "train"
        if index % 40 == 10:
            split = "valid"
        elif index % 40 == 30:
            split = "test"
        splits[split].extend(records_of(chapter, record_bytes))

    folder.mkdir(parents=True, exist_ok=True)
    for split, records in splits.items():
        with open(folder / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in records)
    return {split: len(records) for split, records in splits.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="The tiny byte-level RWKV-7 model (any format rwkv_mlx loads).")
    parser.add_argument("--text", required=True, type=Path, help="The output of the bible program (see above).")
    parser.add_argument("--output", type=Path, default=Path("finetune_tiny"), help="Folder for the data and adapters.")
    parser.add_argument("--iters", type=int, default=300, help="Training iterations per mode.")
    parser.add_argument("--batch-size", type=int, default=8, help="Records per batch.")
    parser.add_argument("--max-seq-length", type=int, default=128, help="Tokens per training chunk.")
    parser.add_argument("--record-bytes", type=int, default=0, help="Maximum bytes per record; 0 for one verse per record.")
    parser.add_argument("--val-batches", type=int, default=12, help="Validation batches per evaluation.")
    parser.add_argument("--lora-learning-rate", type=float, default=3e-4, help="Adam learning rate for LoRA.")
    parser.add_argument("--state-learning-rate", type=float, default=3e-2, help="Adam learning rate for state tuning.")
    parser.add_argument("--modes", default="lora,state", help="Comma-separated fine-tune types to run.")
    options = parser.parse_args()
    modes = options.modes.split(",")
    unknown = [mode for mode in modes if mode not in FINE_TUNE_TYPES]
    if unknown:
        parser.error(f"--modes: unknown fine-tune type {unknown[0]!r}; expected some of {', '.join(FINE_TUNE_TYPES)}")
    if not options.text.is_file():
        parser.error(f"--text {options.text}: file not found")
    used = [mode for mode in modes if run_files(options.output / f"adapters-{mode}")]
    if used:
        parser.error(f"--output {options.output} already contains adapters-{used[0]} from an earlier run; choose another --output")

    data_folder = options.output / "data"
    counts = write_data(options.text, data_folder, options.record_bytes)
    tokenizer = load_tokenizer("bytes")
    data = {split: load_jsonl_dataset(data_folder / f"{split}.jsonl", tokenizer) for split in counts}
    print(f"records: {counts}; test tokens: {sum(len(e) for e in data['test'])}")

    base, _, _ = load_model(options.model)
    base_loss = evaluate(base, data["test"], options.batch_size, max_seq_length=options.max_seq_length)
    print(f"base model: test loss {base_loss:.4f} nats/byte, perplexity {math.exp(base_loss):.3f}")

    rows = []
    for mode in modes:
        mx.random.seed(0)
        model = prepare_for_training(load_model(options.model)[0], mode)
        learning_rate = options.lora_learning_rate if mode in ("lora", "dora") else options.state_learning_rate
        args = TrainingArgs(
            batch_size=options.batch_size,
            iters=options.iters,
            val_batches=options.val_batches,
            steps_per_report=25,
            steps_per_eval=max(options.iters // 2, 1),
            steps_per_save=options.iters,
            max_seq_length=options.max_seq_length,
            learning_rate=learning_rate,
            adapter_file=str(options.output / f"adapters-{mode}" / "adapters.safetensors"),
        )
        tic = time.perf_counter()
        history = train(model, data["train"], data["valid"], args, metadata={"fine_tune_type": mode})
        seconds = time.perf_counter() - tic
        print(f"{mode}: validation losses {[(it, round(loss, 4)) for it, loss in history.valid]}")
        loss = evaluate(model, data["test"], options.batch_size, max_seq_length=options.max_seq_length)
        rows.append((mode, learning_rate, seconds, loss))
        print(f"{mode}: test loss {base_loss:.4f} -> {loss:.4f} (drop {base_loss - loss:.4f}) in {seconds:.0f} s")

    print("\n| fine-tune type | learning rate | iterations | time (s) | test loss before | test loss after | drop |")
    print("|---|---|---|---|---|---|---|")
    for mode, learning_rate, seconds, loss in rows:
        print(
            f"| {mode} | {learning_rate:g} | {options.iters} | {seconds:.0f} | {base_loss:.4f} | {loss:.4f} | "
            f"{base_loss - loss:.4f} |"
        )


if __name__ == "__main__":
    main()
