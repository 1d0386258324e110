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

// The shared memory of a launch of `kernel` with `dynamic` bytes of dynamic
// shared memory on the current device (foveal_shared_memory): the static
// part from the compiled kernel, never hard-coded.
template <typename Kernel>
int shared_memory_of(Kernel kernel, size_t dynamic, foveal_shared_memory& out) {
  cudaFuncAttributes attr;
  int device = 0;
  int optin = 0;
  cudaError_t e = cudaFuncGetAttributes(&attr, kernel);
  if (e == cudaSuccess) e = cudaGetDevice(&device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (e != cudaSuccess) return static_cast<int>(e);
  out.static_bytes = attr.sharedSizeBytes;
  out.dynamic_bytes = dynamic;
  out.limit_bytes = static_cast<size_t>(optin);
  return 0;
}

// Shared memory per block any kernel may use without opting in: 48 KiB,
// static plus dynamic.
constexpr size_t kDefaultSharedMemory = 48 * 1024;

// Makes a launch of `kernel` with `dynamic` bytes of dynamic shared memory
// valid, on the host, before it is enqueued: FOVEAL_ERR_SHARED_MEMORY when
// static plus dynamic passes the device's opt-in limit; otherwise, when
// static plus dynamic passes 48 KiB, opts the kernel in
// (cudaFuncSetAttribute) to all the dynamic shared memory the device allows
// it: always the same value, so that host threads launching it with other
// sizes never lower each other's bound. No synchronisation; allowed during
// graph capture.
template <typename Kernel>
int prepare_shared_memory(Kernel kernel, size_t dynamic) {
  foveal_shared_memory sm;
  const int status = shared_memory_of(kernel, dynamic, sm);
  if (status != 0) return status;
  const size_t total = sm.static_bytes + sm.dynamic_bytes;
  if (total > sm.limit_bytes) return FOVEAL_ERR_SHARED_MEMORY;
  if (total > kDefaultSharedMemory) {
    const int most = static_cast<int>(sm.limit_bytes - sm.static_bytes);
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, most);
    if (e != cudaSuccess) return static_cast<int>(e);
  }
  return 0;
}

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
