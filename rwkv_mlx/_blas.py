"""Use an optimized BLAS for MLX's CPU backend on Linux.

MLX's Linux CPU wheels (mlx-cpu 0.32) link a bundled reference BLAS. Loading
the distribution's OpenBLAS with global symbol binding before MLX is first
imported makes MLX's BLAS calls resolve to OpenBLAS instead. On a 2-core
x86_64 Linux machine, a [64, 4096] x [4096, 4096] float32 product went from
4.9 to 150 GFLOP/s (bench/bench_blas.py, docs/benchmarks.md).

It is on by default on Linux when a library is found, never on macOS (MLX uses
Accelerate and Metal there), and has no effect once ``mlx.core`` is imported.
Set ``RWKV_MLX_BLAS=0`` to turn it off, or to a library path to choose one.
NOTE: torch in the same process slows down with it loaded: BlinkDL's package
on torch 2.13 took 198 instead of 34 ms per decoded token on the machine
above (bench/bench_models.py, docs/benchmarks.md).
"""

import ctypes
import ctypes.util
import logging
import os
import sys
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
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as error:
        logger.warning("could not load the BLAS library %s (%s); MLX keeps its own", path, error)
        return None
    loaded_library = path
    return path
