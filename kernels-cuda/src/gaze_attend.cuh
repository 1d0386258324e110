// The attend step of gaze_decode (SPEC "Gaze Attention / gaze_decode"),
// shared by gaze_decode.cu (its attend kernel) and gaze_route_decode.cu (the
// fused op, which plans each block's set itself): a block attends one slice
// of a unit's attended set, listed as segments, and writes its partial
// softmax state. The design is in docs/ops/gaze_decode.md.
#pragma once

#include "common.cuh"

namespace foveal {
namespace {

constexpr int kAttendThreads = 128;
// Accumulator floats per thread from which the attend kernel keeps fewer
// tokens per lane group in flight (2, or 1 with two vectors per lane) instead
// of 4: on sm_80 the larger states spill registers at 4; sm_90 fits them.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
constexpr int kWideState = 32;
#else
constexpr int kWideState = 1 << 30;
#endif
constexpr int kVisibleFlag = 1 << 8;  // segment mask bit: a visible range (id = its first position)

// Query heads of one unit, and where they start.
struct Unit {
  int kv_head, h0, heads;
};

__device__ __forceinline__ Unit unit_of(int q_heads, int kv_heads, int unit) {
  const int group = q_heads / kv_heads;
  const int chunks = ceil_div(group, FOVEAL_GAZE_MAX_GROUP);
  const int kvh = unit / chunks;
  const int chunk = unit % chunks;
  return {kvh, kvh * group + chunk * FOVEAL_GAZE_MAX_GROUP, min(FOVEAL_GAZE_MAX_GROUP, group - chunk * FOVEAL_GAZE_MAX_GROUP)};
}

__device__ __forceinline__ int units_per_row(int q_heads, int kv_heads) {
  return kv_heads * ceil_div(q_heads / kv_heads, FOVEAL_GAZE_MAX_GROUP);
}

template <typename T>
__device__ __forceinline__ void widen16(const uint4& raw, float (&out)[Vec16<T>::kElems]) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec16<T>::kElems; ++i) out[i] = to_float(e[i]);
}

// kHeadDimMax bounds the head dim (the runtime one is any multiple of the
// 16-byte vector up to it); kGroupMax bounds the query heads of a unit. A
// token is served by kHeadSplit lane groups side by side, each holding
// kHeadsPerThread of the unit's heads: they load the same 16-byte chunks of
// the token's key and value (one transaction where they share a warp), and
// each thread's state stays small enough to keep several tokens in flight.
//
// One block's share of a unit's attended set: the segments `segs[0..n_segs)`
// list `total` tokens; block `split` of p.num_splits attends its whole-step
// slice of them and writes its partial (max, sum, unnormalised o) for each of
// the unit's heads to p.partial_ml / p.partial_o. Every thread of the block
// must call it (it synchronises); `segs` may be global memory this block
// wrote before a barrier.
template <typename T, int kHeadDimMax, int kGroupMax>
__device__ __forceinline__ void gaze_attend_slice(const foveal_gaze_decode_params& p, int split, int unit, int b,
                                                  const int4* segs, int n_segs, int total) {
  constexpr int kVec = Vec16<T>::kElems;
  constexpr int kChunks = kHeadDimMax / kVec;          // 16-byte vectors per row, at most
  constexpr int kLanes = kChunks < 32 ? kChunks : 32;  // lanes sharing one token's row
  constexpr int kChunksPerLane = kChunks / kLanes;
  constexpr int kHeadsPerThread = kGroupMax < 4 ? kGroupMax : 4;
  constexpr int kHeadSplit = kGroupMax / kHeadsPerThread;
  constexpr int kKeyGroups = kAttendThreads / (kLanes * kHeadSplit);  // tokens per step and slot
  constexpr int kSlice = kChunksPerLane * kVec;        // output elements a lane holds per head
  // Tokens a lane group has in flight (each costs 2 * kChunksPerLane 16-byte registers).
  constexpr int kUnroll = kHeadsPerThread * kSlice < kWideState ? 4 : kChunksPerLane > 1 ? 1 : 2;
  constexpr int kTile = kKeyGroups * kUnroll;          // tokens per block step

  const Unit u = unit_of(p.q_heads, p.kv_heads, unit);
  const int lane = threadIdx.x % kLanes;
  const int g0 = (threadIdx.x / kLanes) % kHeadSplit * kHeadsPerThread;  // this thread's first head of the unit
  const int key_group = threadIdx.x / (kLanes * kHeadSplit);
  const int n_chunks = p.head_dim / kVec;

  float q[kHeadsPerThread][kChunksPerLane][kVec];
  const T* q_b = static_cast<const T*>(p.q) + b * p.q_stride_b;
#pragma unroll
  for (int g = 0; g < kHeadsPerThread; ++g) {
#pragma unroll
    for (int c = 0; c < kChunksPerLane; ++c) {
      const int chunk = c * kLanes + lane;
      if (g0 + g < u.heads && chunk < n_chunks) {
        load16_as_float(q_b + (u.h0 + g0 + g) * p.q_stride_h + chunk * kVec, q[g][c]);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) q[g][c][e] = 0.f;
      }
    }
  }

  // This block's slice [lo, hi) of the unit's attended tokens, whole steps
  // each (the last block's may be shorter, later ones empty).
  const int64_t per_split = static_cast<int64_t>(ceil_div(ceil_div(total, p.num_splits), kTile)) * kTile;
  const int lo = static_cast<int>(min(static_cast<int64_t>(total), split * per_split));
  const int hi = static_cast<int>(min(static_cast<int64_t>(total), lo + per_split));

  // The segment holding token lo: the first whose end is past it.
  int seg = 0;
  {
    int top = n_segs;
    while (seg < top) {
      const int mid = (seg + top) / 2;
      if (segs[mid].w <= lo) seg = mid + 1; else top = mid;
    }
  }
  int4 cur = seg < n_segs ? segs[seg] : make_int4(0, 0, 0, 0);

  const T* k_bh = static_cast<const T*>(p.k) + b * p.k_stride_b + u.kv_head * p.k_stride_h;
  const T* v_bh = static_cast<const T*>(p.v) + b * p.v_stride_b + u.kv_head * p.v_stride_h;
  const int32_t* region_pos = p.region_pos + static_cast<int64_t>(b) * p.max_regions * p.max_region_len;

  float m[kHeadsPerThread], l[kHeadsPerThread], acc[kHeadsPerThread][kSlice];
#pragma unroll
  for (int g = 0; g < kHeadsPerThread; ++g) {
    m[g] = -CUDART_INF_F;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < kSlice; ++e) acc[g][e] = 0.f;
  }

  // The loop bound is uniform across the block, so every lane of a warp
  // reaches the shuffles; slots past the slice load zeros and count for no head.
  for (int base = lo; base < hi; base += kTile) {
    uint4 k_raw[kUnroll][kChunksPerLane], v_raw[kUnroll][kChunksPerLane];
    int heads[kUnroll];  // mask of the unit's heads attending the slot's token
#pragma unroll
    for (int s = 0; s < kUnroll; ++s) {
      const int t = base + s * kKeyGroups + key_group;
      heads[s] = 0;
      int64_t pos = 0;
      if (t < hi) {
        while (t >= cur.w) cur = segs[++seg];  // tokens only grow along a lane group
        const int i = t - cur.z;
        pos = (cur.y & kVisibleFlag) ? cur.x + i : region_pos[static_cast<int64_t>(cur.x) * p.max_region_len + i];
        heads[s] = cur.y & 0xff;
      }
      const T* k_row = k_bh + pos * p.k_stride_s;
      const T* v_row = v_bh + pos * p.v_stride_s;
#pragma unroll
      for (int c = 0; c < kChunksPerLane; ++c) {
        const int chunk = c * kLanes + lane;
        if (heads[s] != 0 && chunk < n_chunks) {
          k_raw[s][c] = __ldg(reinterpret_cast<const uint4*>(k_row + chunk * kVec));
          v_raw[s][c] = __ldg(reinterpret_cast<const uint4*>(v_row + chunk * kVec));
        } else {
          k_raw[s][c] = make_uint4(0, 0, 0, 0);
          v_raw[s][c] = make_uint4(0, 0, 0, 0);
        }
      }
    }

    // Scores: scale * q . k.
    float score[kUnroll][kHeadsPerThread];
#pragma unroll
    for (int s = 0; s < kUnroll; ++s) {
      float kf[kChunksPerLane][kVec];
#pragma unroll
      for (int c = 0; c < kChunksPerLane; ++c) widen16<T>(k_raw[s][c], kf[c]);
#pragma unroll
      for (int g = 0; g < kHeadsPerThread; ++g) {
        float dot = 0.f;
#pragma unroll
        for (int c = 0; c < kChunksPerLane; ++c) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) dot = fmaf(q[g][c][e], kf[c][e], dot);
        }
        score[s][g] = group_sum<kLanes>(dot) * p.scale;
      }
    }

    // Online softmax per head over the slots whose token it attends
    // (common.cuh's rules): the running state is rescaled once per step to
    // the step's max, `score` becomes the weights.
#pragma unroll
    for (int g = 0; g < kHeadsPerThread; ++g) {
      float m_new = m[g];
#pragma unroll
      for (int s = 0; s < kUnroll; ++s) {
        if ((heads[s] >> (g0 + g)) & 1) m_new = fmaxf(m_new, score[s][g]);
      }
      const float alpha = softmax_weight(m[g], m_new);  // 0 while m[g] is -inf
      float sum = 0.f;
#pragma unroll
      for (int s = 0; s < kUnroll; ++s) {
        score[s][g] = ((heads[s] >> (g0 + g)) & 1) ? softmax_weight(score[s][g], m_new) : 0.f;
        sum += score[s][g];
      }
      l[g] = l[g] * alpha + sum;
      m[g] = m_new;
#pragma unroll
      for (int e = 0; e < kSlice; ++e) acc[g][e] *= alpha;
    }
#pragma unroll
    for (int s = 0; s < kUnroll; ++s) {
      float vf[kSlice];
#pragma unroll
      for (int c = 0; c < kChunksPerLane; ++c) {
        float w[kVec];
        widen16<T>(v_raw[s][c], w);
#pragma unroll
        for (int e = 0; e < kVec; ++e) vf[c * kVec + e] = w[e];
      }
#pragma unroll
      for (int g = 0; g < kHeadsPerThread; ++g) {
        // Select, never multiply by a zero weight: a head that does not
        // attend the slot's token leaves its accumulator as it is, so an inf
        // or NaN in a value row that another head of the unit attends cannot
        // reach it (0 x inf is NaN).
        if ((heads[s] >> (g0 + g)) & 1) {
#pragma unroll
          for (int e = 0; e < kSlice; ++e) acc[g][e] = fmaf(score[s][g], vf[e], acc[g][e]);
        }
      }
    }
  }

  // Merge the lane groups' states in key-group order, one thread per (head, dim).
  __shared__ float sm_m[kKeyGroups][kGroupMax];
  __shared__ float sm_l[kKeyGroups][kGroupMax];
  __shared__ float sm_acc[kKeyGroups][kGroupMax][kHeadDimMax];
#pragma unroll
  for (int g = 0; g < kHeadsPerThread; ++g) {
    if (lane == 0) {
      sm_m[key_group][g0 + g] = m[g];
      sm_l[key_group][g0 + g] = l[g];
    }
#pragma unroll
    for (int c = 0; c < kChunksPerLane; ++c) {
      const int chunk = c * kLanes + lane;
      if (chunk < n_chunks) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) sm_acc[key_group][g0 + g][chunk * kVec + e] = acc[g][c * kVec + e];
      }
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < u.heads * p.head_dim; idx += kAttendThreads) {
    const int g = idx / p.head_dim;
    const int d = idx % p.head_dim;
    float mm = -CUDART_INF_F;
    for (int kg = 0; kg < kKeyGroups; ++kg) mm = fmaxf(mm, sm_m[kg][g]);
    float ll = 0.f;
    float oo = 0.f;
    for (int kg = 0; kg < kKeyGroups; ++kg) {
      const float w = softmax_weight(sm_m[kg][g], mm);  // 0 for an empty group
      ll += sm_l[kg][g] * w;
      oo += sm_acc[kg][g][d] * w;
    }
    const int64_t part = (static_cast<int64_t>(b) * p.q_heads + u.h0 + g) * p.num_splits + split;
    p.partial_o[part * p.head_dim + d] = oo;
    if (d == 0) {
      p.partial_ml[part * 2] = mm;
      p.partial_ml[part * 2 + 1] = ll;
    }
  }
}

// The merge of one query head's split partials, by log-sum-exp in split
// order (gaze_decode's merge kernel; gaze_route_decode's last block of a
// unit): o = sum_s o_s w_s / L with w_s = exp(m_s - M), L = sum_s l_s w_s,
// M = max_s m_s (common.cuh's rules); lse = M + ln L. A head that attended
// nothing (L = 0) gets o = 0 and lse = -inf. Threads 0..31 form the weights
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
    for (int s = threadIdx.x; s < p.num_splits; s += 32) {
      weight[s] = ll == 0.f ? 0.f : softmax_weight(__ldcg(ml + 2 * s), mm) / ll;
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
