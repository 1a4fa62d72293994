"""Adapter folders: set a model up for a kind of fine-tuning, save, load and fuse.

An adapter folder contains two files, and a third for state tuning, in
mlx-lm's format where it has one:

``adapter_config.json``
    The training options. Loading reads these fields:

    - ``fine_tune_type``: ``lora``, ``dora``, ``full`` or ``state``
      (``lora`` when absent);
    - ``num_layers``: how many of the last layers were adapted, -1 for all;
    - ``lora_parameters`` (LoRA and DoRA): ``rank``, ``scale``, ``dropout``
      and ``keys``, the module paths inside a layer such as ``attn.r_proj``.
      Absent or null keys mean every linear layer of the block, as in mlx-lm;
    - ``base_model_fingerprint``: ``rwkv_mlx.io.state.model_fingerprint`` of
      the base model;
    - ``model_type`` (``rwkv4`` to ``rwkv7``) and ``rwkv_version`` (``4``,
      ``5``, ``5.1``, ``5.2``, ``6`` or ``7``, as ``rwkv_mlx.io.state.rwkv_version``
      gives it) of the base model. Adapters for another version are rejected;
      folders without these fields (older ones, and mlx-lm's) load unchecked.

``adapters.safetensors``
    Exactly the trained tensors, under their names in the adapted model:
    ``...lora_a``, ``...lora_b`` (and ``...m`` for DoRA), the unfrozen layers'
    weights for ``full``, or for ``state`` ``initial_state.layers.<i>.wkv``
    [H, N, N] (RWKV-4: ``initial_state.layers.<i>.wkv_sums`` [2, C], see
    ``rwkv_mlx.tuner.state``). A full fine-tune of a float16 model trains and
    saves the unfrozen weights in float32; loading casts every tensor to the
    dtype of the parameter it replaces. The metadata records
    ``fine_tune_type``, ``iteration``, ``base_model_fingerprint``,
    ``model_type`` and ``rwkv_version``.

``state.safetensors`` (state tuning only)
    The tuned state as a state file for ``generate --load-state``
    (``rwkv_mlx.io.state``), written with every save of ``adapters.safetensors``.

Checkpoints saved during training sit beside it as
``<iteration>_adapters.safetensors`` (seven digits), and the optimizer state
as ``optimizer.safetensors`` / ``<iteration>_optimizer.safetensors``. Every
file is written to a temporary name and renamed into place, so an interrupted
save leaves the previous file intact. The trainer writes ``adapter_config.json``
with the first saved tensors, so a run that stops before its first save leaves
an existing folder unchanged.
"""

import copy
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .._files import write_atomically as _write_atomically
from ..io.state import model_fingerprint, rwkv_version
from .lora import DoRALinear, LoRALinear, dense_weight
from .state import InitialState, StateTunedModel

logger = logging.getLogger(__name__)

FINE_TUNE_TYPES = ("lora", "dora", "full", "state")

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapters.safetensors"
STATE_FILE = "state.safetensors"
LOSS_HISTORY_FILE = "loss_history.json"
# The trainer names the optimizer state after the weights file, ending in this.
OPTIMIZER_FILE_ENDING = "optimizer.safetensors"

# The receptance, key, value and output projections of the time mix and both
# projections of the channel mix: the large matrices of a block, present in
# RWKV-4, 5, 6 and 7 alike. The rest is left alone: RWKV-7's small low-rank
# matrices (decay, in-context learning rate, value residual, gate), the
# channel-mix receptance of RWKV-4, 5 and 6, and the gate projection of
# RWKV-5.1, 5.2 and 6.
DEFAULT_LORA_KEYS = ("attn.r_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "ffn.key", "ffn.value")

# mlx-lm's defaults, so a config written by either tool means the same.
DEFAULT_LORA_PARAMETERS = {"rank": 8, "scale": 20.0, "dropout": 0.0}

ADAPTER_LEAVES = {"lora": ("lora_a", "lora_b"), "dora": ("lora_a", "lora_b", "m")}


# The attribute where prepare_for_training records what it applied.
PREPARED_CONFIG_ATTRIBUTE = "_prepared_adapter_config"


class AdapterError(ValueError):
    """An adapter folder or file that cannot be used with this model; the
    message names the file and the tensor or field."""


def run_files(folder: Path, weights_name: str = ADAPTER_WEIGHTS_FILE) -> List[str]:
    """Return the names of a training run's files in ``folder``, sorted.

    Args:
        folder (Path): The folder; it may not exist.
        weights_name (str): The name of the run's adapter weights file; its
            checkpoints end with it.

    Returns:
        list[str]: The adapter config, the tuned state, the loss history, the
        weights, the optimizer state and their checkpoints found there.
    """
    if not Path(folder).is_dir():
        return []
    names = (ADAPTER_CONFIG_FILE, STATE_FILE, LOSS_HISTORY_FILE)
    endings = (weights_name, OPTIMIZER_FILE_ENDING)
    return sorted(path.name for path in Path(folder).iterdir() if path.name in names or path.name.endswith(endings))


def short_list(names: Sequence[str], shown: int = 3) -> str:
    """Return the first ``shown`` names joined by commas, and how many more there are.

    Args:
        names (Sequence[str]): The names, in the order to show them.
        shown (int): How many names to write out.

    Returns:
        str: For example ``"a, b, c and 2 more"``.
    """
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _has_adapter_layers(model: nn.Module) -> bool:
    """Return whether any layer of ``model`` is a LoRA or DoRA layer."""
    return any(isinstance(m, (LoRALinear, DoRALinear)) for _, m in model.named_modules())


def base_fingerprint(model: nn.Module) -> str:
    """Return the fingerprint of the base model under any adapters.

    Args:
        model (nn.Module): A model, with or without adapters.

    Returns:
        str: ``rwkv_mlx.io.state.model_fingerprint`` of the base model.
    """
    if isinstance(model, StateTunedModel):
        return model_fingerprint(model.base_model)
    if _has_adapter_layers(model):
        raise ValueError("the model already has LoRA or DoRA layers; take the fingerprint before adding them")
    return model_fingerprint(model)


def model_identity(model: nn.Module) -> Dict[str, str]:
    """Return the ``model_type`` and ``rwkv_version`` that adapters record of their base model.

    Args:
        model (nn.Module): A model, with or without adapters or a tuned state.

    Returns:
        dict[str, str]: ``model_type`` (``rwkv7``) and ``rwkv_version`` (``5.2``).
    """
    args = getattr(model, "args", None)
    model_type = getattr(model, "model_type", None) or getattr(args, "model_type", "")
    return {"model_type": str(model_type), "rwkv_version": rwkv_version(model)}


def _version_name(identity: Dict[str, Any]) -> str:
    """Return ``RWKV-5.2`` for an identity, or its ``model_type`` when it has no version."""
    version = identity.get("rwkv_version")
    if version == "5":
        # The recorded label of RWKV-5.0, named in full beside 5.1 and 5.2.
        version = "5.0"
    return f"RWKV-{version}" if version else str(identity.get("model_type"))


def saved_identity(*sources: Optional[Dict[str, Any]]) -> Dict[str, str]:
    """Return the ``model_type`` and ``rwkv_version`` recorded in the first
    source that has them (safetensors metadata, adapter config); empty when none has."""
    for source in sources:
        found = {key: str(source[key]) for key in ("model_type", "rwkv_version") if source and source.get(key)}
        if found:
            return found
    return {}


def check_model_identity(saved: Dict[str, str], model: nn.Module, source: str) -> None:
    """Raise AdapterError when adapters were trained on another RWKV version or model type.

    Args:
        saved (dict): ``saved_identity`` of the adapters; empty passes.
        model (nn.Module): The model to load them onto.
        source (str): The file, for the message.
    """
    if not saved:
        return
    current = model_identity(model)
    if all(saved[key] == current[key] for key in saved):
        return
    raise AdapterError(
        f"{source}: the adapters are for {_version_name(saved)} ({saved.get('model_type', 'model_type unknown')}), "
        f"but the model is {_version_name(current)} ({current['model_type']}); "
        "use the base model they were trained on"
    )


def shape_mismatch_hint(saved: Dict[str, str], model: nn.Module) -> str:
    """Return the end of a shape-mismatch message: the versions, and what differs."""
    current = _version_name(model_identity(model))
    if not saved:
        return (
            "the adapters were trained on another model or with other options (rank, keys, num_layers); "
            f"the model is {current}, and the adapters do not record their RWKV version"
        )
    return (
        f"the adapters and the model are both {current}, so the adapters were trained on a model "
        "of another size or with other options (rank, keys, num_layers)"
    )


def _selected_layers(model: nn.Module, num_layers: int) -> List[Tuple[int, nn.Module]]:
    """Return (index, layer) for the last ``num_layers`` layers (-1: all)."""
    total = len(model.layers)
    if num_layers == -1:
        num_layers = total
    if not 0 < num_layers <= total:
        raise ValueError(f"num_layers is {num_layers}, but the model has {total} layers; use 1 to {total}, or -1 for all")
    return list(enumerate(model.layers))[total - num_layers :]


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.QuantizedLinear))


def apply_lora_layers(
    model: nn.Module, num_layers: int, lora_parameters: Dict[str, Any], use_dora: bool = False
) -> None:
    """Replace linear layers of the last ``num_layers`` layers by LoRA or DoRA layers.

    Args:
        model (nn.Module): The model, changed in place.
        num_layers (int): How many of the last layers to adapt; -1 for all.
        lora_parameters (dict): ``rank``, ``scale``, ``dropout`` and optional
            ``keys``: module paths inside a layer (``attn.r_proj``) or, when
            not found in a layer, inside the model (``lm_head``). Without
            ``keys`` every linear layer of the adapted blocks is adapted.
        use_dora (bool): Make DoRA layers instead of LoRA layers.
    """
    for name in ("rank", "scale"):
        if name not in lora_parameters:
            raise KeyError(f"lora_parameters has no '{name}' (mlx-lm's name for the LoRA {name})")
    layer_class = DoRALinear if use_dora else LoRALinear
    options = dict(
        rank=int(lora_parameters["rank"]),
        scale=float(lora_parameters["scale"]),
        dropout=float(lora_parameters.get("dropout", 0.0)),
    )
    keys = lora_parameters.get("keys")
    layers = _selected_layers(model, num_layers)

    def convert(path: str, module: nn.Module) -> nn.Module:
        if not _is_linear(module):
            raise ValueError(
                f"cannot put a {'DoRA' if use_dora else 'LoRA'} adapter on '{path}': it is a "
                f"{type(module).__name__}, and only linear layers can be adapted"
            )
        return layer_class.from_base(module, **options)

    if keys is None:
        for _, layer in layers:
            found = [(path, convert(path, m)) for path, m in layer.named_modules() if path and _is_linear(m)]
            layer.update_modules(tree_unflatten(found))
        return

    missing = []
    for key in keys:
        # A key may be absent from some layers (layer 0 has no value
        # residual), as in mlx-lm.
        in_layers = [(layer, dict(layer.named_modules()).get(key)) for _, layer in layers]
        in_layers = [(layer, module) for layer, module in in_layers if module is not None]
        for layer, module in in_layers:
            layer.update_modules(tree_unflatten([(key, convert(key, module))]))
        if in_layers:
            continue
        module = dict(model.named_modules()).get(key)
        if module is None:
            missing.append(key)
            continue
        model.update_modules(tree_unflatten([(key, convert(key, module))]))

    if missing:
        available = sorted(path for path, m in model.layers[-1].named_modules() if path and _is_linear(m))
        raise ValueError(f"no module {missing} in the model's layers; the linear layers of a block are {available}")


def prepare_for_training(
    model: nn.Module,
    fine_tune_type: str,
    num_layers: int = -1,
    lora_parameters: Optional[Dict[str, Any]] = None,
) -> nn.Module:
    """Freeze a model except what ``fine_tune_type`` trains.

    Args:
        model (nn.Module): The base model; changed in place for lora, dora and full.
        fine_tune_type (str): ``lora`` or ``dora`` (adapters on linear
            layers), ``full`` (every weight of the last ``num_layers``
            layers, float16 ones cast to float32 to train; the embedding
            and the output head stay frozen) or ``state`` (the initial WKV
            state of the last ``num_layers`` layers).
        num_layers (int): How many of the last layers to train; -1 for all.
        lora_parameters (dict, optional): For lora and dora, see
            ``apply_lora_layers``; ``keys`` defaults to ``DEFAULT_LORA_KEYS``
            (an adapter_config.json without ``keys``, mlx-lm's format, means
            every linear layer instead).

    Returns:
        nn.Module: The model to train: the same object, or a
        ``StateTunedModel`` around it for state tuning. It records what was
        applied (``prepared_adapter_config``), and ``train`` writes that as
        adapter_config.json unless given another.
    """
    if fine_tune_type not in FINE_TUNE_TYPES:
        raise ValueError(f"unknown fine-tune type {fine_tune_type!r}; expected one of {', '.join(FINE_TUNE_TYPES)}")
    selected = _selected_layers(model, num_layers)
    fingerprint = base_fingerprint(model)
    model.freeze()

    config = {"fine_tune_type": fine_tune_type, "num_layers": num_layers, "base_model_fingerprint": fingerprint}
    if fine_tune_type in ("lora", "dora"):
        parameters = {**DEFAULT_LORA_PARAMETERS, **(lora_parameters or {})}
        if parameters.get("keys") is None:
            parameters["keys"] = list(DEFAULT_LORA_KEYS)
        apply_lora_layers(model, num_layers, parameters, use_dora=fine_tune_type == "dora")
        config["lora_parameters"] = parameters
    elif fine_tune_type == "full":
        for _, layer in selected:
            layer.unfreeze()
            _train_in_float32(layer)
    else:
        model = StateTunedModel(model)
        chosen = {index for index, _ in selected}
        for index, layer_state in enumerate(model.initial_state.layers):
            if index not in chosen:
                layer_state.freeze()

    # Set as a plain attribute, because nn.Module stores a dict set the usual
    # way in its parameter tree.
    object.__setattr__(model, PREPARED_CONFIG_ATTRIBUTE, config)
    return model


def prepared_adapter_config(model: nn.Module) -> Optional[Dict[str, Any]]:
    """Return what ``prepare_for_training`` applied to ``model``, as adapter_config.json contents.

    Args:
        model (nn.Module): A model returned by ``prepare_for_training``.

    Returns:
        dict | None: ``fine_tune_type``, ``num_layers``,
        ``base_model_fingerprint`` and, for lora and dora, ``lora_parameters``
        with their ``keys``: what ``load_adapters`` reads. None for a model
        that ``prepare_for_training`` did not return.
    """
    config = getattr(model, PREPARED_CONFIG_ATTRIBUTE, None)
    return copy.deepcopy(config) if config is not None else None


def _train_in_float32(layer: nn.Module) -> None:
    """Cast a layer's trainable float16 weights to float32.

    In float16, Adam's epsilon of 1e-8 rounds to 0, so a weight whose
    gradient is zero gets the update 0/0 and becomes NaN after the first
    step. Updates below float16's resolution (about 1e-3 of the weight's
    magnitude) would also be lost. The residual stream continues in float32
    from the first such layer on (``rwkv_mlx.models.rwkv4.Block`` undoes the
    float16 rescaling of RWKV-4, 5 and 6 there).
    """
    cast = [(name, value.astype(mx.float32)) for name, value in tree_flatten(layer.trainable_parameters()) if value.dtype == mx.float16]
    if cast:
        layer.load_weights(cast, strict=False)


def trainable_weights(model: nn.Module) -> Dict[str, mx.array]:
    """Return the trainable parameters by their names in the model."""
    return dict(tree_flatten(model.trainable_parameters()))


def write_atomically(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it to ``path``."""
    _write_atomically(path, write)


def save_safetensors(path: Path, arrays: Dict[str, mx.array], metadata: Optional[Dict[str, str]] = None) -> None:
    """Write arrays to a safetensors file atomically."""
    mx.eval(arrays)
    write_atomically(path, lambda f: mx.save_safetensors(f, arrays, metadata={k: str(v) for k, v in (metadata or {}).items()}))


def save_adapter_weights(path: Path, model: nn.Module, metadata: Optional[Dict[str, Any]] = None) -> None:
    """Save the model's trainable parameters to ``path``, atomically.

    Args:
        path (Path): The safetensors file.
        model (nn.Module): The model being trained.
        metadata (dict, optional): String metadata to store in the file.
    """
    save_safetensors(path, trainable_weights(model), metadata)


def save_adapter_config(adapter_path: Path, config: Dict[str, Any]) -> None:
    """Write ``adapter_config.json`` into the adapter folder, atomically."""
    adapter_path = Path(adapter_path)
    adapter_path.mkdir(parents=True, exist_ok=True)
    text = json.dumps(dict(sorted(config.items())), indent=4, default=str) + "\n"
    write_atomically(adapter_path / ADAPTER_CONFIG_FILE, lambda f: f.write(text.encode()))


def read_adapter_config(adapter_path: Path) -> Dict[str, Any]:
    """Read and check ``adapter_config.json`` of an adapter folder.

    Args:
        adapter_path (Path): The adapter folder.

    Returns:
        dict: The config, with ``fine_tune_type`` always present.
    """
    adapter_path = Path(adapter_path)
    if adapter_path.is_file():
        raise AdapterError(
            f"{adapter_path}: a file, not an adapter folder; pass the folder that contains {ADAPTER_CONFIG_FILE}"
        )
    if not adapter_path.is_dir():
        raise AdapterError(f"{adapter_path}: adapter folder not found")
    config_file = adapter_path / ADAPTER_CONFIG_FILE
    if not config_file.is_file():
        raise AdapterError(
            f"{config_file}: not found; an adapter folder contains {ADAPTER_CONFIG_FILE} and {ADAPTER_WEIGHTS_FILE}"
        )
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterError(f"{config_file}: invalid JSON ({error})") from error
    if not isinstance(config, dict):
        raise AdapterError(f"{config_file}: expected a JSON object, found {type(config).__name__}")

    config.setdefault("fine_tune_type", "lora")
    if config["fine_tune_type"] not in FINE_TUNE_TYPES:
        raise AdapterError(
            f"{config_file}: unknown fine_tune_type {config['fine_tune_type']!r}; expected one of {', '.join(FINE_TUNE_TYPES)}"
        )
    config.setdefault("num_layers", -1)
    if config["fine_tune_type"] in ("lora", "dora") and not isinstance(config.get("lora_parameters"), dict):
        raise AdapterError(f"{config_file}: a {config['fine_tune_type']} adapter needs 'lora_parameters' with rank and scale")
    return config


def read_adapter_weights(path: Path) -> Tuple[Dict[str, mx.array], Dict[str, str]]:
    """Read an adapter safetensors file and its metadata."""
    path = Path(path)
    if path.is_dir():
        raise AdapterError(f"{path}: a folder; name the adapter weights file in it, such as {path / ADAPTER_WEIGHTS_FILE}")
    if not path.is_file():
        raise AdapterError(
            f"{path}: adapter weights not found; name {ADAPTER_WEIGHTS_FILE} or a checkpoint such as "
            f"0000100_{ADAPTER_WEIGHTS_FILE} in a training run's --adapter-path folder"
        )
    try:
        weights, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
    except (RuntimeError, ValueError, OSError) as error:
        raise AdapterError(f"{path}: not a readable safetensors file ({error}); it may be truncated") from error
    return weights, metadata


def check_fingerprint(saved: Optional[str], model: nn.Module, fine_tune_type: str, source: str) -> None:
    """Compare a saved base-model fingerprint with the model's.

    A tuned state is only meaningful for the exact weights it was trained on,
    so a mismatch raises AdapterError for ``state``. For the other types it
    logs a warning. Adapters without a fingerprint (made by mlx-lm) pass.
    """
    if not saved:
        return
    current = base_fingerprint(model)
    if saved == current:
        return
    message = (
        f"{source}: the adapters were trained on a base model with fingerprint {saved}, "
        f"but this model's fingerprint is {current}"
    )
    if fine_tune_type == "state":
        raise AdapterError(message + "; load the base model the state was tuned on (same file, dtype and quantization)")
    logger.warning("%s; the outputs may not be what was trained", message)


def check_adapter_tensors(
    weights: Dict[str, mx.array], model: nn.Module, fine_tune_type: str, source: str, saved: Optional[Dict[str, str]] = None
) -> None:
    """Raise AdapterError unless every tensor is an adapter parameter of the
    model with the same shape; ``saved`` is the adapters' ``saved_identity``,
    named in the message."""
    parameters = dict(tree_flatten(model.parameters()))
    if fine_tune_type in ADAPTER_LEAVES:
        leaves = ADAPTER_LEAVES[fine_tune_type]
        allowed = {name for name in parameters if name.rsplit(".", 1)[-1] in leaves}
    elif fine_tune_type == "state":
        allowed = {name for name in parameters if name.startswith("initial_state.")}
    else:
        allowed = set(parameters)

    for name, value in weights.items():
        if name not in allowed:
            raise AdapterError(
                f"{source}: tensor '{name}' is not a {fine_tune_type} parameter of this model; "
                f"{shape_mismatch_hint(saved or {}, model)}"
            )
        if tuple(value.shape) != tuple(parameters[name].shape):
            raise AdapterError(
                f"{source}: tensor '{name}' has shape {tuple(value.shape)}, but the model's is "
                f"{tuple(parameters[name].shape)}; {shape_mismatch_hint(saved or {}, model)}"
            )


def cast_to_parameters(weights: Dict[str, mx.array], model: nn.Module) -> List[Tuple[str, mx.array]]:
    """Return the (name, tensor) pairs with each tensor cast to the dtype of
    the model's parameter of that name (float32 full fine-tunes onto a float16 model)."""
    parameters = dict(tree_flatten(model.parameters()))
    return [(name, value.astype(parameters[name].dtype)) for name, value in weights.items()]


def load_adapters(model: nn.Module, adapter_path) -> nn.Module:
    """Load an adapter folder onto a model, unfused.

    Args:
        model (nn.Module): The base model. For lora, dora and full it is
            changed in place; its weights are frozen and the adapter
            parameters are trainable.
        adapter_path (str | Path): A folder with ``adapter_config.json`` and
            ``adapters.safetensors`` (see the module docstring), from this
            package or from ``mlx_lm.lora``.

    Returns:
        nn.Module: The adapted model: the same object, or for a ``state``
        adapter a ``StateTunedModel`` that shares the base model's weights and
        starts every sequence from the tuned state.
    """
    adapter_path = Path(adapter_path)
    if isinstance(model, StateTunedModel) or _has_adapter_layers(model):
        raise AdapterError(
            f"cannot load {adapter_path}: the model already has adapters; load them onto a freshly loaded base "
            "model, or merge the present ones first with fuse_adapters"
        )
    config = read_adapter_config(adapter_path)
    weights_file = adapter_path / ADAPTER_WEIGHTS_FILE
    weights, metadata = read_adapter_weights(weights_file)
    fine_tune_type = config["fine_tune_type"]
    identity = saved_identity(metadata, config)
    check_model_identity(identity, model, str(weights_file))
    saved_fingerprint = metadata.get("base_model_fingerprint") or config.get("base_model_fingerprint")
    check_fingerprint(saved_fingerprint, model, fine_tune_type, str(weights_file))

    was_training = model.training
    if fine_tune_type in ("lora", "dora"):
        model.freeze()
        try:
            apply_lora_layers(model, config["num_layers"], config["lora_parameters"], use_dora=fine_tune_type == "dora")
        except (KeyError, ValueError) as error:
            raise AdapterError(f"{adapter_path / ADAPTER_CONFIG_FILE}: {error}") from error
    elif fine_tune_type == "state":
        model.freeze()
        model = StateTunedModel(model)

    check_adapter_tensors(weights, model, fine_tune_type, str(weights_file), identity)
    model.load_weights(cast_to_parameters(weights, model), strict=False)
    mx.eval(model.parameters())
    if not was_training:
        model.eval()
    logger.info("loaded %s adapters from %s (%d tensors)", fine_tune_type, adapter_path, len(weights))
    return model


def load_tuned_cache(model: nn.Module, adapter_path, batch_size: int = 1):
    """Read a state adapter into a cache for the base model, leaving the model unchanged.

    Args:
        model (nn.Module): The base model the state was tuned on.
        adapter_path (str | Path): A ``state`` adapter folder, or its
            ``adapters.safetensors`` file.
        batch_size (int): Sequences in the batch.

    Returns:
        list[ArraysCache]: One cache per layer holding the tuned state.
    """
    adapter_path = Path(adapter_path)
    weights_file = adapter_path / ADAPTER_WEIGHTS_FILE if adapter_path.is_dir() else adapter_path
    config = {}
    if adapter_path.is_dir():
        config = read_adapter_config(adapter_path)
        if config["fine_tune_type"] != "state":
            raise AdapterError(f"{adapter_path}: contains {config['fine_tune_type']} adapters, not a tuned state")
    weights, metadata = read_adapter_weights(weights_file)
    identity = saved_identity(metadata, config)
    check_model_identity(identity, model, str(weights_file))
    check_fingerprint(metadata.get("base_model_fingerprint"), model, "state", str(weights_file))

    tuned = StateTunedModel(model)
    check_adapter_tensors(weights, tuned, "state", str(weights_file), identity)
    tuned.load_weights(list(weights.items()), strict=False)
    return tuned.initial_cache(batch_size)


def save_tuned_state(path, model: StateTunedModel, tokenizer: Optional[str] = None) -> None:
    """Write the tuned initial state as a state file (``rwkv_mlx.io.state``)
    for ``generate --load-state`` with the base model.

    Args:
        path (str | Path): The state file to write.
        model (StateTunedModel): The state-tuned model.
        tokenizer (str, optional): ``tokenizer_identity`` of its tokenizer.
    """
    from ..io.state import save_state

    if not isinstance(model, StateTunedModel):
        raise ValueError("save_tuned_state needs a StateTunedModel (from state tuning or load_adapters)")
    save_state(path, model.initial_cache(1), model.base_model, tokenizer=tokenizer)


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantized linear and embedding layer by a dense one, in place."""
    replaced = []
    for name, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            output_dims, _ = module.weight.shape
            dense = nn.Linear(module.weight.shape[1] * 32 // module.bits, output_dims, bias="bias" in module)
            dense.weight = dense_weight(module)
            if "bias" in module:
                dense.bias = module.bias
            replaced.append((name, dense))
        elif isinstance(module, nn.QuantizedEmbedding):
            weight = dense_weight(module)
            dense = nn.Embedding(*weight.shape)
            dense.weight = weight
            replaced.append((name, dense))
    if replaced:
        model.update_modules(tree_unflatten(replaced))
    return model


def fuse_adapters(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Merge every LoRA and DoRA layer into its base layer, in place.

    Args:
        model (nn.Module): A model with unfused adapters (``load_adapters``).
        dequantize (bool): Also turn every quantized layer into a dense one.

    Returns:
        nn.Module: The model with plain layers only.
    """
    if isinstance(model, StateTunedModel):
        raise ValueError(
            "a tuned state cannot be fused into the weights; use it with generate --load-state, "
            "or load the adapter folder with load_adapters"
        )
    fused = [(name, module.fuse(dequantize=dequantize)) for name, module in model.named_modules() if isinstance(module, (LoRALinear, DoRALinear))]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        dequantize_model(model)
    return model


__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "AdapterError",
    "DEFAULT_LORA_KEYS",
    "DEFAULT_LORA_PARAMETERS",
    "FINE_TUNE_TYPES",
    "InitialState",
    "LOSS_HISTORY_FILE",
    "OPTIMIZER_FILE_ENDING",
    "STATE_FILE",
    "apply_lora_layers",
    "base_fingerprint",
    "check_model_identity",
    "dequantize_model",
    "fuse_adapters",
    "load_adapters",
    "load_tuned_cache",
    "model_identity",
    "prepare_for_training",
    "run_files",
    "save_adapter_config",
    "save_adapter_weights",
    "save_tuned_state",
    "short_list",
    "trainable_weights",
]
