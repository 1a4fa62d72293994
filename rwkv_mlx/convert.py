"""Convert any supported RWKV checkpoint into an MLX model directory.

    python -m rwkv_mlx.convert --model MODEL.pth --mlx-path DIR [-q --q-bits 4]

The directory contains config.json, model.safetensors and the tokenizer files,
and loads in rwkv_mlx and in stock mlx-lm (``model_type: rwkv7``).

With ``--mlx-lm-model-file`` the directory also contains
``rwkv_mlx_model.py``, named in config.json's ``model_file``. mlx-lm's tools
given ``--trust-remote-code`` then run the model with rwkv_mlx's
implementation (see ``rwkv_mlx.mlx_lm_model``). mlx-lm's loader (0.32.2)
rejects a config with ``model_file`` when remote code is not trusted, so such
a directory no longer loads in mlx-lm without that flag.
"""

import argparse
import logging
from pathlib import Path
from typing import Optional

import mlx.nn as nn
from mlx_lm.utils import dequantize_model, quantize_model

from ._files import check_new_directory, write_atomically
from .io.errors import CheckpointError
from .loading import WEIGHT_DTYPES, check_tokenizer_size, default_tokenizer_name, load_model, save_model

logger = logging.getLogger(__name__)

# The group sizes that mx.quantize accepts (MLX 0.32).
Q_GROUP_SIZES = (32, 64, 128)

# The name of the copy of rwkv_mlx/mlx_lm_model.py inside a model directory,
# and the value of config.json's "model_file" that points mlx-lm's loader to it.
MODEL_FILE_NAME = "rwkv_mlx_model.py"


def write_model_file(directory: Path) -> str:
    """Copy the mlx-lm ``model_file`` module into a model directory.

    The copy is written under a temporary name and renamed, so the directory
    never contains a partial file under the final name.

    Args:
        directory (Path): An existing model directory.

    Returns:
        str: The file name to record in config.json's ``model_file``.
    """
    source = Path(__file__).with_name("mlx_lm_model.py")
    write_atomically(directory / MODEL_FILE_NAME, lambda f: f.write(source.read_bytes()))
    return MODEL_FILE_NAME


def convert(
    model: str,
    mlx_path: str = "mlx_model",
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    dtype: Optional[str] = None,
    dequantize: bool = False,
    tokenizer: Optional[str] = None,
    mlx_lm_model_file: bool = False,
) -> Path:
    """Read a checkpoint and write it as an MLX model directory.

    Args:
        model (str): A directory, a checkpoint file or a Hugging Face repo id.
        mlx_path (str): The directory to create; it must not exist yet.
        quantize (bool): Quantize the linear layers and the embedding.
        q_bits (int): Bits per weight when quantizing: 4 or 8.
        q_group_size (int): Weights that share one scale and bias when
            quantizing: 32, 64 or 128.
        dtype (str, optional): Cast floating-point weights to ``float16``,
            ``bfloat16`` or ``float32``; the source's types are kept when not given.
        dequantize (bool): Write a quantized source back at full precision.
        tokenizer (str, optional): ``"world"``, ``"bytes"`` or a tokenizer.json
            path; chosen from the model when not given.
        mlx_lm_model_file (bool): Also write ``rwkv_mlx_model.py`` and name it
            in config.json's ``model_file``, so that mlx-lm given
            ``--trust-remote-code`` runs rwkv_mlx's implementation. mlx-lm
            then rejects the directory without ``--trust-remote-code``.

    Returns:
        Path: The directory written.
    """
    from .tokenizer import load_tokenizer

    target = Path(mlx_path)
    check_new_directory(target, "--mlx-path")
    if quantize and dequantize:
        raise ValueError("choose either --quantize or --dequantize, not both")
    if q_bits not in (4, 8):
        raise ValueError(f"--q-bits must be 4 or 8, got {q_bits}")
    if q_group_size not in Q_GROUP_SIZES:
        raise ValueError(f"--q-group-size must be one of {', '.join(map(str, Q_GROUP_SIZES))}, got {q_group_size}")
    if dtype is not None and dtype not in WEIGHT_DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {dtype!r}")

    loaded, config, path = load_model(model, dtype=dtype)
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")} if dequantize else config
    model_type = config.get("model_type", "rwkv7")
    if mlx_lm_model_file and model_type != "rwkv7":
        raise ValueError(
            f"--mlx-lm-model-file is for RWKV-7 models only, and {model} is {model_type}: mlx-lm has no model "
            "of that version, so its directory runs in rwkv_mlx only; convert without --mlx-lm-model-file"
        )
    tokenizer_name = tokenizer or default_tokenizer_name(path, config)
    text_tokenizer = load_tokenizer(tokenizer_name)
    check_tokenizer_size(text_tokenizer, tokenizer_name, config["vocab_size"])

    if quantize:
        if "quantization" in config:
            raise ValueError(f"{model} is already quantized; convert it with --dequantize first")
        loaded, config = quantize_model(loaded, config, q_group_size, q_bits)
        log_unquantized_layers(loaded, q_group_size)
    elif dequantize:
        loaded = dequantize_model(loaded)

    # The module goes in before config.json names it, so an interrupted save
    # never leaves a config that points to a missing file.
    if mlx_lm_model_file:
        target.mkdir(parents=True, exist_ok=True)
        config["model_file"] = write_model_file(target)

    save_model(target, loaded, config, text_tokenizer)
    return target


def log_unquantized_layers(model: nn.Module, group_size: int) -> None:
    """Warn about the layers that quantization left at full precision because
    their input width is not a multiple of ``group_size`` (the low-rank
    matrices stay at full precision by design and are not listed)."""
    skipped = [
        path
        for path, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Embedding)) and ".lora." not in path and module.weight.shape[-1] % group_size
    ]
    if skipped:
        logger.warning(
            "%d layers stay at full precision because their input width is not a multiple of --q-group-size %d "
            "(for example %s); a smaller --q-group-size quantizes them",
            len(skipped),
            group_size,
            ", ".join(sorted(skipped)[:3]),
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rwkv_mlx.convert", description="Convert an RWKV checkpoint into an MLX model directory."
    )
    parser.add_argument(
        "--model",
        "--hf-path",
        dest="model",
        required=True,
        help="A .pth, rwkv.cpp .bin or GGUF file, a model directory, or a Hugging Face repo id.",
    )
    parser.add_argument("--mlx-path", default="mlx_model", help="The directory to write (default: mlx_model).")
    parser.add_argument("-q", "--quantize", action="store_true", help="Quantize the weights.")
    parser.add_argument("--q-bits", type=int, help="Bits per weight when quantizing, 4 or 8 (default: 4).")
    parser.add_argument(
        "--q-group-size", type=int, help="Weights per quantization group: 32, 64 or 128 (default: 64)."
    )
    parser.add_argument("--dtype", choices=sorted(WEIGHT_DTYPES), help="Cast floating-point weights to this type.")
    parser.add_argument("-d", "--dequantize", action="store_true", help="Write a quantized model at full precision.")
    parser.add_argument("--tokenizer", help='"world", "bytes" or a tokenizer.json path (default: from the model).')
    parser.add_argument(
        "--mlx-lm-model-file",
        action="store_true",
        help=(
            f"Also write {MODEL_FILE_NAME} and name it in config.json's model_file, so that mlx-lm's tools "
            "run the model with rwkv_mlx's implementation when given --trust-remote-code. mlx-lm then "
            "rejects the directory without --trust-remote-code, so leave this off for a directory that "
            "mlx-lm runs with its own rwkv7 implementation (see docs/mlx_lm.md)."
        ),
    )
    return parser


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, value in (("--q-bits", args.q_bits), ("--q-group-size", args.q_group_size)):
        if value is not None and not args.quantize:
            parser.error(f"{flag} applies only when quantizing; add -q")
    try:
        target = convert(
            args.model,
            args.mlx_path,
            quantize=args.quantize,
            q_bits=4 if args.q_bits is None else args.q_bits,
            q_group_size=64 if args.q_group_size is None else args.q_group_size,
            dtype=args.dtype,
            dequantize=args.dequantize,
            tokenizer=args.tokenizer,
            mlx_lm_model_file=args.mlx_lm_model_file,
        )
    except (CheckpointError, FileExistsError, ValueError) as error:
        parser.exit(1, f"error: {error}\n")
    print(f"Saved the MLX model to {target}")


if __name__ == "__main__":
    main()
