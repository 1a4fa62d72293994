"""Decoding of ggml's tensor data types into numpy arrays.

rwkv.cpp ``.bin`` files and GGUF files store tensors in ggml's data types.
The quantized ones split a tensor, flattened in row-major order, into blocks
of 32 values. Every row length is a multiple of 32, so no block spans two
rows. Each block holds its scale ``d`` (and for the ``_1`` types its minimum
``m``) as little-endian float16, followed by the quantized values ``q``:

| type | bytes | layout                                   | value of element j        |
|------|-------|------------------------------------------|---------------------------|
| Q4_0 | 18    | d, qs[16]                                | (q_j - 8) * d             |
| Q4_1 | 20    | d, m, qs[16]                             | q_j * d + m               |
| Q5_0 | 22    | d, qh[4], qs[16]                         | (q_j - 16) * d            |
| Q5_1 | 24    | d, m, qh[4], qs[16]                      | q_j * d + m               |
| Q8_0 | 34    | d, qs[32] (int8)                         | q_j * d                   |

In the 4- and 5-bit types, byte ``qs[i]`` contains element i in its low nibble
and element i + 16 in its high nibble (not two neighbours). The 5-bit types
keep the fifth bit of element j in bit j of ``qh`` read as a little-endian
uint32. This is the layout of ggml since May 2023 (rwkv.cpp file version
101, every GGUF file); older ggml builds interleaved the nibbles and stored
some scales as float32.
"""

from typing import Callable, Dict, Tuple

import numpy as np

# Values per block and bytes per block of each supported type.
BLOCK_LAYOUTS: Dict[str, Tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q8_0": (32, 34),
}

QUANTIZED_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def tensor_nbytes(type_name: str, count: int) -> int:
    """Return the number of bytes that ``count`` values of ``type_name`` occupy.

    Raises:
        ValueError: If ``count`` is not a whole number of blocks.
    """
    values_per_block, bytes_per_block = BLOCK_LAYOUTS[type_name]
    if count % values_per_block:
        raise ValueError(f"{count} values are not a whole number of {type_name} blocks of {values_per_block}")
    return count // values_per_block * bytes_per_block


def _half(blocks: np.ndarray, start: int) -> np.ndarray:
    """Read the little-endian float16 at byte ``start`` of every block, as float32 [blocks, 1]."""
    raw = np.ascontiguousarray(blocks[:, start : start + 2])
    return raw.view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Unpack 16 bytes per block into 32 values: low nibbles first, then high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int32)


def _fifth_bits(blocks: np.ndarray, start: int) -> np.ndarray:
    """Bit j of the little-endian uint32 at byte ``start``, shifted to bit 4, for j = 0..31."""
    qh = np.ascontiguousarray(blocks[:, start : start + 4]).view("<u4").astype(np.int64)
    return (((qh >> np.arange(32)) & 1) << 4).astype(np.int32)


def _q4_0(blocks: np.ndarray) -> np.ndarray:
    d = _half(blocks, 0)
    return (_nibbles(blocks[:, 2:18]) - 8) * d


def _q4_1(blocks: np.ndarray) -> np.ndarray:
    d, m = _half(blocks, 0), _half(blocks, 2)
    return _nibbles(blocks[:, 4:20]) * d + m


def _q5_0(blocks: np.ndarray) -> np.ndarray:
    d = _half(blocks, 0)
    q = _nibbles(blocks[:, 6:22]) | _fifth_bits(blocks, 2)
    return (q - 16) * d


def _q5_1(blocks: np.ndarray) -> np.ndarray:
    d, m = _half(blocks, 0), _half(blocks, 2)
    q = _nibbles(blocks[:, 8:24]) | _fifth_bits(blocks, 4)
    return q * d + m


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    d = _half(blocks, 0)
    return blocks[:, 2:34].view(np.int8).astype(np.int32) * d


_DECODERS: Dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q8_0": _q8_0,
}


def dequantize(data: np.ndarray, type_name: str, count: int) -> np.ndarray:
    """Decode ``count`` values of ggml type ``type_name`` from raw bytes.

    Args:
        data (np.ndarray): The tensor's bytes as a uint8 array of exactly
            ``tensor_nbytes(type_name, count)`` bytes.
        type_name (str): One of ``BLOCK_LAYOUTS``.
        count (int): The number of values.

    Returns:
        np.ndarray: A flat array of ``count`` values: float16 for ``F16``,
        float32 for every other type (``BF16`` widened exactly).

    Raises:
        ValueError: If the type is unknown or ``data`` has the wrong size.
    """
    if type_name not in BLOCK_LAYOUTS:
        raise ValueError(f"unknown ggml data type '{type_name}', expected one of {', '.join(BLOCK_LAYOUTS)}")
    expected = tensor_nbytes(type_name, count)
    if data.size != expected:
        raise ValueError(f"{type_name} data for {count} values must be {expected} bytes, got {data.size}")

    data = np.ascontiguousarray(data, dtype=np.uint8)
    # F32 and F16 are copied, so the result never refers to a memory-mapped file.
    if type_name == "F32":
        return data.view("<f4").astype(np.float32)
    if type_name == "F16":
        return data.view("<f2").astype(np.float16)
    if type_name == "BF16":
        return (data.view("<u2").astype(np.uint32) << 16).view(np.float32)

    _, bytes_per_block = BLOCK_LAYOUTS[type_name]
    blocks = data.reshape(-1, bytes_per_block)
    return _DECODERS[type_name](blocks).astype(np.float32, copy=False).reshape(-1)
