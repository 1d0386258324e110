// Shared device helpers of foveal's kernels: element conversion, 16-byte
// vector loads, warp reductions and the dtype dispatch of the launchers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>
#include <stdint.h>

#include <type_traits>

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

// kVec elements of T as a load leaves them (one element, or one 16-byte
// vector: kVec = Vec16<T>::kElems), kept narrow until they are used, so that
// many loads can be in flight without their widened floats' registers.
template <typename T, int kVec>
struct RawVec {
  static_assert(kVec == 1 || kVec == Vec16<T>::kElems, "one element or one 16-byte vector");
  using Bits = typename std::conditional<kVec == 1, T, uint4>::type;
  Bits bits;

  // Loads kVec elements at p (16-byte aligned for a vector) through the
  // read-only path.
  __device__ __forceinline__ void load(const T* p) {
    if constexpr (kVec == 1) {
      bits = __ldg(p);
    } else {
      bits = __ldg(reinterpret_cast<const uint4*>(p));
    }
  }

  // Element i widened to float.
  __device__ __forceinline__ float at(int i) const {
    if constexpr (kVec == 1) {
      return to_float(bits);
    } else {
      return to_float(reinterpret_cast<const T*>(&bits)[i]);
    }
  }
};

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

// A stride as it bears on alignment: 0 along a dimension of one element,
// which no address steps over (the Rust side's row-stride checks ignore it
// likewise), so a batch of one with an odd batch stride keeps the vector path.
__host__ __device__ constexpr uint64_t stepped_stride(int64_t stride, int64_t extent) {
  return extent > 1 ? static_cast<uint64_t>(stride) : 0u;
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

// ---------------------------------------------------------------------------
// Online softmax: the one place where the rules of a running max and sum
// live (glimpse_scores, text_guided_select, gaze_attend.cuh and every merge
// of partial states use these).
//
// A softmax over scores s_i (natural-log units: scale * q.k) is carried as a
// state (m, l): m the largest score seen, l = sum_i exp(s_i - m). States of
// disjoint sets merge; the set's log-sum-exp is m + ln l. The guards, written
// only here, give what the two-pass CPU references give (m = max, then the
// sum of exp(s - m)), as PyTorch's softmax does:
//  - -inf: a -inf score weighs 0, also while m is still -inf (where s - m
//    would be -inf - -inf = NaN). A state that has seen nothing, or only
//    -inf, is empty: (m, l) = (-inf, 0); rescaling or merging it adds 0.
//  - +inf: a +inf score makes l NaN (inf - inf), as in the references:
//    never a silent finite result.
//  - NaN: fmaxf leaves m alone, the score's weight is NaN, so l becomes NaN
//    (and stays so through every rescale and merge: NaN x 0 is NaN), as in
//    the references.
// exp(s - m) is exp2f((s - m) * log2 e): the difference is formed first, in
// f32 as the references form it, so large logits lose nothing to a score
// scaled by log2 e beforehand (attention_tile.cuh's tiles follow the same
// rules: scores in natural-log units, these helpers per element).
// ---------------------------------------------------------------------------

// exp(s - m) for a score s and the max m of a set holding it (m >= s, or s
// NaN), or the weight of an old max m_old against a new one m >= m_old, to
// rescale a state. 0 when s is -inf, also while m is -inf: then s can only be
// -inf (or NaN), and the difference is taken from 0 instead of m, which
// gives exp(-inf) = 0 (and NaN for NaN) without forming -inf - -inf. The
// guard is on m, so that a tile of scores sharing one max tests it once.
__device__ __forceinline__ float softmax_weight(float s, float m) {
  constexpr float kLog2e = 1.4426950408889634f;
  const float origin = m == -CUDART_INF_F ? 0.0f : m;
  return exp2f((s - origin) * kLog2e);
}

// Adds one score s to the state (m, l).
__device__ __forceinline__ void softmax_add(float& m, float& l, float s) {
  const float m_new = fmaxf(m, s);
  l = l * softmax_weight(m, m_new) + softmax_weight(s, m_new);
  m = m_new;
}

// The log-sum-exp of a state: m + ln l; -inf for an empty state.
__device__ __forceinline__ float softmax_lse(float m, float l) { return m + logf(l); }

// The log-probability of a score s in a set of state (m, l), given ln l:
// (s - m) - ln l. Never s - (m + ln l): m + ln l is rounded at the size of
// the logits (an f32 ulp is 0.0625 at 1e6, probabilities off by 3%), while
// s - m is exact near the max and ln l is small.
__device__ __forceinline__ float softmax_log_prob(float s, float m, float ln_l) { return (s - m) - ln_l; }

// Merges n partial states (m[i * stride], l[i * stride]) in index order:
// the max of the maxima, then each sum rescaled to it. The fixed order makes
// the result deterministic.
__device__ __forceinline__ void merge_max_sum(const float* m, const float* l, int n, int64_t stride, float& m_out,
                                              float& l_out) {
  float mm = -CUDART_INF_F;
  for (int i = 0; i < n; ++i) mm = fmaxf(mm, m[i * stride]);
  float ll = 0.0f;
  for (int i = 0; i < n; ++i) ll += l[i * stride] * softmax_weight(m[i * stride], mm);
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
