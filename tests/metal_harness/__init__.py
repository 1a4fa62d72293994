"""Run ``mx.fast.metal_kernel`` kernels on the CPU, for machines without Metal.

The harness takes a launch description (`rwkv_mlx.ops.metal.KernelLaunch`:
the kernel's name, body, header, inputs, template arguments, grid,
threadgroup and output shapes) and:

1. builds the kernel function MLX would generate for it, with the body and
   header pasted unchanged. Name, template parameters, parameter names and
   buffer order are MLX's (see `signature`);
2. compiles it as C++ (g++ or ``$CXX``, ``-nostdinc``) against
   ``shim/metal_shim.h``, links it with ``shim/runtime.cpp`` into a shared
   library cached by content hash (``$RWKV_MLX_HARNESS_CACHE``, default
   ``<tmp>/rwkv_mlx_metal_harness``), and loads it with ctypes;
3. runs every threadgroup of the grid as MLX dispatches it (grid in threads,
   threadgroup clamped to the grid, partial threadgroups at the edges), once
   per thread order, and checks that all orders give bit-identical outputs.

Execution model
    All threads of one threadgroup run as coroutines on one CPU thread. A
    thread runs alone until its next synchronisation point, then the next
    thread in the order runs: ``forward`` (increasing thread index),
    ``reverse``, or ``shuffled`` (a new seeded permutation for every pass).
    Threadgroups run one after another in the same kind of order. So a
    missing barrier shows up deterministically as outputs that differ between
    orders (`ThreadOrderError`).

Supported Metal language subset (anything else fails to compile, or raises
`UnsupportedFeatureError` before compiling)
    - Address spaces: ``device``, ``constant``, ``thread`` (erased);
      ``threadgroup`` variables and arrays declared in the kernel body, shared
      by the threads of a threadgroup, filled with 0xFF bytes (NaN for floats)
      before each threadgroup runs, at most 32768 bytes in total. Threadgroup
      pointers and references are rejected; pass threadgroup arrays to helper
      functions through template parameters.
    - Kernel buffers: inputs, outputs and ``<name>_shape``/``_strides``/
      ``_ndim`` are bounds-checked objects supporting ``[]``, unary ``*``,
      ``+``/``-`` with an offset, ``+=``, ``-=``, ``++``, ``--``. An
      out-of-bounds index stops the launch with the buffer's name
      (`KernelRuntimeError`). They do not convert to raw pointers. 0-d inputs
      are references, as in MLX. Inputs with fewer than 8 elements are
      ``constant`` in MLX's signature; the harness does not check address
      space conversions.
    - Types: ``bool``, ``char``, ``uchar``, ``short``, ``ushort``, ``int``,
      ``uint``, ``ulong``, ``int8_t`` … ``uint64_t``, ``size_t``, ``float``,
      ``half``/``float16_t`` and ``bfloat``/``bfloat16_t`` (storage types
      that convert to and from float with round-to-nearest-even). ``double``
      is rejected. Vectors ``float2..4``, ``half2..4``, ``int2..4``,
      ``uint2..4``, ``short2..4``, ``ushort2..4`` with ``.x .y .z .w``,
      indexing and element-wise arithmetic with vectors or scalars of the same
      element type. Swizzles and vector comparisons are not supported.
    - Math (``metal::``, ``metal::precise::``, ``metal::fast::`` and
      unqualified): ``exp exp2 log log2 sqrt rsqrt tanh sin cos floor ceil
      trunc round fabs pow fma fmin fmax`` on float; ``abs min max clamp``
      on float, int and uint; ``select isnan isinf isfinite dot``;
      ``numeric_limits<float>``. Results follow the host's libm, not Metal's
      error bounds.
    - Synchronisation: ``threadgroup_barrier`` and ``simdgroup_barrier`` with
      ``mem_flags::mem_none``, ``mem_device``, ``mem_threadgroup``,
      ``mem_texture`` (combined with ``|``). Memory is coherent, so the flags
      only name the barrier. Every thread of a threadgroup must reach the same
      barrier (same source line); a thread that returns while others wait, or
      threads at different barriers, stop the launch.
    - SIMD-group functions (32 lanes, lane = thread index in threadgroup % 32):
      ``simd_sum simd_product simd_min simd_max simd_prefix_inclusive_sum
      simd_prefix_exclusive_sum simd_broadcast simd_shuffle simd_shuffle_xor
      simd_shuffle_up simd_shuffle_down simd_any simd_all`` on float, half,
      int, uint (and bool for any/all). Each call waits until every lane of
      the simdgroup that has not returned reaches the same call; lanes that
      returned are inactive. Calls under divergent control flow (lanes at
      different calls) stop the launch, and reading an inactive lane with a
      shuffle or broadcast stops it too. Sums add the lanes in lane order.
    - Thread attributes: all twenty that MLX declares (thread_position_in_grid,
      threadgroup_position_in_grid, thread_position_in_threadgroup,
      threads_per_threadgroup, dispatch_threads_per_threadgroup,
      threadgroups_per_grid, threads_per_grid, grid_size, grid_origin,
      thread_index_in_threadgroup, thread_index_in_simdgroup,
      simdgroup_index_in_threadgroup, simdgroups_per_threadgroup,
      dispatch_simdgroups_per_threadgroup, threads_per_simdgroup,
      thread_execution_width and the quadgroup ones).
      ``threads_per_threadgroup`` is the size of the current (possibly
      partial) threadgroup and ``dispatch_threads_per_threadgroup`` the
      requested one.
    - Outputs start filled with 0xFF bytes (NaN for floats), like MLX's
      uninitialised allocations, or with ``init_value``.

Not supported (rejected): ``atomic_outputs``, ``ensure_row_contiguous=False``,
textures, samplers, atomics, simdgroup matrices, quad-group functions,
``#include`` of Metal headers, threadgroup memory above 32768 bytes or more
than 1024 threads per threadgroup. A crash inside a kernel (segmentation fault,
stack overflow, integer division by zero) stops the launch with a
`KernelRuntimeError`. NOTE: a thread that spins waiting for another thread
never yields, so the emulator hangs where Metal might not.
"""

from .emulator import (
    DEFAULT_ORDERS,
    EmulatorError,
    ExecutionRecord,
    KernelCompileError,
    KernelRuntimeError,
    ThreadOrderError,
    UnsupportedFeatureError,
    executed,
    find_compiler,
    launcher,
    run_launch,
    translation_unit,
    unavailable_reason,
)
from .signature import harness_source, kernel_name, metal_source

__all__ = [
    "DEFAULT_ORDERS",
    "EmulatorError",
    "ExecutionRecord",
    "KernelCompileError",
    "KernelRuntimeError",
    "ThreadOrderError",
    "UnsupportedFeatureError",
    "executed",
    "find_compiler",
    "harness_source",
    "kernel_name",
    "launcher",
    "metal_source",
    "run_launch",
    "translation_unit",
    "unavailable_reason",
]
