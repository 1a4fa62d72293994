"""RWKV-4, RWKV-5 (5.0, 5.1, 5.2) and RWKV-6 weight layouts and the translation into the canonical ones.

The canonical layout of each version is the parameter tree of its model in
``rwkv_mlx.models`` (``rwkv4``, ``rwkv5``, ``rwkv6``). Tensors with the same
role as in RWKV-7 take RWKV-7's canonical names (see ``layout7``), so LoRA
keys such as ``attn.r_proj`` and ``ffn.key`` mean the same in every version.
The token-shift, decay and bonus tensors keep their official names. With C
the model width, H the head count, N the head size (C = H * N), F the
channel-mix width, V the vocabulary and D_* the low-rank sizes, every
version has, per layer ``i`` (prefix ``model.layers.i.``):

| canonical name                 | shape  | official ``.pth`` name (``blocks.i.``)   |
|--------------------------------|--------|------------------------------------------|
| pre_norm.{weight,bias} (i = 0) | [C]    | ln0.{weight,bias}                        |
| attn_norm.{weight,bias}        | [C]    | ln1.{weight,bias}                        |
| ffn_norm.{weight,bias}         | [C]    | ln2.{weight,bias}                        |
| attn.{r,k,v,o}_proj.weight     | [C, C] | att.{receptance,key,value,output}.weight |
| ffn.key.weight                 | [F, C] | ffn.key.weight                           |
| ffn.value.weight               | [C, F] | ffn.value.weight                         |
| ffn.receptance.weight          | [C, C] | ffn.receptance.weight                    |

plus ``model.embeddings.weight`` [V, C] (``emb.weight``), ``model.norm.*``
(``ln_out.*``) and ``lm_head.weight`` [V, C] (``head.weight``). The
version-specific tensors of layer ``i``:

RWKV-4:

| canonical name         | shape | official name and shape             |
|------------------------|-------|-------------------------------------|
| attn.time_mix_{k,v,r}  | [C]   | att.time_mix_{k,v,r} [1, 1, C]      |
| attn.time_decay        | [C]   | att.time_decay [C]                  |
| attn.time_first        | [C]   | att.time_first [C]                  |
| ffn.time_mix_{k,r}     | [C]   | ffn.time_mix_{k,r} [1, 1, C]        |

RWKV-5 (5.0 has no gate. 5.0 and 5.1 have one decay and one bonus per
head, so P = 1 for them and P = N for 5.2):

| canonical name            | shape  | official name and shape                          |
|---------------------------|--------|--------------------------------------------------|
| attn.time_mix_{k,v,r}     | [C]    | att.time_mix_{k,v,r} [1, 1, C]                   |
| attn.time_mix_g (5.1+)    | [C]    | att.time_mix_g [1, 1, C]                         |
| attn.time_decay           | [H, P] | att.time_decay: [H, N] (5.2), [H] or [H, 1]      |
| attn.time_faaaa           | [H, P] | att.time_faaaa [H, N] (5.2), or exp(att.time_first) from [H] (5.0, 5.1) |
| attn.g_proj.weight (5.1+) | [C, C] | att.gate.weight                                  |
| attn.g_norm.{weight,bias} | [H, N] | att.ln_x.{weight,bias} [C]                       |
| ffn.time_mix_{k,r}        | [C]    | ffn.time_mix_{k,r} [1, 1, C]                     |

RWKV-6:

| canonical name               | shape            | official name and shape           |
|------------------------------|------------------|-----------------------------------|
| attn.time_maa_{x,w,k,v,r,g}  | [C]              | att.time_maa_* [1, 1, C]          |
| attn.time_maa_w1             | [C, 5 D_mix]     | att.time_maa_w1                   |
| attn.time_maa_w2             | [5, D_mix, C]    | att.time_maa_w2                   |
| attn.time_decay              | [C]              | att.time_decay [1, 1, C]          |
| attn.time_decay_w1           | [C, D_decay]     | att.time_decay_w1                 |
| attn.time_decay_w2           | [D_decay, C]     | att.time_decay_w2                 |
| attn.time_faaaa              | [H, N]           | att.time_faaaa [H, N]             |
| attn.g_proj.weight           | [C, C]           | att.gate.weight                   |
| attn.g_norm.{weight,bias}    | [H, N]           | att.ln_x.{weight,bias} [C]        |
| ffn.time_maa_{k,r}           | [C]              | ffn.time_maa_{k,r} [1, 1, C]      |

Only RWKV-5.0 and 5.1's ``time_first`` changes value: its exponential is
the bonus, which 5.2 and 6 store directly. Every other tensor moves
unchanged up to a reshape.

The Hugging Face layouts of RWKV-4 (``RwkvForCausalLM``) and RWKV-5/6 are
read by ``rwkv_mlx.io.hf_older``, which renames their tensors to the
official names and translates them here. RWKV-6 GGUF files are read by
``rwkv_mlx.io.gguf_older``.
"""

import re
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import mlx.core as mx

from .errors import CheckpointError

DEFAULT_NORM_EPS = 1e-5
# The epsilon of rwkv.cpp's RWKV-5 group norm (rwkv_graph.inc at rwkv.cpp commit 4358e70).
RWKV_CPP_V5_GROUP_NORM_EPS = 1e-5
# Config fields that tensors cannot tell, kept from a directory's config.json.
_CONFIG_ONLY_FIELDS = ("rescale_every", "group_norm_eps")

MODEL_TYPES = {"4": "rwkv4", "5": "rwkv5", "5.1": "rwkv5", "5.2": "rwkv5", "6": "rwkv6"}

_TOP_LEVEL = {
    "emb.weight": "model.embeddings.weight",
    "ln_out.weight": "model.norm.weight",
    "ln_out.bias": "model.norm.bias",
    "head.weight": "lm_head.weight",
}

# Official suffix within ``blocks.i.`` -> canonical suffix, for every version.
_COMMON = {
    "ln0.weight": "pre_norm.weight",
    "ln0.bias": "pre_norm.bias",
    "ln1.weight": "attn_norm.weight",
    "ln1.bias": "attn_norm.bias",
    "ln2.weight": "ffn_norm.weight",
    "ln2.bias": "ffn_norm.bias",
    "att.receptance.weight": "attn.r_proj.weight",
    "att.key.weight": "attn.k_proj.weight",
    "att.value.weight": "attn.v_proj.weight",
    "att.output.weight": "attn.o_proj.weight",
    "ffn.key.weight": "ffn.key.weight",
    "ffn.value.weight": "ffn.value.weight",
    "ffn.receptance.weight": "ffn.receptance.weight",
}

# Version-specific official suffix -> canonical suffix. The values of the
# ``*.time_*`` vectors are flattened; per-head tensors are reshaped later.
_VERSION_NAMES = {
    "4": {
        "att.time_mix_k": "attn.time_mix_k",
        "att.time_mix_v": "attn.time_mix_v",
        "att.time_mix_r": "attn.time_mix_r",
        "att.time_decay": "attn.time_decay",
        "att.time_first": "attn.time_first",
        "ffn.time_mix_k": "ffn.time_mix_k",
        "ffn.time_mix_r": "ffn.time_mix_r",
    },
    "5": {
        "att.time_mix_k": "attn.time_mix_k",
        "att.time_mix_v": "attn.time_mix_v",
        "att.time_mix_r": "attn.time_mix_r",
        "att.time_decay": "attn.time_decay",
        "att.time_first": "attn.time_faaaa",
        "att.time_faaaa": "attn.time_faaaa",
        "att.ln_x.weight": "attn.g_norm.weight",
        "att.ln_x.bias": "attn.g_norm.bias",
        "ffn.time_mix_k": "ffn.time_mix_k",
        "ffn.time_mix_r": "ffn.time_mix_r",
    },
    "6": {
        **{f"att.time_maa_{x}": f"attn.time_maa_{x}" for x in "xwkvrg"},
        "att.time_maa_w1": "attn.time_maa_w1",
        "att.time_maa_w2": "attn.time_maa_w2",
        "att.time_decay": "attn.time_decay",
        "att.time_decay_w1": "attn.time_decay_w1",
        "att.time_decay_w2": "attn.time_decay_w2",
        "att.time_faaaa": "attn.time_faaaa",
        "att.gate.weight": "attn.g_proj.weight",
        "att.ln_x.weight": "attn.g_norm.weight",
        "att.ln_x.bias": "attn.g_norm.bias",
        "ffn.time_maa_k": "ffn.time_maa_k",
        "ffn.time_maa_r": "ffn.time_maa_r",
    },
}
_VERSION_NAMES["5.1"] = {
    **_VERSION_NAMES["5"],
    "att.time_mix_g": "attn.time_mix_g",
    "att.gate.weight": "attn.g_proj.weight",
}
_VERSION_NAMES["5.2"] = _VERSION_NAMES["5.1"]

# Canonical suffixes stored flat, [C].
_FLAT = re.compile(r"\.(time_mix_[kvrg]|time_maa_[xwkvrg]|time_decay|time_first)$")
# Canonical suffixes stored per head, [H, N] or [H, 1].
_PER_HEAD = ("attn.time_faaaa", "attn.g_norm.weight", "attn.g_norm.bias")

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def official_to_canonical(weights: Dict[str, mx.array], version: str, source: str) -> Dict[str, mx.array]:
    """Rename and reshape official RWKV-4, 5.x or 6 weights into the canonical layout.

    Args:
        weights (dict[str, mx.array]): Tensors named as in BlinkDL's ``.pth``
            files (or restored to those names by the rwkv.cpp reader).
        version (str): ``"4"``, ``"5"``, ``"5.1"``, ``"5.2"`` or ``"6"``, as
            ``rwkv_mlx.io.pth.detect_version`` returns it.
        source (str): The file the weights came from, for error messages.

    Returns:
        dict[str, mx.array]: The canonical weights, shaped as the model expects.

    Raises:
        CheckpointError: For a tensor that does not belong to this version, or
            a per-head tensor whose size does not fit the head count.
    """
    if version not in _VERSION_NAMES:
        raise CheckpointError(f"{source}: RWKV version '{version}' has no layout here (expected 4, 5, 5.1, 5.2 or 6)")
    names = {**_COMMON, **_VERSION_NAMES[version]}

    out = {}
    for name, value in weights.items():
        if name in _TOP_LEVEL:
            out[_TOP_LEVEL[name]] = value
            continue

        parts = name.split(".", 2)
        if len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit():
            raise CheckpointError(f"{source}: unexpected tensor '{name}' in an RWKV-{version} checkpoint")
        suffix = parts[2]
        if suffix == "att.time_state":
            raise CheckpointError(
                f"{source}: tensor '{name}' is a tuned initial state (a state-tuned checkpoint), which is not "
                "supported for RWKV-4/5/6; load the base model and pass the state separately"
            )
        if suffix not in names:
            raise CheckpointError(f"{source}: unexpected tensor '{name}' in an RWKV-{version} checkpoint")

        canonical = f"model.layers.{parts[1]}.{names[suffix]}"
        if suffix == "att.time_first" and version.startswith("5"):
            # RWKV-5.0 and 5.1 store the log of the bonus.
            value = mx.exp(value.astype(mx.float32))
        out[canonical] = value

    return reshape_canonical(out, version, source)


def reshape_canonical(weights: Dict[str, mx.array], version: str, source: str) -> Dict[str, mx.array]:
    """Give token-shift, decay and per-head tensors their canonical shapes.

    The head count comes from ``attn.time_faaaa`` ([H, N] in 5.2 and 6) or,
    in 5.0 and 5.1, from ``attn.time_decay`` ([H] or [H, 1]).
    """
    if not version.startswith(("5", "6")):
        return {name: value.reshape(-1) if _FLAT.search(name) else value for name, value in weights.items()}

    heads = _head_count(weights, version, source)
    out = {}
    for name, value in weights.items():
        suffix = _LAYER.sub("", name)
        if suffix in _PER_HEAD or (suffix == "attn.time_decay" and version.startswith("5")):
            if value.size % heads:
                raise CheckpointError(
                    f"{source}: tensor '{name}' has shape {tuple(value.shape)}, expected a multiple of {heads} values "
                    f"({heads} heads)"
                )
            value = value.reshape(heads, -1)
        elif _FLAT.search(name):
            value = value.reshape(-1)
        out[name] = value
    return out


def _head_count(weights: Dict[str, mx.array], version: str, source: str) -> int:
    name = "model.layers.0.attn.time_faaaa" if version in ("5.2", "6") else "model.layers.0.attn.time_decay"
    if name not in weights:
        raise CheckpointError(f"{source}: missing tensor '{name}', which gives the head count of an RWKV-{version} model")
    value = weights[name]
    if value.ndim == 0 or (version in ("5.2", "6") and value.ndim < 2):
        raise CheckpointError(f"{source}: tensor '{name}' has shape {tuple(value.shape)}, expected [heads, head size]")
    return value.shape[0]


def infer_config(weights: Dict[str, mx.array], version: str, source: str = "weights") -> Dict[str, Any]:
    """Derive the ``ModelArgs`` fields of an RWKV-4, 5.x or 6 model from its canonical weights.

    Only leading dimensions are read where a quantized weight would pack the
    last one, so quantized weights work too.

    Args:
        weights (dict[str, mx.array]): Canonical weights.
        version (str): ``"4"``, ``"5"``, ``"5.1"``, ``"5.2"`` or ``"6"``.
        source (str): Where the weights came from, for error messages.

    Returns:
        dict: ``model_type`` (``rwkv4``, ``rwkv5`` or ``rwkv6``), ``version``,
        ``vocab_size``, ``hidden_size``, ``intermediate_size``,
        ``num_hidden_layers``, ``norm_eps`` (1e-5, which tensors cannot tell),
        and for RWKV-5/6 ``head_dim``; RWKV-6 adds ``mix_low_rank_dim`` and
        ``decay_low_rank_dim``.

    Raises:
        CheckpointError: If a tensor the sizes are read from is missing or
            mis-shaped, or a layer is missing.
    """
    if version not in MODEL_TYPES:
        raise CheckpointError(f"{source}: RWKV version '{version}' has no layout here (expected 4, 5, 5.1, 5.2 or 6)")

    def tensor(name: str, ndim: int) -> mx.array:
        if name not in weights:
            raise CheckpointError(f"{source}: missing tensor '{name}' of an RWKV-{version} model")
        value = weights[name]
        if value.ndim != ndim:
            raise CheckpointError(f"{source}: tensor '{name}' has shape {list(value.shape)}, expected {ndim} dimensions")
        return value

    layers = sorted({int(m.group(1)) for m in map(_LAYER.match, weights) if m})
    if not layers:
        raise CheckpointError(f"{source}: no tensors named 'model.layers.<i>.*'; not a model in the canonical layout")
    if layers != list(range(len(layers))):
        missing = sorted(set(range(layers[-1] + 1)) - set(layers))[0]
        raise CheckpointError(f"{source}: missing every tensor of layer {missing} ('model.layers.{missing}.*')")

    hidden_size = tensor("model.norm.weight", 1).shape[0]
    config = {
        "model_type": MODEL_TYPES[version],
        "version": version,
        "vocab_size": tensor("model.embeddings.weight", 2).shape[0],
        "hidden_size": hidden_size,
        "intermediate_size": tensor("model.layers.0.ffn.key.weight", 2).shape[0],
        "num_hidden_layers": len(layers),
        "norm_eps": DEFAULT_NORM_EPS,
    }
    if version == "4":
        return config

    heads = tensor("model.layers.0.attn.g_norm.weight", 2).shape[0]
    if hidden_size % heads:
        raise CheckpointError(
            f"{source}: {heads} heads (tensor 'model.layers.0.attn.g_norm.weight') do not divide the width {hidden_size}"
        )
    config["head_dim"] = hidden_size // heads
    if version == "6":
        config["mix_low_rank_dim"] = tensor("model.layers.0.attn.time_maa_w2", 3).shape[1]
        config["decay_low_rank_dim"] = tensor("model.layers.0.attn.time_decay_w1", 2).shape[1]
    return config


def read_official(official: Dict[str, mx.array], version: str, source: str) -> Tuple[Dict[str, mx.array], Dict[str, Any]]:
    """Translate official RWKV-4, 5.x or 6 weights and derive their model config.

    Args:
        official (dict[str, mx.array]): Tensors with the official names.
        version (str): As ``rwkv_mlx.io.pth.detect_version`` returns it.
        source (str): The file the weights came from, for error messages.

    Returns:
        tuple[dict[str, mx.array], dict]: The canonical weights and the
        ``ModelArgs`` fields (see ``infer_config``).
    """
    weights = official_to_canonical(official, version, source)
    return weights, infer_config(weights, version, source)


def read_rwkv_cpp(official: Dict[str, mx.array], source: str) -> Tuple[Dict[str, mx.array], Dict[str, Any]]:
    """Translate the official-name weights of an rwkv.cpp file and derive their model config.

    rwkv.cpp names a 5.x model without a gate "5.1"; the version is taken
    from the tensors instead, as the official package names it (5.0). The
    config keeps rwkv.cpp's group-norm epsilon for RWKV-5 (1e-5, where the
    official package uses 64e-5), so the model computes what rwkv.cpp does.

    Args:
        official (dict[str, mx.array]): Weights from ``rwkv_mlx.io.rwkv_cpp.load_rwkv_cpp``.
        source (str): The file the weights came from, for error messages.

    Returns:
        tuple[dict[str, mx.array], dict]: The canonical weights and the ``ModelArgs`` fields.
    """
    from .pth import detect_version

    version = detect_version(official, source)
    weights, config = read_official(official, version, source)
    if version.startswith("5"):
        config["group_norm_eps"] = RWKV_CPP_V5_GROUP_NORM_EPS
    return weights, config


def read_directory(path: Path) -> Optional[Tuple[Dict[str, mx.array], Dict[str, Any]]]:
    """Read a model directory written by ``rwkv_mlx.loading.save_model`` for RWKV-4, 5 or 6.

    Args:
        path (Path): The directory, with ``config.json`` and safetensors.

    Returns:
        tuple[dict[str, mx.array], dict] | None: The canonical weights and
        the config, or None when ``config.json`` names another ``model_type``
        (RWKV-7 directories are read by ``rwkv_mlx.io.hf``).

    Raises:
        CheckpointError: If a file is unreadable or config.json disagrees with the tensors.
    """
    from .hf import _read_json, _read_safetensors

    config_file = path / "config.json"
    if not config_file.is_file():
        return None
    hf_config = _read_json(config_file)
    model_type = hf_config.get("model_type")
    if model_type not in MODEL_TYPES.values():
        return None

    version = str(hf_config.get("version", ""))
    if MODEL_TYPES.get(version) != model_type:
        raise CheckpointError(
            f"{config_file}: field 'version' is '{version}', which is not an RWKV version of model_type "
            f"'{model_type}'; set it to the version the weights were saved from ("
            f"{', '.join(v for v, t in MODEL_TYPES.items() if t == model_type)})"
        )
    weights = reshape_canonical(_read_safetensors(path), version, str(path))
    config = infer_config(weights, version, str(path))
    for field, value in config.items():
        if field in hf_config and hf_config[field] != value and field != "norm_eps":
            raise CheckpointError(f"{config_file}: field '{field}' is {hf_config[field]!r}, but the weights have {value!r}")
    config["norm_eps"] = hf_config.get("norm_eps") or DEFAULT_NORM_EPS
    for field in _CONFIG_ONLY_FIELDS:
        if field in hf_config:
            config[field] = hf_config[field]

    quantization = hf_config.get("quantization")
    if quantization is not None:
        config["quantization"] = quantization
    elif any(name.endswith(".scales") for name in weights):
        raise CheckpointError(f"{config_file}: missing field 'quantization', but the weights contain quantized tensors (*.scales)")
    return weights, config
