"""Where the Metal-kernel tests run the kernels: in the CPU emulation harness,
and on the Metal GPU where there is one. The ``kernels`` fixture that runs a
test in each place is in conftest.py."""

import contextlib
from pathlib import Path

import mlx.core as mx
import pytest

import metal_harness
from rwkv_mlx.ops import metal

REPO_ROOT = Path(__file__).resolve().parents[1]
METAL_PRESENT = mx.metal.is_available()

NEEDS_EMULATOR = pytest.mark.skipif(
    metal_harness.unavailable_reason() is not None, reason=str(metal_harness.unavailable_reason())
)
NEEDS_METAL = pytest.mark.skipif(not METAL_PRESENT, reason="needs a Metal GPU")
LAUNCHERS = [pytest.param("emulated", marks=NEEDS_EMULATOR), pytest.param("metal", marks=NEEDS_METAL)]


@contextlib.contextmanager
def kernels_on(kind: str):
    """Run every kernel launched through ``rwkv_mlx.ops.metal`` in the emulator or on the GPU."""
    if kind == "emulated":
        with metal.use_launcher(metal_harness.launcher()):
            yield
    else:
        with metal.use_launcher(metal.run_on_metal), mx.stream(mx.gpu):
            yield

