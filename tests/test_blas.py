"""The optimized BLAS for MLX's CPU backend on Linux, and gemv_forward's
single-row products (rwkv_mlx/_blas.py, rwkv_mlx/gemv_forward.c)."""

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from rwkv_mlx import _blas

needs_openblas = pytest.mark.skipif(
    not sys.platform.startswith("linux") or _blas.find_openblas() is None,
    reason="needs Linux with OpenBLAS installed (apt-get install libopenblas0-pthread)",
)
needs_gemv_forward = pytest.mark.skipif(
    _blas.gemv_forward is None,
    reason="gemv_forward is not loaded here (needs Linux, OpenBLAS and a C compiler)",
)


def stored(array: np.ndarray, transposed: bool) -> mx.array:
    """Return ``array`` as an MLX array that is either contiguous or a
    transposed view, so MLX passes the matching transpose flag to the BLAS."""
    if not transposed:
        return mx.array(array)
    return mx.array(np.ascontiguousarray(np.swapaxes(array, -1, -2))).swapaxes(-1, -2)


@needs_gemv_forward
@pytest.mark.parametrize(
    "a_shape, b_shape",
    [((1, 37), (37, 19)), ((19, 37), (37, 1)), ((1, 1), (1, 1)), ((3, 1, 9), (3, 9, 4)), ((2, 5, 9), (9, 1))],
)
@pytest.mark.parametrize("a_transposed", [False, True])
@pytest.mark.parametrize("b_transposed", [False, True])
def test_single_row_products_match_numpy(a_shape, b_shape, a_transposed, b_transposed):
    rng = np.random.default_rng(0)
    a = rng.standard_normal(a_shape).astype(np.float32)
    b = rng.standard_normal(b_shape).astype(np.float32)
    c = rng.standard_normal(np.broadcast_shapes(a_shape[:-1] + (1,), b_shape[:-2] + (1, b_shape[-1]))).astype(np.float32)
    before = _blas.gemv_forwarded_count()

    product = stored(a, a_transposed) @ stored(b, b_transposed)
    fused = mx.addmm(mx.array(c), stored(a, a_transposed), stored(b, b_transposed), alpha=0.5, beta=2.0)
    mx.eval(product, fused)

    np.testing.assert_allclose(np.array(product), a @ b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(fused), 2.0 * c + 0.5 * (a @ b), rtol=1e-5, atol=1e-5)
    assert _blas.gemv_forwarded_count() > before


@needs_gemv_forward
def test_strided_row_of_a_larger_matrix():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 40)).astype(np.float32)
    w = rng.standard_normal((40, 30)).astype(np.float32)

    found = np.array(mx.array(x)[2:3, :] @ mx.array(w)[:, ::3])
    column = np.array(mx.array(w).T[::3] @ mx.array(x).T[:, 4:5])

    np.testing.assert_allclose(found, x[2:3] @ w[:, ::3], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(column, w.T[::3] @ x.T[:, 4:5], rtol=1e-5, atol=1e-5)


@needs_gemv_forward
def test_larger_products_keep_sgemm():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((8, 16)).astype(np.float32)
    b = rng.standard_normal((16, 12)).astype(np.float32)
    before = _blas.gemv_forwarded_count()

    found = np.array(mx.array(a) @ mx.array(b))

    np.testing.assert_allclose(found, a @ b, rtol=1e-5, atol=1e-5)
    assert _blas.gemv_forwarded_count() == before


# What a fresh interpreter reports after `import rwkv_mlx`, with one product run.
PROBE = """
import json
import rwkv_mlx
import mlx.core as mx
from rwkv_mlx import _blas
y = (mx.ones((1, 64)) @ mx.ones((64, 8))).tolist()
print(json.dumps({"blas": _blas.loaded_library, "gemv": _blas.gemv_forwarded_count(), "y": y}))
"""


def probe(tmp_path, **environment) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RWKV_MLX_BLAS", "RWKV_MLX_GEMV", "CC")}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), **environment)
    result = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@needs_openblas
def test_fresh_import_compiles_into_the_cache(tmp_path):
    found = probe(tmp_path)

    assert found["blas"] == _blas.find_openblas()
    assert found["gemv"] == 1
    assert found["y"] == [[64.0] * 8]
    libraries = list((tmp_path / "cache" / "rwkv_mlx").glob("gemv_forward-*.so"))
    assert len(libraries) == 1
    assert sorted(p.name for p in (tmp_path / "cache" / "rwkv_mlx").iterdir()) == [
        libraries[0].name,
        libraries[0].name + ".sha256",
    ]


@needs_openblas
@pytest.mark.parametrize("damage", ["truncated", "no checksum"])
def test_damaged_cached_library_is_rebuilt(tmp_path, damage):
    # Loading a truncated library can crash the process, so it must be
    # compiled again, not loaded.
    probe(tmp_path)
    library = next((tmp_path / "cache" / "rwkv_mlx").glob("gemv_forward-*.so"))
    whole = library.read_bytes()
    if damage == "truncated":
        library.write_bytes(whole[:3000])
    else:
        library.with_name(library.name + ".sha256").unlink()

    found = probe(tmp_path)

    assert found["gemv"] == 1
    assert library.read_bytes() == whole


@needs_openblas
def test_gemv_forward_can_be_turned_off(tmp_path):
    found = probe(tmp_path, RWKV_MLX_GEMV="0")

    assert found["blas"] == _blas.find_openblas()
    assert found["gemv"] is None
    assert found["y"] == [[64.0] * 8]


@needs_openblas
def test_no_compiler_keeps_openblas(tmp_path):
    found = probe(tmp_path, CC=str(tmp_path / "no-such-compiler"))

    assert found["blas"] == _blas.find_openblas()
    assert found["gemv"] is None
    assert found["y"] == [[64.0] * 8]


@needs_openblas
def test_failing_compiler_leaves_no_partial_library(tmp_path):
    found = probe(tmp_path, CC="false")

    assert found["gemv"] is None
    assert not list((tmp_path / "cache" / "rwkv_mlx").glob("*"))


def test_blas_off_loads_nothing(tmp_path):
    found = probe(tmp_path, RWKV_MLX_BLAS="0")

    assert found["blas"] is None
    assert found["gemv"] is None
    assert found["y"] == [[64.0] * 8]
