"""Shared test setup.

Importing rwkv_mlx first lets it load an optimized BLAS before any test module
imports mlx.core (see rwkv_mlx/_blas.py).
"""

from pathlib import Path

import pytest

import rwkv_mlx  # noqa: F401

# After rwkv_mlx, because it imports mlx.core.
from metal_kernels import LAUNCHERS, kernels_on

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"
RWKV_CPP_TINY = SHARED_FIXTURES / "rwkv-cpp-tiny"


@pytest.fixture(scope="session")
def rwkv_cpp_tiny() -> Path:
    """The folder of rwkv.cpp's tiny trained models; skips the test where it is absent."""
    if not RWKV_CPP_TINY.is_dir():
        pytest.skip(f"the tiny rwkv.cpp models are not present at {RWKV_CPP_TINY}")
    return RWKV_CPP_TINY


@pytest.fixture(params=LAUNCHERS)
def kernels(request):
    """Run the test with the Metal kernels in the emulator and on a Metal GPU,
    where each is available; the value is ``emulated`` or ``metal``."""
    with kernels_on(request.param):
        yield request.param
