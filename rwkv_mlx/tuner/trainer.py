"""The training loop: batches, chunked sequences, the loss, checkpoints and progress.

A sequence longer than ``max_seq_length`` tokens is trained in consecutive
chunks of that many tokens. Each chunk starts from the state (token shifts and
WKV state of every layer) that the previous chunk ended with, with the
gradient stopped there, so memory depends on the chunk length and not on the
sequence length. The gradients of all chunks of a batch are summed before the
optimizer step, and the loss is the mean over every trained token of the batch.

Training stops with ``TrainingError`` at the first iteration whose loss or
updated weights are not finite, before anything of that iteration is saved.
"""

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.models.cache import ArraysCache

from ..models import rwkv7
from .adapters import (
    ADAPTER_WEIGHTS_FILE,
    LOSS_HISTORY_FILE,
    OPTIMIZER_FILE_ENDING,
    STATE_FILE,
    AdapterError,
    cast_to_parameters,
    check_model_identity,
    model_identity,
    prepared_adapter_config,
    read_adapter_weights,
    run_files,
    save_adapter_config,
    save_adapter_weights,
    save_safetensors,
    save_tuned_state,
    saved_identity,
    short_list,
    shape_mismatch_hint,
    trainable_weights,
    write_atomically,
)
from .datasets import Example, as_example
from .losses import DEFAULT_LOSS_CHUNK_SIZE, chunked_cross_entropy, module_cross_entropy, output_head
from .state import StateTunedModel, zero_cache

logger = logging.getLogger(__name__)

# Batches are padded to a multiple of this many tokens, so that few distinct
# shapes reach the compiled WKV kernels.
PAD_MULTIPLE = 32

LayerState = Tuple[mx.array, mx.array, mx.array]

# Whether plot_losses has already warned that matplotlib is missing.
_warned_no_matplotlib = False


class TrainingError(RuntimeError):
    """Training diverged: a loss or an updated weight is NaN or infinite.
    The message names the iteration and what to change."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training was interrupted (Ctrl-C); the saved files are those of ``last_saved_iteration``.

    Attributes:
        iteration (int): The iteration that was running.
        last_saved_iteration (int): The last iteration saved by this run; 0 when none.
        adapter_file (Path | None): The file with the last saved tensors.
        state_file (Path | None): The tuned state for ``generate --load-state``
            saved with them (state tuning only).
    """

    def __init__(self, message: str, iteration: int, last_saved_iteration: int, adapter_file, state_file):
        super().__init__(message)
        self.iteration = iteration
        self.last_saved_iteration = last_saved_iteration
        self.adapter_file = adapter_file
        self.state_file = state_file


@dataclass
class TrainingArgs:
    """Options of ``train``; the names follow mlx-lm's ``TrainingArgs``."""

    batch_size: int = field(default=4, metadata={"help": "Sequences per batch."})
    iters: int = field(default=1000, metadata={"help": "Iterations (batches) to train for."})
    val_batches: int = field(default=25, metadata={"help": "Validation batches per evaluation; -1 for all."})
    steps_per_report: int = field(default=10, metadata={"help": "Iterations between training-loss reports."})
    steps_per_eval: int = field(default=200, metadata={"help": "Iterations between validations."})
    steps_per_save: int = field(default=100, metadata={"help": "Iterations between checkpoints."})
    max_seq_length: int = field(default=2048, metadata={"help": "Tokens per chunk of a sequence."})
    adapter_file: Optional[str] = field(
        default="adapters.safetensors", metadata={"help": "Where to save the trained tensors; None to not save."}
    )
    grad_checkpoint: bool = field(default=False, metadata={"help": "Recompute each block in the backward pass."})
    grad_accumulation_steps: int = field(default=1, metadata={"help": "Batches per optimizer update."})
    learning_rate: float = field(default=1e-5, metadata={"help": "Adam's learning rate when no optimizer is given."})
    loss_chunk_size: int = field(default=DEFAULT_LOSS_CHUNK_SIZE, metadata={"help": "Tokens per chunk of logits."})
    max_grad_norm: Optional[float] = field(default=None, metadata={"help": "Clip the gradient to this norm."})
    seed: int = field(default=0, metadata={"help": "Seed of the batch order and of dropout."})
    start_iteration: int = field(
        default=1, metadata={"help": "First iteration; above 1 when resuming, and at most iters."}
    )


TrainingArgs.__doc__ += "\n\nAttributes:\n" + "\n".join(
    f"    {option.name} ({getattr(option.type, '__name__', option.type)}): {option.metadata['help']}"
    for option in fields(TrainingArgs)
)


@dataclass
class TrainingHistory:
    """Losses recorded during training: (iteration, loss) pairs."""

    train: List[Tuple[int, float]] = field(default_factory=list)
    valid: List[Tuple[int, float]] = field(default_factory=list)
    last_saved_iteration: int = 0

    def to_dict(self) -> Dict[str, Any]:
        return {"train": self.train, "valid": self.valid, "last_saved_iteration": self.last_saved_iteration}


def _records(count: int) -> str:
    """Return "1 record" or "N records"."""
    return f"{count} record" if count == 1 else f"{count} records"


def earlier_history(path: Path, start_iteration: int) -> TrainingHistory:
    """Return the losses that ``path`` (a ``loss_history.json``) recorded
    before ``start_iteration``, so a resumed run keeps them.

    A missing or unreadable file gives an empty history, with a warning when
    it is unreadable. ``last_saved_iteration`` stays 0: it counts this run's saves.
    """
    if not path.is_file():
        return TrainingHistory()
    try:
        recorded = json.loads(path.read_text())
        train = [(int(i), float(loss)) for i, loss in recorded.get("train", []) if int(i) < start_iteration]
        valid = [(int(i), float(loss)) for i, loss in recorded.get("valid", []) if int(i) < start_iteration]
    except (OSError, ValueError, TypeError, AttributeError) as error:
        logger.warning("%s: cannot read the earlier losses (%s); the history starts at iteration %d", path, error, start_iteration)
        return TrainingHistory()
    return TrainingHistory(train=train, valid=valid)


@dataclass
class Batch:
    """Padded token ids [B, L] int32 and the loss mask [B, L] bool (see ``Example``)."""

    tokens: np.ndarray
    loss_mask: np.ndarray

    @property
    def trained_tokens(self) -> int:
        return int(self.loss_mask[:, 1:].sum())


def collate(examples: Sequence[Example]) -> Batch:
    """Pad examples on the right to a common length: a multiple of
    ``PAD_MULTIPLE`` plus one, so the inputs are a multiple of it."""
    longest = max(len(e) for e in examples)
    length = 1 + PAD_MULTIPLE * math.ceil(max(longest - 1, 1) / PAD_MULTIPLE)
    tokens = np.zeros((len(examples), length), dtype=np.int32)
    mask = np.zeros((len(examples), length), dtype=bool)
    for row, example in enumerate(examples):
        tokens[row, : len(example)] = example.tokens
        mask[row, : len(example)] = example.loss_mask
    return Batch(tokens, mask)


def iterate_batches(
    dataset: Sequence[Example],
    batch_size: int,
    loop: bool = False,
    seed: Optional[int] = 0,
    skip: int = 0,
    drop_last: bool = True,
) -> Iterator[Batch]:
    """Yield batches of examples of similar length.

    Examples are sorted by length and cut into batches. With a seed, the
    order of the batches is shuffled anew for every pass over the data.

    Args:
        dataset (sequence of Example): The examples.
        batch_size (int): Examples per batch.
        loop (bool): Repeat forever.
        seed (int, optional): Seed of the batch order; None keeps the sorted order.
        skip (int): Batches to skip first (to resume where a run stopped).
        drop_last (bool): Leave out the last, smaller batch.

    Yields:
        Batch: The padded batch.
    """
    if batch_size < 1:
        raise ValueError(f"the batch size must be at least 1, got {batch_size}")
    if len(dataset) < batch_size:
        raise ValueError(
            f"the data has {_records(len(dataset))}, fewer than the batch size {batch_size}; "
            "lower the batch size or add records"
        )
    order = sorted(range(len(dataset)), key=lambda i: len(dataset[i]))
    stop = len(order) - batch_size + 1 if drop_last else len(order)
    groups = [order[i : i + batch_size] for i in range(0, stop, batch_size)]

    epoch = 0
    produced = 0
    while True:
        permutation = np.arange(len(groups))
        if seed is not None:
            permutation = np.random.default_rng([seed, epoch]).permutation(len(groups))
        for index in permutation:
            produced += 1
            if produced <= skip:
                continue
            yield collate([dataset[i] for i in groups[index]])
        epoch += 1
        if not loop:
            return


def initial_states(model: nn.Module, batch_size: int) -> List[LayerState]:
    """Return each layer's starting state: the tuned one for a StateTunedModel, else the empty state."""
    if isinstance(model, StateTunedModel):
        caches = model.initial_cache(batch_size)
    else:
        caches = zero_cache(model, batch_size)
    return [tuple(cache.cache) for cache in caches]


def _run_block(layer: nn.Module, x: mx.array, v_first: Optional[mx.array], state: LayerState):
    """Run one block from ``state`` and return its output, ``v_first`` and the new state.

    RWKV-7 blocks take and return the first layer's value (``v_first``, the
    value residual). RWKV-4, 5 and 6 blocks have none, and ``v_first`` stays None.
    """
    cache = ArraysCache(size=3)
    cache.cache = list(state)
    if isinstance(layer, rwkv7.Block):
        x, v_first = layer(x, v_first, cache, None)
    else:
        x = layer(x, cache, None)
    return x, v_first, tuple(cache.cache)


def _run_block_checkpointed(layer: nn.Module, x: mx.array, v_first: Optional[mx.array], state: LayerState):
    def block(parameters, x, v_first, state):
        layer.update(parameters)
        return _run_block(layer, x, v_first, state)

    return mx.checkpoint(block)(layer.trainable_parameters(), x, v_first, state)


def forward_hidden(
    model: nn.Module, inputs: mx.array, states: List[LayerState], checkpoint: bool = False
) -> Tuple[mx.array, List[LayerState]]:
    """Run the model up to its final norm, from explicit per-layer states.

    This is the inner model's ``__call__`` (``rwkv7.Rwkv7Model`` or the
    ``rwkv4.RwkvModel`` that RWKV-4, 5 and 6 share) with the states passed in
    and out as arrays, so that each block can be checkpointed.

    Args:
        model (nn.Module): An RWKV-4, 5, 6 or 7 ``Model``, or a
            ``StateTunedModel``, with or without adapters.
        inputs (mx.array): Token ids, [B, T].
        states (list): Per layer (time-mix token shift, WKV state, channel-mix token shift).
        checkpoint (bool): Recompute each block in the backward pass
            instead of keeping its activations.

    Returns:
        tuple[mx.array, list]: Hidden states [B, T, C] and the new per-layer states.
    """
    inner = model.model
    run = _run_block_checkpointed if checkpoint else _run_block
    x = inner.embeddings(inputs)
    v_first = None
    new_states = []
    for layer, state in zip(inner.layers, states):
        x, v_first, state = run(layer, x, v_first, state)
        new_states.append(state)
    return inner.norm(x), new_states


def _head_module(model: nn.Module) -> nn.Module:
    # Only RWKV-7's arguments have ``tie_word_embeddings``.
    if getattr(model.args, "tie_word_embeddings", False):
        return model.model.embeddings
    return model.lm_head


def sequence_loss(
    model: nn.Module,
    inputs: mx.array,
    targets: mx.array,
    positions: mx.array,
    states: Optional[List[LayerState]],
    normalizer: float,
    loss_chunk_size: int = DEFAULT_LOSS_CHUNK_SIZE,
    checkpoint: bool = False,
    gradient_in_forward: bool = False,
) -> Tuple[mx.array, List[LayerState]]:
    """Return the loss of one chunk of a batch and the states it ends with.

    Args:
        model (nn.Module): The model.
        inputs (mx.array): Token ids, [B, T].
        targets (mx.array): The next token of every input, [B, T].
        positions (mx.array): Flat indices into [B * T] of the targets that
            count in the loss.
        states (list, optional): The states to start from; None for the
            model's initial state (which, for state tuning, is trained).
        normalizer (float): The loss is the sum over ``positions`` divided by this.
        loss_chunk_size (int): Tokens per chunk of logits.
        checkpoint (bool): Checkpoint every block.
        gradient_in_forward (bool): The loss will be differentiated: take the
            gradient of the output head's input in the forward pass, which
            saves one product with the head (see ``chunked_cross_entropy``).

    Returns:
        tuple[mx.array, list]: The scalar loss and the final states.
    """
    if states is None:
        states = initial_states(model, inputs.shape[0])
    hidden, states = forward_hidden(model, inputs, states, checkpoint)
    hidden = hidden.reshape(-1, hidden.shape[-1])[positions]
    targets = targets.reshape(-1)[positions]

    head_module = _head_module(model)
    head = output_head(head_module)
    if head is None:
        project = head_module.as_linear if isinstance(head_module, (nn.Embedding, nn.QuantizedEmbedding)) else head_module
        total = module_cross_entropy(hidden, targets, project, chunk_size=loss_chunk_size)
    else:
        weight_grad = "weight" in dict(tree_flatten(head_module.trainable_parameters()))
        total = chunked_cross_entropy(
            hidden,
            targets,
            head,
            chunk_size=loss_chunk_size,
            weight_grad=weight_grad,
            gradient_in_forward=gradient_in_forward,
        )
    return total / normalizer, states


def _chunk_bounds(length: int, chunk: int) -> List[Tuple[int, int]]:
    return [(start, min(start + chunk, length)) for start in range(0, length, chunk)]


def batch_loss_and_grad(
    model: nn.Module, batch: Batch, args: TrainingArgs, value_and_grad=None
) -> Tuple[float, int, Optional[Dict]]:
    """Compute the mean loss of a batch and, with ``value_and_grad``, its gradient.

    The batch is cut into chunks of ``args.max_seq_length`` inputs; each
    chunk starts from the states the previous one ended with, gradient stopped.

    Args:
        model (nn.Module): The model.
        batch (Batch): The batch.
        args (TrainingArgs): ``max_seq_length``, ``loss_chunk_size`` and ``grad_checkpoint``.
        value_and_grad (callable, optional): ``nn.value_and_grad(model, sequence_loss)``;
            None to compute the loss only.

    Returns:
        tuple[float, int, dict | None]: Mean loss per trained token, the
        number of trained tokens, and the gradient tree (None without
        ``value_and_grad``).
    """
    tokens, mask = batch.tokens, batch.loss_mask
    count = batch.trained_tokens
    inputs_all = mx.array(tokens[:, :-1])
    targets_all = mx.array(tokens[:, 1:])
    trained = mask[:, 1:]

    states = None
    total = 0.0
    grads = None
    for start, end in _chunk_bounds(inputs_all.shape[1], args.max_seq_length):
        inputs, targets = inputs_all[:, start:end], targets_all[:, start:end]
        positions = np.flatnonzero(trained[:, start:end].reshape(-1))
        if states is not None:
            states = [tuple(mx.stop_gradient(s) for s in layer) for layer in states]

        if len(positions) == 0:
            # Nothing to learn here, but the state must still move on.
            if states is None:
                states = initial_states(model, inputs.shape[0])
            _, states = forward_hidden(model, inputs, states)
            mx.eval(states)
            continue

        positions = mx.array(positions.astype(np.int32))
        if value_and_grad is None:
            loss, states = sequence_loss(model, inputs, targets, positions, states, count, args.loss_chunk_size)
            mx.eval(loss, states)
        else:
            (loss, states), chunk_grads = value_and_grad(
                model,
                inputs,
                targets,
                positions,
                states,
                count,
                args.loss_chunk_size,
                args.grad_checkpoint,
                gradient_in_forward=True,
            )
            grads = chunk_grads if grads is None else tree_map(lambda a, b: a + b, grads, chunk_grads)
            mx.eval(loss, states, grads)
        total += loss.item()
    return total, count, grads


def evaluate(
    model: nn.Module,
    dataset: Sequence,
    batch_size: int,
    num_batches: int = -1,
    max_seq_length: int = 2048,
    loss_chunk_size: int = DEFAULT_LOSS_CHUNK_SIZE,
    progress=None,
) -> float:
    """Return the mean loss per trained token over (part of) a dataset.

    Args:
        model (nn.Module): The model; put into eval mode.
        dataset (sequence): Examples (see ``as_example``).
        batch_size (int): Examples per batch; a last, smaller batch is included.
        num_batches (int): Batches to evaluate; -1 for all.
        max_seq_length (int): Tokens per chunk of a sequence.
        loss_chunk_size (int): Tokens per chunk of logits.
        progress (callable, optional): Called after every batch.

    Returns:
        float: The mean loss (natural log), so ``exp`` of it is the perplexity.
    """
    examples = [as_example(item, i) for i, item in enumerate(dataset)]
    if not examples:
        raise ValueError("the evaluation data has no records; pass at least one example")
    if num_batches < 1 and num_batches != -1:
        raise ValueError(f"num_batches must be at least 1, or -1 for all, got {num_batches}")
    check_vocabulary(model, examples)
    model.eval()
    args = TrainingArgs(max_seq_length=max_seq_length, loss_chunk_size=loss_chunk_size)
    batch_size = min(batch_size, len(examples))
    total_loss, total_tokens = 0.0, 0
    for index, batch in enumerate(iterate_batches(examples, batch_size, seed=None, drop_last=False)):
        if num_batches != -1 and index >= num_batches:
            break
        loss, count, _ = batch_loss_and_grad(model, batch, args)
        total_loss += loss * count
        total_tokens += count
        if progress is not None:
            progress()
    if total_tokens == 0:
        raise ValueError(
            "no token of the evaluation data counts in the loss: an example needs at least two tokens, "
            "and its loss_mask must select some"
        )
    return total_loss / total_tokens


def check_vocabulary(model: nn.Module, examples: Sequence[Example]) -> None:
    """Raise ValueError for a token id outside the model's vocabulary, naming its record."""
    vocab_size = model.args.vocab_size
    for index, example in enumerate(examples):
        if len(example.tokens) and (example.tokens.max() >= vocab_size or example.tokens.min() < 0):
            bad = int(example.tokens.max() if example.tokens.max() >= vocab_size else example.tokens.min())
            raise ValueError(
                f"{example.source or f'example {index}'}: token id {bad} is outside the model's vocabulary of {vocab_size}; "
                "use the tokenizer that belongs to the model"
            )


def optimizer_file_for(adapter_file: Path) -> Path:
    """Return the optimizer-state file saved beside an adapter file."""
    adapter_file = Path(adapter_file)
    name = adapter_file.name
    if name.endswith("adapters.safetensors"):
        return adapter_file.with_name(name[: -len("adapters.safetensors")] + "optimizer.safetensors")
    return adapter_file.with_name(adapter_file.stem + ".optimizer.safetensors")


def save_checkpoint(
    adapter_file: Path, model: nn.Module, optimizer: optim.Optimizer, iteration: int, metadata: Dict[str, Any]
) -> None:
    """Save the trained tensors and the optimizer state, each atomically."""
    info = {**metadata, "iteration": str(iteration)}
    save_adapter_weights(adapter_file, model, info)
    state = dict(tree_flatten(optimizer.state))
    save_safetensors(optimizer_file_for(adapter_file), state, info)


def resume_from(adapter_file, model: nn.Module, optimizer: Optional[optim.Optimizer] = None) -> int:
    """Load saved trained tensors (and the optimizer state when saved beside
    them) to continue training.

    Args:
        adapter_file (str | Path): An adapter safetensors file from this
            trainer or from mlx-lm.
        model (nn.Module): The model, prepared for the same kind of training.
        optimizer (Optimizer, optional): Gets its saved state when the file
            ``optimizer_file_for(adapter_file)`` exists and matches.

    Returns:
        int: The iteration to continue at: one after the saved one, or 1 when
        the file does not record it.

    Raises:
        AdapterError: When the file records another RWKV version or model
            type than the model's, or its tensors do not match what the model trains.
    """
    adapter_file = Path(adapter_file)
    if adapter_file.name.endswith(OPTIMIZER_FILE_ENDING):
        raise AdapterError(
            f"{adapter_file}: the optimizer state of a checkpoint; name the adapter weights file beside it, "
            f"such as {adapter_file.with_name(adapter_file.name.replace(OPTIMIZER_FILE_ENDING, ADAPTER_WEIGHTS_FILE))}"
        )
    weights, metadata = read_adapter_weights(adapter_file)
    identity = saved_identity(metadata)
    check_model_identity(identity, model, str(adapter_file))
    trainable = trainable_weights(model)
    unexpected = sorted(set(weights) - set(trainable))
    missing = sorted(set(trainable) - set(weights))
    if unexpected or missing:
        name = (unexpected or missing)[0]
        problem = "is not trained in this run" if unexpected else "is trained in this run but missing from the file"
        raise AdapterError(
            f"{adapter_file}: tensor '{name}' {problem} ({len(unexpected)} unexpected, {len(missing)} missing); "
            "resume with the same fine-tune type, num_layers and LoRA keys"
        )
    for name, value in weights.items():
        if tuple(value.shape) != tuple(trainable[name].shape):
            raise AdapterError(
                f"{adapter_file}: tensor '{name}' has shape {tuple(value.shape)}, expected "
                f"{tuple(trainable[name].shape)}; {shape_mismatch_hint(identity, model)}"
            )
    _check_resumed_base(metadata, model, str(adapter_file))
    model.load_weights(cast_to_parameters(weights, model), strict=False)
    mx.eval(model.parameters())

    iteration = int(metadata.get("iteration", 0) or 0)
    optimizer_file = optimizer_file_for(adapter_file)
    if optimizer is not None and optimizer_file.is_file():
        state, state_metadata = read_adapter_weights(optimizer_file)
        if state_metadata.get("iteration") != metadata.get("iteration"):
            logger.warning("%s is from another iteration than %s; the optimizer starts afresh", optimizer_file, adapter_file)
        else:
            optimizer.init(model.trainable_parameters())
            current = dict(tree_flatten(optimizer.state))
            if set(state) != set(current) or any(state[k].shape != current[k].shape for k in state):
                logger.warning("%s does not match this optimizer; the optimizer starts afresh", optimizer_file)
            else:
                # The learning rate given to this run replaces the saved one,
                # so a resumed run can lower it. A schedule sets it again from
                # the restored step.
                optimizer.state = tree_unflatten(list(state.items()))
                if "learning_rate" in current:
                    optimizer.state["learning_rate"] = current["learning_rate"]
    logger.info("resuming from %s at iteration %d", adapter_file, iteration + 1)
    return iteration + 1


def _check_resumed_base(metadata: Dict[str, str], model: nn.Module, source: str) -> None:
    """Compare the base model a checkpoint was trained on with the one
    ``prepare_for_training`` recorded: a tuned state must resume on the same
    weights, and other adapters get a warning."""
    saved = metadata.get("base_model_fingerprint")
    current = (prepared_adapter_config(model) or {}).get("base_model_fingerprint")
    if not saved or not current or saved == current:
        return
    message = f"{source}: trained on a base model with fingerprint {saved}, but this model's fingerprint is {current}"
    if metadata.get("fine_tune_type") == "state":
        raise AdapterError(f"{message}; resume the tuned state on the base model it was tuned on")
    logger.warning("%s; the run continues on this model", message)


def plot_losses(history: TrainingHistory, path: Path) -> bool:
    """Draw the training and validation losses to a PNG file.

    Returns:
        bool: False when matplotlib is not installed; the first such call of
        the process logs a warning.
    """
    global _warned_no_matplotlib
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _warned_no_matplotlib:
            logger.warning("matplotlib is not installed, so no loss plot is written (pip install matplotlib)")
            _warned_no_matplotlib = True
        return False

    figure, axes = plt.subplots(figsize=(7, 4))
    if history.train:
        axes.plot(*zip(*history.train), label="training loss")
    if history.valid:
        axes.plot(*zip(*history.valid), marker="o", label="validation loss")
    axes.set_xlabel("iteration")
    axes.set_ylabel("loss (nats per token)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def _make_progress(total: int, initial: int):
    """Return a progress bar, shown only on a terminal (``disable=None``)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="it", dynamic_ncols=True, desc="training", disable=None)


def _clip(grads, max_norm: Optional[float]):
    if max_norm is None:
        return grads
    grads, _ = optim.clip_grad_norm(grads, max_norm)
    return grads


class _TrainingRun:
    """One call of ``train``: the optimizer steps, reports, validations and checkpoints."""

    def __init__(self, model, args: TrainingArgs, optimizer, valid_examples, training_callback, metadata, adapter_config):
        self.model = model
        self.args = args
        self.optimizer = optimizer
        self.valid_examples = valid_examples
        self.training_callback = training_callback
        self.metadata = metadata
        self.adapter_config = adapter_config
        self.adapter_file = Path(args.adapter_file) if args.adapter_file else None
        self.state_file = None
        if self.adapter_file is not None and isinstance(model, StateTunedModel):
            self.state_file = self.adapter_file.parent / STATE_FILE
        self.history = TrainingHistory()
        if self.adapter_file is not None and args.start_iteration > 1:
            self.history = earlier_history(self.adapter_file.parent / LOSS_HISTORY_FILE, args.start_iteration)
        self.value_and_grad = nn.value_and_grad(model, sequence_loss)
        self.progress = _make_progress(args.iters, args.start_iteration - 1)

        # Sums since the last report, and the running total of trained tokens.
        self.losses, self.tokens, self.steps, self.elapsed = 0.0, 0, 0, 0.0
        self.trained_tokens = 0
        self.accumulated = None

    def step(self, batch: Batch, iteration: int) -> None:
        """Compute the gradient of one batch and update the weights every
        ``grad_accumulation_steps`` batches."""
        args = self.args
        tic = time.perf_counter()
        loss, count, grads = batch_loss_and_grad(self.model, batch, args, self.value_and_grad)
        if not math.isfinite(loss):
            raise self.diverged(iteration, f"the training loss is {loss}")
        if args.grad_accumulation_steps > 1:
            grads = tree_map(lambda g: g / args.grad_accumulation_steps, grads)
        if self.accumulated is None:
            self.accumulated = grads
        else:
            self.accumulated = tree_map(lambda a, b: a + b, self.accumulated, grads)

        if iteration % args.grad_accumulation_steps == 0 or iteration == args.iters:
            self.optimizer.update(self.model, _clip(self.accumulated, args.max_grad_norm))
            if isinstance(self.model, StateTunedModel):
                self.model.initial_state.constrain()
            self.accumulated = None
            mx.eval(self.model.parameters(), self.optimizer.state)
            if not _all_finite(self.model.trainable_parameters()):
                raise self.diverged(
                    iteration,
                    "the optimizer update made some weights NaN or infinite, so the model's trained weights in "
                    "memory are unusable now (reload the model, or load the last checkpoint, before using it again)",
                )

        self.elapsed += time.perf_counter() - tic
        self.losses += loss
        self.tokens += count
        self.steps += 1
        self.progress.update(1)

    def diverged(self, iteration: int, problem: str) -> TrainingError:
        """Return the error for a loss or weights that are not finite at ``iteration``."""
        last = self.history.last_saved_iteration
        if last:
            last_checkpoint = f"the last checkpoint, iteration {last} in {self.adapter_file}, is unchanged"
        else:
            last_checkpoint = "no checkpoint of this run was saved"
        remedy = f"Lower the learning rate (it is {self.optimizer.learning_rate.item():.3g})"
        if any(value.dtype == mx.float16 for _, value in tree_flatten(self.model.parameters())):
            # float16's range ends at 65504, and activations of a trained model can leave it.
            remedy += (
                ", or train a float32 or bfloat16 copy of the model "
                "(python -m rwkv_mlx.convert --dtype float32, or --dtype bfloat16)"
            )
        return TrainingError(
            f"training diverged at iteration {iteration}: {problem}. Nothing of this iteration was saved, "
            f"and {last_checkpoint}. {remedy}"
        )

    def report(self, iteration: int) -> None:
        """Report the mean training loss and the speed since the last report."""
        self.trained_tokens += self.tokens
        info = {
            "iteration": iteration,
            "train_loss": self.losses / self.steps,
            "learning_rate": self.optimizer.learning_rate.item(),
            "iterations_per_second": self.steps / self.elapsed,
            "tokens_per_second": self.tokens / self.elapsed,
            "trained_tokens": self.trained_tokens,
            "peak_memory": mx.get_peak_memory() / 1e9,
        }
        self.history.train.append((iteration, info["train_loss"]))
        self.progress.write(
            f"Iter {iteration}: train loss {info['train_loss']:.3f}, learning rate {info['learning_rate']:.3e}, "
            f"it/s {info['iterations_per_second']:.3f}, tokens/s {info['tokens_per_second']:.1f}, "
            f"trained tokens {self.trained_tokens}, peak memory {info['peak_memory']:.3f} GB"
        )
        self.progress.set_postfix(
            loss=f"{info['train_loss']:.3f}",
            tok_s=f"{info['tokens_per_second']:.0f}",
            lr=f"{info['learning_rate']:.2e}",
            peak_mem=f"{info['peak_memory']:.2f}GB",
        )
        if self.training_callback is not None:
            self.training_callback.on_train_loss_report(info)
        self.losses, self.tokens, self.steps, self.elapsed = 0.0, 0, 0, 0.0

    def validate(self, iteration: int) -> None:
        """Evaluate the validation set, if there is one, after ``iteration`` iterations."""
        if not self.valid_examples:
            return
        args = self.args
        tic = time.perf_counter()
        loss = evaluate(
            self.model, self.valid_examples, args.batch_size, args.val_batches, args.max_seq_length, args.loss_chunk_size
        )
        seconds = time.perf_counter() - tic
        self.model.train()
        # A resumed run measures the loss at its first iteration again, and the new figure replaces the old.
        self.history.valid = [entry for entry in self.history.valid if entry[0] != iteration] + [(iteration, loss)]
        self.progress.write(f"Iter {iteration}: validation loss {loss:.3f}, validation time {seconds:.1f} s")
        if self.training_callback is not None:
            self.training_callback.on_val_loss_report({"iteration": iteration, "val_loss": loss, "val_time": seconds})

    def save(self, iteration: int) -> None:
        """Save the trained tensors, a numbered checkpoint, the loss history
        and, for state tuning, the state file.

        The first save also creates the folder and writes the adapter config.
        """
        if self.adapter_file is None:
            return
        folder = self.adapter_file.parent
        if not self.history.last_saved_iteration:
            folder.mkdir(parents=True, exist_ok=True)
            if self.adapter_config is not None:
                save_adapter_config(folder, self.adapter_config)

        save_checkpoint(self.adapter_file, self.model, self.optimizer, iteration, self.metadata)
        checkpoint = self.adapter_file.with_name(f"{iteration:07d}_{self.adapter_file.name}")
        save_checkpoint(checkpoint, self.model, self.optimizer, iteration, self.metadata)
        if self.state_file is not None:
            save_tuned_state(self.state_file, self.model, self.metadata.get("tokenizer"))
        self.history.last_saved_iteration = iteration
        text = json.dumps(self.history.to_dict())
        write_atomically(folder / LOSS_HISTORY_FILE, lambda f: f.write(text.encode()))
        self.progress.write(f"Iter {iteration}: saved the trained tensors to {self.adapter_file} and {checkpoint}")

    def interrupted(self, iteration: int) -> TrainingInterrupted:
        """Log and return the interruption at ``iteration``, naming the last saved files."""
        last = self.history.last_saved_iteration
        if self.adapter_file is None:
            saved = "nothing is saved without an adapter_file"
        elif not last:
            saved = "it stopped before the first checkpoint, so nothing was saved"
        else:
            saved = f"the last checkpoint is iteration {last} in {self.adapter_file}"
            if self.state_file is not None:
                saved += f", with its tuned state in {self.state_file}"
        message = f"training interrupted at iteration {iteration}; {saved}"
        logger.warning(message)
        return TrainingInterrupted(message, iteration, last, self.adapter_file, self.state_file)


def _all_finite(tree) -> bool:
    """Return whether every array of a parameter tree is free of NaN and infinity."""
    flags = [mx.isfinite(value).all() for _, value in tree_flatten(tree)]
    return not flags or bool(mx.stack(flags).all().item())


def _check_adapter_file(adapter_file: str, start_iteration: int) -> None:
    """Raise ValueError when ``adapter_file`` names a folder or lies in a file,
    or when a run that starts at iteration 1 would overwrite another run's
    files beside it."""
    text, adapter_file = str(adapter_file), Path(adapter_file)
    if adapter_file.is_dir() or text.endswith(("/", os.sep)):
        raise ValueError(
            f"adapter_file {text} names a folder; name the weights file, such as {adapter_file / ADAPTER_WEIGHTS_FILE}"
        )
    if adapter_file.parent.exists() and not adapter_file.parent.is_dir():
        raise ValueError(f"adapter_file {text}: {adapter_file.parent} is a file, not a folder")
    if start_iteration != 1:
        return
    files = run_files(adapter_file.parent, adapter_file.name)
    if files:
        raise ValueError(
            f"{adapter_file.parent} already contains a training run's files ({short_list(files)}), which this run "
            "would overwrite; train into a new folder, or continue that run with resume_from and its start_iteration"
        )


def _warn_later_checkpoints(adapter_file: Path, start_iteration: int) -> None:
    """Log the checkpoints beside ``adapter_file`` from ``start_iteration`` on,
    left by the run being resumed from an earlier checkpoint."""
    if start_iteration == 1 or not adapter_file.parent.is_dir():
        return
    suffix = f"_{adapter_file.name}"
    later = sorted(
        path.name
        for path in adapter_file.parent.glob(f"*{suffix}")
        if path.name[: -len(suffix)].isdigit() and int(path.name[: -len(suffix)]) >= start_iteration
    )
    if later:
        logger.warning(
            "%s: %s come from the run being resumed, after iteration %d; this run replaces them only where it "
            "saves the same iteration",
            adapter_file.parent,
            short_list(later),
            start_iteration - 1,
        )


def _check_training_inputs(model: nn.Module, train_examples, valid_examples, args: TrainingArgs) -> None:
    """Raise ValueError for data, options or a model that cannot be trained,
    before anything is written."""
    check_vocabulary(model, train_examples + valid_examples)
    untrained = [example.source or f"example {i}" for i, example in enumerate(train_examples) if example.trained_tokens == 0]
    if untrained:
        raise ValueError(
            f"{untrained[0]}: no token of the example counts in the loss; an example needs at least two tokens "
            "(the first is only read), so check its length and its loss_mask"
        )
    if args.batch_size < 1:
        raise ValueError(f"the batch size must be at least 1, got {args.batch_size}")
    if not 0 <= args.learning_rate < math.inf:
        raise ValueError(f"the learning rate must be a finite number, 0 or more, got {args.learning_rate}")
    if len(train_examples) < args.batch_size:
        raise ValueError(
            f"the training data has {_records(len(train_examples))}, fewer than the batch size {args.batch_size}; "
            "lower the batch size or add records"
        )
    if args.adapter_file is not None:
        _check_adapter_file(args.adapter_file, args.start_iteration)
        _warn_later_checkpoints(Path(args.adapter_file), args.start_iteration)
    if args.grad_accumulation_steps < 1:
        raise ValueError(f"grad_accumulation_steps must be at least 1, got {args.grad_accumulation_steps}")
    if args.start_iteration > args.iters:
        raise ValueError(
            f"start_iteration {args.start_iteration} is above iters {args.iters}, so there is nothing to train; "
            "iters counts every iteration, including those before start_iteration"
        )
    if not tree_flatten(model.trainable_parameters()):
        raise ValueError("the model has no trainable parameters; prepare it with prepare_for_training or unfreeze it")


def train(
    model: nn.Module,
    train_set: Sequence,
    valid_set: Optional[Sequence] = None,
    args: TrainingArgs = TrainingArgs(),
    optimizer: Optional[optim.Optimizer] = None,
    training_callback=None,
    metadata: Optional[Dict[str, Any]] = None,
    adapter_config: Optional[Dict[str, Any]] = None,
) -> TrainingHistory:
    """Train the model's trainable parameters.

    Whatever is unfrozen is trained: use ``prepare_for_training`` for LoRA,
    DoRA, state tuning or a full fine-tune, or unfreeze a freshly built model
    to train it from scratch. The data and options are checked before anything
    is written, and the folder of ``args.adapter_file`` is created and written
    at the first save only, so a run that fails earlier leaves it as it was.
    A run from iteration 1 rejects a folder that already contains another
    run's files; a resumed run (``args.start_iteration`` above 1) continues in it.

    Args:
        model (nn.Module): An RWKV-4, 5, 6 or 7 model.
        train_set (sequence): Examples: ``Example``, token-id sequences, or
            (tokens, loss_mask) pairs.
        valid_set (sequence, optional): Examples for validation.
        args (TrainingArgs): The options.
        optimizer (Optimizer, optional): Adam with ``args.learning_rate`` when not given.
        training_callback (optional): An object with mlx-lm's
            ``on_train_loss_report(info)`` and ``on_val_loss_report(info)``.
        metadata (dict, optional): Stored in every saved file (for example
            ``fine_tune_type`` and ``base_model_fingerprint``), together with
            the model's ``model_type`` and ``rwkv_version``. Its ``tokenizer``
            (a ``tokenizer_identity``) also goes into the state file.
        adapter_config (dict, optional): Written as ``adapter_config.json``
            beside ``args.adapter_file`` with the first save, together with
            the model's ``model_type`` and ``rwkv_version``. Defaults to what
            ``prepare_for_training`` applied to the model, so that
            ``load_adapters`` reads the folder; a model that it did not
            prepare gets no adapter_config.json.

    Returns:
        TrainingHistory: The reported losses. The trained tensors are in
        ``args.adapter_file`` every ``args.steps_per_save`` iterations and at
        the end. For a ``StateTunedModel`` each save also writes the tuned
        state to ``state.safetensors`` beside it, for ``generate --load-state``.

    Raises:
        ValueError: For data or options that cannot be trained.
        TrainingError: When a training loss or the updated weights are NaN or
            infinite; that iteration is not saved.
        TrainingInterrupted: On KeyboardInterrupt, after logging which checkpoint is the last one.
    """
    train_examples = [as_example(item, i) for i, item in enumerate(train_set)]
    valid_examples = [as_example(item, i, "validation example") for i, item in enumerate(valid_set or [])]
    _check_training_inputs(model, train_examples, valid_examples, args)
    if args.grad_checkpoint and any(getattr(m, "p", 0) > 0 for _, m in model.named_modules() if isinstance(m, nn.Dropout)):
        # NOTE: the recomputed block draws new dropout masks, so its gradient
        # does not match the forward pass exactly.
        logger.warning("dropout with gradient checkpointing: the recomputed blocks use other dropout masks")

    optimizer = optimizer or optim.Adam(learning_rate=args.learning_rate)
    mx.random.seed(args.seed)
    identity = model_identity(model)
    if adapter_config is None:
        adapter_config = prepared_adapter_config(model)
    if adapter_config is not None:
        adapter_config = {**adapter_config, **identity}
    # The saved files name the kind of tuning and the base model, which
    # load_adapters and the state file check, also when the caller did not.
    recorded = {}
    for key in ("fine_tune_type", "base_model_fingerprint"):
        if adapter_config is not None and adapter_config.get(key) is not None:
            recorded[key] = adapter_config[key]
    metadata = {**recorded, **(metadata or {}), **identity}
    run = _TrainingRun(model, args, optimizer, valid_examples, training_callback, metadata, adapter_config)
    batches = iterate_batches(train_examples, args.batch_size, loop=True, seed=args.seed, skip=args.start_iteration - 1)

    model.train()
    iteration = args.start_iteration - 1
    try:
        run.validate(args.start_iteration - 1)
        for iteration in range(args.start_iteration, args.iters + 1):
            run.step(next(batches), iteration)
            if iteration % args.steps_per_report == 0 or iteration == args.iters:
                run.report(iteration)
            if iteration % args.steps_per_eval == 0 or iteration == args.iters:
                run.validate(iteration)
            if iteration % args.steps_per_save == 0 or iteration == args.iters:
                run.save(iteration)
    except KeyboardInterrupt:
        run.progress.close()
        raise run.interrupted(iteration) from None
    finally:
        run.progress.close()

    if run.adapter_file is not None:
        plot_losses(run.history, run.adapter_file.parent / "loss.png")
    return run.history
