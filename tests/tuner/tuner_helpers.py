"""Shared pieces of the tuner tests: a byte-level tokenizer with a chat
template, tiny models of every RWKV version, data folders and batches."""

import json
from pathlib import Path
from typing import Dict, List, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from random_models import OLDER_MODULES, TINY_CONFIG, random_model, random_older_model, two_layer_older_config
from rwkv_mlx.tuner import DEFAULT_LORA_KEYS, TrainingArgs, train
from rwkv_mlx.tuner.datasets import make_example
from rwkv_mlx.tuner.trainer import batch_loss_and_grad, collate, sequence_loss

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


OLDER_VERSIONS = list(OLDER_MODULES)


def older_config(version: str) -> dict:
    """The config.json of a tiny RWKV-4, 5.x or 6 model: byte vocabulary,
    width 64 (one quantization group), two layers of two heads."""
    config = two_layer_older_config(version, vocab_size=256, hidden_size=64, intermediate_size=128, head_dim=32)
    return dict(config, version=version)


def older_model(version: str, seed: int = 0, dtype=mx.float32):
    """Build a tiny RWKV-4, 5.x or 6 model (``older_config``) with random
    weights in trained-like ranges, cast to ``dtype``."""
    return random_older_model(version, older_config(version), seed, dtype=dtype)


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


LORA_PARAMETERS = {"rank": 4, "scale": 10.0, "dropout": 0.0}


def train_steps(model, folder, iters, fine_tune_type, examples, learning_rate=1e-2, fingerprint="", valid=None, **extra):
    """Train ``iters`` steps on ``examples`` into an adapter folder with its
    config, validating on ``valid`` at the start and the end; returns the history."""
    adapter_config = {
        "fine_tune_type": fine_tune_type,
        "num_layers": -1,
        "lora_parameters": {**LORA_PARAMETERS, "keys": list(DEFAULT_LORA_KEYS)},
        "base_model_fingerprint": fingerprint,
    }
    args = TrainingArgs(
        batch_size=2,
        iters=iters,
        steps_per_save=iters,
        steps_per_eval=iters,
        steps_per_report=1,
        learning_rate=learning_rate,
        adapter_file=str(folder / "adapters.safetensors"),
        **extra,
    )
    metadata = {"fine_tune_type": fine_tune_type, "base_model_fingerprint": fingerprint}
    return train(model, examples, valid, args, metadata=metadata, adapter_config=adapter_config)


def base_name(name: str) -> str:
    """The base model's name of a parameter of a LoRA or DoRA model."""
    return name.replace(".linear.", ".")


def assert_only_adapters_changed(before: Dict[str, np.ndarray], after: Dict[str, np.ndarray]) -> None:
    """Check that every weight of ``after`` but the LoRA matrices equals its
    base weight in ``before`` (both from ``all_weights``)."""
    for name, value in after.items():
        if not name.endswith(("lora_a", "lora_b")):
            assert np.array_equal(value, before[base_name(name)]), name


def plain_and_checkpointed(model, batch, max_seq_length: int) -> tuple:
    """Return ``batch_loss_and_grad`` of ``batch`` without and with gradient
    checkpointing, in chunks of ``max_seq_length``."""
    value_and_grad = nn.value_and_grad(model, sequence_loss)
    plain = batch_loss_and_grad(model, batch, TrainingArgs(max_seq_length=max_seq_length), value_and_grad)
    checkpointed = batch_loss_and_grad(
        model, batch, TrainingArgs(max_seq_length=max_seq_length, grad_checkpoint=True), value_and_grad
    )
    return plain, checkpointed


def assert_metal_gradients_match(model, monkeypatch) -> None:
    """Check that the loss and gradient of a prepared model are the same
    through the Metal WKV kernels as through the pure-MLX forms.

    The kernels run on a Metal GPU where there is one, else in the CPU
    emulator. The batch is longer than ``max_seq_length``, so the state is
    carried across chunks. Skips when neither is available.
    """
    import metal_harness
    from rwkv_mlx.ops import metal

    reason = metal_harness.unavailable_reason()
    if reason is not None and not mx.metal.is_available():
        pytest.skip(str(reason))
    randomize_trainable(model, scale=0.05, seed=4)
    batch = random_batch(batch_size=2, length=40, seed=9, prompt=3)
    args = TrainingArgs(max_seq_length=24)
    value_and_grad = nn.value_and_grad(model, sequence_loss)
    with mx.stream(mx.cpu):
        expected = batch_loss_and_grad(model, batch, args, value_and_grad)

    if mx.metal.is_available():
        with mx.stream(mx.gpu):
            found = batch_loss_and_grad(model, batch, args, value_and_grad)
    else:
        monkeypatch.setattr(metal, "metal_available", lambda: True)
        with metal.use_launcher(metal_harness.launcher()):
            found = batch_loss_and_grad(model, batch, args, value_and_grad)

    assert abs(found[0] - expected[0]) <= 1e-5 * abs(expected[0])
    for (name, a), (_, b) in zip(tree_flatten(expected[2]), tree_flatten(found[2])):
        assert mx.abs(a - b).max().item() <= 1e-4 * (1 + mx.abs(a).max().item()), name


def quantize_for_test(model, bits: int):
    """Quantize a model with its own ``quant_predicate``, in groups of 32
    (the tiny models' widths), and return it."""
    predicate = model.quant_predicate

    def class_predicate(path, module):
        if not hasattr(module, "to_quantized"):
            return False
        choice = predicate(path, module)
        if choice is True:
            return {"group_size": 32, "bits": bits}
        return choice

    nn.quantize(model, class_predicate=class_predicate)
    mx.eval(model.parameters())
    return model
