"""Merge LoRA or DoRA adapters into the base model: ``python -m rwkv_mlx.fuse``.

Writes a model directory (config.json, model.safetensors and the tokenizer
files) that loads like any other. The flags are those of ``mlx_lm.fuse``
that apply. A quantized base stays quantized unless ``--dequantize`` is
given. A ``full`` adapter folder is fused by loading its weights; a tuned
state has no weights to merge and is rejected.

Example::

    python -m rwkv_mlx.fuse --model model.pth --adapter-path adapters --save-path fused_model
"""

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from ._files import check_new_directory
from .io.errors import CheckpointError
from .tuner.adapters import AdapterError, fuse_adapters, load_adapters, read_adapter_config

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of ``python -m rwkv_mlx.fuse``."""
    parser = argparse.ArgumentParser(prog="python -m rwkv_mlx.fuse", description="Fuse trained adapters into the base model.")
    parser.add_argument("--model", required=True, help="The base model: directory, checkpoint file or Hugging Face repo id.")
    parser.add_argument("--tokenizer", help='Tokenizer: "world", "bytes" or a tokenizer.json path (default: the model\'s).')
    parser.add_argument("--adapter-path", default="adapters", help="Folder with adapter_config.json and adapters.safetensors (default: adapters).")
    parser.add_argument("--save-path", default="fused_model", help="New or empty directory to write the fused model to (default: fused_model).")
    parser.add_argument("--dequantize", action="store_true", help="Write a dense model even when the base model is quantized.")
    return parser


def fuse(model_source: str, adapter_path: str, save_path: str, dequantize: bool = False, tokenizer: Optional[str] = None) -> None:
    """Load a base model and its adapters, merge them, and write a model directory.

    Args:
        model_source (str): The base model.
        adapter_path (str): The adapter folder.
        save_path (str): The directory to write; it must be new or empty, so
            the base model or another model is never overwritten.
        dequantize (bool): Write dense weights even for a quantized base.
        tokenizer (str, optional): The tokenizer to save with the model.
    """
    from .loading import default_tokenizer_name, load_model, save_model
    from .tokenizer import load_tokenizer

    check_new_directory(Path(save_path), "--save-path")
    config = read_adapter_config(Path(adapter_path))
    if config["fine_tune_type"] == "state":
        raise AdapterError(
            f"{adapter_path}: a tuned state has no weights to fuse; use its state.safetensors with "
            "generate --load-state, or load the folder with rwkv_mlx.tuner.load_adapters"
        )

    model, model_config, path = load_model(model_source)
    tokenizer_object = load_tokenizer(tokenizer or default_tokenizer_name(path, model_config))
    model = load_adapters(model, adapter_path)
    fuse_adapters(model, dequantize=dequantize)

    model_config = dict(model_config)
    if dequantize:
        model_config.pop("quantization", None)
        model_config.pop("quantization_config", None)
    saver = tokenizer_object if hasattr(tokenizer_object, "save_pretrained") else None
    if saver is None:
        logger.warning("the tokenizer cannot save itself; %s gets no tokenizer files", save_path)
    save_model(Path(save_path), model, model_config, saver)
    print(f"Saved the fused model to {save_path}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        fuse(args.model, args.adapter_path, args.save_path, args.dequantize, args.tokenizer)
    except (AdapterError, CheckpointError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
