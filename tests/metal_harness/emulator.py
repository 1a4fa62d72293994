"""Compile a kernel launch as C++ and run it on the CPU in several thread orders."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .signature import harness_source, kernel_name

logger = logging.getLogger(__name__)

SHIM_DIR = Path(__file__).parent / "shim"

# Thread orders: each runs every threadgroup's threads one at a time between
# synchronisation points. "shuffled" draws a new permutation for every pass.
DEFAULT_ORDERS = ("forward", "reverse", "shuffled")

_ORDER_CODES = {"forward": 0, "reverse": 1, "shuffled": 2}

COMMON_FLAGS = ["-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", "-fno-strict-aliasing"]
# Stack-clash probes touch every page of a large frame in order, so a kernel
# that overflows its coroutine stack hits the guard page below it.
KERNEL_FLAGS = [
    "-nostdinc",
    "-fno-exceptions",
    "-fno-rtti",
    "-fstack-clash-protection",
    "-Wno-attributes",
    "-Werror=return-type",
]
RUNTIME_FLAGS = ["-U_FORTIFY_SOURCE", "-D_FORTIFY_SOURCE=0", "-fno-stack-protector"]


class EmulatorError(RuntimeError):
    """Base class of the harness errors."""


class UnsupportedFeatureError(EmulatorError):
    """The launch uses a Metal feature the harness does not emulate."""


class KernelCompileError(EmulatorError):
    """The kernel did not compile as C++ against the shim."""


class KernelRuntimeError(EmulatorError):
    """The kernel failed while running: out-of-bounds access, barrier misuse or a crash."""


class ThreadOrderError(EmulatorError):
    """Outputs differ between thread orders: a missing barrier or a data race."""


@dataclass
class ExecutionRecord:
    """One emulated launch, kept so tests can show which sources really ran."""

    name: str
    kernel_name: str
    source: str
    header: str
    source_file: str
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    orders: tuple[str, ...]


executed: list[ExecutionRecord] = []


def unavailable_reason() -> str | None:
    """Return why the harness cannot run on this machine, or None when it can.

    The runtime needs Linux: threadgroup memory lives in an ELF section found
    through the linker's ``__start_``/``__stop_`` symbols, and threads are
    ucontext coroutines. A missing compiler is not a reason: `find_compiler`
    raises for it, so CI fails loudly instead of skipping.
    """
    if not sys.platform.startswith("linux"):
        return f"the Metal emulation harness runs on Linux only, not {sys.platform}"
    return None


def find_compiler() -> str:
    """Return the C++ compiler to use: ``$CXX``, else g++, else c++.

    Raises:
        EmulatorError: when none is installed.
    """
    for candidate in (os.environ.get("CXX"), "g++", "c++"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    raise EmulatorError("no C++ compiler found for the Metal emulation harness: install g++ or set CXX")


def cache_dir() -> Path:
    """Return the directory of compiled kernels (``$RWKV_MLX_HARNESS_CACHE`` or a temp dir)."""
    path = os.environ.get("RWKV_MLX_HARNESS_CACHE")
    directory = Path(path) if path else Path(tempfile.gettempdir()) / "rwkv_mlx_metal_harness"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _compiler_identity(compiler: str) -> str:
    result = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False)
    return compiler + "\n" + result.stdout


def _run_compiler(command: list[str], description: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        message = result.stderr.strip() or result.stdout.strip()
        raise KernelCompileError(f"{description} failed to compile:\n{message[:6000]}")


def _hash(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:24]


_compiler_cache: dict[str, str] = {}


def _runtime_object(compiler: str, identity: str) -> Path:
    runtime = (SHIM_DIR / "runtime.cpp").read_text()
    abi = (SHIM_DIR / "mtl_abi.h").read_text()
    key = _hash(identity, runtime, abi, *COMMON_FLAGS, *RUNTIME_FLAGS)
    target = cache_dir() / f"runtime-{key}.o"
    if not target.exists():
        partial = target.with_suffix(f".{os.getpid()}.tmp")
        _run_compiler(
            [compiler, *COMMON_FLAGS, *RUNTIME_FLAGS, "-I", str(SHIM_DIR), "-c",
             str(SHIM_DIR / "runtime.cpp"), "-o", str(partial)],
            "the emulation runtime",
        )
        os.replace(partial, target)
    return target


def translation_unit(launch) -> str:
    """Return the C++ translation unit that emulates ``launch``."""
    return '#include "metal_shim.h"\n' + harness_source(launch)


_libraries: dict[Path, ctypes.CDLL] = {}


def compile_launch(launch) -> ctypes.CDLL:
    """Compile ``launch`` (or reuse the cached library) and load it."""
    compiler = find_compiler()
    identity = _compiler_cache.get(compiler)
    if identity is None:
        identity = _compiler_cache[compiler] = _compiler_identity(compiler)
    runtime = _runtime_object(compiler, identity)

    unit = translation_unit(launch)
    shim = (SHIM_DIR / "metal_shim.h").read_text() + (SHIM_DIR / "mtl_abi.h").read_text()
    key = _hash(identity, unit, shim, runtime.name, *COMMON_FLAGS, *KERNEL_FLAGS)
    library = cache_dir() / f"{launch.name}-{key}.so"
    if not library.exists():
        # Files are written under per-process names and renamed, so test
        # processes sharing the cache never see each other's partial files.
        source = cache_dir() / f"{launch.name}-{key}.cpp"
        partial_source = source.with_suffix(f".{os.getpid()}.cpp")
        partial_source.write_text(unit)
        partial = library.with_suffix(f".{os.getpid()}.tmp")
        _run_compiler(
            [compiler, *COMMON_FLAGS, *KERNEL_FLAGS, "-I", str(SHIM_DIR), str(partial_source), str(runtime),
             "-shared", "-Wl,-Bsymbolic", "-o", str(partial), "-lm"],
            f"kernel '{launch.name}' ({partial_source})",
        )
        os.replace(partial_source, source)
        os.replace(partial, library)
        logger.info("compiled %s into %s", launch.name, library)
    if library not in _libraries:
        handle = ctypes.CDLL(str(library), mode=os.RTLD_LOCAL)
        handle.mtl_launch.restype = ctypes.c_int
        handle.mtl_launch.argtypes = [
            ctypes.POINTER(ctypes.c_longlong),
            ctypes.POINTER(ctypes.c_longlong),
            ctypes.c_int,
            ctypes.c_ulonglong,
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.POINTER(ctypes.c_longlong),
            ctypes.c_char_p,
            ctypes.c_int,
        ]
        _libraries[library] = handle
    return _libraries[library]


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def check_supported(launch) -> None:
    """Raise `UnsupportedFeatureError` for launch options and constructs the harness cannot emulate."""
    if getattr(launch, "atomic_outputs", False):
        raise UnsupportedFeatureError(f"kernel '{launch.name}': atomic outputs are not emulated")
    if not getattr(launch, "ensure_row_contiguous", True):
        raise UnsupportedFeatureError(
            f"kernel '{launch.name}': ensure_row_contiguous=False is not emulated (inputs are always row contiguous)"
        )
    code = _strip_comments(launch.header + "\n" + launch.source)
    match = re.search(r"\bthreadgroup\b\s*[^;{}()=\[]*?[*&]", code)
    if match:
        raise UnsupportedFeatureError(
            f"kernel '{launch.name}': threadgroup pointers and references are not emulated "
            f"(found '{match.group(0).strip()}'); pass threadgroup arrays to helpers as template parameters"
        )
    match = re.search(r"\b(texture\w*|sampler|simdgroup_matrix\w*|atomic\w*|quad_\w+)\b", code)
    if match:
        raise UnsupportedFeatureError(f"kernel '{launch.name}': '{match.group(1)}' is not emulated")
    for dim in (*launch.grid, *launch.threadgroup):
        if dim <= 0:
            raise UnsupportedFeatureError(
                f"kernel '{launch.name}': grid {launch.grid} and threadgroup {launch.threadgroup} must be positive"
            )


def _raw(array: mx.array) -> np.ndarray:
    """Return the bytes of ``array`` in row-major order as a numpy array."""
    if array.dtype == mx.bfloat16:
        array = array.view(mx.uint16)
    return np.ascontiguousarray(np.array(array))


_NUMPY_CARRIER = {
    mx.bfloat16: np.uint16,
    mx.float16: np.float16,
    mx.float32: np.float32,
    mx.bool_: np.bool_,
    mx.int8: np.int8,
    mx.int16: np.int16,
    mx.int32: np.int32,
    mx.int64: np.int64,
    mx.uint8: np.uint8,
    mx.uint16: np.uint16,
    mx.uint32: np.uint32,
    mx.uint64: np.uint64,
}


def _new_output(shape, dtype, init_value) -> np.ndarray:
    size = int(np.prod(shape, dtype=np.int64))
    if init_value is None:
        # Uninitialised memory: all bits set, which is NaN for every float type.
        return np.full(size * dtype.size, 0xFF, dtype=np.uint8).view(_NUMPY_CARRIER[dtype])
    value = mx.full((size,), init_value, dtype=dtype)
    return _raw(value).copy()


def _to_mlx(data: np.ndarray, shape, dtype) -> mx.array:
    array = mx.array(data).reshape(shape)
    if dtype == mx.bfloat16:
        array = array.view(mx.bfloat16)
    return array


def run_launch(launch, orders=DEFAULT_ORDERS, seed: int = 0) -> list[mx.array]:
    """Run ``launch`` on the CPU once per thread order and return its outputs.

    Args:
        launch: A launch description with the fields of
            `rwkv_mlx.ops.metal.KernelLaunch`.
        orders: Thread orders to run (``forward``, ``reverse``, ``shuffled``);
            all must produce bit-identical outputs.
        seed: Seed of the shuffled order.

    Returns:
        list[mx.array]: The outputs, with the shapes and dtypes of the launch.

    Raises:
        UnsupportedFeatureError, KernelCompileError, KernelRuntimeError,
        ThreadOrderError: see the classes.
    """
    reason = unavailable_reason()
    if reason:
        raise EmulatorError(reason)
    check_supported(launch)
    library = compile_launch(launch)
    from .signature import parameters

    params = parameters(launch)
    buffers: list[np.ndarray | None] = []
    sizes: list[int] = []
    raw_inputs = [_raw(x) for x in launch.inputs]
    output_slots = []
    for p in params:
        if p.kind == "attribute":
            continue
        array = launch.inputs[p.input_index] if p.input_index is not None else None
        if p.kind == "input":
            data = raw_inputs[p.input_index]
        elif p.kind == "shape":
            data = np.array(array.shape, dtype=np.int32)
        elif p.kind == "strides":
            strides = np.ones(array.ndim, dtype=np.int64)
            for d in range(array.ndim - 2, -1, -1):
                strides[d] = strides[d + 1] * array.shape[d + 1]
            data = strides
        elif p.kind == "ndim":
            data = np.array(array.ndim, dtype=np.int32)
        else:
            output_slots.append(len(buffers))
            data = None
        buffers.append(data)
        sizes.append(0 if data is None else max(data.size, 1))

    # MLX clamps the threadgroup to the grid in every dimension.
    group = tuple(min(t, g) for t, g in zip(launch.threadgroup, launch.grid))
    grid_arg = (ctypes.c_longlong * 3)(*launch.grid)
    group_arg = (ctypes.c_longlong * 3)(*group)

    results = []
    for order in orders:
        outputs = [
            _new_output(shape, dtype, launch.init_value)
            for shape, dtype in zip(launch.output_shapes, launch.output_dtypes)
        ]
        for slot, output in zip(output_slots, outputs):
            buffers[slot] = output
            sizes[slot] = output.size
        pointers = (ctypes.c_void_p * len(buffers))(*[b.ctypes.data for b in buffers])
        size_arg = (ctypes.c_longlong * len(sizes))(*sizes)
        error = ctypes.create_string_buffer(4096)
        code = library.mtl_launch(
            grid_arg, group_arg, _ORDER_CODES[order], seed, pointers, size_arg, error, len(error)
        )
        if code != 0:
            raise KernelRuntimeError(
                f"kernel '{launch.name}' failed in the {order} thread order: {error.value.decode()}"
            )
        results.append(outputs)

    _compare_orders(launch, orders, results)
    executed.append(
        ExecutionRecord(
            launch.name,
            kernel_name(launch),
            launch.source,
            launch.header,
            getattr(launch, "source_file", ""),
            tuple(launch.grid),
            tuple(launch.threadgroup),
            tuple(orders),
        )
    )
    return [
        _to_mlx(data, shape, dtype)
        for data, shape, dtype in zip(results[0], launch.output_shapes, launch.output_dtypes)
    ]


def _compare_orders(launch, orders, results) -> None:
    reference = results[0]
    for order, outputs in zip(orders[1:], results[1:]):
        for name, expected, actual in zip(launch.output_names, reference, outputs):
            same = expected.view(np.uint8) == actual.view(np.uint8)
            if same.all():
                continue
            first = int(np.argmin(same)) // expected.itemsize
            raise ThreadOrderError(
                f"kernel '{launch.name}': output '{name}' differs between the {orders[0]} and {order} "
                f"thread orders (first at element {first}: {expected[first]!r} vs {actual[first]!r}); "
                "a threadgroup barrier is missing or threads race on shared memory"
            )


def launcher(orders=DEFAULT_ORDERS, seed: int = 0):
    """Return a launcher for `rwkv_mlx.ops.metal.use_launcher` that runs kernels in the harness."""

    def launch_in_harness(launch) -> list[mx.array]:
        return run_launch(launch, orders=orders, seed=seed)

    return launch_in_harness
