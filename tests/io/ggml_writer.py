"""Writers of ggml-typed test files: rwkv.cpp ``.bin`` and GGUF, plain or quantized.

The quantizers follow the round-to-nearest reference quantizers that ggml
uses when no importance matrix is given (``quantize_row_*_ref``), in float32
arithmetic, so a file written here contains the blocks rwkv.cpp would write.
Re-quantizing rwkv.cpp's tiny RWKV-7 test model gave Q5_0 and Q5_1 blocks
byte-identical to rwkv.cpp's own ``tests/tiny-rwkv-7v0-834K-Q5_*.bin``.
Each quantizer also returns the values the blocks decode to, computed from
the integers it packed, so tests can check a decoder without trusting it.
"""

import struct
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

RWKV_CPP_MAGIC = 0x67676D66
RWKV_CPP_TYPE_IDS = {"FP32": 0, "FP16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 7, "Q5_1": 8, "Q8_0": 9}
GGUF_TYPE_IDS = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "BF16": 30}


def _blocks(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float32).reshape(-1)
    assert values.size % 32 == 0, "quantized tensors need a multiple of 32 values"
    return values.reshape(-1, 32)


def _scale(x: np.ndarray) -> np.ndarray:
    """Return ``x`` rounded to float16 (stored) and widened back to float32 (decoded)."""
    return x.astype(np.float16)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d != 0, np.float32(1) / np.where(d != 0, d, np.float32(1)), np.float32(0)).astype(np.float32)


def _signed_max(blocks: np.ndarray) -> np.ndarray:
    """The value of largest magnitude in each block, sign kept (the first one on ties)."""
    index = np.argmax(np.abs(blocks), axis=1)
    return blocks[np.arange(len(blocks)), index][:, None]


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    q = q.astype(np.uint8)
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _pack_fifth_bits(q: np.ndarray) -> np.ndarray:
    bits = ((q.astype(np.uint32) >> 4) & 1) << np.arange(32, dtype=np.uint32)
    return bits.sum(axis=1, dtype=np.uint32).astype("<u4")[:, None].view(np.uint8)


def _truncate_to_int(x: np.ndarray) -> np.ndarray:
    """C's float-to-integer cast: rounds toward zero."""
    return np.trunc(x).astype(np.int32)


def quantize_q4_0(values: np.ndarray) -> Tuple[bytes, np.ndarray]:
    """Return the Q4_0 blocks of ``values`` and the values they decode to."""
    x = _blocks(values)
    d = (_signed_max(x) / np.float32(-8)).astype(np.float32)
    q = np.minimum(15, _truncate_to_int(x * _inverse(d) + np.float32(8.5)))
    d16 = _scale(d)
    raw = np.concatenate([d16.view(np.uint8), _pack_nibbles(q)], axis=1)
    decoded = ((q - 8) * d16.astype(np.float32)).astype(np.float32)
    return raw.tobytes(), decoded.reshape(-1)


def quantize_q4_1(values: np.ndarray) -> Tuple[bytes, np.ndarray]:
    """Return the Q4_1 blocks of ``values`` and the values they decode to."""
    x = _blocks(values)
    low, high = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    d = ((high - low) / np.float32(15)).astype(np.float32)
    q = np.minimum(15, _truncate_to_int((x - low) * _inverse(d) + np.float32(0.5)))
    d16, m16 = _scale(d), _scale(low)
    raw = np.concatenate([d16.view(np.uint8), m16.view(np.uint8), _pack_nibbles(q)], axis=1)
    decoded = (q * d16.astype(np.float32) + m16.astype(np.float32)).astype(np.float32)
    return raw.tobytes(), decoded.reshape(-1)


def quantize_q5_0(values: np.ndarray) -> Tuple[bytes, np.ndarray]:
    """Return the Q5_0 blocks of ``values`` and the values they decode to."""
    x = _blocks(values)
    d = (_signed_max(x) / np.float32(-16)).astype(np.float32)
    q = np.minimum(31, _truncate_to_int(x * _inverse(d) + np.float32(16.5)))
    d16 = _scale(d)
    raw = np.concatenate([d16.view(np.uint8), _pack_fifth_bits(q), _pack_nibbles(q)], axis=1)
    decoded = ((q - 16) * d16.astype(np.float32)).astype(np.float32)
    return raw.tobytes(), decoded.reshape(-1)


def quantize_q5_1(values: np.ndarray) -> Tuple[bytes, np.ndarray]:
    """Return the Q5_1 blocks of ``values`` and the values they decode to."""
    x = _blocks(values)
    low, high = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    d = ((high - low) / np.float32(31)).astype(np.float32)
    q = _truncate_to_int((x - low) * _inverse(d) + np.float32(0.5)) & 0xFF
    d16, m16 = _scale(d), _scale(low)
    raw = np.concatenate([d16.view(np.uint8), m16.view(np.uint8), _pack_fifth_bits(q), _pack_nibbles(q)], axis=1)
    decoded = (q * d16.astype(np.float32) + m16.astype(np.float32)).astype(np.float32)
    return raw.tobytes(), decoded.reshape(-1)


def quantize_q8_0(values: np.ndarray) -> Tuple[bytes, np.ndarray]:
    """Return the Q8_0 blocks of ``values`` and the values they decode to."""
    x = _blocks(values)
    d = (np.abs(x).max(axis=1, keepdims=True) / np.float32(127)).astype(np.float32)
    scaled = x * _inverse(d)
    q = (np.sign(scaled) * np.floor(np.abs(scaled) + np.float32(0.5))).astype(np.int8)
    d16 = _scale(d)
    raw = np.concatenate([d16.view(np.uint8), q.view(np.uint8)], axis=1)
    decoded = (q.astype(np.int32) * d16.astype(np.float32)).astype(np.float32)
    return raw.tobytes(), decoded.reshape(-1)


QUANTIZERS = {
    "Q4_0": quantize_q4_0,
    "Q4_1": quantize_q4_1,
    "Q5_0": quantize_q5_0,
    "Q5_1": quantize_q5_1,
    "Q8_0": quantize_q8_0,
}


def encode(values: np.ndarray, type_name: str) -> Tuple[bytes, np.ndarray]:
    """Return ``values`` encoded as ggml type ``type_name`` and the values that decode from it.

    ``type_name`` uses rwkv.cpp's names (FP32, FP16) or GGUF's (F32, F16, BF16).
    """
    values = np.asarray(values, dtype=np.float32).reshape(-1)
    if type_name in ("FP32", "F32"):
        return values.astype("<f4").tobytes(), values
    if type_name in ("FP16", "F16"):
        half = values.astype("<f2")
        return half.tobytes(), half.astype(np.float32)
    if type_name == "BF16":
        bits = (values.view(np.uint32) >> 16).astype("<u2")
        return bits.tobytes(), (bits.astype(np.uint32) << 16).view(np.float32)
    return QUANTIZERS[type_name](values)


# One tensor to write: (name, shape in row-major (PyTorch/numpy) order, values, type name).
TensorSpec = Tuple[str, Sequence[int], np.ndarray, str]


def write_rwkv_cpp(
    path: Path,
    tensors: Iterable[TensorSpec],
    n_vocab: int,
    n_embed: int,
    n_layer: int,
    data_type: str = "FP32",
    file_version: int = 101,
    magic: int = RWKV_CPP_MAGIC,
    type_ids: Optional[Dict[str, int]] = None,
) -> Dict[str, np.ndarray]:
    """Write an rwkv.cpp ``.bin`` file and return the decoded value of every tensor.

    ``type_ids`` overrides the id written for a type name, to produce broken files.
    """
    ids = dict(RWKV_CPP_TYPE_IDS, **(type_ids or {}))
    decoded = {}
    with open(path, "wb") as f:
        f.write(struct.pack("<6I", magic, file_version, n_vocab, n_embed, n_layer, ids[data_type]))
        for name, shape, values, type_name in tensors:
            data, decoded[name] = encode(values, type_name)
            key = name.encode("utf-8")
            f.write(struct.pack("<3I", len(shape), len(key), ids[type_name]))
            f.write(struct.pack(f"<{len(shape)}I", *reversed(tuple(shape))))
            f.write(key)
            f.write(data)
    return decoded


def _gguf_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _gguf_value(value) -> bytes:
    """Type id and payload of one metadata value: str, bool, int (uint32), float (float32) or list of str."""
    if isinstance(value, str):
        return struct.pack("<I", 8) + _gguf_string(value)
    if isinstance(value, bool):
        return struct.pack("<IB", 7, value)
    if isinstance(value, int):
        return struct.pack("<II", 4, value)
    if isinstance(value, float):
        return struct.pack("<If", 6, value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return struct.pack("<IIQ", 9, 8, len(value)) + b"".join(_gguf_string(v) for v in value)
    raise TypeError(f"unsupported GGUF metadata value {value!r}")


def write_gguf(path: Path, metadata: Dict[str, object], tensors: List[TensorSpec], alignment: int = 32) -> Dict[str, np.ndarray]:
    """Write a GGUF version 3 file and return the decoded value of every tensor."""
    decoded, blobs, infos = {}, [], []
    offset = 0
    for name, shape, values, type_name in tensors:
        data, decoded[name] = encode(values, type_name)
        dims = tuple(reversed(tuple(shape)))
        infos.append(
            _gguf_string(name)
            + struct.pack("<I", len(dims))
            + struct.pack(f"<{len(dims)}Q", *dims)
            + struct.pack("<IQ", GGUF_TYPE_IDS[type_name], offset)
        )
        padding = (-len(data)) % alignment
        blobs.append(data + b"\0" * padding)
        offset += len(data) + padding

    header = b"GGUF" + struct.pack("<IQQ", 3, len(infos), len(metadata))
    header += b"".join(_gguf_string(k) + _gguf_value(v) for k, v in metadata.items())
    header += b"".join(infos)
    header += b"\0" * ((-len(header)) % alignment)
    Path(path).write_bytes(header + b"".join(blobs))
    return decoded


def random_official_rwkv7(
    hidden: int = 64, heads: int = 2, layers: int = 2, vocab: int = 96, ffn: int = 128, rank: int = 32, seed: int = 0
) -> Dict[str, np.ndarray]:
    """Random RWKV-7 weights with the official names and shapes (BlinkDL's ``.pth``), float32.

    All sizes are multiples of 32, so every matrix can be quantized.
    """
    rng = np.random.default_rng(seed)
    C, N = hidden, hidden // heads

    def normal(*shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    weights = {
        "emb.weight": normal(vocab, C),
        "blocks.0.ln0.weight": 1 + normal(C, scale=0.1),
        "blocks.0.ln0.bias": normal(C, scale=0.1),
        "ln_out.weight": 1 + normal(C, scale=0.1),
        "ln_out.bias": normal(C, scale=0.1),
        "head.weight": normal(vocab, C, scale=C**-0.5),
    }
    for i in range(layers):
        p = f"blocks.{i}."
        for norm in ("ln1", "ln2", "att.ln_x"):
            weights[p + norm + ".weight"] = 1 + normal(C, scale=0.1)
            weights[p + norm + ".bias"] = normal(C, scale=0.1)
        for mix in "rwkvag":
            weights[p + f"att.x_{mix}"] = rng.uniform(0, 1, (1, 1, C)).astype(np.float32)
        for lora in ("w", "a", "v", "g"):
            if lora == "v" and i == 0:
                continue
            weights[p + f"att.{lora}1"] = normal(C, rank, scale=C**-0.5)
            weights[p + f"att.{lora}2"] = normal(rank, C, scale=rank**-0.5)
            if lora != "g":
                weights[p + f"att.{lora}0"] = normal(1, 1, C, scale=0.5) + (-2.0 if lora == "w" else 0.0)
        weights[p + "att.k_k"] = 0.85 + normal(1, 1, C, scale=0.05)
        weights[p + "att.k_a"] = 1 + normal(1, 1, C, scale=0.05)
        weights[p + "att.r_k"] = normal(heads, N, scale=0.3)
        for proj in ("receptance", "key", "value", "output"):
            weights[p + f"att.{proj}.weight"] = normal(C, C, scale=C**-0.5)
        weights[p + "ffn.x_k"] = rng.uniform(0, 1, (1, 1, C)).astype(np.float32)
        weights[p + "ffn.key.weight"] = normal(ffn, C, scale=C**-0.5)
        weights[p + "ffn.value.weight"] = normal(C, ffn, scale=ffn**-0.5)
    return weights


# The low-rank matrices, which rwkv.cpp's converter transposes.
_LOW_RANK = tuple(f".att.{lora}{i}" for lora in "wavg" for i in (1, 2))
# Tensors that rwkv.cpp's quantizer leaves in float even when they are matrices.
_RWKV_CPP_NEVER_QUANTIZED = ("emb.weight", "head.weight", ".att.r_k") + _LOW_RANK


def rwkv_cpp_tensors_from_official_rwkv7(weights: Dict[str, np.ndarray], matrix_type: str = "FP32") -> List[TensorSpec]:
    """Lay out official RWKV-7 weights as rwkv.cpp's converter and quantizer do.

    The six token-shift mixes become one ``att.x_rwkvag`` [6, 1, C], the
    low-rank matrices are transposed, and 2-D matrices other than the
    embedding, the head and the low-rank ones are stored as ``matrix_type``.
    """
    tensors: List[TensorSpec] = []
    for name, value in weights.items():
        if ".att.x_" in name:
            if name.endswith(".att.x_r"):
                prefix = name[: -len("x_r")]
                mixes = np.concatenate([weights[prefix + f"x_{m}"] for m in "rwkvag"], axis=0)
                tensors.append((prefix + "x_rwkvag", mixes.shape, mixes, "FP32"))
            continue
        if name.endswith(_LOW_RANK):
            value = np.ascontiguousarray(value.T)
        type_name = "FP32"
        if value.ndim == 2 and not name.endswith(_RWKV_CPP_NEVER_QUANTIZED):
            type_name = matrix_type
        tensors.append((name, value.shape, value, type_name))
    return tensors
