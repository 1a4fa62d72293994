"""Reader for the Hugging Face RWKV-4, 5 and 6 model directories and for directories with official tensor names.

A model directory contains ``config.json`` and the weights, either as
safetensors (``model.safetensors``, or shards listed in
``model.safetensors.index.json``) or as PyTorch zip checkpoints
(``pytorch_model.bin``, or shards listed in ``pytorch_model.bin.index.json``),
which are read without torch. Three layouts are read here:

- transformers' ``RwkvForCausalLM`` (``model_type`` "rwkv"): RWKV-4, as
  transformers' ``convert_rwkv_checkpoint_to_hf.py`` writes it.
- The RWKV organisation's remote-code models ``Rwkv5ForCausalLM``
  (``model_type`` "rwkv5", RWKV-5.0 to 5.2) and ``Rwkv6ForCausalLM``
  (``model_type`` "rwkv6"), whose converters rename the tensors the same way.
- The official names themselves (``emb.weight``, ``blocks.i.att.*``) for any
  version, as RWKV-7 "Goose" models with the RWKV-block project's remote code
  (``model_type`` "rwkv7") store them.

The Hugging Face names are the official ones with some name segments
renamed, and with ``rwkv.`` in front of every name but ``head.weight``:

| Hugging Face segment                          | official segment              |
|-----------------------------------------------|-------------------------------|
| rwkv.embeddings.weight                        | emb.weight                    |
| blocks.0.pre_ln.{weight,bias}                 | blocks.0.ln0.{weight,bias}    |
| blocks.i.attention.*                          | blocks.i.att.*                |
| blocks.i.feed_forward.*                       | blocks.i.ffn.*                |
| time_mix_{key,value,receptance,gate} (4, 5.x) | time_mix_{k,v,r,g}            |

Every other segment, and every value and shape, is the official one (for
example ``rwkv.blocks.0.attention.time_mix_key`` [1, 1, C] is
``blocks.0.att.time_mix_k``, and ``rwkv.blocks.0.attention.time_maa_w1`` is
``blocks.0.att.time_maa_w1``), so ``layout_older`` (RWKV-4, 5, 6) and
``layout7`` (RWKV-7) take the tensors on to the canonical layout. transformers
also accepts a base model without the ``rwkv.`` prefix, and so does this reader.

The RWKV version comes from the tensors (``rwkv_mlx.io.pth.detect_version``).
config.json's ``model_type`` must agree with it, so an RWKV-5 directory is
never read as another version. config.json's sizes (``vocab_size``,
``hidden_size``, ``num_hidden_layers``, ``intermediate_size``, ``head_size``)
are checked against the tensors, ``layer_norm_epsilon`` and ``rescale_every``
are kept, and with ``tie_word_embeddings`` a missing ``head.weight`` is the
embedding matrix.

The per-head group norm keeps the official ``rwkv`` package's epsilon (64e-5)
for RWKV-5 and 6. The RWKV-5 remote code calls ``group_norm`` with torch's
default 1e-5 instead, so its logits differ slightly from the official ones
and from these.
"""

import json
import logging
import math
import re
import struct
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import mlx.core as mx
from mlx.utils import tree_flatten

from ..models import rwkv4, rwkv5, rwkv6
from .errors import CheckpointError
from .hf import _load_file, _read_json, infer_rwkv7_config
from .layout7 import official_to_canonical as official7_to_canonical
from .layout_older import _COMMON, _TOP_LEVEL, _VERSION_NAMES, DEFAULT_NORM_EPS, read_official
from .pth import detect_version, load_pth

logger = logging.getLogger(__name__)

# config.json ``model_type`` -> the RWKV versions its tensors may have.
MODEL_TYPE_VERSIONS = {
    "rwkv": ("4",),
    "rwkv5": ("5", "5.1", "5.2"),
    "rwkv6": ("6",),
    "rwkv7": ("7",),
}
HF_PREFIX = "rwkv."
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_INDEX = "pytorch_model.bin.index.json"
# The group-norm epsilon of RWKV-6 is 1e-5 * head_size_divisor ** 2 in the
# remote code, and the models here use the official 64e-5.
OFFICIAL_HEAD_SIZE_DIVISOR = 8

# Official name segment -> Hugging Face name segment.
_HF_SEGMENTS = {
    "emb": "embeddings",
    "ln0": "pre_ln",
    "att": "attention",
    "ffn": "feed_forward",
    "time_mix_k": "time_mix_key",
    "time_mix_v": "time_mix_value",
    "time_mix_r": "time_mix_receptance",
    "time_mix_g": "time_mix_gate",
}
_OFFICIAL_SEGMENTS = {hf: official for official, hf in _HF_SEGMENTS.items()}

# config.json field -> ModelArgs field, for sizes the tensors also give.
_CONFIG_SIZES = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_hidden_layers",
    "intermediate_size": "intermediate_size",
    "head_size": "head_dim",
}
_MODEL_MODULES = {"rwkv4": rwkv4, "rwkv5": rwkv5, "rwkv6": rwkv6}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# A quoted canonical or official tensor name in a message.
_QUOTED_NAME = re.compile(r"'((?:model|lm_head|blocks|emb|ln_out|head)\.[^']+)'")


def official_name(name: str) -> str:
    """Return the official name of a tensor named in the Hugging Face layout; an official name stays as it is."""
    if name.startswith(HF_PREFIX):
        name = name[len(HF_PREFIX) :]
    return ".".join(_OFFICIAL_SEGMENTS.get(segment, segment) for segment in name.split("."))


def hf_name(name: str) -> str:
    """Return the Hugging Face name of a tensor with an official name."""
    renamed = ".".join(_HF_SEGMENTS.get(segment, segment) for segment in name.split("."))
    return renamed if renamed == "head.weight" else HF_PREFIX + renamed


def is_hf_older_directory(path: Union[str, Path]) -> bool:
    """Tell whether a directory contains a model in one of the layouts read here.

    Only config.json and the tensor names in the safetensors headers are
    read. A directory without safetensors counts when config.json names an
    RWKV ``model_type`` without the ``version`` field of this package's own
    directories, because only this reader reads ``pytorch_model*.bin``
    weights (and reports their absence).

    Args:
        path (str | Path): A model directory.

    Returns:
        bool: True for the Hugging Face RWKV-4/5/6 layouts and for official tensor names.

    Raises:
        CheckpointError: If config.json or a safetensors header is unreadable.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not path.is_dir() or not config_file.is_file():
        return False
    hf_config = _read_json(config_file)
    model_type = hf_config.get("model_type")
    if model_type == "rwkv":
        return True

    safetensors = _safetensors_files(path)
    if safetensors:
        names = [name for file in safetensors for name in _safetensors_names(file)]
        return _has_official_layout(official_name(name) for name in names)
    return model_type in MODEL_TYPE_VERSIONS and "version" not in hf_config


def load_hf_older_directory(path: Union[str, Path]) -> Tuple[Dict[str, mx.array], Dict[str, Any]]:
    """Read a Hugging Face RWKV-4/5/6 directory, or one with official tensor names, into canonical weights.

    Args:
        path (str | Path): The directory, with ``config.json`` and the weight files.

    Returns:
        tuple[dict[str, mx.array], dict]: The canonical weights and the
        ``ModelArgs`` fields of the detected version's model.

    Raises:
        CheckpointError: If a file is missing or unreadable, a tensor is
            missing, unexpected or mis-shaped (named as in its file), or
            config.json disagrees with the tensors.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: directory not found")
    config_file = path / "config.json"
    hf_config = _read_json(config_file)

    tensors, files = _read_tensors(path)
    official = {official_name(name): value for name, value in tensors.items()}
    if not _has_official_layout(official):
        found = ", ".join(f"'{name}'" for name in list(tensors)[:4]) or "no tensors"
        raise CheckpointError(
            f"{path}: the tensors are not in the Hugging Face RWKV layout ('rwkv.embeddings.weight', "
            f"'rwkv.blocks.<i>.attention.*') or the official one ('emb.weight', 'blocks.<i>.att.*'): found {found}"
        )

    try:
        version = detect_version(official, str(path))
    except CheckpointError as error:
        raise CheckpointError(_NameMap(tensors).translate(str(error))) from error
    _check_model_type(hf_config, version, config_file)
    _tie_head(official, hf_config, config_file)

    if version == "7":
        weights = official7_to_canonical(official, str(path))
        config = infer_rwkv7_config(weights, str(path))
        _check_config_sizes(config, hf_config, config_file)
    else:
        weights, config = _read_older(official, version, tensors, files, hf_config, path)
    _keep_config_fields(config, hf_config, config_file)

    logger.info("Read RWKV-%s from %s (%d tensors)", version, path, len(tensors))
    return weights, config


def _read_older(
    official: Dict[str, mx.array],
    version: str,
    tensors: Dict[str, mx.array],
    files: Dict[str, Path],
    hf_config: Dict[str, Any],
    path: Path,
) -> Tuple[Dict[str, mx.array], Dict[str, Any]]:
    """Translate RWKV-4, 5.x or 6 tensors and check them, naming tensors as the files do."""
    names = _NameMap(tensors, version)
    try:
        weights, config = read_official(official, version, str(path))
    except CheckpointError as error:
        raise CheckpointError(names.translate(str(error))) from error

    # Tensors that agree with each other but not with config.json point at
    # config.json; otherwise the tensor that breaks the declared sizes is named.
    config_file = path / "config.json"
    declared = _declared_config(config, hf_config)
    problem = _tensor_problem(weights, declared, names, files, path)
    if problem is not None and declared != config and _tensor_problem(weights, config, names, files, path) is None:
        _check_config_sizes(config, hf_config, config_file)
    if problem is not None:
        raise CheckpointError(problem)
    _check_config_sizes(config, hf_config, config_file)
    return weights, config


def _keep_config_fields(config: Dict[str, Any], hf_config: Dict[str, Any], config_file: Path) -> None:
    """Copy the fields that tensors cannot tell from config.json into the model config."""
    config["norm_eps"] = float(hf_config.get("layer_norm_epsilon") or DEFAULT_NORM_EPS)
    if hf_config.get("rescale_every") is not None and config["model_type"] != "rwkv7":
        config["rescale_every"] = int(hf_config["rescale_every"])

    divisor = hf_config.get("head_size_divisor")
    if divisor is not None and divisor != OFFICIAL_HEAD_SIZE_DIVISOR:
        logger.warning(
            "%s: field 'head_size_divisor' is %s, but the group norm uses the official epsilon 64e-5 "
            "(head_size_divisor %d) regardless",
            config_file,
            divisor,
            OFFICIAL_HEAD_SIZE_DIVISOR,
        )


class _NameMap:
    """Names tensors as the directory's files name them, given their canonical or official names."""

    def __init__(self, tensors: Dict[str, mx.array], version: Optional[str] = None):
        self.shapes = {name: list(value.shape) for name, value in tensors.items()}
        self.file_names = {official_name(name): name for name in tensors}
        self.hf_layout = any(official_name(name) != name for name in tensors)
        self.top_level = {canonical: official for official, canonical in _TOP_LEVEL.items()}
        self.layer = {}
        if version in _VERSION_NAMES:
            # att.time_first and att.time_faaaa both map to attn.time_faaaa, and 5.0 and 5.1 store time_first.
            names = {**_COMMON, **_VERSION_NAMES[version]}
            self.layer = {canonical: official for official, canonical in names.items()}
            if version in ("5", "5.1"):
                self.layer["attn.time_faaaa"] = "att.time_first"

    def file_name(self, name: str) -> str:
        """Return the name a tensor has in the files (or would have there), given its canonical or official name."""
        official = self.top_level.get(name)
        match = _LAYER.match(name)
        if match:
            layer_suffix = self.layer.get(match.group(2))
            official = f"blocks.{match.group(1)}.{layer_suffix}" if layer_suffix else None
        elif official is None and (name.startswith("blocks.") or name in _TOP_LEVEL):
            official = name
        if official is None:
            return name
        if official in self.file_names:
            return self.file_names[official]
        return hf_name(official) if self.hf_layout else official

    def translate(self, message: str) -> str:
        """Replace the quoted canonical and official tensor names in a message with the files' names."""
        return _QUOTED_NAME.sub(lambda match: f"'{self.file_name(match.group(1))}'", message)


def _has_official_layout(names) -> bool:
    names = set(names)
    return "emb.weight" in names and any(name.startswith("blocks.") for name in names)


def _tie_head(official: Dict[str, mx.array], hf_config: Dict[str, Any], config_file: Path) -> None:
    """Use the embedding matrix as the head when config.json ties them and the head is absent."""
    if "head.weight" in official or "emb.weight" not in official:
        return
    if hf_config.get("tie_word_embeddings"):
        official["head.weight"] = official["emb.weight"]
        return
    raise CheckpointError(
        f"{config_file.parent}: missing tensor 'head.weight', and config.json does not set "
        "'tie_word_embeddings' (a base model without its language-model head cannot generate)"
    )


def _check_model_type(hf_config: Dict[str, Any], version: str, config_file: Path) -> None:
    """Raise CheckpointError where config.json's model_type names another RWKV version than the tensors."""
    model_type = hf_config.get("model_type")
    if model_type in MODEL_TYPE_VERSIONS and version not in MODEL_TYPE_VERSIONS[model_type]:
        raise CheckpointError(
            f"{config_file}: field 'model_type' is '{model_type}' (RWKV-"
            f"{' or '.join(MODEL_TYPE_VERSIONS[model_type])}), but the tensors are RWKV-{version}. "
            "The weights and config.json come from different models."
        )


def _declared_config(config: Dict[str, Any], hf_config: Dict[str, Any]) -> Dict[str, Any]:
    """Return the config with config.json's sizes in place of those read from layer 0's tensors.

    Checking the tensors against the declared sizes names the tensor that is
    wrong, where sizes read from a mis-shaped tensor would blame its neighbours.
    """
    declared = dict(config)
    for field, arg in _CONFIG_SIZES.items():
        value = hf_config.get(field)
        if arg in declared and isinstance(value, int) and value > 0:
            declared[arg] = value
    if declared.get("head_dim") and declared["hidden_size"] % declared["head_dim"]:
        declared["head_dim"] = config["head_dim"]
    return declared


def _tensor_problem(
    weights: Dict[str, mx.array], config: Dict[str, Any], names: _NameMap, files: Dict[str, Path], path: Path
) -> Optional[str]:
    """Describe the first missing, unexpected or mis-shaped tensor, named as in its file, or return None."""
    module = _MODEL_MODULES[config["model_type"]]
    try:
        model = module.Model(module.ModelArgs.from_dict(config))
    except ValueError as error:
        return f"{path}: the tensors and config.json give an invalid model ({error})"
    # MLX builds the parameters lazily: for a 7B RWKV-6 this takes 0.05 s and no tensor memory.
    expected = dict(tree_flatten(model.parameters()))
    model_name = f"an RWKV-{config['version']} model with {config['num_hidden_layers']} layers"

    missing = sorted(set(expected) - set(weights))
    if missing:
        return f"{path}: missing tensor '{names.file_name(missing[0])}' ({len(missing)} missing in all) of {model_name}"
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        name = names.file_name(unexpected[0])
        count = f"{len(unexpected)} unexpected in all"
        return f"{files.get(name, path)}: unexpected tensor '{name}' ({count}) in {model_name}"
    for canonical, value in weights.items():
        shape = tuple(expected[canonical].shape)
        if tuple(value.shape) != shape:
            name = names.file_name(canonical)
            stored = names.shapes.get(name, list(value.shape))
            if stored == list(value.shape):
                expectation = f"expected {list(shape)}"
            else:
                expectation = f"expected {math.prod(shape)} values ({list(shape)} once reshaped)"
            return f"{files.get(name, path)}: tensor '{name}' has shape {stored}, {expectation} for {model_name}"
    return None


def _check_config_sizes(config: Dict[str, Any], hf_config: Dict[str, Any], config_file: Path) -> None:
    """Raise CheckpointError where a config.json size contradicts the tensors."""
    for field, arg in _CONFIG_SIZES.items():
        value = hf_config.get(field)
        if value is not None and arg in config and value != config[arg]:
            raise CheckpointError(f"{config_file}: field '{field}' is {value!r}, but the weights have {config[arg]!r}")

    attention_size = hf_config.get("attention_hidden_size")
    if attention_size is not None and attention_size != config["hidden_size"]:
        raise CheckpointError(
            f"{config_file}: field 'attention_hidden_size' is {attention_size}, but only an attention width "
            f"equal to hidden_size ({config['hidden_size']}) is supported"
        )


def _safetensors_files(path: Path) -> List[Path]:
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        return [path / shard for shard in sorted(set(_weight_map(index).values()))]
    return sorted(path.glob("model*.safetensors")) or sorted(path.glob("*.safetensors"))


def _pytorch_files(path: Path) -> List[Path]:
    index = path / PYTORCH_INDEX
    if index.is_file():
        return [path / shard for shard in sorted(set(_weight_map(index).values()))]
    return sorted(path.glob("pytorch_model*.bin"))


def _weight_map(index: Path) -> Dict[str, str]:
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: missing field 'weight_map' (tensor name -> shard file)")
    return weight_map


def _safetensors_names(file: Path) -> List[str]:
    """Return the tensor names in a safetensors file's header, without reading the tensors."""
    if not file.is_file():
        raise CheckpointError(f"{file}: file not found")
    try:
        with open(file, "rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8))
            if header_size > file.stat().st_size - 8:
                raise ValueError(f"the header size {header_size} exceeds the file size {file.stat().st_size}")
            header = json.loads(f.read(header_size))
    except (OSError, ValueError, struct.error) as error:
        raise CheckpointError(
            f"{file}: cannot read the safetensors header ({error}); it may be truncated, so download or convert "
            "the model again"
        ) from error
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: the safetensors header is not a JSON object")
    return [name for name in header if name != "__metadata__"]


def _read_tensors(path: Path) -> Tuple[Dict[str, mx.array], Dict[str, Path]]:
    """Read every tensor of the directory, and the file each came from.

    Safetensors are preferred where a directory has both formats, as
    transformers does.
    """
    files = _safetensors_files(path)
    read = _load_file
    index = path / SAFETENSORS_INDEX
    if not files:
        files = _pytorch_files(path)
        read = load_pth
        index = path / PYTORCH_INDEX
    if not files:
        raise CheckpointError(
            f"{path}: no weight files in the model directory (expected *.safetensors or pytorch_model*.bin)"
        )

    tensors: Dict[str, mx.array] = {}
    source: Dict[str, Path] = {}
    for file in files:
        shard = read(file)
        for name, value in shard.items():
            if name in tensors:
                raise CheckpointError(f"{file}: tensor '{name}' also appears in {source[name].name}")
            tensors[name] = value
            source[name] = file

    if index.is_file():
        for name, shard_name in _weight_map(index).items():
            if name not in tensors:
                raise CheckpointError(f"{path / shard_name}: missing tensor '{name}', which {index.name} lists in it")
    return tensors, source
