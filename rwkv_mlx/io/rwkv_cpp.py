"""Reader for rwkv.cpp's ``.bin`` checkpoints (RWKV-4, 5.1, 5.2, 6 and 7).

File layout (all integers little-endian uint32, no padding anywhere):

    header   magic      0x67676d66 (the bytes "fmgg")
             version    100 or 101
             n_vocab, n_embed, n_layer
             data_type  the type of most matrices (ids below)
    then, until the end of the file, one record per tensor:
             dim_count  1, 2 or 3
             key_length bytes in the name
             data_type  this tensor's type (ids below)
             dims       dim_count sizes in ggml order, the reverse of the
                        PyTorch shape: a [rows, columns] matrix stores
                        (columns, rows)
             name       key_length bytes of UTF-8, e.g. "blocks.0.att.key.weight"
             data       the values in row-major order, in the tensor's type

Data type ids: 0 FP32, 1 FP16, 2 Q4_0, 3 Q4_1, 7 Q5_0, 8 Q5_1, 9 Q8_0 (block
layouts in ``ggml_quants``). Ids 4-6 (Q4_1_O, Q4_2, Q4_3) were removed from
rwkv.cpp, and 10-16 (Q8_1 and the k-quants) are not read here. Version 101
(May 2023) changed every quantized block layout. Quantized data in a version
100 file is rejected, while its FP32 and FP16 data reads as in version 101.

rwkv.cpp's converter rewrote some tensors of the official ``.pth``, and
``load_rwkv_cpp`` undoes it, so it returns the official names and shapes:

- every version: ``time_*`` tensors were squeezed (``[1, 1, C]`` -> ``[C]``);
- RWKV-4: ``time_decay`` was stored as ``-exp(time_decay)``;
- RWKV-5.1: ``time_decay`` as ``exp(-exp(.))`` and ``time_first`` as
  ``exp(.)``, both ``[H, 1, 1]``;
- RWKV-5.2: ``time_decay`` as ``exp(-exp(.))`` and ``time_faaaa``, both
  ``[H, N, 1]``;
- RWKV-6: ``time_maa_w1``, ``time_decay_w1`` and ``time_decay_w2`` were
  transposed, ``time_maa_w2`` had its last two axes swapped, ``time_decay``
  became ``[H, N, 1]`` and ``time_faaaa`` ``[H, N, 1]``;
- RWKV-7: the six token-shift mixes ``att.x_{r,w,k,v,a,g}`` were concatenated
  into one ``att.x_rwkvag`` ``[6, 1, C]``, and the low-rank matrices
  ``att.{w,a,v,g}{1,2}`` were transposed.

The RWKV version is detected from the tensor names, as rwkv.cpp does: ``att.r_k``
means 7, ``att.time_maa_x`` 6, ``att.ln_x`` with ``att.gate`` 5.2,
``att.ln_x`` alone 5.1, otherwise 4.
"""

import logging
import struct
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import mlx.core as mx
import numpy as np

from . import ggml_quants
from .errors import CheckpointError

logger = logging.getLogger(__name__)

MAGIC = 0x67676D66
FILE_VERSIONS = (100, 101)
HEADER_BYTES = 24

# rwkv.cpp's data type ids -> ggml type names (as in ``ggml_quants``).
DATA_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q5_0", 8: "Q5_1", 9: "Q8_0"}
# rwkv.cpp's names for the ids, for messages and ``info``.
TYPE_NAMES = {
    0: "FP32", 1: "FP16", 2: "Q4_0", 3: "Q4_1", 4: "Q4_1_O", 5: "Q4_2", 6: "Q4_3", 7: "Q5_0", 8: "Q5_1",
    9: "Q8_0", 10: "Q8_1", 11: "Q2_K", 12: "Q3_K", 13: "Q4_K", 14: "Q5_K", 15: "Q6_K", 16: "Q8_K",
}  # fmt: skip
REMOVED_TYPES = (4, 5, 6)

# Official shapes per RWKV version, in symbols: C width, V vocabulary, F
# channel-mix width, H heads, N head size, D* low-rank sizes. Per-layer names
# are suffixes of ``blocks.{i}.``, and ``blocks.0.ln0`` is listed at the top.
_TOP_SHAPES = {
    "emb.weight": ("V", "C"),
    "blocks.0.ln0.weight": ("C",),
    "blocks.0.ln0.bias": ("C",),
    "ln_out.weight": ("C",),
    "ln_out.bias": ("C",),
    "head.weight": ("V", "C"),
}
_NORMS = {name: ("C",) for name in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias")}
_MIX = (1, 1, "C")
_SQUARE = ("C", "C")
_FFN = {"ffn.key.weight": ("F", "C"), "ffn.receptance.weight": _SQUARE, "ffn.value.weight": ("C", "F")}
_PROJECTIONS = {f"att.{name}.weight": _SQUARE for name in ("key", "value", "receptance", "output")}
_GROUP_NORM = {"att.ln_x.weight": ("C",), "att.ln_x.bias": ("C",)}

_LAYER_SHAPES: Dict[str, Dict[str, tuple]] = {
    "4": {
        **_NORMS, **_PROJECTIONS, **_FFN,
        "att.time_mix_k": _MIX, "att.time_mix_v": _MIX, "att.time_mix_r": _MIX,
        "att.time_decay": ("C",), "att.time_first": ("C",),
        "ffn.time_mix_k": _MIX, "ffn.time_mix_r": _MIX,
    },
    # NOTE: the official shape of RWKV-5.1's time_decay and time_first is
    # taken as [H], because the file keeps only their H values.
    "5.1": {
        **_NORMS, **_PROJECTIONS, **_GROUP_NORM, **_FFN,
        "att.time_mix_k": _MIX, "att.time_mix_v": _MIX, "att.time_mix_r": _MIX,
        "att.time_decay": ("H",), "att.time_first": ("H",),
        "ffn.time_mix_k": _MIX, "ffn.time_mix_r": _MIX,
    },
    "5.2": {
        **_NORMS, **_PROJECTIONS, **_GROUP_NORM, **_FFN,
        "att.time_mix_k": _MIX, "att.time_mix_v": _MIX, "att.time_mix_r": _MIX, "att.time_mix_g": _MIX,
        "att.time_decay": ("H", "N"), "att.time_faaaa": ("H", "N"), "att.gate.weight": _SQUARE,
        "ffn.time_mix_k": _MIX, "ffn.time_mix_r": _MIX,
    },
    "6": {
        **_NORMS, **_PROJECTIONS, **_GROUP_NORM, **_FFN,
        **{f"att.time_maa_{x}": _MIX for x in "xwkvrg"},
        "att.time_maa_w1": ("C", "Dmix5"), "att.time_maa_w2": (5, "Dmix", "C"),
        "att.time_decay": _MIX, "att.time_decay_w1": ("C", "Ddecay"), "att.time_decay_w2": ("Ddecay", "C"),
        "att.time_faaaa": ("H", "N"), "att.gate.weight": _SQUARE,
        "ffn.time_maa_k": _MIX, "ffn.time_maa_r": _MIX,
    },
    "7": {
        **_NORMS, **_PROJECTIONS, **_GROUP_NORM,
        **{f"att.x_{x}": _MIX for x in "rwkvag"},
        "att.w0": _MIX, "att.w1": ("C", "Dw"), "att.w2": ("Dw", "C"),
        "att.a0": _MIX, "att.a1": ("C", "Da"), "att.a2": ("Da", "C"),
        "att.v0": _MIX, "att.v1": ("C", "Dv"), "att.v2": ("Dv", "C"),
        "att.g1": ("C", "Dg"), "att.g2": ("Dg", "C"),
        "att.k_k": _MIX, "att.k_a": _MIX, "att.r_k": ("H", "N"),
        "ffn.x_k": _MIX, "ffn.key.weight": ("F", "C"), "ffn.value.weight": ("C", "F"),
    },
}  # fmt: skip

# Tensors absent from layer 0 of an RWKV-7 model, whose value needs no residual mix.
_V7_ABSENT_IN_FIRST_LAYER = ("att.v0", "att.v1", "att.v2")


def read_rwkv_cpp_tensors(path: Union[str, Path]) -> Tuple[Dict[str, Any], List[Tuple[str, Tuple[int, ...], str, np.ndarray]]]:
    """Read an rwkv.cpp file's header and tensors exactly as stored.

    Args:
        path (str | Path): The ``.bin`` file.

    Returns:
        tuple[dict, list]: The header fields (``file_version``, ``n_vocab``,
        ``n_embed``, ``n_layer``, ``data_type``) and one ``(name, shape,
        data_type, values)`` per tensor, in file order. ``shape`` is in
        PyTorch order and ``values`` is a numpy array of that shape (float16
        for FP16, float32 for every other type).

    Raises:
        CheckpointError: If the file is missing, truncated, or not a valid
            rwkv.cpp file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise CheckpointError(f"{path}: file is {size} bytes, too short for the {HEADER_BYTES}-byte rwkv.cpp header")

    data = np.memmap(path, dtype=np.uint8, mode="r")
    magic, version, n_vocab, n_embed, n_layer, data_type = struct.unpack_from("<6I", data, 0)
    if magic != MAGIC:
        raise CheckpointError(
            f"{path}: field 'magic' is {magic:#010x}, expected {MAGIC:#010x} (an rwkv.cpp .bin file)"
        )
    if version not in FILE_VERSIONS:
        raise CheckpointError(
            f"{path}: field 'version' is {version}, an unsupported rwkv.cpp file version "
            f"(expected {' or '.join(map(str, FILE_VERSIONS))})"
        )
    header = {
        "file_version": version,
        "n_vocab": n_vocab,
        "n_embed": n_embed,
        "n_layer": n_layer,
        "data_type": _type_name(path, data_type, version, "field 'data_type' of the file header"),
    }

    tensors = []
    offset = HEADER_BYTES
    previous = None
    while offset < size:
        record, offset = _read_tensor(path, data, offset, version, previous)
        tensors.append(record)
        previous = record[0]
    return header, tensors


def _type_name(path: Path, type_id: int, version: int, where: str) -> str:
    """Return rwkv.cpp's name for a data type id this reader can decode."""
    name = TYPE_NAMES.get(type_id)
    if name is None:
        raise CheckpointError(f"{path}: {where} has unknown data type id {type_id} (known ids are 0-16)")
    if type_id in REMOVED_TYPES:
        raise CheckpointError(
            f"{path}: {where} is {name}, a format rwkv.cpp removed; re-quantize the FP16 or FP32 model "
            "with a current rwkv.cpp (Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0)"
        )
    if type_id not in DATA_TYPES:
        raise CheckpointError(
            f"{path}: {where} is {name}, which this reader does not decode; "
            "supported types are FP32, FP16, Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0"
        )
    if version == 100 and DATA_TYPES[type_id] in ggml_quants.QUANTIZED_TYPES:
        raise CheckpointError(
            f"{path}: {where} is {name} in file version 100, whose quantized block layout ggml dropped "
            "in May 2023; re-quantize the FP16 or FP32 model with a current rwkv.cpp"
        )
    return name


def _read_tensor(path: Path, data: np.ndarray, offset: int, version: int, previous: Optional[str]):
    """Read the tensor record at ``offset`` and return it with the offset of the next record."""
    size = data.size
    where = f"the tensor after '{previous}'" if previous else "the first tensor"
    if offset + 12 > size:
        raise CheckpointError(f"{path}: file is truncated inside the header of {where} (offset {offset})")
    dim_count, key_length, type_id = struct.unpack_from("<3I", data, offset)
    offset += 12

    if dim_count not in (1, 2, 3):
        raise CheckpointError(f"{path}: field 'dim_count' of {where} is {dim_count}, expected 1, 2 or 3")
    if offset + 4 * dim_count + key_length > size:
        raise CheckpointError(f"{path}: file is truncated inside the header of {where} (offset {offset - 12})")
    dims = struct.unpack_from(f"<{dim_count}I", data, offset)
    offset += 4 * dim_count
    try:
        name = bytes(data[offset : offset + key_length]).decode("utf-8")
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{path}: the name of {where} is not valid UTF-8 ({error})") from error
    offset += key_length

    type_name = _type_name(path, type_id, version, f"tensor '{name}'")
    shape = tuple(reversed(dims))
    count = int(np.prod(shape))
    if count == 0:
        raise CheckpointError(f"{path}: tensor '{name}' has shape {list(shape)}, expected no zero dimension")
    values_per_block, _ = ggml_quants.BLOCK_LAYOUTS[DATA_TYPES[type_id]]
    if dims[0] % values_per_block:
        raise CheckpointError(
            f"{path}: tensor '{name}' is {type_name} with rows of {dims[0]} values, "
            f"expected a multiple of the block size {values_per_block}"
        )

    nbytes = ggml_quants.tensor_nbytes(DATA_TYPES[type_id], count)
    if offset + nbytes > size:
        raise CheckpointError(
            f"{path}: file is truncated inside tensor '{name}': its {type_name} data {list(shape)} needs "
            f"{nbytes} bytes from offset {offset}, but the file ends at {size}"
        )
    values = ggml_quants.dequantize(data[offset : offset + nbytes], DATA_TYPES[type_id], count)
    return (name, shape, type_name, values.reshape(shape)), offset + nbytes


def detect_version(names) -> str:
    """Return the RWKV version ("4", "5.1", "5.2", "6" or "7") that a set of official tensor names belongs to."""
    names = set(names)
    if "blocks.0.att.r_k" in names or "blocks.0.att.x_rwkvag" in names:
        return "7"
    if "blocks.0.att.time_maa_x" in names:
        return "6"
    if "blocks.0.att.ln_x.weight" in names:
        return "5.2" if "blocks.0.att.gate.weight" in names else "5.1"
    return "4"


def load_rwkv_cpp(
    path: Union[str, Path], dtype: Optional[mx.Dtype] = None
) -> Tuple[Dict[str, mx.array], Dict[str, Any]]:
    """Read an rwkv.cpp ``.bin`` file into weights with the official names and shapes.

    Args:
        path (str | Path): The ``.bin`` file.
        dtype (mx.Dtype, optional): Cast every tensor to this type. By
            default FP16 tensors stay float16 and all others, dequantized
            ones included, are float32.

    Returns:
        tuple[dict[str, mx.array], dict]: The weights, named and shaped as in
        BlinkDL's ``.pth`` files, and ``info`` with ``version`` (the RWKV
        version: "4", "5.1", "5.2", "6" or "7"), ``file_version``,
        ``vocab_size``, ``hidden_size``, ``num_layers``, ``data_type`` (the
        header's) and ``tensor_types`` (tensor count per stored type).

    Raises:
        CheckpointError: If the file is missing, truncated, not an rwkv.cpp
            file, uses an unsupported data type, or contains a missing,
            unexpected or mis-shaped tensor.
    """
    path = Path(path)
    header, tensors = read_rwkv_cpp_tensors(path)

    stored = {}
    tensor_types: Dict[str, int] = {}
    for name, _, type_name, values in tensors:
        if name in stored:
            raise CheckpointError(f"{path}: tensor '{name}' appears twice")
        stored[name] = values
        tensor_types[type_name] = tensor_types.get(type_name, 0) + 1

    version = detect_version(stored)
    official = _restore_official(path, stored, version)
    _check_shapes(path, official, version, header)

    weights = {}
    for name, values in official.items():
        array = mx.array(values)
        weights[name] = array.astype(dtype) if dtype is not None else array

    info = {
        "version": version,
        "file_version": header["file_version"],
        "vocab_size": header["n_vocab"],
        "hidden_size": header["n_embed"],
        "num_layers": header["n_layer"],
        "data_type": header["data_type"],
        "tensor_types": tensor_types,
    }
    logger.info("Read RWKV-%s from %s (%s, %d tensors)", version, path, header["data_type"], len(weights))
    return weights, info


def load_rwkv_cpp_canonical(
    path: Union[str, Path], dtype: Optional[mx.Dtype] = None
) -> Tuple[Dict[str, mx.array], Dict[str, Any]]:
    """Read an RWKV-7 rwkv.cpp file into the canonical layout and its model config.

    Args:
        path (str | Path): The ``.bin`` file.
        dtype (mx.Dtype, optional): As in ``load_rwkv_cpp``.

    Returns:
        tuple[dict[str, mx.array], dict]: The canonical weights (see
        ``layout7``) and the ``ModelArgs`` fields of ``rwkv_mlx.models.rwkv7``.

    Raises:
        CheckpointError: As ``load_rwkv_cpp``, and for a model of another RWKV version.
    """
    from .hf import infer_rwkv7_config
    from .layout7 import official_to_canonical

    official, info = load_rwkv_cpp(path, dtype)
    if info["version"] != "7":
        raise CheckpointError(
            f"{path}: this is an RWKV-{info['version']} model; only RWKV-7 converts to the canonical layout"
        )
    weights = official_to_canonical(official, str(path))
    return weights, infer_rwkv7_config(weights, str(path))


def _restore_official(path: Path, stored: Dict[str, np.ndarray], version: str) -> Dict[str, np.ndarray]:
    """Undo rwkv.cpp's converter: rename, reshape and invert the stored tensors."""
    official = {}
    for name, values in stored.items():
        suffix = name.split(".", 2)[-1] if name.startswith("blocks.") else name
        if version == "7":
            official.update(_restore_v7(path, name, suffix, values))
        elif version == "6":
            official[name] = _restore_v6(path, name, suffix, values)
        elif version in ("5.1", "5.2"):
            official[name] = _restore_v5(name, suffix, values, version)
        else:
            official[name] = _restore_v4(suffix, values)
    return official


def _transpose(path: Path, name: str, values: np.ndarray, axes: Tuple[int, ...]) -> np.ndarray:
    if values.ndim != len(axes):
        raise CheckpointError(
            f"{path}: tensor '{name}' has shape {list(values.shape)}, expected {len(axes)} dimensions"
        )
    return np.ascontiguousarray(values.transpose(axes))


def _restore_v7(path: Path, name: str, suffix: str, values: np.ndarray) -> Dict[str, np.ndarray]:
    if suffix == "att.x_rwkvag":
        if values.size % 6:
            raise CheckpointError(
                f"{path}: tensor '{name}' has shape {list(values.shape)}, expected [6, 1, C] "
                "(the six token-shift mixes r, w, k, v, a, g)"
            )
        prefix = name[: -len("x_rwkvag")]
        mixes = values.reshape(6, 1, 1, -1)
        return {f"{prefix}x_{letter}": mixes[i] for i, letter in enumerate("rwkvag")}
    if suffix in ("att.w1", "att.w2", "att.a1", "att.a2", "att.v1", "att.v2", "att.g1", "att.g2"):
        return {name: _transpose(path, name, values, (1, 0))}
    return {name: values}


def _restore_v6(path: Path, name: str, suffix: str, values: np.ndarray) -> np.ndarray:
    if suffix in ("att.time_maa_w1", "att.time_decay_w1", "att.time_decay_w2"):
        return _transpose(path, name, values, (1, 0))
    if suffix == "att.time_maa_w2":
        return _transpose(path, name, values, (0, 2, 1))
    if suffix == "att.time_faaaa":
        return values.reshape(values.shape[:2]) if values.ndim == 3 else values
    if ".time_" in suffix:
        # time_maa_* and time_decay: squeezed [C] or per-head [H, N, 1] -> [1, 1, C].
        return values.reshape(1, 1, -1)
    return values


def _restore_v5(name: str, suffix: str, values: np.ndarray, version: str) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        if suffix == "att.time_decay":
            # Stored as exp(-exp(decay)). A stored 1 or 0 becomes -inf or inf,
            # which the model maps back to the same decay.
            decay = np.log(-np.log(values.astype(np.float64))).astype(np.float32)
            return decay.reshape(values.shape[:2]) if version == "5.2" else decay.reshape(-1)
        if suffix == "att.time_first":
            return np.log(values.astype(np.float64)).astype(np.float32).reshape(-1)
    if suffix == "att.time_faaaa":
        return values.reshape(values.shape[:2]) if values.ndim == 3 else values
    if ".time_mix_" in suffix:
        return values.reshape(1, 1, -1)
    return values


def _restore_v4(suffix: str, values: np.ndarray) -> np.ndarray:
    if suffix == "att.time_decay":
        # Stored as -exp(decay).
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log(-values.astype(np.float64)).astype(np.float32)
    if ".time_mix_" in suffix:
        return values.reshape(1, 1, -1)
    return values


def _check_shapes(path: Path, weights: Dict[str, np.ndarray], version: str, header: Dict[str, Any]) -> None:
    """Check that every expected tensor is present with its official shape and nothing else is."""
    sizes = {"C": header["n_embed"], "V": header["n_vocab"]}
    layer_shapes = _LAYER_SHAPES[version]
    n_layer = header["n_layer"]

    expected = dict(_TOP_SHAPES)
    for i in range(n_layer):
        for suffix, shape in layer_shapes.items():
            if version == "7" and i == 0 and suffix in _V7_ABSENT_IN_FIRST_LAYER:
                continue
            expected[f"blocks.{i}.{suffix}"] = shape

    for name in weights:
        if name not in expected:
            raise CheckpointError(
                f"{path}: unexpected tensor '{name}' in an RWKV-{version} model; "
                f"field 'n_layer' of the file header gives {n_layer} layer(s)"
            )
    for name, symbols in expected.items():
        if name not in weights:
            raise CheckpointError(f"{path}: missing tensor '{name}' of an RWKV-{version} model")
        _match_shape(path, name, weights[name].shape, symbols, sizes)

    if "H" in sizes and "N" in sizes and sizes["H"] * sizes["N"] != sizes["C"]:
        raise CheckpointError(
            f"{path}: {sizes['H']} heads of size {sizes['N']} do not make up the width {sizes['C']} "
            "(field 'n_embed' of the file header)"
        )


def _match_shape(path: Path, name: str, shape: Tuple[int, ...], symbols: tuple, sizes: Dict[str, int]) -> None:
    """Check ``shape`` against symbolic dims, binding symbols seen for the first time."""
    if len(shape) == len(symbols):
        for size, symbol in zip(shape, symbols):
            if isinstance(symbol, int):
                if size != symbol:
                    break
            elif sizes.setdefault(symbol, size) != size:
                break
        else:
            return
    expected = []
    for symbol in symbols:
        if isinstance(symbol, str) and symbol in sizes:
            expected.append(f"{symbol}={sizes[symbol]}")
        else:
            expected.append(str(symbol))
    raise CheckpointError(f"{path}: tensor '{name}' has shape {list(shape)}, expected [{', '.join(expected)}]")
