// glimpse_scores: the glimpse token's attention to the visual tokens at layer K
// (SPEC "GlimpsePrune / glimpse_scores").
//
// Three launches on the caller's stream, no host synchronisation:
//  1. prepare: pos_to_vis[b, p] = the visual index of position p, or -1
//     (binary search of the ascending vis_pos), and zeros in the output rows
//     past nv[b].
//  2. scores: grid (split, KV head x head chunk, row). A block streams one
//     contiguous slice of the row's keys for one KV head, reading each key
//     once with 16-byte loads for all the query heads of its GQA group (their
//     queries sit in registers), writes scale * q.k for the visual keys, and
//     keeps the running max and sum of exponentials of its slice (online
//     log-sum-exp with common.cuh's softmax_add; the flash-decoding split of
//     the keys). The softmax modes
//     stream every valid key (the log-sum-exp needs them all); Logits mode
//     streams the visual keys alone.
//  3. normalize (LogSoftmax, Softmax only): merges the splits' partials in a
//     fixed order into the row's (max m, sum l), then rewrites the visual
//     scores s as (s - m) - ln l (never s - (m + ln l), which loses the
//     precision of large logits).
// The order of every reduction is fixed, so results are bit-identical run to run.

#include "common.cuh"

namespace foveal {
namespace {

constexpr int kScoreThreads = 128;
constexpr int kUnroll = 2;      // keys each lane group has in flight
constexpr int kNormRows = 32;   // visual tokens per normalize block

__global__ void glimpse_prepare_kernel(const foveal_glimpse_scores_params p) {
  const int b = blockIdx.y;
  const int nv = p.nv[b];
  const int32_t* vis = p.vis_pos + b * p.vis_stride_b;
  const int n_out = p.nv_max * p.q_heads;
  const int n_items = max(p.seq, n_out);
  for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < n_items; t += gridDim.x * blockDim.x) {
    if (t < p.seq && p.mode != FOVEAL_SCORES_LOGITS) {
      int lo = 0, hi = nv;  // lower bound of t in vis[0, nv)
      while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (vis[mid] < t) lo = mid + 1; else hi = mid;
      }
      p.pos_to_vis[static_cast<int64_t>(b) * p.seq + t] = (lo < nv && vis[lo] == t) ? lo : -1;
    }
    if (t < n_out) {
      const int i = t / p.q_heads;
      if (i >= nv) p.out[b * p.out_stride_b + i * p.out_stride_i + t % p.q_heads] = 0.f;
    }
  }
}

// kHeadDimMax bounds the head dim (the runtime one is any multiple of the
// 16-byte vector up to it); kGroupMax bounds the query heads one block serves.
template <typename T, int kHeadDimMax, int kGroupMax>
__global__ void __launch_bounds__(kScoreThreads) glimpse_scores_kernel(const foveal_glimpse_scores_params p) {
  constexpr int kVec = Vec16<T>::kElems;
  constexpr int kChunks = kHeadDimMax / kVec;          // 16-byte vectors per key, at most
  constexpr int kLanes = kChunks < 32 ? kChunks : 32;  // lanes sharing one key
  constexpr int kChunksPerLane = kChunks / kLanes;
  constexpr int kKeyGroups = kScoreThreads / kLanes;   // keys per block step
  static_assert(kLanes >= kGroupMax, "one lane writes each head's score");

  const int group = p.q_heads / p.kv_heads;
  const int head_chunks = ceil_div(group, kGroupMax);
  const int split = blockIdx.x;
  const int kvh = blockIdx.y / head_chunks;
  const int chunk_of_heads = blockIdx.y % head_chunks;
  const int b = blockIdx.z;
  const int h0 = kvh * group + chunk_of_heads * kGroupMax;       // first query head served
  const int nh = min(kGroupMax, group - chunk_of_heads * kGroupMax);  // query heads served
  const int lane = threadIdx.x % kLanes;
  const int key_group = threadIdx.x / kLanes;
  const int n_chunks = p.head_dim / kVec;

  // This lane's slice of each served query head.
  float q[kGroupMax][kChunksPerLane][kVec];
  const T* q_b = static_cast<const T*>(p.q) + b * p.q_stride_b;
#pragma unroll
  for (int g = 0; g < kGroupMax; ++g) {
#pragma unroll
    for (int c = 0; c < kChunksPerLane; ++c) {
      const int chunk = c * kLanes + lane;
      if (g < nh && chunk < n_chunks) {
        load16_as_float(q_b + (h0 + g) * p.q_stride_h + chunk * kVec, q[g][c]);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) q[g][c][e] = 0.f;
      }
    }
  }

  // This block's slice [lo, hi) of the row's items: its valid keys
  // (position start + item) or, in Logits mode, its visual keys (vis[item]).
  const bool need_lse = p.mode != FOVEAL_SCORES_LOGITS;
  const int start = p.row_start[b];
  const int32_t* vis = p.vis_pos + b * p.vis_stride_b;
  const int n_items = need_lse ? p.row_end[b] - start : p.nv[b];
  const int per_split = ceil_div(n_items, p.num_splits);
  const int lo = split * per_split;
  const int hi = min(n_items, lo + per_split);

  float m[kGroupMax], l[kGroupMax];
#pragma unroll
  for (int g = 0; g < kGroupMax; ++g) {
    m[g] = -CUDART_INF_F;
    l[g] = 0.f;
  }

  const T* k_bh = static_cast<const T*>(p.k) + b * p.k_stride_b + kvh * p.k_stride_h;
  const int32_t* pos_to_vis = p.pos_to_vis + static_cast<int64_t>(b) * p.seq;
  float* out_b = p.out + b * p.out_stride_b;

  // The loop bound is uniform across the block, so every lane of a warp
  // reaches the shuffles; lanes past the slice compute on zeros and write nothing.
  for (int base = lo; base < hi; base += kKeyGroups * kUnroll) {
    float kv[kUnroll][kChunksPerLane][kVec];
    int item[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      item[u] = base + u * kKeyGroups + key_group;
      const bool valid = item[u] < hi;
      const int pos = !valid ? 0 : need_lse ? start + item[u] : vis[item[u]];
      const T* k_row = k_bh + static_cast<int64_t>(pos) * p.k_stride_s;
#pragma unroll
      for (int c = 0; c < kChunksPerLane; ++c) {
        const int chunk = c * kLanes + lane;
        if (valid && chunk < n_chunks) {
          load16_as_float(k_row + chunk * kVec, kv[u][c]);
        } else {
#pragma unroll
          for (int e = 0; e < kVec; ++e) kv[u][c][e] = 0.f;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float s[kGroupMax];
#pragma unroll
      for (int g = 0; g < kGroupMax; ++g) {
        float acc = 0.f;
#pragma unroll
        for (int c = 0; c < kChunksPerLane; ++c) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc = fmaf(q[g][c][e], kv[u][c][e], acc);
        }
        s[g] = group_sum<kLanes>(acc) * p.scale;
      }
      if (item[u] >= hi) continue;
      if (need_lse) {
#pragma unroll
        for (int g = 0; g < kGroupMax; ++g) softmax_add(m[g], l[g], s[g]);
      }
      const int vi = need_lse ? pos_to_vis[start + item[u]] : item[u];
      if (vi >= 0) {
#pragma unroll
        for (int g = 0; g < kGroupMax; ++g) {
          if (g < nh && lane == g) out_b[vi * p.out_stride_i + h0 + g] = s[g];
        }
      }
    }
  }

  if (!need_lse) return;
  // Merge the key groups' (max, sum) in a fixed order, one thread per head.
  __shared__ float sm_m[kKeyGroups][kGroupMax];
  __shared__ float sm_l[kKeyGroups][kGroupMax];
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < kGroupMax; ++g) {
      sm_m[key_group][g] = m[g];
      sm_l[key_group][g] = l[g];
    }
  }
  __syncthreads();
  if (threadIdx.x < nh) {
    const int g = threadIdx.x;
    float mm;
    float ll;
    merge_max_sum(&sm_m[0][g], &sm_l[0][g], kKeyGroups, kGroupMax, mm, ll);
    float* part = p.partial + ((static_cast<int64_t>(b) * p.num_splits + split) * p.q_heads + h0 + g) * 2;
    part[0] = mm;
    part[1] = ll;
  }
}

__global__ void glimpse_normalize_kernel(const foveal_glimpse_scores_params p) {
  extern __shared__ float stats[];  // [q_heads][2]: the row's max and the ln of its sum of exponentials
  const int b = blockIdx.y;
  for (int h = threadIdx.x; h < p.q_heads; h += blockDim.x) {
    const float* part = p.partial + static_cast<int64_t>(b) * p.num_splits * p.q_heads * 2 + h * 2;
    const int64_t split_stride = static_cast<int64_t>(p.q_heads) * 2;
    float mm;
    float ll;
    merge_max_sum(part, part + 1, p.num_splits, split_stride, mm, ll);
    stats[2 * h] = mm;
    stats[2 * h + 1] = logf(ll);
  }
  __syncthreads();
  const int nv = p.nv[b];
  const int i0 = blockIdx.x * kNormRows;
  for (int t = threadIdx.x; t < kNormRows * p.q_heads; t += blockDim.x) {
    const int i = i0 + t / p.q_heads;
    const int h = t % p.q_heads;
    if (i >= nv) continue;
    float* o = p.out + b * p.out_stride_b + i * p.out_stride_i + h;
    const float v = softmax_log_prob(*o, stats[2 * h], stats[2 * h + 1]);
    *o = p.mode == FOVEAL_SCORES_SOFTMAX ? expf(v) : v;
  }
}

template <typename T, int kHeadDimMax, int kGroupMax>
void launch_scores(const foveal_glimpse_scores_params& p, cudaStream_t stream) {
  const int head_chunks = ceil_div(p.q_heads / p.kv_heads, kGroupMax);
  const dim3 grid(p.num_splits, p.kv_heads * head_chunks, p.batch);
  glimpse_scores_kernel<T, kHeadDimMax, kGroupMax><<<grid, kScoreThreads, 0, stream>>>(p);
}

template <typename T, int kHeadDimMax>
void launch_scores_for_group(const foveal_glimpse_scores_params& p, cudaStream_t stream) {
  const int group = p.q_heads / p.kv_heads;
  if (group <= 1) launch_scores<T, kHeadDimMax, 1>(p, stream);
  else if (group <= 2) launch_scores<T, kHeadDimMax, 2>(p, stream);
  else if (group <= 4) launch_scores<T, kHeadDimMax, 4>(p, stream);
  else launch_scores<T, kHeadDimMax, FOVEAL_GLIMPSE_MAX_GROUP>(p, stream);
}

template <typename T>
int launch_glimpse_scores(const foveal_glimpse_scores_params& p, cudaStream_t stream) {
  if (p.head_dim <= 0 || p.head_dim % Vec16<T>::kElems != 0 || p.head_dim > FOVEAL_GLIMPSE_MAX_HEAD_DIM ||
      p.kv_heads <= 0 || p.q_heads % p.kv_heads != 0 || p.num_splits <= 0) {
    return FOVEAL_ERR_UNSUPPORTED;
  }
  const bool normalize = p.mode != FOVEAL_SCORES_LOGITS;
  const size_t norm_smem = static_cast<size_t>(p.q_heads) * 2 * sizeof(float);
  if (normalize) {
    const int status = prepare_shared_memory(glimpse_normalize_kernel, norm_smem);  // before anything is enqueued
    if (status != 0) return status;
  }
  const int n_items = max(p.seq, p.nv_max * p.q_heads);
  const dim3 prep_grid(min(ceil_div(n_items, 256), 1024), p.batch);
  glimpse_prepare_kernel<<<prep_grid, 256, 0, stream>>>(p);
  if (p.head_dim <= 64) launch_scores_for_group<T, 64>(p, stream);
  else if (p.head_dim <= 128) launch_scores_for_group<T, 128>(p, stream);
  else launch_scores_for_group<T, 256>(p, stream);
  if (normalize) {
    const dim3 norm_grid(ceil_div(p.nv_max, kNormRows), p.batch);
    glimpse_normalize_kernel<<<norm_grid, 256, norm_smem, stream>>>(p);
  }
  return launch_status();
}

}  // namespace
}  // namespace foveal

extern "C" int foveal_glimpse_scores(const foveal_glimpse_scores_params* p, foveal_stream_t stream) {
  if (p->nv_max == 0 || p->batch == 0) return 0;  // nothing to write
  FOVEAL_DISPATCH_DTYPE(p->dtype, T, return foveal::launch_glimpse_scores<T>(*p, stream));
  return 0;
}
