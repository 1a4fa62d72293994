"""Reader for RWKV-7 model directories in the Hugging Face layouts of fla and mlx-lm.

A model directory contains ``config.json`` and the weights as safetensors: one
``model.safetensors``, or shards listed in ``model.safetensors.index.json``.
Two layouts share the canonical names (see ``layout7``):

- flash-linear-attention's ``RWKV7ForCausalLM`` (``model_type`` "rwkv7"):
  ``attn.k_k``, ``attn.k_a`` and ``ffn.x_k`` are ``[C]`` and ``attn.g_norm.*``
  is ``[C]``. Checkpoints from fla's first RWKV-7 version hold one
  ``attn.x_x`` ``[6, C]`` in place of the six token-shift mixes, in the
  order r, w, k, v, a, g. Some checkpoints carry an unused ``attn.v_lora``
  in layer 0, which is dropped. With ``norm_bias: false`` the layer norms
  have no bias tensors and zero biases are added.
- what ``mlx_lm.convert`` writes for ``model_type`` "rwkv7": canonical
  shapes, and when quantized, ``<module>.scales`` and ``<module>.biases``
  beside each quantized weight, with the settings in the ``quantization``
  entry of ``config.json``. These are kept as they are.

config.json uses fla's ``RWKV7Config`` fields. The model's shapes are read
from the tensors (``infer_rwkv7_config``); a config field that disagrees
with them is an error.
"""

import json
import logging
import re
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import mlx.core as mx

from .errors import CheckpointError
from .layout7 import reshape_canonical

logger = logging.getLogger(__name__)

MODEL_TYPES = ("rwkv7", "rwkv7_fla")
INDEX_FILE = "model.safetensors.index.json"
TOKEN_SHIFT_MIXES = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")
DEFAULT_NORM_EPS = 1e-5

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def infer_rwkv7_config(weights: Dict[str, mx.array], source: str = "weights") -> Dict[str, Any]:
    """Derive the ``ModelArgs`` fields of an RWKV-7 model from its canonical weights.

    Only leading dimensions are read where a quantized weight would pack the
    last one, so quantized weights work too.

    Args:
        weights (dict[str, mx.array]): Canonical weights (see ``layout7``).
        source (str): Where the weights came from, for error messages.

    Returns:
        dict: ``model_type``, ``vocab_size``, ``hidden_size``,
        ``intermediate_size``, ``head_dim``, ``num_hidden_layers``, the four
        low-rank sizes, ``tie_word_embeddings`` (true when there is no
        ``lm_head.weight``) and ``norm_eps`` (1e-5, which tensors cannot tell).
        ``v_low_rank_dim`` is 0 for a one-layer model, which has no value
        low-rank projection.

    Raises:
        CheckpointError: If a tensor the sizes are read from is missing or mis-shaped.
    """

    def tensor(name: str, ndim: int) -> mx.array:
        if name not in weights:
            raise CheckpointError(f"{source}: missing tensor '{name}' of an RWKV-7 model")
        value = weights[name]
        if value.ndim != ndim:
            raise CheckpointError(
                f"{source}: tensor '{name}' has shape {list(value.shape)}, expected {ndim} dimensions"
            )
        return value

    layers = sorted({int(m.group(1)) for m in map(_LAYER.match, weights) if m})
    if not layers:
        raise CheckpointError(f"{source}: no tensors named 'model.layers.<i>.*'; not an RWKV-7 model in the canonical layout")
    if layers != list(range(len(layers))):
        missing = sorted(set(range(layers[-1] + 1)) - set(layers))
        raise CheckpointError(f"{source}: missing every tensor of layer {missing[0]} ('model.layers.{missing[0]}.*')")

    hidden_size = tensor("model.norm.weight", 1).shape[0]
    heads, head_dim = tensor("model.layers.0.attn.r_k", 2).shape
    if heads * head_dim != hidden_size:
        raise CheckpointError(
            f"{source}: tensor 'model.layers.0.attn.r_k' has shape {[heads, head_dim]}, "
            f"expected [heads, head size] with heads * head size = {hidden_size}"
        )

    def rank(module: str, layer: int = 0) -> int:
        return tensor(f"model.layers.{layer}.attn.{module}.lora.0.weight", 2).shape[0]

    return {
        "model_type": "rwkv7",
        "vocab_size": tensor("model.embeddings.weight", 2).shape[0],
        "hidden_size": hidden_size,
        "intermediate_size": tensor("model.layers.0.ffn.key.weight", 2).shape[0],
        "norm_eps": DEFAULT_NORM_EPS,
        "head_dim": head_dim,
        "num_hidden_layers": len(layers),
        "a_low_rank_dim": rank("a_lora"),
        "v_low_rank_dim": rank("v_lora", layer=1) if len(layers) > 1 else 0,
        "gate_low_rank_dim": rank("g_lora"),
        "decay_low_rank_dim": rank("w_lora"),
        "tie_word_embeddings": "lm_head.weight" not in weights,
    }


def load_hf_directory(path: Union[str, Path]) -> Tuple[Dict[str, mx.array], Dict[str, Any]]:
    """Read an RWKV-7 model directory in fla's or mlx-lm's layout.

    Args:
        path (str | Path): The directory with ``config.json`` and safetensors.

    Returns:
        tuple[dict[str, mx.array], dict]: The canonical weights and the
        ``ModelArgs`` fields, plus ``quantization`` (from config.json) when the
        weights are quantized.

    Raises:
        CheckpointError: If a file is missing or unreadable, the model is not
            RWKV-7, or config.json disagrees with the tensors.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: directory not found")
    hf_config = _read_json(path / "config.json")

    model_type = hf_config.get("model_type")
    if model_type is not None and model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"{path / 'config.json'}: field 'model_type' is '{model_type}', expected one of {', '.join(MODEL_TYPES)}"
        )
    if hf_config.get("attn"):
        raise CheckpointError(
            f"{path / 'config.json'}: field 'attn' configures softmax-attention layers (a hybrid model), "
            "which RWKV-7 models here do not support"
        )

    weights = _read_safetensors(path)
    weights = _normalize_fla(weights, hf_config, path)
    weights = reshape_canonical(weights, str(path))

    config = infer_rwkv7_config(weights, str(path))
    _check_config(config, hf_config, path / "config.json")
    config["norm_eps"] = hf_config.get("norm_eps") or DEFAULT_NORM_EPS

    quantization = hf_config.get("quantization") or hf_config.get("quantization_config")
    if quantization is not None:
        config["quantization"] = quantization
    elif any(name.endswith(".scales") for name in weights):
        raise CheckpointError(
            f"{path / 'config.json'}: missing field 'quantization', but the weights hold quantized tensors (*.scales)"
        )

    logger.info("Read RWKV-7 from %s (%d tensors)", path, len(weights))
    return weights, config


def _read_json(file: Path) -> Dict[str, Any]:
    if not file.is_file():
        raise CheckpointError(f"{file}: file not found; a model directory needs config.json")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{file}: not valid JSON ({error})") from error


def _load_file(file: Path) -> Dict[str, mx.array]:
    if not file.is_file():
        raise CheckpointError(f"{file}: file not found")
    try:
        return dict(mx.load(str(file)))
    except (RuntimeError, ValueError) as error:
        raise CheckpointError(
            f"{file}: cannot read safetensors ({error}); it may be truncated, so download or convert the model again"
        ) from error


def _read_safetensors(path: Path) -> Dict[str, mx.array]:
    """Read every tensor of the directory, following the shard index when there is one."""
    index_file = path / INDEX_FILE
    if index_file.exists():
        weight_map = _read_json(index_file).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_file}: missing field 'weight_map' (tensor name -> shard file)")
        weights = {}
        for shard in sorted(set(weight_map.values())):
            weights.update(_load_file(path / shard))
        for name, shard in weight_map.items():
            if name not in weights:
                raise CheckpointError(f"{path / shard}: missing tensor '{name}', which {INDEX_FILE} lists in it")
        return weights

    files: List[Path] = sorted(path.glob("model*.safetensors")) or sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors weight files in the model directory")
    weights = {}
    for file in files:
        shard = _load_file(file)
        duplicates = weights.keys() & shard.keys()
        if duplicates:
            raise CheckpointError(f"{file}: tensor '{sorted(duplicates)[0]}' also appears in another weight file")
        weights.update(shard)
    return weights


def _normalize_fla(weights: Dict[str, mx.array], hf_config: Dict[str, Any], path: Path) -> Dict[str, mx.array]:
    """Split the legacy ``attn.x_x``, drop layer 0's unused value projection and add missing norm biases."""
    out = {}
    for name, value in weights.items():
        if name.endswith(".attn.x_x"):
            if value.size % 6:
                raise CheckpointError(
                    f"{path}: tensor '{name}' has shape {list(value.shape)}, expected [6, C] "
                    "(the token-shift mixes r, w, k, v, a, g)"
                )
            mixes = value.reshape(6, 1, 1, -1)
            prefix = name[: -len("x_x")]
            for i, mix in enumerate(TOKEN_SHIFT_MIXES):
                out[prefix + mix] = mixes[i]
        elif name.startswith("model.layers.0.attn.v_lora."):
            logger.debug("%s: dropping '%s', which layer 0 does not use", path, name)
        else:
            out[name] = value

    if hf_config.get("norm_bias") is False:
        for name, value in list(out.items()):
            if name.endswith("norm.weight") and not name.endswith("g_norm.weight"):
                out.setdefault(name[: -len("weight")] + "bias", mx.zeros_like(value))
    return out


def _check_config(config: Dict[str, Any], hf_config: Dict[str, Any], file: Path) -> None:
    """Raise CheckpointError where a config.json field contradicts the shapes read from the tensors."""
    expected = dict(config)
    expected["num_heads"] = config["hidden_size"] // config["head_dim"]
    hidden_ratio = hf_config.get("hidden_ratio")
    if hf_config.get("intermediate_size") is None and hidden_ratio is not None:
        # fla rounds hidden_size * hidden_ratio up to a multiple of 32.
        hf_config = dict(hf_config, intermediate_size=-(-int(config["hidden_size"] * hidden_ratio) // 32) * 32)

    fields = ["vocab_size", "hidden_size", "intermediate_size", "head_dim", "num_heads", "num_hidden_layers",
              "a_low_rank_dim", "gate_low_rank_dim", "decay_low_rank_dim"]  # fmt: skip
    if config["num_hidden_layers"] > 1:
        fields.append("v_low_rank_dim")
    for field in fields:
        value = hf_config.get(field)
        if value is not None and value != expected[field]:
            raise CheckpointError(
                f"{file}: field '{field}' is {value}, but the weights have {field} = {expected[field]}"
            )

    value_dim = hf_config.get("value_dim")
    for dim in value_dim if isinstance(value_dim, list) else [value_dim]:
        if dim is not None and dim != config["hidden_size"]:
            raise CheckpointError(
                f"{file}: field 'value_dim' is {value_dim}; only a value size equal to "
                f"hidden_size ({config['hidden_size']}) is supported"
            )

    tied = hf_config.get("tie_word_embeddings")
    if tied is not None and bool(tied) != config["tie_word_embeddings"]:
        logger.warning(
            "%s: field 'tie_word_embeddings' is %s, but lm_head.weight is %s; following the weights",
            file,
            tied,
            "absent" if config["tie_word_embeddings"] else "present",
        )
