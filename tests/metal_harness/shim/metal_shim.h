// The subset of the Metal Shading Language that the emulation harness
// compiles as C++. The kernel translation unit is compiled with -nostdinc and
// includes only this header, so any Metal (or C++ library) name that is not
// defined here is a compile error rather than a silent host fallback.
//
// The list of supported features lives in tests/metal_harness/__init__.py.

#ifndef RWKV_MLX_METAL_SHIM_H
#define RWKV_MLX_METAL_SHIM_H

// ---------------------------------------------------------------------------
// Address spaces
// ---------------------------------------------------------------------------
// Pointers and references into device, constant and thread memory are plain
// C++ pointers here; kernel buffers are bounds-checked `mtl::buffer` objects.
#define device
#define constant
#define thread
// A threadgroup variable becomes a static local in its own section: the
// runtime runs one threadgroup at a time, so the variable is shared by the
// threads of the running group. The runtime fills the section with 0xFF bytes
// (NaN for floats) before every threadgroup, like uninitialised memory.
#define threadgroup static __attribute__((section("mtl_tgmem"), aligned(16)))

#define kernel

// Metal has no 64-bit floating point type.
#define double metal_does_not_support_double

// ---------------------------------------------------------------------------
// Scalar types
// ---------------------------------------------------------------------------
typedef __INT8_TYPE__ int8_t;
typedef __INT16_TYPE__ int16_t;
typedef __INT32_TYPE__ int32_t;
typedef __INT64_TYPE__ int64_t;
typedef __UINT8_TYPE__ uint8_t;
typedef __UINT16_TYPE__ uint16_t;
typedef __UINT32_TYPE__ uint32_t;
typedef __UINT64_TYPE__ uint64_t;
typedef __SIZE_TYPE__ size_t;
typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;

#include "mtl_abi.h"

namespace mtl {

inline unsigned float_bits(float x) { return __builtin_bit_cast(unsigned, x); }
inline float bits_float(unsigned x) { return __builtin_bit_cast(float, x); }

// IEEE binary16, converted in software with round-to-nearest-even.
struct half_t {
  unsigned short bits;
  half_t() = default;
  half_t(float x) : bits(from_float(x)) {}
  operator float() const { return to_float(bits); }

  static unsigned short from_float(float x) {
    unsigned u = float_bits(x);
    unsigned sign = (u >> 16) & 0x8000u;
    unsigned exponent = (u >> 23) & 0xFFu;
    unsigned mantissa = u & 0x7FFFFFu;
    if (exponent == 0xFFu) {
      return sign | 0x7C00u | (mantissa ? 0x200u : 0u);
    }

    // Rebias the exponent; too large overflows to infinity.
    int e = int(exponent) - 127 + 15;
    if (e >= 31) {
      return sign | 0x7C00u;
    }

    // Subnormal half: shift the mantissa with its implicit bit into place.
    if (e <= 0) {
      if (e < -10) {
        return sign;
      }
      mantissa |= 0x800000u;
      unsigned shift = unsigned(14 - e);
      unsigned half_mantissa = mantissa >> shift;
      unsigned rest = mantissa & ((1u << shift) - 1u);
      unsigned halfway = 1u << (shift - 1u);
      if (rest > halfway || (rest == halfway && (half_mantissa & 1u))) {
        half_mantissa++;
      }
      return sign | half_mantissa;
    }

    // Normal half: a carry out of the mantissa rounds up into the exponent.
    unsigned result = sign | (unsigned(e) << 10) | (mantissa >> 13);
    unsigned rest = mantissa & 0x1FFFu;
    if (rest > 0x1000u || (rest == 0x1000u && (result & 1u))) {
      result++;
    }
    return (unsigned short)result;
  }

  static float to_float(unsigned short h) {
    unsigned sign = unsigned(h & 0x8000u) << 16;
    unsigned exponent = (h >> 10) & 0x1Fu;
    unsigned mantissa = h & 0x3FFu;
    if (exponent == 0x1Fu) {
      return bits_float(sign | 0x7F800000u | (mantissa << 13));
    }
    if (exponent == 0) {
      float magnitude = float(mantissa) * (1.0f / 16777216.0f);
      return sign ? -magnitude : magnitude;
    }
    return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  }
};

// bfloat16: the top half of a float32, rounded to nearest even.
struct bfloat_t {
  unsigned short bits;
  bfloat_t() = default;
  bfloat_t(float x) {
    unsigned u = float_bits(x);
    if ((u & 0x7F800000u) == 0x7F800000u && (u & 0x7FFFFFu)) {
      bits = (unsigned short)((u >> 16) | 0x40u);
    } else {
      bits = (unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    }
  }
  operator float() const { return bits_float(unsigned(bits) << 16); }
};

}  // namespace mtl

typedef mtl::half_t half;
typedef mtl::half_t float16_t;
typedef mtl::bfloat_t bfloat;
typedef mtl::bfloat_t bfloat16_t;

// ---------------------------------------------------------------------------
// Vector types: named components x, y, z, w, indexing, and element-wise
// arithmetic with vectors and scalars. Swizzles and comparisons are not
// supported.
// ---------------------------------------------------------------------------
namespace mtl {

template <typename T, int n>
struct vec_storage;
template <typename T>
struct vec_storage<T, 2> {
  T x, y;
};
template <typename T>
struct vec_storage<T, 3> {
  T x, y, z;
};
template <typename T>
struct vec_storage<T, 4> {
  T x, y, z, w;
};

template <typename T, int n>
struct vec : vec_storage<T, n> {
  vec() = default;
  explicit vec(T scalar) {
    for (int i = 0; i < n; ++i) (*this)[i] = scalar;
  }
  vec(T x, T y) : vec_storage<T, n>{x, y} { static_assert(n == 2, "wrong component count"); }
  vec(T x, T y, T z) : vec_storage<T, n>{x, y, z} { static_assert(n == 3, "wrong component count"); }
  vec(T x, T y, T z, T w) : vec_storage<T, n>{x, y, z, w} {
    static_assert(n == 4, "wrong component count");
  }
  T& operator[](int i) { return (&this->x)[i]; }
  const T& operator[](int i) const { return (&this->x)[i]; }
};

#define MTL_VEC_BINARY(op)                                                 \
  template <typename T, int n>                                             \
  vec<T, n> operator op(vec<T, n> lhs, const vec<T, n>& rhs) {             \
    for (int i = 0; i < n; ++i) lhs[i] = lhs[i] op rhs[i];                 \
    return lhs;                                                            \
  }                                                                        \
  template <typename T, int n>                                             \
  vec<T, n> operator op(vec<T, n> lhs, T rhs) {                            \
    for (int i = 0; i < n; ++i) lhs[i] = lhs[i] op rhs;                    \
    return lhs;                                                            \
  }                                                                        \
  template <typename T, int n>                                             \
  vec<T, n> operator op(T lhs, vec<T, n> rhs) {                            \
    for (int i = 0; i < n; ++i) rhs[i] = lhs op rhs[i];                    \
    return rhs;                                                            \
  }                                                                        \
  template <typename T, int n, typename U>                                 \
  vec<T, n>& operator op##=(vec<T, n>& lhs, const U& rhs) {                \
    lhs = lhs op rhs;                                                      \
    return lhs;                                                            \
  }
MTL_VEC_BINARY(+)
MTL_VEC_BINARY(-)
MTL_VEC_BINARY(*)
MTL_VEC_BINARY(/)
#undef MTL_VEC_BINARY

template <typename T, int n>
vec<T, n> operator-(vec<T, n> v) {
  for (int i = 0; i < n; ++i) v[i] = -v[i];
  return v;
}

// A kernel buffer: a pointer with the element count of the array behind it.
// Every access checks its index and stops the launch with the buffer's name
// when the index is out of bounds. There is no conversion to a raw pointer.
template <typename T>
struct buffer {
  T* base;
  long long size;
  long long offset;
  const char* name;

  T& operator[](long long i) const {
    long long index = offset + i;
    if (index < 0 || index >= size) {
      fail_out_of_bounds(name, index, size);
    }
    return base[index];
  }
  T& operator*() const { return (*this)[0]; }
  buffer operator+(long long d) const { return buffer{base, size, offset + d, name}; }
  buffer operator-(long long d) const { return buffer{base, size, offset - d, name}; }
  buffer& operator+=(long long d) {
    offset += d;
    return *this;
  }
  buffer& operator-=(long long d) {
    offset -= d;
    return *this;
  }
  buffer& operator++() {
    ++offset;
    return *this;
  }
  buffer& operator--() {
    --offset;
    return *this;
  }
};

}  // namespace mtl

#define MTL_VEC_TYPES(scalar)                 \
  typedef mtl::vec<scalar, 2> scalar##2;      \
  typedef mtl::vec<scalar, 3> scalar##3;      \
  typedef mtl::vec<scalar, 4> scalar##4;
MTL_VEC_TYPES(float)
MTL_VEC_TYPES(half)
MTL_VEC_TYPES(int)
MTL_VEC_TYPES(uint)
MTL_VEC_TYPES(short)
MTL_VEC_TYPES(ushort)
#undef MTL_VEC_TYPES

// ---------------------------------------------------------------------------
// Synchronisation
// ---------------------------------------------------------------------------
namespace metal {

enum class mem_flags : int {
  mem_none = 0,
  mem_device = 1,
  mem_threadgroup = 2,
  mem_texture = 4,
};
inline mem_flags operator|(mem_flags lhs, mem_flags rhs) { return mem_flags(int(lhs) | int(rhs)); }

inline void threadgroup_barrier(mem_flags flags, int line = __builtin_LINE()) {
  mtl::barrier(0, int(flags), line);
}
inline void simdgroup_barrier(mem_flags flags, int line = __builtin_LINE()) {
  mtl::barrier(1, int(flags), line);
}

// ---------------------------------------------------------------------------
// Math: float overloads (half and bfloat convert to float first, as their
// implicit conversions do), integer min/max/abs/clamp.
// ---------------------------------------------------------------------------
#define MTL_MATH_1(name, builtin) \
  inline float name(float x) { return builtin(x); }
#define MTL_MATH_SET                                                       \
  MTL_MATH_1(exp, __builtin_expf)                                          \
  MTL_MATH_1(exp2, __builtin_exp2f)                                        \
  MTL_MATH_1(log, __builtin_logf)                                          \
  MTL_MATH_1(log2, __builtin_log2f)                                        \
  MTL_MATH_1(sqrt, __builtin_sqrtf)                                        \
  MTL_MATH_1(tanh, __builtin_tanhf)                                        \
  MTL_MATH_1(sin, __builtin_sinf)                                          \
  MTL_MATH_1(cos, __builtin_cosf)                                          \
  MTL_MATH_1(floor, __builtin_floorf)                                      \
  MTL_MATH_1(ceil, __builtin_ceilf)                                        \
  MTL_MATH_1(trunc, __builtin_truncf)                                      \
  MTL_MATH_1(round, __builtin_roundf)                                      \
  MTL_MATH_1(fabs, __builtin_fabsf)                                        \
  inline float rsqrt(float x) { return 1.0f / __builtin_sqrtf(x); }        \
  inline float pow(float x, float y) { return __builtin_powf(x, y); }      \
  inline float fma(float x, float y, float z) { return __builtin_fmaf(x, y, z); } \
  inline float fmin(float x, float y) { return __builtin_fminf(x, y); }    \
  inline float fmax(float x, float y) { return __builtin_fmaxf(x, y); }

MTL_MATH_SET
namespace precise {
MTL_MATH_SET
}
namespace fast {
MTL_MATH_SET
}
#undef MTL_MATH_SET
#undef MTL_MATH_1

inline float abs(float x) { return __builtin_fabsf(x); }
inline int abs(int x) { return x < 0 ? -x : x; }
inline float min(float x, float y) { return __builtin_fminf(x, y); }
inline float max(float x, float y) { return __builtin_fmaxf(x, y); }
inline int min(int x, int y) { return x < y ? x : y; }
inline int max(int x, int y) { return x > y ? x : y; }
inline uint min(uint x, uint y) { return x < y ? x : y; }
inline uint max(uint x, uint y) { return x > y ? x : y; }
inline float clamp(float x, float lo, float hi) { return min(max(x, lo), hi); }
inline int clamp(int x, int lo, int hi) { return min(max(x, lo), hi); }
inline uint clamp(uint x, uint lo, uint hi) { return min(max(x, lo), hi); }
inline float select(float a, float b, bool c) { return c ? b : a; }
inline bool isnan(float x) { return __builtin_isnan(x); }
inline bool isinf(float x) { return __builtin_isinf(x); }
inline bool isfinite(float x) { return __builtin_isfinite(x); }

template <typename T, int n>
T dot(const mtl::vec<T, n>& x, const mtl::vec<T, n>& y) {
  T total = x[0] * y[0];
  for (int i = 1; i < n; ++i) total += x[i] * y[i];
  return total;
}

template <typename T>
struct numeric_limits;
template <>
struct numeric_limits<float> {
  static constexpr float max() { return __FLT_MAX__; }
  static constexpr float min() { return __FLT_MIN__; }
  static constexpr float lowest() { return -__FLT_MAX__; }
  static constexpr float epsilon() { return __FLT_EPSILON__; }
  static constexpr float infinity() { return __builtin_inff(); }
  static constexpr float quiet_NaN() { return __builtin_nanf(""); }
};

// ---------------------------------------------------------------------------
// SIMD-group functions. Each call is a synchronisation point of the
// simdgroup: every active lane must reach the same call before any lane
// continues, and the result is computed from the values of the active lanes.
// ---------------------------------------------------------------------------
}  // namespace metal

namespace mtl {

enum simd_op : int {
  simd_op_sum,
  simd_op_product,
  simd_op_min,
  simd_op_max,
  simd_op_prefix_inclusive_sum,
  simd_op_prefix_exclusive_sum,
  simd_op_broadcast,
  simd_op_shuffle,
  simd_op_shuffle_xor,
  simd_op_shuffle_up,
  simd_op_shuffle_down,
  simd_op_any,
  simd_op_all,
};

template <typename T>
struct simd_scalar {
  static constexpr bool ok = false;
};
template <>
struct simd_scalar<float> {
  static constexpr bool ok = true;
};
template <>
struct simd_scalar<int> {
  static constexpr bool ok = true;
};
template <>
struct simd_scalar<uint> {
  static constexpr bool ok = true;
};
template <>
struct simd_scalar<half> {
  static constexpr bool ok = true;
};
template <>
struct simd_scalar<bool> {
  static constexpr bool ok = true;
};

struct simd_lanes {
  unsigned active;
  unsigned lane;
};

template <typename T>
T simd_reduce(int op, int line, T x, int param) {
  static_assert(simd_scalar<T>::ok, "the emulator supports SIMD-group functions on float, half, int, uint and bool only");
  T lanes[32];
  unsigned active = simd_exchange(op, line, &x, int(sizeof(T)), lanes);
  unsigned me = current_lane();
  auto is_active = [&](unsigned l) { return l < 32 && ((active >> l) & 1u); };
  auto read_lane = [&](unsigned l) -> T {
    if (!is_active(l)) {
      fail("SIMD-group shuffle or broadcast reads an inactive lane");
    }
    return lanes[l];
  };
  switch (op) {
    case simd_op_sum:
    case simd_op_product:
    case simd_op_min:
    case simd_op_max:
    case simd_op_prefix_inclusive_sum:
    case simd_op_prefix_exclusive_sum: {
      bool started = false;
      T total = T(0);
      unsigned last = (op == simd_op_prefix_inclusive_sum) ? me + 1
                      : (op == simd_op_prefix_exclusive_sum) ? me
                                                              : 32u;
      for (unsigned l = 0; l < last; ++l) {
        if (!is_active(l)) continue;
        T value = lanes[l];
        if (!started) {
          total = value;
          started = true;
        } else if (op == simd_op_product) {
          total = total * value;
        } else if (op == simd_op_min) {
          total = value < total ? value : total;
        } else if (op == simd_op_max) {
          total = value > total ? value : total;
        } else {
          total = total + value;
        }
      }
      return total;
    }
    case simd_op_broadcast:
    case simd_op_shuffle:
      return read_lane(unsigned(param));
    case simd_op_shuffle_xor:
      return read_lane(me ^ unsigned(param));
    case simd_op_shuffle_up:
      return me >= unsigned(param) ? read_lane(me - unsigned(param)) : x;
    case simd_op_shuffle_down:
      return me + unsigned(param) < 32u ? read_lane(me + unsigned(param)) : x;
    default:
      fail("unknown SIMD-group operation");
  }
}

inline bool simd_vote(int op, int line, bool x) {
  bool lanes[32];
  unsigned active = simd_exchange(op, line, &x, int(sizeof(bool)), lanes);
  for (unsigned l = 0; l < 32; ++l) {
    if (!((active >> l) & 1u)) continue;
    if (op == simd_op_any && lanes[l]) return true;
    if (op == simd_op_all && !lanes[l]) return false;
  }
  return op == simd_op_all;
}

}  // namespace mtl

namespace metal {

#define MTL_SIMD_FN(name, op)                                        \
  template <typename T>                                              \
  T name(T x, int line = __builtin_LINE()) {                         \
    return mtl::simd_reduce<T>(mtl::op, line, x, 0);                 \
  }
MTL_SIMD_FN(simd_sum, simd_op_sum)
MTL_SIMD_FN(simd_product, simd_op_product)
MTL_SIMD_FN(simd_min, simd_op_min)
MTL_SIMD_FN(simd_max, simd_op_max)
MTL_SIMD_FN(simd_prefix_inclusive_sum, simd_op_prefix_inclusive_sum)
MTL_SIMD_FN(simd_prefix_exclusive_sum, simd_op_prefix_exclusive_sum)
#undef MTL_SIMD_FN

#define MTL_SIMD_LANE_FN(name, op)                                   \
  template <typename T>                                              \
  T name(T x, ushort param, int line = __builtin_LINE()) {           \
    return mtl::simd_reduce<T>(mtl::op, line, x, int(param));        \
  }
MTL_SIMD_LANE_FN(simd_broadcast, simd_op_broadcast)
MTL_SIMD_LANE_FN(simd_shuffle, simd_op_shuffle)
MTL_SIMD_LANE_FN(simd_shuffle_xor, simd_op_shuffle_xor)
MTL_SIMD_LANE_FN(simd_shuffle_up, simd_op_shuffle_up)
MTL_SIMD_LANE_FN(simd_shuffle_down, simd_op_shuffle_down)
#undef MTL_SIMD_LANE_FN

inline bool simd_any(bool x, int line = __builtin_LINE()) {
  return mtl::simd_vote(mtl::simd_op_any, line, x);
}
inline bool simd_all(bool x, int line = __builtin_LINE()) {
  return mtl::simd_vote(mtl::simd_op_all, line, x);
}

}  // namespace metal

using namespace metal;

namespace mtl {

inline uint3 to_uint3(const uint3_pod& p) { return uint3(p.x, p.y, p.z); }

}  // namespace mtl

#endif  // RWKV_MLX_METAL_SHIM_H
