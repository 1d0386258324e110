// Shared device helpers of foveal's kernels: element conversion, 16-byte
// vector loads, warp reductions and the dtype dispatch of the launchers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>
#include <stdint.h>

#include "foveal.h"

namespace foveal {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Rounds a float to the element type T (round to nearest even).
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Elements of T in one 16-byte vector.
template <typename T>
struct Vec16 {
  static constexpr int kElems = 16 / sizeof(T);
};

// Loads 16 bytes (read-only path) and widens them to floats.
template <typename T>
__device__ __forceinline__ void load16_as_float(const T* p, float (&out)[Vec16<T>::kElems]) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec16<T>::kElems; ++i) out[i] = to_float(e[i]);
}

// Loads kVec elements (one, or one 16-byte vector: kVec = Vec16<T>::kElems,
// 16-byte aligned) through the read-only path, widened to floats.
template <typename T, int kVec>
__device__ __forceinline__ void load_as_float(const T* p, float (&out)[kVec]) {
  static_assert(kVec == 1 || kVec == Vec16<T>::kElems, "one element or one 16-byte vector");
  if constexpr (kVec == 1) {
    out[0] = to_float(__ldg(p));
  } else {
    load16_as_float(p, out);
  }
}

// Stores kVec floats rounded to T (one element, or one aligned 16-byte vector).
template <typename T, int kVec>
__device__ __forceinline__ void store_from_float(T* p, const float (&v)[kVec]) {
  static_assert(kVec == 1 || kVec == Vec16<T>::kElems, "one element or one 16-byte vector");
  if constexpr (kVec == 1) {
    *p = from_float<T>(v[0]);
  } else {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < kVec; ++i) e[i] = from_float<T>(v[i]);
    *reinterpret_cast<uint4*>(p) = raw;
  }
}

// Whether every address and stride in `parts` (OR-ed together, in bytes) is
// a multiple of 16 bytes.
__host__ __device__ constexpr bool aligned16(uint64_t parts) { return (parts & 15u) == 0; }

// Sum over aligned groups of `kWidth` lanes (a power of two); every lane of
// the group ends with the group's sum. The order of additions is fixed, so
// the result is deterministic.
template <int kWidth>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Merges n partial softmax statistics (running max m[i * stride], sum of
// exponentials l[i * stride] relative to it) in index order; a partial whose
// max is -inf is empty. The fixed order makes the result deterministic.
__device__ __forceinline__ void merge_max_sum(const float* m, const float* l, int n, int64_t stride, float& m_out,
                                              float& l_out) {
  float mm = -CUDART_INF_F;
  for (int i = 0; i < n; ++i) mm = fmaxf(mm, m[i * stride]);
  float ll = 0.0f;
  for (int i = 0; i < n; ++i) {
    const float mi = m[i * stride];
    if (mi != -CUDART_INF_F) ll += l[i * stride] * expf(mi - mm);
  }
  m_out = mm;
  l_out = ll;
}

// ceil(a / b) for a >= 0, b > 0, without the overflow of (a + b - 1) / b.
__host__ __device__ constexpr int ceil_div(int a, int b) { return a / b + (a % b != 0); }

// Status of the launches just enqueued (no synchronisation).
inline int launch_status() { return static_cast<int>(cudaGetLastError()); }

}  // namespace foveal

// Runs `body` with `T` bound to the element type of `dtype`.
#define FOVEAL_DISPATCH_DTYPE(dtype, T, ...)   \
  switch (dtype) {                             \
    case FOVEAL_F32: {                         \
      using T = float;                         \
      __VA_ARGS__;                             \
    } break;                                   \
    case FOVEAL_F16: {                         \
      using T = __half;                        \
      __VA_ARGS__;                             \
    } break;                                   \
    case FOVEAL_BF16: {                        \
      using T = __nv_bfloat16;                 \
      __VA_ARGS__;                             \
    } break;                                   \
    default:                                   \
      return FOVEAL_ERR_UNSUPPORTED;           \
  }
