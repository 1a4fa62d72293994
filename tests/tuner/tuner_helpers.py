"""Shared pieces of the tuner tests: a byte-level tokenizer with a chat
template, tiny models, data folders and batches."""

import json
from pathlib import Path
from typing import Dict, List, Sequence

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map

from random_models import TINY_CONFIG, random_model
from rwkv_mlx.tuner.datasets import make_example
from rwkv_mlx.tuner.trainer import collate

ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


class ByteTokenizer:
    """Token id = byte value, end of text = 0, and RWKV's plain chat format
    ``User: ...\\n\\nAssistant: ...\\n\\n``."""

    eos_token_id = 0

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt: bool = False):
        text = "".join(f"{ROLE_NAMES[m['role']]}: {m['content']}\n\n" for m in messages)
        if add_generation_prompt:
            text += "Assistant:"
        return self.encode(text)


def write_jsonl(path: Path, records: Sequence) -> Path:
    """Write records (dicts, or raw strings written as they are) one per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def pattern_texts(count: int, seed: int = 0) -> List[Dict[str, str]]:
    """Short texts with a repeating pattern that a tiny model learns in a few steps."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta"]
    return [{"text": " ".join(words[(i + j) % 4] for j in range(int(rng.integers(6, 14))))} for i in range(count)]


def tiny_model(seed: int = 0, dtype=mx.float32, config=None):
    return random_model(config or TINY_CONFIG, seed=seed, dtype=dtype)


def random_batch(batch_size: int, length: int, seed: int = 0, prompt: int = 0):
    """A batch of random token sequences of different lengths; the first
    ``prompt`` tokens of each do not count in the loss."""
    rng = np.random.default_rng(seed)
    examples = []
    for row in range(batch_size):
        n = length - 3 * row
        mask = np.ones(n, dtype=bool)
        mask[:prompt] = False
        examples.append(make_example(rng.integers(1, 256, n), mask))
    return collate(examples)


def cast_trainable(model, dtype):
    """Cast the trainable parameters to ``dtype``."""
    model.update(tree_map(lambda p: p.astype(dtype), model.trainable_parameters()))


def randomize_trainable(model, scale: float, seed: int):
    """Give every trainable parameter small random values (for example LoRA's
    zero ``lora_b``), so that every gradient path is exercised."""
    rng = np.random.default_rng(seed)
    values = {
        name: value + mx.array(scale * rng.standard_normal(value.shape), dtype=value.dtype)
        for name, value in tree_flatten(model.trainable_parameters())
    }
    model.load_weights(list(values.items()), strict=False)


def all_weights(model) -> Dict[str, np.ndarray]:
    """Every parameter of the model as a NumPy copy, by name."""
    return {name: np.array(value) for name, value in tree_flatten(model.parameters())}
