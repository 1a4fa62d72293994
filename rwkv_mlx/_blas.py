"""Use an optimized BLAS for MLX's CPU backend on Linux.

MLX's Linux CPU wheels (mlx-cpu 0.32) link a bundled reference BLAS. Loading
the distribution's OpenBLAS with global symbol binding before MLX is first
imported makes MLX's BLAS calls resolve to OpenBLAS instead. On a 2-core
x86_64 Linux machine, a [64, 4096] x [4096, 4096] float32 product went from
4.9 to 150 GFLOP/s (bench/bench_blas.py, docs/benchmarks.md).

It is on by default on Linux when a library is found, never on macOS (MLX uses
Accelerate and Metal there), and has no effect once ``mlx.core`` is imported.
Set ``RWKV_MLX_BLAS=0`` to turn it off, or to a library path to choose one.

With OpenBLAS, single-row products (decoding) also go to its matrix-vector
product. ``gemv_forward.c``, compiled once with the system C compiler into
``~/.cache/rwkv_mlx`` (or ``$XDG_CACHE_HOME/rwkv_mlx``), takes MLX's
``cblas_sgemm`` calls and forwards those with one row or column to
``cblas_sgemv``. That took decoding the 0.1B shape from 42 to 25-28 ms per
token (docs/benchmarks.md). Where it cannot be compiled or loaded, it is
skipped and the reason logged at DEBUG level; set ``RWKV_MLX_GEMV=0`` to turn
only it off.

NOTE: torch in the same process slows down with OpenBLAS loaded: BlinkDL's package
on torch 2.13 took 198 instead of 34 ms per decoded token on the machine
above (bench/bench_models.py, docs/benchmarks.md).
"""

import ctypes
import ctypes.util
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

# Debian and Ubuntu install OpenBLAS here (packages libopenblas0-pthread and
# libopenblas0-openmp); the generic names come from the BLAS alternatives.
CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
]

loaded_library: Optional[str] = None

# The loaded gemv_forward library, or None when single-row products go to
# cblas_sgemm as MLX sends them.
gemv_forward: Optional[ctypes.CDLL] = None


def find_openblas() -> Optional[str]:
    """Return the path of an OpenBLAS library with unprefixed CBLAS symbols, or None."""
    for candidate in CANDIDATES:
        if Path(candidate).exists():
            return candidate
    return ctypes.util.find_library("openblas")


def use_optimized_blas() -> Optional[str]:
    """Load an optimized BLAS for MLX if possible and allowed.

    Returns:
        str or None: The library loaded, or None when nothing was loaded.
    """
    global loaded_library
    setting = os.environ.get("RWKV_MLX_BLAS", "1")
    if loaded_library or setting == "0" or not sys.platform.startswith("linux"):
        return loaded_library
    if "mlx.core" in sys.modules:
        logger.debug("mlx.core was imported before rwkv_mlx, so MLX keeps its own BLAS")
        return None

    path = setting if setting not in ("1", "") else find_openblas()
    if path is None:
        return None
    if os.environ.get("RWKV_MLX_GEMV", "1") != "0":
        _load_gemv_forward(path)
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as error:
        logger.warning("could not load the BLAS library %s (%s); MLX keeps its own", path, error)
        return None
    loaded_library = path
    return path


def _load_gemv_forward(blas_path: str) -> None:
    """Build (once) and load ``gemv_forward.c`` ahead of the BLAS at ``blas_path``.

    Its ``cblas_sgemm`` must become global before the BLAS's own does, so it
    is loaded privately, pointed at the BLAS, and only then made global. Any
    failure leaves MLX's products as they are.
    """
    global gemv_forward
    try:
        library = _build_gemv_forward()
        forward = ctypes.CDLL(str(library), mode=ctypes.RTLD_LOCAL)
        status = forward.rwkv_mlx_gemv_forward_init(os.fsencode(blas_path))
        if status != 0:
            logger.debug("gemv_forward could not use %s (status %d)", blas_path, status)
            return
        forward = ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
    except (OSError, subprocess.SubprocessError) as error:
        logger.debug("single-row products stay with cblas_sgemm: %s", error)
        return
    forward.rwkv_mlx_gemv_forwarded.restype = ctypes.c_long
    gemv_forward = forward


def _build_gemv_forward() -> Path:
    """Return the compiled ``gemv_forward.c``, compiling it into the cache if needed.

    Beside the library, ``<library>.sha256`` records its checksum. A library
    whose checksum is missing or differs (truncated, overwritten) is compiled
    again, because loading a damaged library can crash the process.
    """
    source = Path(__file__).with_name("gemv_forward.c")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rwkv_mlx"
    library = cache / f"gemv_forward-{digest}.so"
    checksum = library.with_name(library.name + ".sha256")
    if library.exists() and checksum.exists():
        if hashlib.sha256(library.read_bytes()).hexdigest() == checksum.read_text().strip():
            return library
        logger.debug("%s does not match its checksum in %s, so it is compiled again", library, checksum)

    if os.environ.get("CC"):
        compiler = shutil.which(os.environ["CC"])
    else:
        compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise OSError(f"C compiler {os.environ.get('CC', 'cc')!r} not found: install one or set CC to one")
    cache.mkdir(parents=True, exist_ok=True)

    # Compile to a temporary name and rename, so a concurrent import never
    # loads a half-written library. The checksum is written last.
    handle, partial = tempfile.mkstemp(dir=cache, suffix=".so")
    os.close(handle)
    try:
        subprocess.run(
            [compiler, "-O2", "-shared", "-fPIC", str(source), "-o", partial, "-ldl"],
            check=True, capture_output=True, timeout=120,
        )
        written = hashlib.sha256(Path(partial).read_bytes()).hexdigest()
        os.replace(partial, library)
        _write_atomically(checksum, written + "\n")
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    logger.debug("compiled %s", library)
    return library


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder."""
    handle, partial = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def gemv_forwarded_count() -> Optional[int]:
    """Return the number of products sent to ``cblas_sgemv``, or None when
    ``gemv_forward`` is not loaded."""
    return None if gemv_forward is None else gemv_forward.rwkv_mlx_gemv_forwarded()
