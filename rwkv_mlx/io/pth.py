"""Reader for PyTorch ``.pth`` checkpoints that needs no torch and runs no pickled code.

File format (``torch.save`` since PyTorch 1.6): a zip archive whose entries
all sit under one top folder, ``<archive>/``:

- ``data.pkl``: a pickle (protocol 2) of the saved object, here a dict from
  tensor name to tensor. Each tensor is pickled as a call of
  ``torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride,
  requires_grad, backward_hooks[, metadata])``, with offset and strides
  counted in elements. Each storage is a persistent id
  ``("storage", storage_type, key, location, numel)``, where ``storage_type``
  is a global such as ``torch.FloatStorage`` that fixes the dtype.
- ``data/<key>``: the raw bytes of storage ``key``, ``numel`` elements.
  Several tensors may view one storage (a transposed copy, a slice).
- ``byteorder``: ``little`` or ``big``, the byte order of every storage.
  Files without it are read as little-endian, as torch does by default.
- ``version`` and other bookkeeping entries, which are not needed here.

The unpickler resolves only the globals that rebuilding a dict of tensors
needs and hands back stand-ins of its own, so nothing named in the pickle is
ever imported or called. Every other global raises ``CheckpointError``.
Only float32, float16 and bfloat16 storages are read; tensors keep their dtype.
"""

import logging
import pickle
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import mlx.core as mx
import numpy as np
from numpy.lib.stride_tricks import as_strided

from .errors import CheckpointError

logger = logging.getLogger(__name__)

ZIP_MAGIC = b"PK\x03\x04"
# Protocol-2 pickle of torch's legacy magic number 0x1950a86a20f9469cfc6c,
# the first bytes of files that torch.save wrote before the zip format.
LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"

SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")

# Legacy typed-storage class name -> (dtype name, item size in bytes).
STORAGE_TYPES = {
    "FloatStorage": ("float32", 4),
    "HalfStorage": ("float16", 2),
    "BFloat16Storage": ("bfloat16", 2),
    "DoubleStorage": ("float64", 8),
    "LongStorage": ("int64", 8),
    "IntStorage": ("int32", 4),
    "ShortStorage": ("int16", 2),
    "CharStorage": ("int8", 1),
    "ByteStorage": ("uint8", 1),
    "BoolStorage": ("bool", 1),
    "ComplexFloatStorage": ("complex64", 8),
    "ComplexDoubleStorage": ("complex128", 16),
    # Untyped storages hold raw bytes, which torch rebuilds as uint8.
    "UntypedStorage": ("uint8", 1),
}

# Storage dtype name -> numpy dtype of its elements, before the byte order is
# applied. bfloat16 is read as its 16-bit pattern and reinterpreted in MLX.
_NUMPY_ELEMENTS = {"float32": "f4", "float16": "f2", "bfloat16": "u2"}


class _StandIn:
    """Base of the objects the unpickler creates in place of torch's.

    A pickle's BUILD opcode would set their attributes; refusing it keeps a
    crafted file from altering the shared storage-type stand-ins.
    """

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError(f"data.pkl sets the state of a {type(self).__name__}, which torch never does")


class _StorageType(_StandIn):
    """Stand-in for a torch storage class named in the pickle; it is never called."""

    __slots__ = ("class_name", "dtype", "itemsize")

    def __init__(self, class_name: str):
        self.class_name = class_name
        self.dtype, self.itemsize = STORAGE_TYPES[class_name]


class _Storage(_StandIn):
    """A storage as the pickle's persistent id describes it; its bytes are read later."""

    __slots__ = ("storage_type", "key", "numel")

    def __init__(self, storage_type: _StorageType, key: str, numel: int):
        self.storage_type = storage_type
        self.key = key
        self.numel = numel


class _TensorRecord(_StandIn):
    """A tensor as ``_rebuild_tensor_v2`` would build it: a strided view of a storage."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage: Any, offset: Any, size: Any, stride: Any):
        self.storage = storage
        self.offset = offset
        self.size = size
        self.stride = stride


class _Rebuild(_StandIn):
    """Stand-in for one of torch's tensor-rebuilding functions."""

    __slots__ = ("function",)

    def __init__(self, function):
        self.function = function

    def __call__(self, *args):
        return self.function(*args)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return _TensorRecord(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


# (module, name) -> the object the unpickler hands back for that global.
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _Rebuild(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_parameter"): _Rebuild(_rebuild_parameter),
}
for _name in STORAGE_TYPES:
    _ALLOWED_GLOBALS[("torch", _name)] = _StorageType(_name)
_ALLOWED_GLOBALS[("torch.storage", "UntypedStorage")] = _ALLOWED_GLOBALS[("torch", "UntypedStorage")]


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals in ``_ALLOWED_GLOBALS``."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise CheckpointError(
                f"{self.source}: data.pkl references the global '{module}.{name}', which a checkpoint of "
                "tensors never needs, so loading stopped without running it. The file may be malicious or "
                "contain more than a state dict. If you trust it, re-save only the model's state_dict()"
            )
        return allowed

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(
                f"{self.source}: data.pkl has the persistent id {pid!r:.80}, expected "
                "('storage', storage type, key, location, numel)"
            )
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"{self.source}: storage '{key}' has no storage type, found {storage_type!r:.80}")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise CheckpointError(
                f"{self.source}: invalid storage entry (key {key!r:.40}, numel {numel!r:.40}) in data.pkl"
            )
        return _Storage(storage_type, key, numel)


def _open_archive(path: Path) -> zipfile.ZipFile:
    """Open a checkpoint as a zip archive, and tell a truncated file from another format in the error."""
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file, expected a PyTorch .pth checkpoint")

    with open(path, "rb") as f:
        head = f.read(len(LEGACY_MAGIC))
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        if head.startswith(ZIP_MAGIC):
            raise CheckpointError(
                f"{path}: the zip archive is truncated or corrupt ({error}). Download or copy the file again"
            ) from error
        if head.startswith(LEGACY_MAGIC):
            raise CheckpointError(
                f"{path}: written in PyTorch's legacy format (torch < 1.6, or "
                "_use_new_zipfile_serialization=False), which is not supported. Re-save it with a current torch.save"
            ) from error
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint: expected a zip archive (first bytes {head[:8]!r})"
        ) from error


def _find_prefix(archive: zipfile.ZipFile, path: Path) -> str:
    """Return the archive's top folder, the one that contains ``data.pkl``."""
    prefixes = [name[: -len("/data.pkl")] for name in archive.namelist() if name.endswith("/data.pkl")]
    prefixes = [prefix for prefix in prefixes if prefix and "/" not in prefix]
    if len(prefixes) != 1:
        raise CheckpointError(
            f"{path}: a zip archive, but not a PyTorch checkpoint: expected one '<archive>/data.pkl' entry, "
            f"found {len(prefixes)}"
        )
    return prefixes[0]


def _read_byteorder(archive: zipfile.ZipFile, prefix: str, path: Path) -> str:
    """Return ``"<"`` or ``">"`` from the archive's ``byteorder`` entry."""
    name = f"{prefix}/byteorder"
    if name not in archive.namelist():
        return "<"
    value = archive.read(name).strip()
    if value == b"little":
        return "<"
    if value == b"big":
        return ">"
    raise CheckpointError(f"{path}: entry 'byteorder' is {value[:20]!r}, expected b'little' or b'big'")


def _unpickle(archive: zipfile.ZipFile, prefix: str, path: Path) -> Any:
    """Unpickle ``data.pkl`` with the restricted unpickler."""
    try:
        with archive.open(f"{prefix}/data.pkl") as f:
            return _RestrictedUnpickler(f, str(path)).load()
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:
        raise CheckpointError(f"{path}: entry 'data.pkl' is truncated or corrupt ({error})") from error
    except (pickle.UnpicklingError, ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
        raise CheckpointError(f"{path}: entry 'data.pkl' is not a valid tensor pickle ({error})") from error


def _collect_records(obj: Any, path: Path) -> "OrderedDict[str, _TensorRecord]":
    """Check that the unpickled object is a flat dict of named tensors."""
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path}: data.pkl contains a {type(obj).__name__}, expected a dict from tensor name to tensor"
        )
    records = OrderedDict()
    for name, value in obj.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{path}: key {name!r:.40} in data.pkl is not a tensor name (a str)")
        if not isinstance(value, _TensorRecord):
            raise CheckpointError(
                f"{path}: entry '{name}' is a {type(value).__name__}, not a tensor. Only a plain state dict "
                "of tensors can be read"
            )
        records[name] = value
    return records


def _check_record(name: str, record: _TensorRecord, path: Path) -> Tuple[int, Tuple[int, ...], Tuple[int, ...]]:
    """Validate a tensor's dtype, offset, size and stride against its storage."""
    storage = record.storage
    if not isinstance(storage, _Storage):
        raise CheckpointError(f"{path}: tensor '{name}' has no storage, found {type(storage).__name__}")
    dtype = storage.storage_type.dtype
    if dtype not in SUPPORTED_DTYPES:
        raise CheckpointError(
            f"{path}: tensor '{name}' is stored as {dtype} (torch.{storage.storage_type.class_name}). "
            f"Only {', '.join(SUPPORTED_DTYPES)} tensors are supported, so convert it before saving"
        )

    offset, size, stride = record.offset, record.size, record.stride
    well_formed = (
        isinstance(offset, int)
        and isinstance(size, tuple)
        and isinstance(stride, tuple)
        and len(size) == len(stride)
        and all(isinstance(n, int) and n >= 0 for n in size + stride)
        and offset >= 0
    )
    if not well_formed:
        raise CheckpointError(
            f"{path}: tensor '{name}' has an invalid layout (offset {offset!r:.40}, size {size!r:.60}, "
            f"stride {stride!r:.60}); expected non-negative integers and one stride per dimension"
        )

    if all(n > 0 for n in size):
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.numel:
            raise CheckpointError(
                f"{path}: tensor '{name}' (offset {offset}, size {list(size)}, stride {list(stride)}) reaches "
                f"element {last}, past the end of its storage '{storage.key}' of {storage.numel} elements"
            )
    return offset, size, stride


def _read_storage(archive: zipfile.ZipFile, prefix: str, storage: _Storage, byteorder: str, path: Path) -> np.ndarray:
    """Read one storage's elements as a flat, read-only numpy array in the file's byte order."""
    entry = f"{prefix}/data/{storage.key}"
    itemsize = storage.storage_type.itemsize
    try:
        info = archive.getinfo(entry)
    except KeyError:
        raise CheckpointError(f"{path}: storage entry 'data/{storage.key}' is missing") from None
    expected = storage.numel * itemsize
    if info.file_size < expected:
        raise CheckpointError(
            f"{path}: storage entry 'data/{storage.key}' has {info.file_size} bytes, expected {expected} "
            f"({storage.numel} {storage.storage_type.dtype} elements)"
        )
    try:
        data = archive.read(entry)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:
        raise CheckpointError(
            f"{path}: storage entry 'data/{storage.key}' is truncated or corrupt ({error})"
        ) from error
    element = np.dtype(byteorder + _NUMPY_ELEMENTS[storage.storage_type.dtype])
    return np.frombuffer(data, dtype=element, count=storage.numel)


def _to_mlx(flat: np.ndarray, dtype: str, offset: int, size: Tuple[int, ...], stride: Tuple[int, ...]) -> mx.array:
    """Copy a strided view of a storage into a contiguous MLX array of its dtype."""
    itemsize = flat.dtype.itemsize
    if any(n == 0 for n in size):
        view = np.zeros(size, dtype=flat.dtype)
    else:
        view = as_strided(flat[offset:], shape=size, strides=[s * itemsize for s in stride], writeable=False)
    values = np.array(view, dtype=flat.dtype.newbyteorder("="), order="C")
    array = mx.array(values)
    if dtype == "bfloat16":
        array = array.view(mx.bfloat16)
    return array


def load_pth(path: Union[str, Path]) -> Dict[str, mx.array]:
    """Read the tensors of a PyTorch zip checkpoint without torch.

    Args:
        path (str | Path): A ``.pth`` file written by ``torch.save`` (PyTorch 1.6 or later).

    Returns:
        dict[str, mx.array]: Every tensor by name, contiguous, in its stored dtype.

    Raises:
        CheckpointError: The file is missing, not a zip checkpoint, truncated or
            corrupt, references a global outside the allowed set, or holds
            something other than float32, float16 or bfloat16 tensors.
    """
    path = Path(path)
    with _open_archive(path) as archive:
        prefix = _find_prefix(archive, path)
        byteorder = _read_byteorder(archive, prefix, path)
        records = _collect_records(_unpickle(archive, prefix, path), path)

        # Read each storage once, however many tensors view it, and drop it as
        # soon as its tensors are copied out, so the peak memory is the
        # tensors plus the largest storage.
        by_storage: Dict[str, List[Tuple[str, _TensorRecord]]] = OrderedDict()
        layouts = {}
        for name, record in records.items():
            layouts[name] = _check_record(name, record, path)
            by_storage.setdefault(record.storage.key, []).append((name, record))

        tensors = {}
        for users in by_storage.values():
            storages = {id(record.storage): record.storage for _, record in users}
            largest = max(storages.values(), key=lambda s: s.numel * s.storage_type.itemsize)
            if len({(s.storage_type.class_name, s.numel) for s in storages.values()}) > 1:
                raise CheckpointError(
                    f"{path}: storage '{largest.key}' is described with different types or sizes by the "
                    f"tensors {', '.join(repr(n) for n, _ in users[:3])}"
                )
            flat = _read_storage(archive, prefix, largest, byteorder, path)
            for name, record in users:
                tensors[name] = _to_mlx(flat, largest.storage_type.dtype, *layouts[name])
            del flat

    logger.debug("read %d tensors from %s", len(tensors), path)
    return {name: tensors[name] for name in records}


def _shape(weights: Mapping[str, Any], name: str) -> Optional[Tuple[int, ...]]:
    value = weights.get(name)
    return None if value is None else tuple(value.shape)


def detect_version(weights: Mapping[str, Any], source: str = "checkpoint") -> str:
    """Detect the RWKV version of official (BlinkDL) weights from their names and shapes.

    The markers, checked on layer 0 in this order:

    - ``"7"``: ``att.k_k``, ``att.w0``, ``att.a0`` or ``att.r_k`` (x070).
    - ``"6"``: ``att.time_maa_x`` or ``att.time_decay_w1`` (x060).
    - ``"5.2"``: ``att.ln_x`` and ``att.gate``, with ``att.time_decay`` of shape [H, N], N > 1.
    - ``"5.1"``: ``att.ln_x`` and ``att.gate``, with one decay per head.
    - ``"5"``: ``att.ln_x`` without ``att.gate``.
    - ``"4"``: ``att.time_first`` of shape [C] and no ``att.ln_x``.

    Args:
        weights (Mapping[str, Any]): Tensors by official name; values need a ``shape``.
        source (str): The file the weights came from, for error messages.

    Returns:
        str: One of ``"4"``, ``"5"``, ``"5.1"``, ``"5.2"``, ``"6"``, ``"7"``.

    Raises:
        CheckpointError: The weights are not an RWKV model in the official layout.
    """
    emb = _shape(weights, "emb.weight")
    layer0 = sorted(name for name in weights if name.startswith("blocks.0.att."))
    if emb is None or len(emb) != 2 or not layer0:
        found = ", ".join(f"'{name}'" for name in list(weights)[:4]) or "no tensors"
        raise CheckpointError(
            f"{source}: not an RWKV checkpoint in the official layout: expected 'emb.weight' [V, C] and "
            f"'blocks.0.att.*' tensors, found {found} ({len(weights)} tensors in all)"
        )

    def has(suffix: str) -> bool:
        return f"blocks.0.att.{suffix}" in weights

    if any(has(s) for s in ("k_k", "w0", "a0", "r_k")):
        return "7"
    if has("time_maa_x") or has("time_decay_w1"):
        return "6"
    if has("ln_x.weight"):
        if not has("gate.weight"):
            return "5"
        decay = _shape(weights, "blocks.0.att.time_decay") or ()
        return "5.2" if len(decay) >= 2 and decay[1] > 1 else "5.1"
    time_first = _shape(weights, "blocks.0.att.time_first")
    if time_first is not None and len(time_first) == 1 and time_first[0] == emb[1]:
        return "4"

    found = ", ".join(f"'{name}'" for name in layer0[:6])
    raise CheckpointError(
        f"{source}: the layer-0 attention tensors match no RWKV version (4, 5, 5.1, 5.2, 6 or 7): found {found}"
    )
