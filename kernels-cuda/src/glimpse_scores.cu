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

#include "attention_tile.cuh"
#include "common.cuh"

namespace foveal {
namespace {

constexpr int kScoreThreads = 128;
constexpr int kUnroll = 2;      // keys each lane group of the f32 kernel has in flight
constexpr int kMmaWarps = 4;    // warps of a tensor-core block
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

// Writes a block's (max, sum) of each of its nh query heads, from sm_m,
// sm_l [kParts][kGroupMax] merged in part order, to the split's partial.
template <int kParts>
__device__ __forceinline__ void write_partial(const foveal_glimpse_scores_params& p, const float (&sm_m)[kParts][8],
                                              const float (&sm_l)[kParts][8], int b, int split, int h0, int nh) {
  if (static_cast<int>(threadIdx.x) < nh) {
    const int g = threadIdx.x;
    float mm;
    float ll;
    merge_max_sum(&sm_m[0][g], &sm_l[0][g], kParts, 8, mm, ll);
    float* part = p.partial + ((static_cast<int64_t>(b) * p.num_splits + split) * p.q_heads + h0 + g) * 2;
    part[0] = mm;
    part[1] = ll;
  }
}

// The f32 scores (no tensor-core path for f32 keys without losing their
// precision): kHeadDimMax bounds the head dim (the runtime one is any
// multiple of the 16-byte vector up to it); kGroupMax bounds the query heads
// one block serves. A lane group per key, every head's partial dot product
// on every lane, reduce-scattered across the group so that each lane ends
// with one head's score and updates that head's softmax state only.
template <typename T, int kHeadDimMax, int kGroupMax>
__global__ void __launch_bounds__(kScoreThreads) glimpse_scores_fma_kernel(const foveal_glimpse_scores_params p) {
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

  // After the reduce-scatter below, lane `lane` of a lane group holds the
  // score of head `lane / kLanesPerHead` (kLanesPerHead lanes alike), and
  // keeps that head's running softmax state only.
  constexpr int kLanesPerHead = kLanes / kGroupMax;
  const int head = lane / kLanesPerHead;
  float m = -CUDART_INF_F;
  float l = 0.f;

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
      float v[kGroupMax];  // the lane's partial dot products, one a head
#pragma unroll
      for (int g = 0; g < kGroupMax; ++g) {
        float acc = 0.f;
#pragma unroll
        for (int c = 0; c < kChunksPerLane; ++c) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc = fmaf(q[g][c][e], kv[u][c][e], acc);
        }
        v[g] = acc;
      }
      // Reduce-scatter across the group (recursive halving, a fixed order):
      // at each of the first log2(kGroupMax) steps a lane keeps half of its
      // heads (the upper half where its lane bit is set) and adds its
      // partner's partial sums of them; the last steps sum the one head left.
      int count = kGroupMax;
#pragma unroll
      for (int off = kLanes / 2; off >= 1; off /= 2) {
        if (count > 1) {
          const int half = count / 2;
          const bool upper = (lane & off) != 0;
#pragma unroll
          for (int i = 0; i < kGroupMax / 2; ++i) {
            if (i < half) {
              const float send = upper ? v[i] : v[i + half];
              const float keep = upper ? v[i + half] : v[i];
              v[i] = keep + __shfl_xor_sync(0xffffffffu, send, off);
            }
          }
          count = half;
        } else {
          v[0] += __shfl_xor_sync(0xffffffffu, v[0], off);
        }
      }
      const float sc = v[0] * p.scale;
      if (item[u] >= hi || head >= nh) continue;
      if (need_lse) softmax_add(m, l, sc);
      const int vi = need_lse ? pos_to_vis[start + item[u]] : item[u];
      if (vi >= 0 && lane % kLanesPerHead == 0) out_b[vi * p.out_stride_i + h0 + head] = sc;
    }
  }

  if (!need_lse) return;
  // Merge the key groups' (max, sum) in a fixed order, one thread per head.
  __shared__ float sm_m[kKeyGroups][8];
  __shared__ float sm_l[kKeyGroups][8];
  if (lane % kLanesPerHead == 0) {
    sm_m[key_group][head] = m;
    sm_l[key_group][head] = l;
  }
  __syncthreads();
  write_partial<kKeyGroups>(p, sm_m, sm_l, b, split, h0, nh);
}

// The bf16 / f16 scores on tensor cores: grid and slices as the f32 kernel's
// (split, KV head x chunk of up to 8 query heads, row), kMmaWarps warps a
// block, each streaming steps of kTiles tiles of 8 keys. A tile's scores
// are one mma.sync m16n8k16 product per 16 dims, S = Q K^T: the up to 8
// query heads are the rows of A (rows 8-15 are zeros), the 8 keys the
// columns of B, f32 accumulators. Lane = 4 g + t holds key g of the tile
// (its B fragments) and, of the result, head g's scores of keys 2t and
// 2t + 1: a score is never reduced across lanes, and each lane keeps the
// running softmax state of one head (no lane repeats another's update).
//
// The dims of each mma step are permuted, the same way for the keys and the
// queries (a dot product is a sum in any order): lane t of a quad takes 16
// bytes, dims 32 c + 8 t .. + 8, of its key, whose first 8 bytes are its B
// fragment of step 2c and last 8 of step 2c + 1; its query fragments (head
// g) are the same dims of q, loaded once. Dims past the runtime head dim are
// zeros on both sides. Keys past the slice are read from the slice's first
// key (a valid address) and their scores dropped.
//
// The keys come through shared memory by cp.async, kStages steps deep: a
// lane copies its own 16-byte pieces to its own slots and reads back only
// those (no barrier), so the copies of the next kStages - 1 steps are in
// flight while a step is scored (8 copies a lane at D 64 and 128, 8 at 256
// with 2 stages), whatever the compiler schedules. kLse: the softmax modes
// (every valid key, position start + item); otherwise Logits (the visual
// keys, position vis[item], loaded a step before its copies are issued).
// kExact: the head dim is kHeadDimMax (no copy is a zero-fill).
template <typename T, int kHeadDimMax, bool kLse, bool kExact>
__global__ void __launch_bounds__(kMmaWarps * 32) glimpse_scores_mma_kernel(const foveal_glimpse_scores_params p) {
  constexpr int kChunks = ceil_div(kHeadDimMax, 32);      // 16-byte pieces per key and lane
  constexpr int kTiles = kChunks >= 4 ? 1 : 4 / kChunks;  // tiles a step: at least 4 pieces a lane
  constexpr int kPieces = kTiles * kChunks;
  constexpr int kStages = kPieces >= 8 ? 2 : 3;           // at most 32 KiB of stages a block
  constexpr int kStepKeys = kMmaWarps * kTiles * 8;
  __shared__ uint4 staged[kMmaWarps][kStages][kPieces][32];  // [warp][stage][piece][lane]
  const int group = p.q_heads / p.kv_heads;
  const int head_chunks = ceil_div(group, 8);
  const int split = blockIdx.x;
  const int kvh = blockIdx.y / head_chunks;
  const int chunk_of_heads = blockIdx.y % head_chunks;
  const int b = blockIdx.z;
  const int h0 = kvh * group + chunk_of_heads * 8;  // first query head served
  const int nh = min(8, group - chunk_of_heads * 8);  // query heads served
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int g = lane / 4;  // key g of a tile; query head g
  const int t = lane % 4;  // keys 2t, 2t + 1 of the scores; dims 8t.. of each 32
  const int dims = p.head_dim;

  // Query head g's A fragments of steps 2c, 2c + 1 (rows 8-15: zeros): dims
  // 32 c + 8 t .. + 8. Heads past nh are zeros (their scores are not used).
  uint32_t qa[kChunks][2][4];
  const T* q_b = static_cast<const T*>(p.q) + b * p.q_stride_b + (h0 + min(g, nh - 1)) * p.q_stride_h;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int d0 = 32 * c + 8 * t;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (g < nh && (kExact || d0 < dims)) v = __ldg(reinterpret_cast<const uint4*>(q_b + d0));
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      qa[c][j][0] = w[2 * j];
      qa[c][j][1] = 0;
      qa[c][j][2] = w[2 * j + 1];
      qa[c][j][3] = 0;
    }
  }

  const int start = p.row_start[b];
  const int32_t* vis = p.vis_pos + b * p.vis_stride_b;
  const int n_items = kLse ? p.row_end[b] - start : p.nv[b];
  const int per_split = ceil_div(n_items, p.num_splits);
  const int lo = split * per_split;
  const int hi = min(n_items, lo + per_split);
  const T* k_bh = static_cast<const T*>(p.k) + b * p.k_stride_b + kvh * p.k_stride_h + 8 * t;
  const int32_t* pos_to_vis = p.pos_to_vis + static_cast<int64_t>(b) * p.seq;
  float* out_b = p.out + b * p.out_stride_b + h0 + g;
  const bool writes = g < nh;
  const int first = lo + warp * kTiles * 8;  // this warp's first key; its steps are kStepKeys apart
  const int steps = first < hi ? ceil_div(hi - first, kStepKeys) : 0;

  // The sequence positions of key g of each tile of step s (the slice's
  // first key past its end).
  auto positions = [&](int s, int (&pos)[kTiles]) {
#pragma unroll
    for (int i = 0; i < kTiles; ++i) {
      const int item = first + s * kStepKeys + 8 * i + g;
      const int at = item < hi ? item : lo;
      pos[i] = kLse ? start + at : vis[at];
    }
  };
  // Issues the copies of a step into stage `slot` (one commit group).
  auto issue = [&](const int (&pos)[kTiles], int slot) {
#pragma unroll
    for (int i = 0; i < kTiles; ++i) {
      const T* k_row = k_bh + static_cast<int64_t>(pos[i]) * p.k_stride_s;
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const bool valid = kExact || 32 * c + 8 * t < dims;
        attn::cp_async_16(&staged[warp][slot][i * kChunks + c][lane], valid ? k_row + 32 * c : k_row, valid);
      }
    }
  };

  float m = -CUDART_INF_F;
  float l = 0.f;
  int pos[kTiles];
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < steps) {
      positions(s, pos);
      issue(pos, s);
    }
    attn::cp_async_commit();
  }
  if (kStages - 1 < steps) positions(kStages - 1, pos);
  for (int s = 0; s < steps; ++s) {
    attn::cp_async_wait<kStages - 2>();  // step s has landed
    uint4 kb[kPieces];
#pragma unroll
    for (int i = 0; i < kPieces; ++i) kb[i] = staged[warp][s % kStages][i][lane];
    if (s + kStages - 1 < steps) {
      issue(pos, (s + kStages - 1) % kStages);
      if (s + kStages < steps) positions(s + kStages, pos);
    }
    attn::cp_async_commit();
    const int base = first + s * kStepKeys;
#pragma unroll
    for (int i = 0; i < kTiles; ++i) {
      float acc[4] = {0.f, 0.f, 0.f, 0.f};  // head g: keys 2t, 2t + 1; (rows 8-15: zeros)
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const uint4& v = kb[i * kChunks + c];
        attn::mma_16816<T>(acc, qa[c][0], v.x, v.y);
        attn::mma_16816<T>(acc, qa[c][1], v.z, v.w);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int item = base + 8 * i + 2 * t + j;
        if (item >= hi) continue;
        const float sc = acc[j] * p.scale;
        if (kLse) softmax_add(m, l, sc);
        const int vi = kLse ? pos_to_vis[start + item] : item;
        if (vi >= 0 && writes) out_b[vi * p.out_stride_i] = sc;
      }
    }
  }
  attn::cp_async_wait<0>();  // no copy outlives the block

  if constexpr (kLse) {
    // Merge the states of the quad's 4 lanes (head g), in a fixed order. (The
    // butterfly gives the 4 lanes the same state: the merge is commutative.)
#pragma unroll
    for (int off = 1; off < 4; off *= 2) {
      const float mo = __shfl_xor_sync(0xffffffffu, m, off);
      const float lo_ = __shfl_xor_sync(0xffffffffu, l, off);
      const float mm = fmaxf(m, mo);
      l = l * softmax_weight(m, mm) + lo_ * softmax_weight(mo, mm);
      m = mm;
    }
    __shared__ float sm_m[kMmaWarps][8];
    __shared__ float sm_l[kMmaWarps][8];
    if (t == 0) {
      sm_m[warp][g] = m;
      sm_l[warp][g] = l;
    }
    __syncthreads();
    write_partial<kMmaWarps>(p, sm_m, sm_l, b, split, h0, nh);
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
  glimpse_scores_fma_kernel<T, kHeadDimMax, kGroupMax><<<grid, kScoreThreads, 0, stream>>>(p);
}

// f32 keys: the FMA kernel, instantiated for the group's size; bf16 / f16:
// the tensor-core kernel (any group: up to 8 heads a block).
template <typename T, int kHeadDimMax>
void launch_scores_for_group(const foveal_glimpse_scores_params& p, cudaStream_t stream) {
  if constexpr (std::is_same<T, float>::value) {
    const int group = p.q_heads / p.kv_heads;
    if (group <= 1) launch_scores<T, kHeadDimMax, 1>(p, stream);
    else if (group <= 2) launch_scores<T, kHeadDimMax, 2>(p, stream);
    else if (group <= 4) launch_scores<T, kHeadDimMax, 4>(p, stream);
    else launch_scores<T, kHeadDimMax, FOVEAL_GLIMPSE_MAX_GROUP>(p, stream);
  } else {
    static_assert(FOVEAL_GLIMPSE_MAX_GROUP == 8, "the mma kernel serves 8 heads a block (its n = 8)");
    const dim3 grid(p.num_splits, p.kv_heads * ceil_div(p.q_heads / p.kv_heads, 8), p.batch);
    const bool lse = p.mode != FOVEAL_SCORES_LOGITS;
    const bool exact = p.head_dim == kHeadDimMax;
    const auto kernel = lse ? (exact ? glimpse_scores_mma_kernel<T, kHeadDimMax, true, true>
                                     : glimpse_scores_mma_kernel<T, kHeadDimMax, true, false>)
                            : (exact ? glimpse_scores_mma_kernel<T, kHeadDimMax, false, true>
                                     : glimpse_scores_mma_kernel<T, kHeadDimMax, false, false>);
    kernel<<<grid, kMmaWarps * 32, 0, stream>>>(p);
  }
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
