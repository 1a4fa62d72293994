// Calls between an emulated kernel and the emulation runtime. Included by the
// kernel translation unit (through metal_shim.h, without system headers) and
// by runtime.cpp, so it must not depend on either side's definitions.

#ifndef RWKV_MLX_MTL_ABI_H
#define RWKV_MLX_MTL_ABI_H

namespace mtl {

struct uint3_pod {
  unsigned x, y, z;
};

// The values of every thread attribute that MLX can declare in a generated
// kernel signature, for one emulated thread.
struct thread_attributes {
  uint3_pod thread_position_in_grid;
  uint3_pod thread_position_in_threadgroup;
  uint3_pod threadgroup_position_in_grid;
  uint3_pod threads_per_threadgroup;
  uint3_pod dispatch_threads_per_threadgroup;
  uint3_pod threadgroups_per_grid;
  uint3_pod threads_per_grid;
  uint3_pod grid_size;
  uint3_pod grid_origin;
  unsigned thread_index_in_threadgroup;
  unsigned thread_index_in_simdgroup;
  unsigned simdgroup_index_in_threadgroup;
  unsigned simdgroups_per_threadgroup;
  unsigned dispatch_simdgroups_per_threadgroup;
  unsigned threads_per_simdgroup;
  unsigned thread_execution_width;
  unsigned thread_index_in_quadgroup;
  unsigned quadgroup_index_in_threadgroup;
  unsigned quadgroups_per_threadgroup;
  unsigned dispatch_quadgroups_per_threadgroup;
};

// Stop the launch: the runtime reports the message and the current thread.
[[noreturn]] void fail(const char* message);
[[noreturn]] void fail_out_of_bounds(const char* name, long long index, long long size);

// Wait until the other threads of the threadgroup (scope 0) or simdgroup
// (scope 1) reach a barrier. `line` identifies the call site.
void barrier(int scope, int flags, int line);

// Deposit `value` (`size` bytes) for a SIMD-group operation, wait until every
// active lane of the simdgroup has reached the same call, then copy all 32
// lanes' values into `lanes`. Returns the mask of active lanes.
unsigned simd_exchange(int op, int line, const void* value, int size, void* lanes);

// Lane of the calling thread within its simdgroup.
unsigned current_lane();

}  // namespace mtl

// Defined by the generated kernel translation unit: run the kernel for one
// thread with the given buffers (`sizes` in elements) and attributes.
extern "C" void mtl_kernel_entry(
    void* const* buffers,
    const long long* sizes,
    const mtl::thread_attributes* attributes);

#endif  // RWKV_MLX_MTL_ABI_H
