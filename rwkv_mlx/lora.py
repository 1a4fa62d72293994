"""Fine-tune an RWKV model: ``python -m rwkv_mlx.lora``.

The flags, the YAML config and the data formats are mlx-lm's (``mlx_lm.lora``)
where they apply; ``--fine-tune-type state`` (state tuning) and
``--max-chunks`` are this package's. Options given on the command line win
over the YAML config, which wins over the defaults.

Example::

    python -m rwkv_mlx.lora --model model.pth --train --data data/ --iters 600
    python -m rwkv_mlx.lora --model model.pth --test --data data/ --adapter-path adapters
"""

import argparse
import logging
import math
import re
import sys
import types
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import yaml
from mlx.utils import tree_flatten

from .io.errors import CheckpointError
from .tuner.adapters import (
    ADAPTER_WEIGHTS_FILE,
    DEFAULT_LORA_KEYS,
    DEFAULT_LORA_PARAMETERS,
    FINE_TUNE_TYPES,
    STATE_FILE,
    AdapterError,
    base_fingerprint,
    load_adapters,
    prepare_for_training,
    run_files,
    short_list,
)
from .tuner.datasets import DatasetError, Features, load_datasets
from .tuner.losses import DEFAULT_LOSS_CHUNK_SIZE
from .tuner.trainer import TrainingArgs, TrainingError, TrainingInterrupted, evaluate, resume_from, train

logger = logging.getLogger(__name__)

OPTIMIZERS = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD, "adafactor": optim.Adafactor}

CONFIG_DEFAULTS: Dict[str, Any] = {
    "model": None,
    "tokenizer": None,
    "train": False,
    "test": False,
    "data": None,
    "fine_tune_type": "lora",
    "optimizer": "adam",
    "optimizer_config": {},
    "mask_prompt": None,
    "num_layers": -1,
    "batch_size": 4,
    "iters": 1000,
    "val_batches": 25,
    "test_batches": 500,
    "learning_rate": 1e-5,
    "lr_schedule": None,
    "steps_per_report": 10,
    "steps_per_eval": 200,
    "save_every": 100,
    "grad_accumulation_steps": 1,
    "resume_adapter_file": None,
    "adapter_path": "adapters",
    "max_seq_length": 2048,
    "max_chunks": 16,
    "loss_chunk_size": DEFAULT_LOSS_CHUNK_SIZE,
    "grad_checkpoint": False,
    "max_grad_norm": None,
    "seed": 0,
    "lora_parameters": dict(DEFAULT_LORA_PARAMETERS),
    "text_feature": None,
    "prompt_feature": None,
    "completion_feature": None,
    "chat_feature": None,
    "config": None,
}

# mlx-lm options that a config may carry but that have no effect here.
IGNORED_OPTIONS = ("report_to", "project_name", "trust_remote_code", "clear_cache_threshold", "hf_dataset", "wandb")

# YAML 1.1 reads "1e-5" as a string; this resolver reads it as a float.
YAML_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+(?:[eE][-+]?[0-9]+)?)$")


class ConfigLoader(yaml.SafeLoader):
    """A YAML loader that reads exponent notation without a dot as a float."""


ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", YAML_FLOAT, list("-+0123456789."))


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of ``python -m rwkv_mlx.lora``; every default is None
    so that the YAML config and ``CONFIG_DEFAULTS`` can fill in."""
    parser = argparse.ArgumentParser(
        prog="python -m rwkv_mlx.lora",
        description="Fine-tune an RWKV model with LoRA, DoRA, state tuning or a full fine-tune.",
    )
    parser.add_argument("--model", help="Model directory, checkpoint file (.pth, .bin, .gguf) or Hugging Face repo id.")
    parser.add_argument("--tokenizer", help='Tokenizer: "world", "bytes" or a tokenizer.json path (default: the model\'s).')

    parser.add_argument("--train", action="store_true", default=None, help="Train.")
    parser.add_argument("--test", action="store_true", default=None, help="Print the test loss and perplexity.")
    parser.add_argument("--data", help="Folder with train.jsonl, valid.jsonl and test.jsonl, or a Hugging Face dataset repo id.")

    parser.add_argument(
        "--fine-tune-type",
        choices=FINE_TUNE_TYPES,
        help=(
            "What to train: lora or dora (adapters on the blocks' linear layers), full (every weight of the "
            "blocks, not the embedding or the output head; float16 weights are trained in float32) or state "
            "(the initial WKV state of every block) (default: lora)."
        ),
    )
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), help="Optimizer (default: adam).")
    parser.add_argument(
        "--mask-prompt",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Compute the loss on completions and assistant messages only (default: on for those formats).",
    )
    parser.add_argument("--num-layers", type=int, help="How many of the last blocks to train; -1 for all (default).")

    parser.add_argument("--batch-size", type=int, help="Sequences per batch (default: 4).")
    parser.add_argument(
        "--iters",
        type=int,
        help=(
            "Total iterations (batches) to train for; with --resume-adapter-file this counts the iterations "
            "already done, so it must be above the saved iteration (default: 1000)."
        ),
    )
    parser.add_argument("--val-batches", type=int, help="Validation batches per evaluation; -1 for all (default: 25).")
    parser.add_argument("--test-batches", type=int, help="Test batches; -1 for all (default: 500).")
    parser.add_argument("--learning-rate", type=float, help="Learning rate (default: 1e-5).")
    parser.add_argument("--steps-per-report", type=int, help="Iterations between loss reports (default: 10).")
    parser.add_argument("--steps-per-eval", type=int, help="Iterations between validations (default: 200).")
    parser.add_argument("--save-every", type=int, help="Iterations between saved checkpoints (default: 100).")
    parser.add_argument("--grad-accumulation-steps", type=int, help="Batches per optimizer update (default: 1).")

    parser.add_argument(
        "--resume-adapter-file",
        help="Continue training from this adapters.safetensors, at the iteration after the one it was saved at, up to --iters.",
    )
    parser.add_argument("--adapter-path", help="Folder to save the adapters to, or to load them from for --test (default: adapters).")

    parser.add_argument(
        "--max-seq-length",
        type=int,
        help="Tokens per training chunk; longer records are trained in chunks with the state carried over (default: 2048).",
    )
    parser.add_argument(
        "--max-chunks", type=int, help="Maximum number of --max-seq-length chunks one record may span (default: 16)."
    )
    parser.add_argument("--grad-checkpoint", action="store_true", default=None, help="Recompute each block in the backward pass to save memory.")

    parser.add_argument("--lora-rank", type=int, help="LoRA and DoRA rank (default: 8).")
    parser.add_argument("--lora-scale", type=float, help="Scale of the LoRA and DoRA update (default: 20.0).")
    parser.add_argument("--lora-dropout", type=float, help="Dropout on the LoRA and DoRA input (default: 0.0).")

    parser.add_argument("--seed", type=int, help="Seed of the batch order, the adapter initialisation and dropout (default: 0).")
    parser.add_argument("-c", "--config", help="A YAML file with any of these options, by their names with underscores.")
    return parser


def read_yaml_config(path: str) -> Dict[str, Any]:
    """Read a YAML options file into a dict."""
    try:
        with open(path) as f:
            config = yaml.load(f, ConfigLoader)
    except FileNotFoundError as error:
        raise ValueError(f"{path}: config file not found") from error
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: invalid YAML ({error})") from error
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values, found {type(config).__name__}")
    return config


def resolve_options(argv: Optional[Sequence[str]] = None) -> types.SimpleNamespace:
    """Parse the command line, merge the YAML config and the defaults, and check the result."""
    namespace = build_parser().parse_args(argv)
    options = dict(vars(namespace))
    explicit = {key for key, value in options.items() if value is not None}

    if options["config"]:
        config = read_yaml_config(options["config"])
        for key, value in config.items():
            if key in IGNORED_OPTIONS:
                logger.warning("%s: option '%s' has no effect in rwkv_mlx", options["config"], key)
            elif key not in CONFIG_DEFAULTS:
                raise ValueError(f"{options['config']}: unknown option '{key}'")
            elif options.get(key) is None:
                options[key] = value
                explicit.add(key)

    for key, value in CONFIG_DEFAULTS.items():
        if options.get(key) is None:
            options[key] = value

    lora_parameters = {**DEFAULT_LORA_PARAMETERS, **(options["lora_parameters"] or {})}
    for flag, key in (("lora_rank", "rank"), ("lora_scale", "scale"), ("lora_dropout", "dropout")):
        value = options.pop(flag, None)
        if value is not None:
            lora_parameters[key] = value
    if lora_parameters.get("keys") is None:
        lora_parameters["keys"] = list(DEFAULT_LORA_KEYS)
    options["lora_parameters"] = lora_parameters
    options["adapter_path_given"] = "adapter_path" in explicit

    check_options(options)
    return types.SimpleNamespace(**options)


def check_options(options: Dict[str, Any]) -> None:
    """Raise ValueError for a missing or out-of-range option, naming the flag."""
    if not options["train"] and not options["test"]:
        raise ValueError("nothing to do: pass --train, --test or both")
    for name in ("model", "data"):
        if not options[name]:
            raise ValueError(f"--{name} is required, on the command line or in the --config file")
    for name in ("batch_size", "iters", "steps_per_report", "steps_per_eval", "save_every", "max_seq_length",
                 "max_chunks", "grad_accumulation_steps", "loss_chunk_size"):
        if not isinstance(options[name], int) or options[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {options[name]!r}")
    for name in ("val_batches", "test_batches"):
        if not isinstance(options[name], int) or (options[name] < 1 and options[name] != -1):
            raise ValueError(
                f"--{name.replace('_', '-')} must be a positive integer, or -1 for the whole set, got {options[name]!r}"
            )
    rate = options["learning_rate"]
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < math.inf:
        raise ValueError(f"--learning-rate must be a finite number, 0 or more, got {rate!r}")
    seed = options["seed"]
    if not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"--seed must be an integer in [0, 2**32), got {seed!r}")
    num_layers = options["num_layers"]
    if not isinstance(num_layers, int) or (num_layers < 1 and num_layers != -1):
        raise ValueError(f"--num-layers must be a positive integer, or -1 for every layer, got {num_layers!r}")
    check_lora_parameters(options["lora_parameters"])
    if options["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {options['optimizer']!r}; expected one of {', '.join(sorted(OPTIMIZERS))}")
    if options["fine_tune_type"] not in FINE_TUNE_TYPES:
        raise ValueError(f"unknown fine-tune type {options['fine_tune_type']!r}; expected one of {', '.join(FINE_TUNE_TYPES)}")
    if options["train"]:
        check_adapter_folder(options["adapter_path"], options["resume_adapter_file"])


def check_lora_parameters(parameters: Dict[str, Any]) -> None:
    """Raise ValueError for a LoRA rank, scale or dropout out of range, naming its flag."""
    rank, scale, dropout = parameters.get("rank"), parameters.get("scale"), parameters.get("dropout")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"--lora-rank (lora_parameters.rank) must be a positive integer, got {rank!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"--lora-scale (lora_parameters.scale) must be a finite number, got {scale!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"--lora-dropout (lora_parameters.dropout) must be in [0, 1), got {dropout!r}")


def check_adapter_folder(adapter_path: str, resume_adapter_file: Optional[str]) -> None:
    """Raise ValueError when a training run would overwrite the adapters of
    another run in ``adapter_path``. Continuing the run whose checkpoint
    ``resume_adapter_file`` lies in that folder is allowed."""
    folder = Path(adapter_path)
    if resume_adapter_file and Path(resume_adapter_file).is_dir():
        raise ValueError(
            f"--resume-adapter-file {resume_adapter_file} is a folder; name the adapter weights file in it, such as "
            f"{Path(resume_adapter_file) / ADAPTER_WEIGHTS_FILE}"
        )
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                raise ValueError(f"--adapter-path {adapter_path}: {path} is a file; name a folder for the adapters")
            break
    saved = run_files(folder)
    if not saved:
        return
    if resume_adapter_file and Path(resume_adapter_file).resolve().parent == folder.resolve():
        return
    resume = ""
    if ADAPTER_WEIGHTS_FILE in saved:
        resume = f", or continue that run with --resume-adapter-file {folder / ADAPTER_WEIGHTS_FILE}"
    raise ValueError(
        f"--adapter-path {adapter_path} already contains a training run's files ({short_list(saved)}), which this "
        f"run would overwrite; choose a new --adapter-path{resume}"
    )


def build_schedule(schedule: Dict[str, Any]):
    """Build a learning-rate schedule from mlx-lm's ``lr_schedule`` config:
    ``name`` (a function of ``mlx.optimizers.schedulers``), ``arguments``, and
    optional ``warmup`` steps from ``warmup_init``."""
    name = schedule.get("name")
    function = getattr(optim.schedulers, str(name), None)
    if function is None or not callable(function):
        raise ValueError(f"lr_schedule: unknown schedule {name!r}; use a function of mlx.optimizers.schedulers")
    arguments = list(schedule.get("arguments", []))
    main = function(*arguments)
    warmup = int(schedule.get("warmup", 0))
    if not warmup:
        return main
    warmup_schedule = optim.schedulers.linear_schedule(float(schedule.get("warmup_init", 0.0)), arguments[0], warmup)
    return optim.schedulers.join_schedules([warmup_schedule, main], [warmup + 1])


def make_optimizer(options) -> optim.Optimizer:
    """Return the optimizer the options name, with its ``optimizer_config``."""
    learning_rate = build_schedule(options.lr_schedule) if options.lr_schedule else options.learning_rate
    extra = options.optimizer_config.get(options.optimizer, {}) if options.optimizer_config else {}
    return OPTIMIZERS[options.optimizer](learning_rate=learning_rate, **(extra or {}))


def count_parameters(model: nn.Module) -> int:
    """Count parameters, each quantized weight as the values it packs."""
    total = 0
    for _, module in model.named_modules():
        for name, value in module.items():
            if not isinstance(value, mx.array):
                continue
            if name in ("scales", "biases") and hasattr(module, "bits"):
                continue
            if name == "weight" and hasattr(module, "bits"):
                total += value.size * 32 // module.bits
            else:
                total += value.size
    return total


def print_trainable_parameters(model: nn.Module) -> None:
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = count_parameters(model)
    print(f"Trainable parameters: {100 * trainable / total:.3f}% ({trainable / 1e6:.3f}M/{total / 1e6:.3f}M)")


def load_model_and_tokenizer(options):
    """Load the model and tokenizer the options name.

    Returns:
        tuple: The model, the tokenizer, and the tokenizer's name or path.
    """
    from .loading import default_tokenizer_name, load_model
    from .tokenizer import load_tokenizer

    model, config, path = load_model(options.model)
    name = options.tokenizer or default_tokenizer_name(path, config)
    return model, load_tokenizer(name), name


def adapter_config(options, fingerprint: str) -> Dict[str, Any]:
    """Return the contents of adapter_config.json for a training run; ``train``
    adds the model's ``model_type`` and ``rwkv_version``."""
    config = {key: value for key, value in vars(options).items() if key not in ("config", "adapter_path_given")}
    config["base_model_fingerprint"] = fingerprint
    if options.fine_tune_type not in ("lora", "dora"):
        config.pop("lora_parameters", None)
    return config


def run_training(options, model, tokenizer_name: str, train_set, valid_set) -> nn.Module:
    """Prepare the model, train it, and save the adapters; returns the trained model.

    Nothing is written to ``--adapter-path`` before the first checkpoint, so
    a run that fails earlier leaves an existing adapter folder unchanged.
    """
    from .io.state import tokenizer_identity

    mx.random.seed(options.seed)
    np.random.seed(options.seed)
    fingerprint = base_fingerprint(model)
    model = prepare_for_training(model, options.fine_tune_type, options.num_layers, options.lora_parameters)
    print_trainable_parameters(model)

    optimizer = make_optimizer(options)
    start_iteration = 1
    if options.resume_adapter_file:
        start_iteration = resume_from(options.resume_adapter_file, model, optimizer)
        done = start_iteration - 1
        if start_iteration > options.iters:
            raise ValueError(
                f"--iters {options.iters} is not above iteration {done}, where {options.resume_adapter_file} "
                f"was saved, so there is nothing to train; --iters counts every iteration, including the {done} "
                f"already done, so pass --iters {done + options.iters} to train {options.iters} more"
            )

    adapter_path = Path(options.adapter_path)
    args = TrainingArgs(
        batch_size=options.batch_size,
        iters=options.iters,
        val_batches=options.val_batches,
        steps_per_report=options.steps_per_report,
        steps_per_eval=options.steps_per_eval,
        steps_per_save=options.save_every,
        max_seq_length=options.max_seq_length,
        adapter_file=str(adapter_path / ADAPTER_WEIGHTS_FILE),
        grad_checkpoint=bool(options.grad_checkpoint),
        grad_accumulation_steps=options.grad_accumulation_steps,
        loss_chunk_size=options.loss_chunk_size,
        max_grad_norm=options.max_grad_norm,
        seed=options.seed,
        start_iteration=start_iteration,
    )
    metadata = {
        "fine_tune_type": options.fine_tune_type,
        "base_model_fingerprint": fingerprint,
        "tokenizer": tokenizer_identity(tokenizer_name),
    }
    config = adapter_config(options, fingerprint)
    train(model, train_set, valid_set, args, optimizer=optimizer, metadata=metadata, adapter_config=config)

    if options.fine_tune_type == "state":
        print(f"Saved the tuned state for generate --load-state to {adapter_path / STATE_FILE}")
    return model


def run(options) -> None:
    """Run the training and testing the options ask for."""
    print("Loading pretrained model")
    model, tokenizer, tokenizer_name = load_model_and_tokenizer(options)

    print("Loading datasets")
    splits = []
    if options.train:
        splits += ["train", "valid"]
    if options.test:
        splits.append("test")
    max_tokens = options.max_seq_length * options.max_chunks + 1
    hint = f" (--max-seq-length {options.max_seq_length} times --max-chunks {options.max_chunks}, plus one)"
    data = load_datasets(
        options.data,
        tokenizer,
        splits,
        mask_prompt=options.mask_prompt,
        max_tokens=max_tokens,
        max_tokens_hint=hint,
        features=Features.from_config(options),
    )

    if options.train:
        print("Training")
        model = run_training(options, model, tokenizer_name, data["train"], data.get("valid"))
    elif options.adapter_path_given:
        model = load_adapters(model, options.adapter_path)

    if options.test:
        print("Testing")
        loss = evaluate(
            model,
            data["test"],
            options.batch_size,
            options.test_batches,
            options.max_seq_length,
            options.loss_chunk_size,
        )
        print(f"Test loss {loss:.3f}, Test ppl {math.exp(loss):.3f}.")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        run(resolve_options(argv))
    except (AdapterError, CheckpointError, DatasetError, TrainingError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:
        message = interrupt_message(interrupt)
        print(f"\n{message}" if message else "", file=sys.stderr)
        return 130
    return 0


def interrupt_message(interrupt: KeyboardInterrupt) -> Optional[str]:
    """Return what to do after Ctrl-C, from the files the run saved.

    The trainer has already logged where it stopped and what it saved, so
    this adds only how to resume; None when there is nothing to add.
    """
    if not isinstance(interrupt, TrainingInterrupted):
        return "interrupted before training started; nothing was saved"
    if interrupt.last_saved_iteration == 0:
        return None
    message = (
        f"interrupted; continue from iteration {interrupt.last_saved_iteration} with "
        f"--resume-adapter-file {interrupt.adapter_file}"
    )
    if interrupt.state_file is not None:
        message += f", or generate from its tuned state with --load-state {interrupt.state_file}"
    return message


if __name__ == "__main__":
    sys.exit(main())
