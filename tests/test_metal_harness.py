"""Tests of the Metal emulation harness itself: that it reproduces MLX's
generated kernel, emulates the supported Metal subset faithfully, and catches
broken kernels (out-of-bounds accesses, missing barriers, barrier misuse).
"""

import dataclasses
import math

import mlx.core as mx
import numpy as np
import pytest

from metal_harness import (
    KernelCompileError,
    KernelRuntimeError,
    ThreadOrderError,
    UnsupportedFeatureError,
    harness_source,
    metal_source,
    run_launch,
    unavailable_reason,
)
from rwkv_mlx.ops import metal

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))


def make_launch(source, inputs, output_shapes, grid, threadgroup, **options):
    """Build a `KernelLaunch` for a test kernel with inputs ``in0, in1, ...`` and outputs ``out0, ...``."""
    output_dtypes = options.pop("output_dtypes", None) or (mx.float32,) * len(output_shapes)
    return metal.KernelLaunch(
        name=options.pop("name", "harness_test"),
        source=source,
        header=options.pop("header", ""),
        input_names=options.pop("input_names", tuple(f"in{i}" for i in range(len(inputs)))),
        output_names=options.pop("output_names", tuple(f"out{i}" for i in range(len(output_shapes)))),
        inputs=tuple(inputs),
        output_shapes=tuple(output_shapes),
        output_dtypes=tuple(output_dtypes),
        grid=grid,
        threadgroup=threadgroup,
        **options,
    )


def mlx_generated_source(launch, capfd, tmp_path) -> str:
    """Return the source MLX itself generates for ``launch``.

    MLX builds the kernel graph without a Metal device while it exports a
    function, and ``verbose=True`` prints the generated source.
    """

    def traced(*inputs):
        return metal.run_on_metal(dataclasses.replace(launch, inputs=inputs), verbose=True)

    capfd.readouterr()
    mx.export_function(str(tmp_path / "kernel.mlxfn"), traced, *launch.inputs)
    printed = capfd.readouterr().out
    return printed.split("```\n", 1)[1].rsplit("\n```", 1)[0]


def shipped_launches():
    """Launch descriptions of every shipped kernel, with and without a mask."""
    mx.random.seed(0)
    B, T, H, N = 2, 3, 2, 32
    vectors = [mx.random.normal((B, T, H, N)).astype(dtype) for dtype in
               (mx.float32, mx.float32, mx.bfloat16, mx.float16, mx.float32, mx.float32)]
    state = mx.zeros((B, H, N, N))
    mask = mx.ones((B, T), dtype=mx.bool_)
    config = metal.WKV7KernelConfig(checkpoint_interval=2)
    checkpoints = mx.zeros((B, H, 2, N, N))
    dy = mx.zeros((B, T, H, N))
    step = [x[:, 0] for x in vectors]
    return {
        "forward": metal.forward_launch(*vectors, state, None, config, 0),
        "forward_mask_checkpoints": metal.forward_launch(*vectors, state, mask, config, 2),
        "backward": metal.backward_launch(*vectors, None, checkpoints, dy, state, config),
        "backward_mask": metal.backward_launch(*vectors, mask, checkpoints, dy, state, config),
        "decode": metal.decode_launch(*step, state, None, config),
        "decode_mask": metal.decode_launch(*step, state, mask[:, 0], config),
    }


SIGNATURE_SOURCE = """
uint i = thread_position_in_grid.x;
out0[i] = T(in0[i]) * scale + in0_shape[0] + float(in0_strides[0]) + in0_ndim + small[0] + float(N) + float(FLAG);
"""


def test_signature_matches_mlx_synthetic(capfd, tmp_path):
    launch = make_launch(
        SIGNATURE_SOURCE,
        [mx.ones((4, 8), dtype=mx.float16), mx.array(2.0), mx.ones((3,), dtype=mx.int32)],
        [(4, 8)],
        grid=(32, 1, 1),
        threadgroup=(16, 1, 1),
        input_names=("in0", "scale", "small"),
        template=(("T", mx.float32), ("N", -3), ("FLAG", True)),
        header="// header line\n",
    )
    assert metal_source(launch) == mlx_generated_source(launch, capfd, tmp_path)


@pytest.mark.parametrize("kernel", list(shipped_launches()))
def test_signature_matches_mlx_shipped(kernel, capfd, tmp_path):
    launch = shipped_launches()[kernel]
    assert metal_source(launch) == mlx_generated_source(launch, capfd, tmp_path)


def test_signature_harness_dialect():
    launch = make_launch(
        SIGNATURE_SOURCE,
        [mx.ones((4, 8), dtype=mx.float16), mx.array(2.0), mx.ones((3,), dtype=mx.int32)],
        [(4, 8)],
        grid=(32, 1, 1),
        threadgroup=(16, 1, 1),
        input_names=("in0", "scale", "small"),
        template=(("T", mx.float32), ("N", -3), ("FLAG", True)),
    )
    text = harness_source(launch)
    name = "custom_kernel_harness_test__float__3_1_float16_t_floats_int32_tc_float"
    assert f"void {name}(" in text
    assert "mtl::buffer<const float16_t> in0," in text
    assert "const float& scale," in text
    assert "mtl::buffer<const int64_t> in0_strides," in text
    assert "const int& in0_ndim," in text
    assert "uint3 thread_position_in_grid) {" in text
    assert f"{name}<float, -3, 1>(" in text


def test_scalars_shapes_and_templates_run():
    launch = make_launch(
        SIGNATURE_SOURCE,
        [mx.arange(32, dtype=mx.float16).reshape(4, 8), mx.array(2.0), mx.array([5, 6, 7], dtype=mx.int32)],
        [(4, 8)],
        grid=(32, 1, 1),
        threadgroup=(16, 1, 1),
        input_names=("in0", "scale", "small"),
        template=(("T", mx.float32), ("N", -3), ("FLAG", True)),
    )
    (out,) = run_launch(launch)
    expected = np.arange(32).reshape(4, 8) * 2.0 + 4 + 8 + 2 + 5 - 3 + 1
    np.testing.assert_array_equal(np.array(out), expected)


ATTRIBUTE_SOURCE = """
uint i = thread_position_in_grid.x + threads_per_grid.x * (thread_position_in_grid.y + threads_per_grid.y * thread_position_in_grid.z);
out0[i * 12 + 0] = threadgroup_position_in_grid.x;
out0[i * 12 + 1] = threadgroup_position_in_grid.y;
out0[i * 12 + 2] = thread_position_in_threadgroup.x;
out0[i * 12 + 3] = thread_position_in_threadgroup.y;
out0[i * 12 + 4] = threads_per_threadgroup.x;
out0[i * 12 + 5] = threads_per_threadgroup.y;
out0[i * 12 + 6] = dispatch_threads_per_threadgroup.x;
out0[i * 12 + 7] = threadgroups_per_grid.x;
out0[i * 12 + 8] = thread_index_in_threadgroup;
out0[i * 12 + 9] = thread_index_in_simdgroup;
out0[i * 12 + 10] = simdgroup_index_in_threadgroup;
out0[i * 12 + 11] = simdgroups_per_threadgroup;
"""


def test_thread_attributes_partial_threadgroups():
    grid = (10, 3, 1)
    launch = make_launch(
        ATTRIBUTE_SOURCE, [mx.zeros((8,))], [(10 * 3 * 12,)], grid=grid, threadgroup=(4, 2, 1),
        output_dtypes=(mx.uint32,),
    )
    (out,) = run_launch(launch)
    values = np.array(out).reshape(3, 10, 12)
    for y in range(3):
        for x in range(10):
            group = (x // 4, y // 2)
            local = (x % 4, y % 2)
            actual = (min(4, 10 - group[0] * 4), min(2, 3 - group[1] * 2))
            linear = local[0] + local[1] * actual[0]
            expected = [
                group[0], group[1], local[0], local[1], actual[0], actual[1], 4, 3,
                linear, linear % 32, linear // 32, math.ceil(actual[0] * actual[1] / 32),
            ]
            assert values[y, x].tolist() == expected, (x, y)


def test_threadgroup_clamped_to_grid():
    launch = make_launch(
        "out0[thread_position_in_grid.x] = threads_per_threadgroup.x;",
        [mx.zeros((8,))], [(6,)], grid=(6, 1, 1), threadgroup=(256, 1, 1),
    )
    (out,) = run_launch(launch)
    assert np.array(out).tolist() == [6.0] * 6


def test_out_of_bounds_read_caught():
    source = "uint i = thread_position_in_grid.x; out0[i] = in0[i + 1];"
    launch = make_launch(source, [mx.zeros((64,))], [(64,)], grid=(64, 1, 1), threadgroup=(32, 1, 1))
    with pytest.raises(KernelRuntimeError, match=r"buffer 'in0': index 64 of 64 elements in thread \(31, 0, 0\)"):
        run_launch(launch)


def test_out_of_bounds_write_caught():
    source = "uint i = thread_position_in_grid.x; out0[i * 2] = in0[i];"
    launch = make_launch(source, [mx.zeros((64,))], [(64,)], grid=(64, 1, 1), threadgroup=(64, 1, 1))
    with pytest.raises(KernelRuntimeError, match="buffer 'out0': index 64 of 64"):
        run_launch(launch)


def test_negative_index_caught():
    source = "uint i = thread_position_in_grid.x; out0[i] = (in0 + 8)[int(i) - 9];"
    launch = make_launch(source, [mx.zeros((16,))], [(16,)], grid=(16, 1, 1), threadgroup=(16, 1, 1))
    with pytest.raises(KernelRuntimeError, match="buffer 'in0': index -1 of 16"):
        run_launch(launch)


ROTATE_SOURCE = """
threadgroup float shared[64];
uint i = thread_position_in_threadgroup.x;
uint n = threads_per_threadgroup.x;
shared[i] = in0[thread_position_in_grid.x];
{barrier}
out0[thread_position_in_grid.x] = shared[(i + 1) % n];
"""


def test_missing_barrier_caught():
    source = ROTATE_SOURCE.format(barrier="")
    launch = make_launch(source, [mx.arange(128, dtype=mx.float32)], [(128,)], grid=(128, 1, 1),
                         threadgroup=(64, 1, 1))
    with pytest.raises(ThreadOrderError, match="'out0' differs between the forward and reverse"):
        run_launch(launch)


def test_barrier_makes_rotation_correct():
    source = ROTATE_SOURCE.format(barrier="threadgroup_barrier(mem_flags::mem_threadgroup);")
    launch = make_launch(source, [mx.arange(128, dtype=mx.float32)], [(128,)], grid=(128, 1, 1),
                         threadgroup=(64, 1, 1))
    (out,) = run_launch(launch)
    expected = np.arange(128).reshape(2, 64)
    np.testing.assert_array_equal(np.array(out).reshape(2, 64), np.roll(expected, -1, axis=1))


def test_missing_second_barrier_caught():
    # The classic bug: a loop that refills shared memory without waiting for
    # the readers of the previous iteration.
    source = """
    threadgroup float shared[32];
    uint i = thread_position_in_threadgroup.x;
    float total = 0.0f;
    for (int step = 0; step < 4; ++step) {
      shared[i] = in0[step * 32 + i];
      threadgroup_barrier(mem_flags::mem_threadgroup);
      total += shared[(i + 5) % 32];
    }
    out0[i] = total;
    """
    launch = make_launch(source, [mx.arange(128, dtype=mx.float32)], [(32,)], grid=(32, 1, 1),
                         threadgroup=(32, 1, 1))
    with pytest.raises(ThreadOrderError):
        run_launch(launch)
    fixed = source.replace("total += shared[(i + 5) % 32];",
                           "total += shared[(i + 5) % 32];\n threadgroup_barrier(mem_flags::mem_threadgroup);")
    (out,) = run_launch(dataclasses.replace(launch, source=fixed))
    data = np.arange(128).reshape(4, 32)
    np.testing.assert_array_equal(np.array(out), np.roll(data, -5, axis=1).sum(axis=0))


def test_uninitialised_threadgroup_memory_is_nan():
    source = """
    threadgroup float shared[32];
    out0[thread_position_in_grid.x] = shared[thread_position_in_threadgroup.x];
    """
    launch = make_launch(source, [mx.zeros((8,))], [(64,)], grid=(64, 1, 1), threadgroup=(32, 1, 1))
    (out,) = run_launch(launch)
    assert np.isnan(np.array(out)).all()


def test_unwritten_output_is_nan():
    source = "uint i = thread_position_in_grid.x; if (i % 2 == 0) { out0[i] = in0[i]; }"
    launch = make_launch(source, [mx.zeros((16,))], [(16,)], grid=(16, 1, 1), threadgroup=(16, 1, 1))
    (out,) = run_launch(launch)
    values = np.array(out)
    assert (values[::2] == 0).all()
    assert np.isnan(values[1::2]).all()


def test_init_value_fills_output():
    source = "uint i = thread_position_in_grid.x; if (i % 2 == 0) { out0[i] = in0[i]; }"
    launch = make_launch(source, [mx.zeros((16,))], [(16,)], grid=(16, 1, 1), threadgroup=(16, 1, 1),
                         init_value=3.0)
    (out,) = run_launch(launch)
    assert np.array(out)[1::2].tolist() == [3.0] * 8


def test_thread_returning_before_barrier_caught():
    source = """
    threadgroup float shared[32];
    uint i = thread_position_in_threadgroup.x;
    if (i == 3) { return; }
    shared[i] = 1.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out0[i] = shared[0];
    """
    launch = make_launch(source, [mx.zeros((8,))], [(32,)], grid=(32, 1, 1), threadgroup=(32, 1, 1))
    with pytest.raises(KernelRuntimeError, match="1 threads of threadgroup .* returned while 31 others wait"):
        run_launch(launch)


def test_divergent_barriers_caught():
    source = """
    uint i = thread_position_in_threadgroup.x;
    if (i < 16) {
      threadgroup_barrier(mem_flags::mem_threadgroup);
    } else {
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    out0[i] = 1.0f;
    """
    launch = make_launch(source, [mx.zeros((8,))], [(32,)], grid=(32, 1, 1), threadgroup=(32, 1, 1))
    with pytest.raises(KernelRuntimeError, match="different threadgroup barriers"):
        run_launch(launch)


SIMD_SOURCE = """
uint lane = thread_index_in_simdgroup;
uint i = thread_position_in_grid.x;
float x = in0[i];
out0[i * 8 + 0] = simd_sum(x);
out0[i * 8 + 1] = simd_max(x);
out0[i * 8 + 2] = simd_min(x);
out0[i * 8 + 3] = simd_prefix_inclusive_sum(x);
out0[i * 8 + 4] = simd_prefix_exclusive_sum(x);
out0[i * 8 + 5] = simd_shuffle_xor(x, 1);
out0[i * 8 + 6] = simd_broadcast(x, 2);
out0[i * 8 + 7] = simd_product(x);
"""


def test_simd_functions():
    # 48 threads per threadgroup: a full simdgroup and one of 16 lanes.
    values = mx.array(np.random.default_rng(0).choice([0.5, 1.0, 2.0, 3.0], size=96).astype(np.float32))
    launch = make_launch(SIMD_SOURCE, [values], [(96 * 8,)], grid=(96, 1, 1), threadgroup=(48, 1, 1))
    (out,) = run_launch(launch)
    out = np.array(out).reshape(96, 8)
    x = np.array(values)
    for start, width in ((0, 32), (32, 16), (48, 32), (80, 16)):
        lanes = x[start:start + width]
        got = out[start:start + width]
        np.testing.assert_array_equal(got[:, 0], lanes.sum())
        np.testing.assert_array_equal(got[:, 1], lanes.max())
        np.testing.assert_array_equal(got[:, 2], lanes.min())
        np.testing.assert_array_equal(got[:, 3], np.cumsum(lanes))
        np.testing.assert_array_equal(got[:, 4], np.cumsum(lanes) - lanes)
        np.testing.assert_array_equal(got[:, 5], lanes[np.arange(width) ^ 1])
        np.testing.assert_array_equal(got[:, 6], lanes[2])
        np.testing.assert_array_equal(got[:, 7], np.prod(lanes))


def test_simd_shuffle_up_down():
    source = """
    uint i = thread_position_in_grid.x;
    out0[i] = simd_shuffle_up(in0[i], 3);
    out1[i] = simd_shuffle_down(in0[i], 5);
    """
    values = np.arange(64, dtype=np.float32)
    launch = make_launch(source, [mx.array(values)], [(64,), (64,)], grid=(64, 1, 1), threadgroup=(64, 1, 1))
    up, down = (np.array(x).reshape(2, 32) for x in run_launch(launch))
    lanes = values.reshape(2, 32)
    lane = np.arange(32)
    np.testing.assert_array_equal(up, np.where(lane >= 3, lanes[:, np.maximum(lane - 3, 0)], lanes))
    np.testing.assert_array_equal(down, np.where(lane + 5 < 32, lanes[:, np.minimum(lane + 5, 31)], lanes))


def test_divergent_simd_calls_caught():
    source = """
    uint lane = thread_index_in_simdgroup;
    float x = in0[lane];
    float y = lane < 8 ? simd_sum(x) : simd_max(x);
    out0[lane] = y;
    """
    launch = make_launch(source, [mx.zeros((32,))], [(32,)], grid=(32, 1, 1), threadgroup=(32, 1, 1))
    with pytest.raises(KernelRuntimeError, match="different SIMD-group calls"):
        run_launch(launch)


def test_shuffle_from_inactive_lane_caught():
    source = """
    uint lane = thread_index_in_simdgroup;
    out0[lane] = simd_shuffle(in0[lane], 20);
    """
    launch = make_launch(source, [mx.zeros((16,))], [(16,)], grid=(16, 1, 1), threadgroup=(16, 1, 1))
    with pytest.raises(KernelRuntimeError, match="inactive lane"):
        run_launch(launch)


def test_half_and_bfloat_conversions():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(size=200) * 10.0 ** rng.integers(-9, 6, size=200),
                             [0.0, -0.0, 65504.0, 70000.0, 1e-8, -3e-5, np.inf, -np.inf]]).astype(np.float32)
    source = """
    uint i = thread_position_in_grid.x;
    out0[i] = float(in0[i]);
    out1[i] = float(in1[i]);
    out2[i] = in2[i];
    out3[i] = in2[i];
    """
    x = mx.array(values)
    launch = make_launch(
        source, [x.astype(mx.float16), x.astype(mx.bfloat16), x], [values.shape] * 4,
        grid=(values.size, 1, 1), threadgroup=(64, 1, 1),
        output_dtypes=(mx.float32, mx.float32, mx.float16, mx.bfloat16),
    )
    half_in, bfloat_in, half_out, bfloat_out = run_launch(launch)
    np.testing.assert_array_equal(np.array(half_in), np.array(x.astype(mx.float16).astype(mx.float32)))
    np.testing.assert_array_equal(np.array(bfloat_in), np.array(x.astype(mx.bfloat16).astype(mx.float32)))
    np.testing.assert_array_equal(np.array(half_out.view(mx.uint16)), np.array(x.astype(mx.float16).view(mx.uint16)))
    np.testing.assert_array_equal(
        np.array(bfloat_out.view(mx.uint16)), np.array(x.astype(mx.bfloat16).view(mx.uint16))
    )


def test_threadgroup_memory_limit():
    source = """
    threadgroup float shared[9000];
    shared[thread_position_in_threadgroup.x] = 1.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out0[thread_position_in_grid.x] = shared[0];
    """
    launch = make_launch(source, [mx.zeros((8,))], [(32,)], grid=(32, 1, 1), threadgroup=(32, 1, 1))
    with pytest.raises(KernelRuntimeError, match="36000 bytes of threadgroup memory"):
        run_launch(launch)


def test_threadgroup_size_limit():
    launch = make_launch("out0[thread_position_in_grid.x] = 1.0f;", [mx.zeros((8,))], [(2048,)],
                         grid=(2048, 1, 1), threadgroup=(2048, 1, 1))
    with pytest.raises(KernelRuntimeError, match="between 1 and 1024 threads"):
        run_launch(launch)


def test_crash_reported_not_fatal():
    source = """
    int i = int(thread_position_in_grid.x);
    out0[i] = float(1000 / (i - int(in0[0])));
    """
    launch = make_launch(source, [mx.full((8,), 3.0)], [(8,)], grid=(8, 1, 1), threadgroup=(8, 1, 1))
    with pytest.raises(KernelRuntimeError, match=r"arithmetic exception .* thread \(3, 0, 0\)"):
        run_launch(launch)


def test_stack_overflow_reported():
    source = """
    thread float big[200000];
    uint i = thread_position_in_grid.x;
    for (uint j = 0; j < 200000; j += 1024) { big[j] = in0[i]; }
    out0[i] = big[i * 1024];
    """
    launch = make_launch(source, [mx.zeros((8,))], [(8,)], grid=(8, 1, 1), threadgroup=(8, 1, 1))
    with pytest.raises(KernelRuntimeError, match="segmentation fault"):
        run_launch(launch)


@pytest.mark.parametrize(
    "source",
    [
        "double x = in0[0]; out0[0] = float(x);",
        "out0[0] = metal::erf(in0[0]);",
        "printf(\"x\"); out0[0] = in0[0];",
        "std::vector<float> v; out0[0] = in0[0];",
        "const device float* p = in0; out0[0] = p[0];",
    ],
    ids=["double", "unsupported_math", "printf", "std_library", "raw_pointer"],
)
def test_unsupported_code_fails_to_compile(source):
    launch = make_launch(source, [mx.zeros((8,))], [(8,)], grid=(1, 1, 1), threadgroup=(1, 1, 1),
                         name="harness_unsupported")
    with pytest.raises(KernelCompileError):
        run_launch(launch)


@pytest.mark.parametrize(
    "source, options",
    [
        ("out0[0] = in0[0];", {"atomic_outputs": True}),
        ("out0[0] = in0[0];", {"ensure_row_contiguous": False}),
        ("threadgroup float s[4]; threadgroup float* p = s; out0[0] = p[0];", {}),
        ("texture2d<float> t; out0[0] = in0[0];", {}),
        ("atomic_fetch_add_explicit(out0, 1.0f, memory_order_relaxed);", {}),
    ],
    ids=["atomic_outputs", "not_row_contiguous", "threadgroup_pointer", "texture", "atomics"],
)
def test_unsupported_features_rejected(source, options):
    launch = make_launch(source, [mx.zeros((8,))], [(8,)], grid=(1, 1, 1), threadgroup=(1, 1, 1), **options)
    with pytest.raises(UnsupportedFeatureError):
        run_launch(launch)


def test_compile_error_points_to_source_file():
    launch = make_launch("out0[0] = in0[0];\nundefined_name += 1;", [mx.zeros((8,))], [(8,)],
                         grid=(1, 1, 1), threadgroup=(1, 1, 1), source_file="broken.metal")
    with pytest.raises(KernelCompileError, match=r"broken\.metal:2"):
        run_launch(launch)
