"""Reader for RWKV-7 GGUF files written by llama.cpp (architecture "rwkv7").

A GGUF file (versions 2 and 3, little-endian) contains, in order:

    "GGUF", uint32 version, uint64 tensor count, uint64 metadata count
    metadata   per entry: key string, uint32 value type, value
    tensors    per tensor: name string, uint32 dim count, uint64 dims in
               ggml order, uint32 data type, uint64 offset into the data
    data       starts at, and places each tensor at, a multiple of
               ``general.alignment`` (32 unless set)

Strings are a uint64 length and UTF-8 bytes.

llama.cpp's converter (``convert_hf_to_gguf.py``, ``Rwkv7Model``) renames the
tensors and changes some shapes. Per layer ``i`` (``blk.i.`` ->
``model.layers.i.``):

| GGUF name                     | shape         | canonical name                          |
|-------------------------------|---------------|-----------------------------------------|
| token_embd.weight             | [V, C]        | model.embeddings.weight                 |
| token_embd_norm.{weight,bias} | [C]           | model.layers.0.pre_norm.*               |
| output_norm.{weight,bias}     | [C]           | model.norm.*                            |
| output.weight                 | [V, C]        | lm_head.weight                          |
| attn_norm.*, attn_norm_2.*    | [C]           | attn_norm.*, ffn_norm.*                 |
| time_mix_lerp_fused.weight    | [6, 1, 1, C]  | attn.x_{r,w,k,v,a,g} (in that order)    |
| time_mix_{w,a,v}0.weight      | [C]           | attn.{w,a,v}_lora.lora.2.bias           |
| time_mix_{w,a,v,g}1.weight    | [D, C]        | attn.{w,a,v,g}_lora.lora.0.weight       |
| time_mix_{w,a,v,g}2.weight    | [C, D]        | attn.{w,a,v,g}_lora.lora.2.weight       |
| time_mix_{k_k,k_a,r_k}.weight | [C]           | attn.{k_k,k_a,r_k} ([H, N])             |
| time_mix_{receptance,key,value,output}.weight | [C, C] | attn.{r,k,v,o}_proj.weight     |
| time_mix_ln.{weight,bias}     | [C]           | attn.g_norm.* ([H, N])                  |
| channel_mix_lerp_k.weight     | [C]           | ffn.x_k                                 |
| channel_mix_{key,value}.weight| [F, C], [C, F]| ffn.{key,value}.weight                  |

Layer 0 carries copies of ``time_mix_a{0,1,2}`` as ``time_mix_v{0,1,2}``,
which the model never uses; they are dropped. The head size comes from
``rwkv7.wkv.head_size``.

Supported data types: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (see
``ggml_quants``). This module parses the file itself, because ``mx.load``
(MLX 0.32) rejects Q5_0 and Q5_1 tensors and returns BF16 ones as float16.
"""

import logging
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import mlx.core as mx
import numpy as np

from . import ggml_quants
from .errors import CheckpointError
from .hf import infer_rwkv7_config
from .layout7 import reshape_canonical

logger = logging.getLogger(__name__)

ARCHITECTURE = "rwkv7"
DEFAULT_ALIGNMENT = 32

# GGUF tensor type ids -> names; only those in ggml_quants.BLOCK_LAYOUTS are decoded.
TENSOR_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS",
    18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16",
    26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0",
}  # fmt: skip

# Metadata value types: id -> (struct format, size) for fixed-size values.
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
            6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}  # fmt: skip
_STRING, _ARRAY = 8, 9

# GGUF tensor name (after "blk.i.") -> canonical suffix (after "model.layers.i.").
_LAYER_NAMES = {
    "attn_norm.weight": "attn_norm.weight",
    "attn_norm.bias": "attn_norm.bias",
    "attn_norm_2.weight": "ffn_norm.weight",
    "attn_norm_2.bias": "ffn_norm.bias",
    "time_mix_w0.weight": "attn.w_lora.lora.2.bias",
    "time_mix_w1.weight": "attn.w_lora.lora.0.weight",
    "time_mix_w2.weight": "attn.w_lora.lora.2.weight",
    "time_mix_a0.weight": "attn.a_lora.lora.2.bias",
    "time_mix_a1.weight": "attn.a_lora.lora.0.weight",
    "time_mix_a2.weight": "attn.a_lora.lora.2.weight",
    "time_mix_v0.weight": "attn.v_lora.lora.2.bias",
    "time_mix_v1.weight": "attn.v_lora.lora.0.weight",
    "time_mix_v2.weight": "attn.v_lora.lora.2.weight",
    "time_mix_g1.weight": "attn.g_lora.lora.0.weight",
    "time_mix_g2.weight": "attn.g_lora.lora.2.weight",
    "time_mix_k_k.weight": "attn.k_k",
    "time_mix_k_a.weight": "attn.k_a",
    "time_mix_r_k.weight": "attn.r_k",
    "time_mix_receptance.weight": "attn.r_proj.weight",
    "time_mix_key.weight": "attn.k_proj.weight",
    "time_mix_value.weight": "attn.v_proj.weight",
    "time_mix_output.weight": "attn.o_proj.weight",
    "time_mix_ln.weight": "attn.g_norm.weight",
    "time_mix_ln.bias": "attn.g_norm.bias",
    "channel_mix_lerp_k.weight": "ffn.x_k",
    "channel_mix_key.weight": "ffn.key.weight",
    "channel_mix_value.weight": "ffn.value.weight",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embeddings.weight",
    "token_embd_norm.weight": "model.layers.0.pre_norm.weight",
    "token_embd_norm.bias": "model.layers.0.pre_norm.bias",
    "output_norm.weight": "model.norm.weight",
    "output_norm.bias": "model.norm.bias",
    "output.weight": "lm_head.weight",
}
_TOKEN_SHIFT_MIXES = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")
# Layer 0's value low-rank projection: copies that llama.cpp's loader needs but the model never uses.
_FIRST_LAYER_UNUSED = ("time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight")

# Canonical weights of nn.Linear and nn.Embedding modules, which may stay quantized.
_QUANTIZABLE_SUFFIXES = ("_proj.weight", "ffn.key.weight", "ffn.value.weight", "lora.0.weight",
                         "lora.2.weight", "embeddings.weight", "lm_head.weight")  # fmt: skip
# ggml types whose blocks map onto MLX's affine quantization, with their bits.
_MLX_AFFINE = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}

# Metadata keys (after "rwkv7.") checked against the config read from the tensors.
_METADATA_FIELDS = {
    "embedding_length": "hidden_size",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "wkv.head_size": "head_dim",
    "attention.decay_lora_rank": "decay_low_rank_dim",
    "attention.iclr_lora_rank": "a_low_rank_dim",
    "attention.value_residual_mix_lora_rank": "v_low_rank_dim",
    "attention.gate_lora_rank": "gate_low_rank_dim",
}


@dataclass
class GGUFTensor:
    """One tensor of a GGUF file, not yet decoded."""

    name: str
    shape: Tuple[int, ...]  # row-major (numpy) order: the reverse of GGUF's dims
    type_name: str
    data: np.ndarray  # the raw bytes, uint8

    def decode(self) -> np.ndarray:
        """Return the values as a numpy array of ``shape`` (float16 for F16, else float32)."""
        count = int(np.prod(self.shape))
        return ggml_quants.dequantize(self.data, self.type_name, count).reshape(self.shape)


class _Cursor:
    """Bounds-checked little-endian reads from a memory-mapped file."""

    def __init__(self, path: Path, data: mmap.mmap):
        self.path, self.data, self.offset = path, data, 0
        self.size = len(data)

    def take(self, size: int, what: str) -> bytes:
        if self.offset + size > self.size:
            raise CheckpointError(
                f"{self.path}: file is truncated inside {what} (needs {size} bytes at offset {self.offset}, "
                f"the file has {self.size})"
            )
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def unpack(self, fmt: str, size: int, what: str):
        return struct.unpack(fmt, self.take(size, what))[0]

    def string(self, what: str) -> str:
        length = self.unpack("<Q", 8, what)
        try:
            return self.take(length, what).decode("utf-8")
        except UnicodeDecodeError as error:
            raise CheckpointError(f"{self.path}: {what} is not valid UTF-8 ({error})") from error

    def value(self, value_type: int, what: str):
        if value_type in _SCALARS:
            fmt, size = _SCALARS[value_type]
            return self.unpack(fmt, size, what)
        if value_type == _STRING:
            return self.string(what)
        if value_type == _ARRAY:
            item_type = self.unpack("<I", 4, what)
            count = self.unpack("<Q", 8, what)
            if item_type in _SCALARS:
                fmt, size = _SCALARS[item_type]
                return np.frombuffer(self.take(size * count, what), dtype=np.dtype(fmt))
            return [self.value(item_type, what) for _ in range(count)]
        raise CheckpointError(f"{self.path}: {what} has unknown metadata value type {value_type}")


def read_gguf_file(path: Union[str, Path]) -> Tuple[Dict[str, Any], Dict[str, GGUFTensor]]:
    """Parse a GGUF file's metadata and tensor table without decoding the tensors.

    Args:
        path (str | Path): The ``.gguf`` file.

    Returns:
        tuple[dict, dict[str, GGUFTensor]]: The metadata (numeric arrays as
        numpy arrays) and the tensors by name, in file order.

    Raises:
        CheckpointError: If the file is missing, truncated or not GGUF.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if path.stat().st_size < 24:
        raise CheckpointError(f"{path}: file is {path.stat().st_size} bytes, too short for a GGUF header")
    with open(path, "rb") as file:
        cursor = _Cursor(path, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ))

    magic = cursor.take(4, "field 'magic'")
    if magic != b"GGUF":
        raise CheckpointError(f"{path}: field 'magic' is {magic!r}, expected b'GGUF' (a GGUF file)")
    version = cursor.unpack("<I", 4, "field 'version'")
    if version not in (2, 3):
        raise CheckpointError(
            f"{path}: field 'version' is {version}, expected GGUF version 2 or 3 "
            "(a little-endian file, as llama.cpp writes by default)"
        )
    n_tensors = cursor.unpack("<Q", 8, "field 'tensor_count'")
    n_metadata = cursor.unpack("<Q", 8, "field 'metadata_kv_count'")

    metadata = {}
    for i in range(n_metadata):
        key = cursor.string(f"the key of metadata entry {i}")
        metadata[key] = cursor.value(cursor.unpack("<I", 4, f"metadata '{key}'"), f"metadata '{key}'")

    infos = []
    for i in range(n_tensors):
        name = cursor.string(f"the name of tensor {i}")
        what = f"the header of tensor '{name}'"
        n_dims = cursor.unpack("<I", 4, what)
        if not 1 <= n_dims <= 4:
            raise CheckpointError(f"{path}: tensor '{name}' has {n_dims} dimensions, expected 1 to 4")
        dims = struct.unpack(f"<{n_dims}Q", cursor.take(8 * n_dims, what))
        type_id = cursor.unpack("<I", 4, what)
        offset = cursor.unpack("<Q", 8, what)
        infos.append((name, tuple(reversed(dims)), type_id, offset))

    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    start = -(-cursor.offset // alignment) * alignment
    tensors = {}
    for name, shape, type_id, offset in infos:
        tensors[name] = _tensor(cursor, name, shape, type_id, start + offset)
    return metadata, tensors


def _tensor(cursor: _Cursor, name: str, shape: Tuple[int, ...], type_id: int, offset: int) -> GGUFTensor:
    path = cursor.path
    type_name = TENSOR_TYPES.get(type_id, f"type id {type_id}")
    # NOTE: the k-quants (Q4_K, Q5_K, Q6_K), which most published llama.cpp
    # quantizations use, are rejected here until ggml_quants decodes them.
    if type_name not in ggml_quants.BLOCK_LAYOUTS:
        raise CheckpointError(
            f"{path}: tensor '{name}' has data type {type_name}, which this reader does not decode; "
            "supported types are F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 "
            "(llama.cpp's llama-quantize can convert a model to Q8_0)"
        )
    values_per_block, _ = ggml_quants.BLOCK_LAYOUTS[type_name]
    if shape[-1] % values_per_block:
        raise CheckpointError(
            f"{path}: tensor '{name}' is {type_name} with rows of {shape[-1]} values, "
            f"expected a multiple of the block size {values_per_block}"
        )
    nbytes = ggml_quants.tensor_nbytes(type_name, int(np.prod(shape)))
    if offset + nbytes > cursor.size:
        raise CheckpointError(
            f"{path}: file is truncated inside tensor '{name}': its {type_name} data {list(shape)} needs "
            f"{nbytes} bytes from offset {offset}, but the file ends at {cursor.size}"
        )
    return GGUFTensor(name, shape, type_name, np.frombuffer(cursor.data, dtype=np.uint8, count=nbytes, offset=offset))


def load_gguf(path: Union[str, Path]) -> Dict[str, mx.array]:
    """Read an RWKV-7 GGUF file into canonical weights, dequantizing every tensor.

    Args:
        path (str | Path): The ``.gguf`` file.

    Returns:
        dict[str, mx.array]: The canonical weights (see ``layout7``): float16
        for F16 tensors, float32 for all others.

    Raises:
        CheckpointError: As ``read_gguf``.
    """
    weights, _ = read_gguf(path)
    return weights


def read_gguf(path: Union[str, Path], keep_quantized: bool = False) -> Tuple[Dict[str, mx.array], Dict[str, Any]]:
    """Read an RWKV-7 GGUF file into canonical weights and the model config.

    Args:
        path (str | Path): The ``.gguf`` file.
        keep_quantized (bool): Keep the Q4_0, Q4_1 and Q8_0 weights of linear
            and embedding layers quantized, as MLX affine triplets
            (``weight``, ``scales``, ``biases``) with group size 32. They are
            described in ``config["quantization"]``, and all other tensors
            are dequantized.

    Returns:
        tuple[dict[str, mx.array], dict]: The canonical weights and the
        ``ModelArgs`` fields of ``rwkv_mlx.models.rwkv7``, plus
        ``quantization`` when weights stayed quantized.

    Raises:
        CheckpointError: If the file is missing, truncated, not GGUF, not an
            RWKV-7 model, uses an unsupported data type, or its tensors do
            not fit together.
    """
    path = Path(path)
    metadata, tensors = read_gguf_file(path)

    architecture = metadata.get("general.architecture")
    if architecture != ARCHITECTURE:
        found = "missing" if architecture is None else f"'{architecture}'"
        raise CheckpointError(
            f"{path}: field 'general.architecture' is {found}, expected '{ARCHITECTURE}' (an RWKV-7 model)"
        )
    head_size = metadata.get(f"{ARCHITECTURE}.wkv.head_size")
    if head_size is None:
        raise CheckpointError(f"{path}: missing field '{ARCHITECTURE}.wkv.head_size'")

    weights: Dict[str, mx.array] = {}
    quantized_bits: Dict[str, int] = {}
    for name, tensor in tensors.items():
        canonical = _canonical_name(path, name)
        if canonical is None:
            continue
        if keep_quantized and tensor.type_name in _MLX_AFFINE and canonical.endswith(_QUANTIZABLE_SUFFIXES):
            module = canonical[: -len(".weight")]
            weights.update(_to_mlx_affine(tensor, module))
            quantized_bits[module] = _MLX_AFFINE[tensor.type_name]
            continue
        values = tensor.decode()
        if canonical == "time_mix_lerp_fused":
            weights.update(_split_lerp(path, name, values))
        elif canonical.endswith("attn.r_k"):
            weights[canonical] = _per_head(path, name, values, int(head_size))
        else:
            weights[canonical] = mx.array(values)

    weights = reshape_canonical(weights, str(path))
    config = infer_rwkv7_config(weights, str(path))
    _check_metadata(path, metadata, config)
    config["norm_eps"] = float(metadata.get(f"{ARCHITECTURE}.attention.layer_norm_epsilon", config["norm_eps"]))
    if quantized_bits:
        config["quantization"] = _quantization_config(quantized_bits)

    logger.info("Read RWKV-7 from %s (%d tensors)", path, len(tensors))
    return weights, config


def _canonical_name(path: Path, name: str) -> Optional[str]:
    """Return the canonical name of a GGUF tensor, ``"time_mix_lerp_fused"`` for the fused
    mixes (prefixed by the layer), or None for layer 0's unused value projection."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        layer, suffix = int(parts[1]), parts[2]
        if suffix == "time_mix_lerp_fused.weight":
            return "time_mix_lerp_fused"
        if suffix in _LAYER_NAMES:
            if layer == 0 and suffix in _FIRST_LAYER_UNUSED:
                return None
            return f"model.layers.{layer}.{_LAYER_NAMES[suffix]}"
    raise CheckpointError(f"{path}: unexpected tensor '{name}' in an RWKV-7 GGUF file")


def _split_lerp(path: Path, name: str, values: np.ndarray) -> Dict[str, mx.array]:
    if values.size % 6:
        raise CheckpointError(
            f"{path}: tensor '{name}' has shape {list(values.shape)}, expected [6, 1, 1, C] "
            "(the token-shift mixes r, w, k, v, a, g)"
        )
    layer = name.split(".")[1]
    mixes = values.reshape(6, 1, 1, -1)
    return {f"model.layers.{layer}.attn.{mix}": mx.array(mixes[i]) for i, mix in enumerate(_TOKEN_SHIFT_MIXES)}


def _per_head(path: Path, name: str, values: np.ndarray, head_size: int) -> mx.array:
    if values.size % head_size:
        raise CheckpointError(
            f"{path}: tensor '{name}' has {values.size} values, not a whole number of heads of "
            f"size {head_size} (field '{ARCHITECTURE}.wkv.head_size')"
        )
    return mx.array(values.reshape(-1, head_size))


def _to_mlx_affine(tensor: GGUFTensor, module: str) -> Dict[str, mx.array]:
    """Repack Q4_0, Q4_1 or Q8_0 blocks as MLX affine quantization with group size 32.

    Each ggml block becomes one MLX group with the same scale. The block's
    offset (-8 d, m or -128 d) becomes the group's bias, so both formats
    decode to the same values.
    """
    bits = _MLX_AFFINE[tensor.type_name]
    _, bytes_per_block = ggml_quants.BLOCK_LAYOUTS[tensor.type_name]
    blocks = np.ascontiguousarray(tensor.data).reshape(-1, bytes_per_block)
    scales = np.ascontiguousarray(blocks[:, 0:2]).view("<f2")[:, 0]

    if tensor.type_name == "Q4_0":
        q = np.concatenate([blocks[:, 2:18] & 0x0F, blocks[:, 2:18] >> 4], axis=1)
        biases = scales * np.float16(-8)
    elif tensor.type_name == "Q4_1":
        q = np.concatenate([blocks[:, 4:20] & 0x0F, blocks[:, 4:20] >> 4], axis=1)
        biases = np.ascontiguousarray(blocks[:, 2:4]).view("<f2")[:, 0]
    else:
        q = (blocks[:, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        biases = scales * np.float16(-128)

    # MLX packs 32 / bits values per uint32, the first in the lowest bits.
    per_word = 32 // bits
    words = q.astype(np.uint32).reshape(-1, per_word) << (bits * np.arange(per_word, dtype=np.uint32))
    packed = np.bitwise_or.reduce(words, axis=1)

    # Scales and biases are widened to float32, because with float16 ones MLX
    # computes q * d + bias in float16. For Q8_0 the bias -128 d cancels most
    # of q * d, and float16 left a 0.0175 logit error on a test model.
    rows = tensor.shape[:-1]
    groups = tensor.shape[-1] // 32
    return {
        f"{module}.weight": mx.array(packed.reshape(*rows, groups * bits)),
        f"{module}.scales": mx.array(scales.astype(np.float32).reshape(*rows, groups)),
        f"{module}.biases": mx.array(biases.astype(np.float32).reshape(*rows, groups)),
    }


def _quantization_config(bits_by_module: Dict[str, int]) -> Dict[str, Any]:
    """mlx-lm's ``quantization`` entry: the most common bits, and an entry for each module with other bits."""
    counts: Dict[int, int] = {}
    for bits in bits_by_module.values():
        counts[bits] = counts.get(bits, 0) + 1
    default_bits = max(counts, key=counts.get)

    config: Dict[str, Any] = {"group_size": 32, "bits": default_bits}
    for module, bits in bits_by_module.items():
        if bits != default_bits:
            config[module] = {"group_size": 32, "bits": bits}
    return config


def _check_metadata(path: Path, metadata: Dict[str, Any], config: Dict[str, Any]) -> None:
    """Raise CheckpointError where an ``rwkv7.*`` metadata field contradicts the tensors."""
    for key, field in _METADATA_FIELDS.items():
        value = metadata.get(f"{ARCHITECTURE}.{key}")
        if value is None or (field == "v_low_rank_dim" and config["num_hidden_layers"] == 1):
            continue
        if int(value) != config[field]:
            raise CheckpointError(
                f"{path}: field '{ARCHITECTURE}.{key}' is {int(value)}, but the tensors have {field} = {config[field]}"
            )
