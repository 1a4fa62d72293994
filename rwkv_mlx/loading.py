"""Find, read and build models: ``load``, ``load_model`` and ``save_model``.

A model source is a local directory, a local checkpoint file, or a Hugging
Face repo id (``owner/name``, or ``owner/name/file.pth`` for one file of a
repository that contains several). The file format is detected from the file's
first bytes, never from its name alone.
"""

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .io.errors import CheckpointError
from .io.state import STATE_FORMAT
from .models import rwkv4, rwkv5, rwkv6, rwkv7

logger = logging.getLogger(__name__)

# Magic bytes at the start of each checkpoint format.
ZIP_MAGIC = b"PK\x03\x04"  # PyTorch's zip checkpoint (.pth)
RWKV_CPP_MAGIC = b"fmgg"  # rwkv.cpp: uint32 0x67676d66 ("ggmf"), little-endian
GGUF_MAGIC = b"GGUF"

# NOTE: "*.bin" is left out, so a hub repo whose weights exist only as
# pytorch_model*.bin downloads without them, although rwkv_mlx.io.hf_older
# reads such a directory once it is local.
MODEL_FILE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"]

# The model module for each config ``model_type``.
MODEL_MODULES = {"rwkv7": rwkv7, "rwkv6": rwkv6, "rwkv5": rwkv5, "rwkv4": rwkv4}
# RWKV versions as ``rwkv_mlx.io.pth.detect_version`` names them.
SUPPORTED_VERSIONS = ("4", "5", "5.1", "5.2", "6", "7")
# The folder of the GPT-NeoX-20B tokenizer (tokenizer.json and
# tokenizer_config.json) of RWKV-4 Pile models, chosen by its vocabulary size.
GPT_NEOX_TOKENIZER = Path(__file__).resolve().parent / "data" / "gpt_neox_20b"
GPT_NEOX_VOCAB_SIZE = 50277


def detect_format(path: Path) -> str:
    """Tell the checkpoint format of a path.

    Args:
        path (Path): A file or a model directory.

    Returns:
        str: One of ``"directory"``, ``"pth"``, ``"rwkv_cpp"``, ``"gguf"`` or ``"safetensors"``.
    """
    if path.is_dir():
        return "directory"
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")

    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(ZIP_MAGIC):
        return "pth"
    if head.startswith(RWKV_CPP_MAGIC):
        return "rwkv_cpp"
    if head.startswith(GGUF_MAGIC):
        return "gguf"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    raise CheckpointError(
        f"{path}: unknown checkpoint format (first bytes {head[:8]!r}); expected a PyTorch .pth, "
        "an rwkv.cpp .bin, a GGUF file, or a model directory with config.json"
    )


def resolve_source(source: str) -> Path:
    """Return a local path for a model source, downloading a hub repo if needed.

    Args:
        source (str): A local path, a Hugging Face repo id, or ``owner/name/file``.

    Returns:
        Path: The local file or directory.
    """
    path = Path(source).expanduser()
    if path.exists():
        return path

    parts = source.split("/")
    if source.startswith((".", "/", "~")) or len(parts) < 2 or not all(parts):
        raise CheckpointError(f"{source}: no such file or directory, and not a Hugging Face repo id (owner/name)")

    from huggingface_hub import hf_hub_download, snapshot_download

    repo_id = "/".join(parts[:2])
    try:
        if len(parts) > 2:
            return Path(hf_hub_download(repo_id, "/".join(parts[2:])))
        return Path(snapshot_download(repo_id, allow_patterns=MODEL_FILE_PATTERNS))
    except Exception as error:  # huggingface_hub raises many unrelated types
        raise CheckpointError(
            f"{source}: not found locally, and downloading it from the Hugging Face hub failed: {error}"
        ) from error


def read_weights(path: Path) -> Tuple[Dict[str, mx.array], Dict[str, Any]]:
    """Read a checkpoint into canonical weights and a config, for any supported RWKV version.

    Args:
        path (Path): A file or directory (see ``detect_format``).

    Returns:
        tuple[dict[str, mx.array], dict]: The weights in the canonical layout
        and the model config (``ModelArgs`` fields).
    """
    from .io import hf, hf_older, layout7, layout_older

    fmt = detect_format(path)
    if fmt == "directory" and (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise CheckpointError(
            f"{path}: an adapter folder, not a model; load it onto its base model (generate and fuse take it as "
            "--adapter-path, and lora resumes from its adapters.safetensors with --resume-adapter-file)"
        )
    if fmt == "directory":
        # Hugging Face RWKV-4/5/6 layouts and official tensor names (see rwkv_mlx.io.hf_older).
        if hf_older.is_hf_older_directory(path):
            return hf_older.load_hf_older_directory(path)
        older = layout_older.read_directory(path)
        return older if older is not None else hf.load_hf_directory(path)

    if fmt == "pth":
        from .io import pth

        official = pth.load_pth(path)
        version = pth.detect_version(official)
        check_supported_version(version, path)
        if version != "7":
            return layout_older.read_official(official, version, str(path))
        weights = layout7.official_to_canonical(official, str(path))
    elif fmt == "rwkv_cpp":
        from .io import rwkv_cpp

        official, info = rwkv_cpp.load_rwkv_cpp(path)
        check_supported_version(info["version"], path)
        if info["version"] != "7":
            return layout_older.read_rwkv_cpp(official, str(path))
        weights = layout7.official_to_canonical(official, str(path))
    elif fmt == "gguf":
        from .io import gguf, gguf_older

        # RWKV-6 files, and the error for architectures no reader takes (see rwkv_mlx.io.gguf_older).
        older = gguf_older.read_gguf_older(path)
        if older is not None:
            return older
        weights, config = gguf.read_gguf(path)
        return weights, config
    else:
        try:
            loaded, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
        except (RuntimeError, ValueError, OSError) as error:
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({error}); it may be truncated, so download or convert it again"
            ) from error
        check_not_state_or_adapter(metadata, path)
        weights = rwkv7.sanitize(dict(loaded), str(path))

    return weights, hf.infer_rwkv7_config(weights)


def check_not_state_or_adapter(metadata: Dict[str, str], path: Path) -> None:
    """Raise CheckpointError when a safetensors file given as a model is an
    rwkv_mlx state file or adapter weights, naming where it belongs."""
    if metadata.get("format") == STATE_FORMAT:
        raise CheckpointError(
            f"{path}: an rwkv_mlx state file, not a model; pass it with --load-state (load_state in Python), "
            "together with the model that saved it"
        )
    if "fine_tune_type" in metadata:
        raise CheckpointError(
            f"{path}: a file of a training run (adapter weights or optimizer state), not a model; pass the run's "
            "folder with --adapter-path, together with the base model"
        )


def check_supported_version(version: str, path: Path) -> None:
    """Raise CheckpointError for an RWKV version this package cannot run yet."""
    if str(version) not in SUPPORTED_VERSIONS:
        raise CheckpointError(
            f"{path}: this is an RWKV-{version} checkpoint; RWKV-{version} is not supported, "
            f"only versions {', '.join(SUPPORTED_VERSIONS)}"
        )


def build_model(weights: Dict[str, mx.array], config: Dict[str, Any], source: str = "weights") -> nn.Module:
    """Build a model from canonical weights and a config, checking every tensor.

    Args:
        weights (dict[str, mx.array]): Canonical weights.
        config (dict): ``ModelArgs`` fields, plus ``quantization`` if quantized.
        source (str): Where the weights came from, for error messages.

    Returns:
        nn.Module: The model, with its weights loaded and evaluated.
    """
    model_type = config.get("model_type", "rwkv7")
    if model_type not in MODEL_MODULES:
        raise CheckpointError(f"{source}: model_type '{model_type}' is not one of {', '.join(MODEL_MODULES)}")
    module = MODEL_MODULES[model_type]
    args = module.ModelArgs.from_dict({**config, "model_type": model_type})
    model = module.Model(args)

    quantization = config.get("quantization")
    if quantization:
        quantize_like_weights(model, quantization, weights)

    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: missing tensor '{missing[0]}' ({len(missing)} missing in all)")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor '{unexpected[0]}' ({len(unexpected)} unexpected in all)")
    for name, value in weights.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{source}: tensor '{name}' has shape {tuple(value.shape)}, expected {tuple(expected[name].shape)}"
            )

    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    model.eval()
    return model


def quantize_like_weights(model: nn.Module, quantization: Dict[str, Any], weights: Dict[str, mx.array]) -> None:
    """Quantize the layers that have ``.scales`` in ``weights``, as mlx-lm records them.

    ``quantization`` contains the default ``group_size`` and ``bits`` and, keyed by
    layer path, the settings of layers quantized differently.
    """

    def predicate(path: str, module: nn.Module):
        if f"{path}.scales" not in weights or not hasattr(module, "to_quantized"):
            return False
        per_layer = quantization.get(path)
        return per_layer if isinstance(per_layer, dict) else True

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )


# The types that floating-point weights can be cast to when loading.
WEIGHT_DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def weight_dtype(dtype: Union[mx.Dtype, str]) -> mx.Dtype:
    """Return the MLX type of ``dtype``, given as a type or its name.

    Raises:
        ValueError: If it is not float16, bfloat16 or float32.
    """
    if isinstance(dtype, str) and dtype in WEIGHT_DTYPES:
        return WEIGHT_DTYPES[dtype]
    if dtype in WEIGHT_DTYPES.values():
        return dtype
    raise ValueError(f"dtype must be one of {', '.join(WEIGHT_DTYPES)} (a name or mx type), got {dtype!r}")


def load_model(source: str, dtype: Optional[Union[mx.Dtype, str]] = None) -> Tuple[nn.Module, Dict[str, Any], Path]:
    """Load a model without its tokenizer.

    Args:
        source (str): A directory, a checkpoint file or a Hugging Face repo id.
        dtype (mx.Dtype | str, optional): Cast floating-point weights to this
            type: float16, bfloat16 or float32, as an MLX type or its name.

    Returns:
        tuple[nn.Module, dict, Path]: The model, its config and the local path.
    """
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"the model source must be a path or a Hugging Face repo id, got {source!r}")
    if dtype is not None:
        dtype = weight_dtype(dtype)
    path = resolve_source(str(source))
    weights, config = read_weights(path)
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    model = build_model(weights, config, str(path))
    return model, config, path


def default_tokenizer_name(path: Path, config: Dict[str, Any]) -> str:
    """Choose the tokenizer for a model: its own files, else by vocabulary size."""
    directory = path if path.is_dir() else path.parent
    if path.is_dir() and (directory / "tokenizer.json").exists():
        return str(directory)
    vocab_size = config["vocab_size"]
    if vocab_size == 256:
        return "bytes"
    if vocab_size == 65536:
        return "world"
    if vocab_size == GPT_NEOX_VOCAB_SIZE:
        return str(GPT_NEOX_TOKENIZER)
    raise CheckpointError(
        f"{path}: no tokenizer.json beside the model and no built-in tokenizer for a vocabulary of "
        f"{vocab_size}; pass one with tokenizer= (\"world\", \"bytes\" or a tokenizer.json path)"
    )


def check_tokenizer_size(tokenizer, tokenizer_name: str, vocab_size: int) -> None:
    """Raise ValueError when ``tokenizer`` makes ids at or above the model's ``vocab_size``.

    Args:
        tokenizer: A tokenizer from ``rwkv_mlx.tokenizer.load_tokenizer``.
        tokenizer_name (str): How the tokenizer was named: ``"world"``,
            ``"bytes"``, a tokenizer.json file or a folder that contains one.
        vocab_size (int): The number of token ids the model accepts.
    """
    size = getattr(tokenizer, "vocab_size", None)
    if size is None or size <= vocab_size:
        return
    named = f"the tokenizer in {tokenizer_name}" if Path(tokenizer_name).is_dir() else f"tokenizer {tokenizer_name!r}"
    raise ValueError(
        f"{named} has {size} tokens but the model's vocabulary has only {vocab_size}; "
        "use the model's own tokenizer (leave the tokenizer option out) or one of its size"
    )


def load(
    path_or_repo: str,
    tokenizer: Optional[str] = None,
    dtype: Optional[Union[mx.Dtype, str]] = None,
    adapter_path: Optional[str] = None,
) -> Tuple[nn.Module, Any]:
    """Load a model and its tokenizer, as ``mlx_lm.load`` does.

    Args:
        path_or_repo (str): A model directory, a ``.pth``/``.bin``/``.gguf``
            checkpoint, or a Hugging Face repo id.
        tokenizer (str, optional): ``"world"``, ``"bytes"`` or a path to a
            tokenizer.json; chosen from the model when not given.
        dtype (mx.Dtype | str, optional): Cast floating-point weights to this
            type: float16, bfloat16 or float32, as an MLX type or its name.
        adapter_path (str, optional): A folder of adapters from
            ``python -m rwkv_mlx.lora`` to apply (LoRA, DoRA, full or state).

    Returns:
        tuple[nn.Module, Tokenizer]: The model and its tokenizer.
    """
    from .tokenizer import load_tokenizer

    model, config, path = load_model(path_or_repo, dtype=dtype)
    if adapter_path is not None:
        from .tuner import load_adapters

        model = load_adapters(model, adapter_path)
    name = tokenizer or default_tokenizer_name(path, config)
    text_tokenizer = load_tokenizer(name)
    check_tokenizer_size(text_tokenizer, name, config["vocab_size"])
    return model, text_tokenizer


def save_model(directory: Path, model: nn.Module, config: Dict[str, Any], tokenizer=None) -> None:
    """Write a model directory: config.json, model.safetensors and the tokenizer files.

    The files are written into a temporary directory beside the target and
    moved into place one by one, so an interrupted save never leaves a
    half-written file under a final name.

    Args:
        directory (Path): The directory to write; created if missing.
        model (nn.Module): The model whose parameters are saved.
        config (dict): The model's config, written as config.json.
        tokenizer (optional): A tokenizer from ``load_tokenizer``, whose files
            are written with ``save_pretrained``; none when not given.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} is a file, not a directory; name a folder for the model")
    directory.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))

    with tempfile.TemporaryDirectory(dir=directory, prefix=".saving-") as staging:
        staging = Path(staging)
        mx.save_safetensors(str(staging / "model.safetensors"), weights, metadata={"format": "mlx"})
        with open(staging / "config.json", "w") as f:
            json.dump({"model_type": "rwkv7", **config}, f, indent=2, sort_keys=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for item in staging.iterdir():
            os.replace(item, directory / item.name)
    logger.debug("saved model to %s", directory)
