"""Time one float32 matrix product in MLX with and without the OpenBLAS that rwkv_mlx loads.

    python bench/bench_blas.py

Each setting runs in its own process, because the BLAS is chosen when
``mlx.core`` is first imported: ``RWKV_MLX_BLAS=0`` keeps MLX's bundled BLAS,
the default loads the distribution's OpenBLAS where one is installed (see
rwkv_mlx/_blas.py). The product is [64, 4096] x [4096, 4096], best of 5.
"""

import json
import os
import subprocess
import sys

from machine import processor_name

CHILD = """
import time
import rwkv_mlx
import mlx.core as mx
a = mx.random.normal((64, 4096)); b = mx.random.normal((4096, 4096)); mx.eval(a, b, a @ b)
best = float("inf")
for _ in range(5):
    start = time.perf_counter(); mx.eval(a @ b); best = min(best, time.perf_counter() - start)
print(rwkv_mlx._blas.loaded_library or "MLX bundled", 2 * 64 * 4096 * 4096 / best / 1e9)
"""


def run(setting: str):
    env = {**os.environ, "RWKV_MLX_BLAS": setting}
    output = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    library, gflops = output.stdout.strip().rsplit(" ", 1)
    return library, float(gflops)


def main():
    processor = processor_name()
    print(f"processor: {processor}, {os.cpu_count()} cores")
    rows = {name: run(setting) for name, setting in (("bundled", "0"), ("default", "1"))}
    for name, (library, gflops) in rows.items():
        print(f"{name:8s} {gflops:8.1f} GFLOP/s  {library}")
    print(f"speedup {rows['default'][1] / rows['bundled'][1]:.1f}x")
    print(json.dumps({"processor": processor, **{k: {"library": v[0], "gflops": v[1]} for k, v in rows.items()}}))


if __name__ == "__main__":
    main()
