// The merge step of gaze_decode (SPEC "Gaze Attention / gaze_decode"), run
// by the last attend block of a unit in gaze_decode.cu and
// gaze_route_decode.cu (gaze_attend.cuh's merge_if_last): the split partials
// that gaze_attend.cuh's attend step wrote, merged by log-sum-exp in a fixed
// order. The design is in docs/ops/gaze_decode.md.
#pragma once

#include "common.cuh"

namespace foveal {
namespace {

// The merge of one query head's split partials, by log-sum-exp in split
// order (the last attend block of a unit): o = sum_s o_s w_s / L with
// w_s = exp(m_s - M), L = sum_s l_s w_s, M = max_s m_s (common.cuh's
// rules); lse = M + ln L. A head that attended nothing (L = 0) gets o = 0
// and lse = -inf. Threads 0..31 form the weights
// (lane-strided max and sum, a fixed shuffle tree: deterministic) in
// `weight` [num_splits] (shared memory), then every thread of the block
// writes its share of o. The partials are read with __ldcg (they may come
// from other blocks of the same launch). Every thread must call it.
template <typename T, int kThreads>
__device__ void merge_splits(const foveal_gaze_decode_params& p, int b, int h, float* weight, float* sh_lse) {
  const int64_t first = (static_cast<int64_t>(b) * p.q_heads + h) * p.num_splits;
  const float* ml = p.partial_ml + first * 2;
  if (threadIdx.x < 32) {
    float mm = -CUDART_INF_F;
    for (int s = threadIdx.x; s < p.num_splits; s += 32) mm = fmaxf(mm, __ldcg(ml + 2 * s));
#pragma unroll
    for (int o = 16; o > 0; o /= 2) mm = fmaxf(mm, __shfl_xor_sync(0xffffffffu, mm, o));
    float ll = 0.f;
    for (int s = threadIdx.x; s < p.num_splits; s += 32) ll += __ldcg(ml + 2 * s + 1) * softmax_weight(__ldcg(ml + 2 * s), mm);
    ll = group_sum<32>(ll);
    // __fdividef (2 ulp; ll <= the attended tokens, far below its 2^126
    // bound): an IEEE division calls a slow-path subroutine, and across that
    // call the attend kernels it is inlined into would spill registers.
    for (int s = threadIdx.x; s < p.num_splits; s += 32) {
      weight[s] = ll == 0.f ? 0.f : __fdividef(softmax_weight(__ldcg(ml + 2 * s), mm), ll);
    }
    if (threadIdx.x == 0) *sh_lse = softmax_lse(mm, ll);
  }
  __syncthreads();
  const float* po = p.partial_o + first * p.head_dim;
  T* o = static_cast<T*>(p.o) + b * p.o_stride_b + h * p.o_stride_h;
  for (int d = threadIdx.x; d < p.head_dim; d += kThreads) {
    float acc = 0.f;
    for (int s = 0; s < p.num_splits; ++s) acc = fmaf(weight[s], __ldcg(po + static_cast<int64_t>(s) * p.head_dim + d), acc);
    o[d] = from_float<T>(acc);
  }
  if (p.lse != nullptr && threadIdx.x == 0) p.lse[b * p.lse_stride_b + h * p.lse_stride_h] = *sh_lse;
}

}  // namespace
}  // namespace foveal
