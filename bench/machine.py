"""Describe the machine a benchmark ran on, for its printout and its JSON.

Two Linux VMs that both report "x86_64, 2 cores" can differ fourfold in
matrix-product speed (OpenBLAS at 150 and at 37.5 GFLOP/s on
bench_blas.py's product, 2026-12-04 and 2026-12-05), so every benchmark
records the processor as well.
"""

import os
import platform
import subprocess
import time


def processor_name() -> str:
    """Return the processor's model name, as precisely as the system reports it.

    Returns:
        str: For example ``"AMD EPYC (family 23, model 1)"`` on a Linux VM or
        ``"Apple M2 Pro"`` on a Mac; ``"unknown processor"`` where the system reports none.
    """
    if platform.system() == "Darwin":
        try:
            return subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return platform.processor() or "unknown processor"

    fields = {}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        return platform.processor() or "unknown processor"
    name = fields.get("model name") or platform.processor() or "unknown processor"
    # A VM may hide the exact model behind a family name; family and model
    # numbers still tell processor generations apart.
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def memory_gb() -> float | None:
    """Return the machine's physical memory in GB, or None where unknown."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return None


def describe() -> dict:
    """Describe this machine and the MLX setup that the benchmarks run on.

    Returns:
        dict: ``processor``, ``cores``, ``memory_gb``, ``platform``, ``mlx``
        (its version), ``blas`` (the library rwkv_mlx loaded for MLX, or
        None for MLX's own), ``gemv_forward`` (whether single-row products go
        to ``cblas_sgemv``) and ``date``.
    """
    import rwkv_mlx  # first: loads the optimized BLAS before mlx.core
    import mlx.core as mx

    return {
        "processor": processor_name(),
        "cores": os.cpu_count(),
        "memory_gb": memory_gb(),
        "platform": platform.platform(),
        "mlx": mx.__version__,
        "blas": rwkv_mlx._blas.loaded_library,
        "gemv_forward": rwkv_mlx._blas.gemv_forward is not None,
        "date": time.strftime("%Y-%m-%d"),
    }


def summary(machine: dict) -> str:
    """Return ``describe()``'s result as one line for a printout."""
    memory = f", {machine['memory_gb']:.0f} GB" if machine["memory_gb"] else ""
    blas = machine["blas"] or "MLX's bundled BLAS"
    products = "cblas_sgemv for single rows" if machine["gemv_forward"] else "cblas_sgemm for all products"
    return (
        f"{machine['processor']}, {machine['cores']} cores{memory}, {machine['platform']}, "
        f"MLX {machine['mlx']} with {blas} ({products}), {machine['date']}"
    )
