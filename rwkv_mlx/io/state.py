"""State files: a model's recurrent state after some text, saved to disk.

A state file is a safetensors file. For each layer ``i`` of a model with
width C and a batch of B sequences it contains the three entries of the
layer's cache (see ``rwkv_mlx.models``):

| tensor                       | shape                          | dtype       |
|------------------------------|--------------------------------|-------------|
| layers.i.attn.token_shift    | [B, 1, C]                      | the model's |
| layers.i.attn.wkv_state      | [B, H, N, N] (RWKV-5, 6, 7 with H heads of size N); [B, 3, C] (RWKV-4) | float32 |
| layers.i.ffn.token_shift     | [B, 1, C]                      | the model's |

and this string metadata:

| key                | value                                                    |
|--------------------|----------------------------------------------------------|
| format             | ``rwkv_mlx.state``                                       |
| format_version     | ``1``                                                    |
| rwkv_version       | the RWKV version, e.g. ``7`` or ``5.2``                  |
| model_fingerprint  | ``model_fingerprint(model)``                             |
| tokenizer          | ``tokenizer_identity(...)``, or empty when unknown       |
| num_layers, hidden_size, head_dim, vocab_size | the model's shape (head_dim empty for RWKV-4) |
| batch_size         | B                                                        |
| tokens             | tokens processed into the state, or empty when unknown   |

Files are written to a temporary file in the target folder and renamed into
place, so an interrupted save leaves the previous file untouched.

NOTE: the file stores no logits, so continuing from a state needs at least
one new prompt token to compute the next token's distribution.
"""

import hashlib
import logging
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import ArraysCache

from .._files import write_atomically
from .errors import CheckpointError

logger = logging.getLogger(__name__)

STATE_FORMAT = "rwkv_mlx.state"
STATE_FORMAT_VERSION = "1"

# Cache entry index -> tensor name within ``layers.i.``.
CACHE_ENTRIES = ("attn.token_shift", "attn.wkv_state", "ffn.token_shift")

# Values sampled from each parameter for the fingerprint.
FINGERPRINT_SAMPLES = 16

BUILTIN_TOKENIZERS = ("world", "bytes")


def rwkv_version(model: nn.Module) -> str:
    """Return the RWKV version of a model: ``args.version`` where the model
    type has several (``"5.2"``), else the number in ``model_type`` (``"7"``).

    Args:
        model (nn.Module): The model.

    Returns:
        str: The version, such as ``"7"`` or ``"5.2"``.
    """
    args = getattr(model, "args", None)
    version = getattr(args, "version", None)
    if version:
        return str(version)
    model_type = getattr(model, "model_type", "") or getattr(args, "model_type", "")
    return model_type[len("rwkv") :] if model_type.startswith("rwkv") else model_type


def model_fingerprint(model: nn.Module) -> str:
    """Return a short hash that identifies a model's weights.

    The hash covers every parameter's name and shape and
    ``FINGERPRINT_SAMPLES`` evenly spaced values of each parameter, read as
    float32. Two loads of the same checkpoint agree; a model cast to another
    dtype or quantized differs, because its values differ.

    Args:
        model (nn.Module): The model.

    Returns:
        str: 32 hexadecimal digits.
    """
    digest = hashlib.sha256()
    samples = []
    for name, value in sorted(tree_flatten(model.parameters()), key=lambda item: item[0]):
        digest.update(f"{name}:{tuple(value.shape)};".encode())
        flat = value.reshape(-1)
        count = min(FINGERPRINT_SAMPLES, flat.size)
        positions = mx.array((np.arange(count) * flat.size) // count, dtype=mx.int32)
        samples.append(flat[positions].astype(mx.float32))
    values = np.array(mx.concatenate(samples)) if samples else np.zeros(0, dtype=np.float32)
    digest.update(values.tobytes())
    return digest.hexdigest()[:32]


def tokenizer_identity(name_or_path: Optional[str]) -> str:
    """Return a string that identifies a tokenizer across machines.

    Args:
        name_or_path (str, optional): ``"world"``, ``"bytes"``, a
            tokenizer.json file, or a folder that contains one.

    Returns:
        str: The built-in name, ``sha256:<16 hex digits>`` of the
        tokenizer.json contents, or ``""`` when unknown.
    """
    if not name_or_path:
        return ""
    if name_or_path in BUILTIN_TOKENIZERS:
        return name_or_path
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        return str(name_or_path)
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def model_shape(model: nn.Module) -> Dict[str, str]:
    """Return the sizes a state depends on: layers, width, head size and vocabulary.

    Args:
        model (nn.Module): The model.

    Returns:
        dict[str, str]: ``num_layers``, ``hidden_size``, ``head_dim`` (empty
        for RWKV-4) and ``vocab_size``, as the strings a state file records.
    """
    args = model.args
    head_dim = getattr(args, "head_dim", None)
    return {
        "num_layers": str(len(model.layers)),
        "hidden_size": str(args.hidden_size),
        "head_dim": "" if head_dim is None else str(head_dim),
        "vocab_size": str(args.vocab_size),
    }


def save_state(
    path,
    cache: List[ArraysCache],
    model: nn.Module,
    tokenizer: Optional[str] = None,
    tokens: Optional[int] = None,
) -> None:
    """Write a model's cache to a state file, atomically.

    Args:
        path (str | Path): The file to write; replaced if it exists.
        cache (list[ArraysCache]): One cache per layer, as from
            ``model.make_cache()``, after processing some tokens.
        model (nn.Module): The model the cache belongs to.
        tokenizer (str, optional): ``tokenizer_identity`` of the tokenizer.
        tokens (int, optional): How many tokens the state has processed.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; name a state file, such as {path / 'state.safetensors'}")
    if len(cache) != len(model.layers):
        raise ValueError(
            f"the cache has {len(cache)} layers but the model has {len(model.layers)}; "
            "pass the model whose make_cache() made the cache"
        )
    if any(entry is None for layer in cache for entry in layer.cache):
        raise ValueError(f"cannot save an empty state to {path}: process at least one token first")
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0):
        raise ValueError(f"tokens must be a count of 0 or more, got {tokens!r}")
    try:
        check_state_shapes(cache, model, "the cache")
    except CheckpointError as error:
        raise ValueError(f"{error}; pass the model whose make_cache() made the cache") from error

    arrays = {}
    for i, layer in enumerate(cache):
        for name, value in zip(CACHE_ENTRIES, layer.cache):
            arrays[f"layers.{i}.{name}"] = value
    batch_size = cache[0][0].shape[0]
    metadata = {
        "format": STATE_FORMAT,
        "format_version": STATE_FORMAT_VERSION,
        "rwkv_version": rwkv_version(model),
        "model_fingerprint": model_fingerprint(model),
        "tokenizer": tokenizer or "",
        "batch_size": str(batch_size),
        "tokens": "" if tokens is None else str(tokens),
        **model_shape(model),
    }
    mx.eval(arrays)

    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise FileNotFoundError(f"cannot save the state to {path}: folder {directory} does not exist")
    write_atomically(path, lambda f: mx.save_safetensors(f, arrays, metadata=metadata))
    logger.info("saved the state to %s", path)


def read_state(path) -> Tuple[Dict[str, mx.array], Dict[str, str]]:
    """Read a state file's tensors and metadata, checking that it is one.

    Args:
        path (str | Path): The state file.

    Returns:
        tuple[dict[str, mx.array], dict[str, str]]: Tensors and metadata.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: state file not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: a folder, not a state file; name the file, such as {path / 'state.safetensors'}")
    try:
        arrays, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
    except (RuntimeError, ValueError, OSError) as error:
        raise CheckpointError(
            f"{path}: not a readable state file ({error}); it may be truncated or in another format. "
            "Save the state again with generate --save-state"
        ) from error

    found = metadata.get("format")
    if found != STATE_FORMAT and metadata.get("fine_tune_type") == "state":
        raise CheckpointError(
            f"{path}: a file of a state-tuning run, not a state file; its tuned state is {path.parent / 'state.safetensors'}"
        )
    if found != STATE_FORMAT and "fine_tune_type" in metadata:
        raise CheckpointError(
            f"{path}: a file of a {metadata['fine_tune_type']} training run, not a state file; load the adapters "
            f"with --adapter-path {path.parent}"
        )
    if found != STATE_FORMAT:
        raise CheckpointError(
            f"{path}: not an rwkv_mlx state file (metadata 'format' is {found!r}, expected {STATE_FORMAT!r}). "
            "An mlx-lm prompt cache continues in Python, through load_prompt_cache and prompt_cache= "
            "(docs/mlx_lm.md)"
        )
    version = metadata.get("format_version")
    if version != STATE_FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: state file format version {version!r} is not supported; expected {STATE_FORMAT_VERSION!r}"
        )
    return arrays, metadata


def load_state(
    path,
    model: nn.Module,
    tokenizer: Optional[str] = None,
) -> Tuple[List[ArraysCache], Dict[str, str]]:
    """Read a state file into a cache for ``model``.

    Args:
        path (str | Path): The state file.
        model (nn.Module): The model that will continue from the state; it
            must be the model that saved it.
        tokenizer (str, optional): ``tokenizer_identity`` of the tokenizer in
            use; rejected if the file names a different one.

    Returns:
        tuple[list[ArraysCache], dict[str, str]]: One cache per layer, and
        the file's metadata.
    """
    path = Path(path)
    arrays, metadata = read_state(path)

    version = rwkv_version(model)
    if metadata.get("rwkv_version") != version:
        raise CheckpointError(
            f"{path}: the state is from an RWKV-{metadata.get('rwkv_version')} model, "
            f"but the model is RWKV-{version}"
        )
    shape = model_shape(model)
    differences = [
        f"{key} {metadata.get(key)} in the state and {value} in this model"
        for key, value in shape.items()
        if metadata.get(key) != value
    ]
    if differences:
        raise CheckpointError(
            f"{path}: the state was saved from a model of another shape ({', '.join(differences)}); "
            "load it with the model that saved it"
        )
    fingerprint = model_fingerprint(model)
    if metadata.get("model_fingerprint") != fingerprint:
        raise CheckpointError(
            f"{path}: the state was saved from a different model. Its fingerprint is "
            f"{metadata.get('model_fingerprint')} and this model's is {fingerprint}, so the weights differ: "
            "another checkpoint, another dtype or quantization, or other adapters."
            f"{_dtype_difference(arrays, model)} Load the state with the model that saved it, in the same dtype "
            "and quantization and with the same --adapter-path"
        )
    saved_tokenizer = metadata.get("tokenizer", "")
    if tokenizer and saved_tokenizer and saved_tokenizer != tokenizer:
        raise CheckpointError(
            f"{path}: the state was saved with tokenizer {saved_tokenizer!r}, but the tokenizer in use is "
            f"{tokenizer!r}; pass the tokenizer the state was saved with"
        )

    cache = model.make_cache()
    for i, layer in enumerate(cache):
        for index, name in enumerate(CACHE_ENTRIES):
            key = f"layers.{i}.{name}"
            if key not in arrays:
                raise CheckpointError(f"{path}: missing tensor '{key}'")
            layer[index] = arrays[key]
    check_state_shapes(cache, model, str(path))
    return cache, metadata


def _probe_cache(model: nn.Module) -> List[ArraysCache]:
    """Return a fresh cache after one token, whose entries have the shapes and
    dtypes the model gives them (for a batch of 1), for every RWKV version."""
    probe = model.make_cache()
    model(mx.zeros((1, 1), dtype=mx.int32), cache=probe)
    return probe


def _dtype_difference(arrays: Dict[str, mx.array], model: nn.Module) -> str:
    """Return a sentence naming the state's and the model's activation dtypes
    when they differ, else an empty string."""
    saved = arrays.get(f"layers.0.{CACHE_ENTRIES[0]}")
    if saved is None:
        return ""
    expected = _probe_cache(model)[0][0].dtype
    if saved.dtype == expected:
        return ""
    saved_name, expected_name = (str(dtype).rsplit(".", 1)[-1] for dtype in (saved.dtype, expected))
    return f" The state was saved from a model that computes in {saved_name}, and this one computes in {expected_name}."


def check_state_shapes(cache: List[ArraysCache], model: nn.Module, source: str) -> None:
    """Raise CheckpointError unless every cache entry has the shape and dtype
    the model gives it, for the batch size of the state.

    The expected shapes come from feeding one token to a fresh cache, so the
    check holds for every RWKV version.
    """
    probe = _probe_cache(model)
    batch_size = cache[0][0].shape[0]
    for i, (layer, expected) in enumerate(zip(cache, probe)):
        for name, value, want in zip(CACHE_ENTRIES, layer.cache, expected.cache):
            shape = (batch_size, *want.shape[1:])
            if tuple(value.shape) != shape:
                raise CheckpointError(
                    f"{source}: tensor 'layers.{i}.{name}' has shape {tuple(value.shape)}, expected {shape}"
                )
            if value.dtype != want.dtype:
                raise CheckpointError(
                    f"{source}: tensor 'layers.{i}.{name}' has dtype {value.dtype}, expected {want.dtype}"
                )
