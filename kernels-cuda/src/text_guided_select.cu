// text_guided_select: FocusLLaVA's text-guided sampler (SPEC "FocusLLaVA /
// text_guided_select"; the math is restated in the Rust module
// foveal::text_guided_select, the design in docs/ops/text_guided_select.md).
//
// The attention A is never stored. Four kernels:
// 1. lse_partial: the max and the sum of exponentials of each query row
//    (text token j, query head h) over a chunk of the visual tokens.
//    bf16/f16: tensor cores (attention_tile.cuh): a block stacks 128 rows of
//    one KV head's group (row r is text token r / G of head r % G, as
//    cross_attention packs GQA), Q tile in shared memory, the chunk's keys in
//    double-buffered cp.async stages, S = Q K^T by mma.sync m16n8k16 and an
//    online softmax per row (common.cuh's rules). f32: one thread per visual
//    token, scalar dot products.
// 2. lse_combine: per (row, head, text token), the chunks combined in order:
//    the max and the ln of the sum of exponentials over the row's visual
//    tokens (split-K), kept apart so that a log-probability is formed as
//    (logit - max) - ln sum, without rounding max + ln sum at the logits' size.
// 3. scores_partial: the logits again, and per visual token
//    sum_j exp(max_h (logit - lse)) over a split of the text tokens.
//    bf16/f16: a block takes 16 text tokens and 64 visual tokens (16 per
//    warp); the tensor-core tiles are (16 text tokens of one query head) x
//    (a warp's 16 keys), so that the max over the heads is element-wise in
//    registers. Per KV head the warp's key fragments are loaded once into
//    registers; the group's query tiles stream through shared memory
//    (cp.async, double-buffered). f32: one thread per visual token.
// 4. select: one block per row sums the splits in order, divides by t_len
//    (S), quantises S to 32.32 fixed point so that every cumulative sum is an
//    exact integer, finds the smallest top-k whose sum reaches the threshold
//    by a most-significant-digit radix walk over the order-preserving keys
//    (digit histograms of counts and of fixed-point sums; one warp finds the
//    digit by a scan over the 256 bins), and writes the kept indices
//    ascending (top_select.cuh). Ties to the lower index.
// No float atomics (integer shared-memory atomics only, which commute):
// deterministic.
#include <cub/block/block_reduce.cuh>

#include "attention_tile.cuh"
#include "top_select.cuh"

namespace foveal {
namespace {

using namespace attn;

constexpr int kMaxD = FOVEAL_TGS_MAX_HEAD_DIM;
constexpr int kSelectThreads = 512;
constexpr int kCombineThreads = 256;
constexpr int kMmaThreads = 128;  // both tensor-core kernels: 4 warps

// Text tokens [j0, j1) of split js of a row with t valid ones.
__device__ __forceinline__ void text_range(const foveal_text_guided_select_params& p, int js, int t, int& j0, int& j1) {
  j0 = js * p.text_per_split;
  j1 = min(j0 + p.text_per_split, t);
}

// Row stride (text tokens) of the combined lse: T rounded up to the score
// kernel's 16-token tiles, so that every tile reads initialised entries.
__host__ __device__ __forceinline__ int lse_text_stride(const foveal_text_guided_select_params& p) {
  return ceil_div(p.text, FOVEAL_TGS_MMA_TEXT) * FOVEAL_TGS_MMA_TEXT;
}

// (max, sum) of key chunk `chunk`, head h, text token j.
__device__ __forceinline__ float* lse_partial_at(const foveal_text_guided_select_params& p, int b, int chunk, int h,
                                                 int j) {
  const int key_chunks = ceil_div(p.visual, p.key_chunk);
  return p.lse_partial + (((static_cast<int64_t>(b) * key_chunks + chunk) * p.q_heads + h) * p.text + j) * 2;
}

// (max, ln sum) of head h, text token j.
__device__ __forceinline__ float* lse_at(const foveal_text_guided_select_params& p, int b, int h, int j) {
  return p.lse + ((static_cast<int64_t>(b) * p.q_heads + h) * lse_text_stride(p) + j) * 2;
}

// ------------------------------------------------ tensor-core kernels

// Tiles of the log-sum-exp kernel: 4 warps over the rows, each over all
// the stage's keys.
template <int kHeadDim>
struct LseTile {
  static constexpr int kMTiles = kHeadDim > 128 ? 1 : 2;  // 16-row tiles per warp
  static constexpr int kRows = 16 * kMTiles * 4;
  static constexpr int kKeys = kHeadDim > 128 ? 32 : 64;  // keys per stage
  static constexpr int kNTiles = kKeys / 8;
  static constexpr int kStride = kHeadDim + 8;  // elements per smem row (16 bytes of padding)
  static constexpr size_t kSmemBytes = static_cast<size_t>(kRows + 2 * kKeys) * kStride * 2;  // Q, 2 K stages
};
static_assert(LseTile<128>::kRows == FOVEAL_TGS_MMA_ROWS && LseTile<256>::kRows == FOVEAL_TGS_MMA_ROWS_WIDE,
              "rows per block promised by foveal.h");
static_assert(FOVEAL_TGS_KEY_CHUNK % LseTile<128>::kKeys == 0 && FOVEAL_TGS_KEY_CHUNK % LseTile<256>::kKeys == 0,
              "key chunks of whole stages");

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kMmaThreads) lse_partial_mma_kernel(const foveal_text_guided_select_params p) {
  using Tile = LseTile<kHeadDim>;
  constexpr int kRows = Tile::kRows, kKeys = Tile::kKeys, kStride = Tile::kStride;
  constexpr int kMTiles = Tile::kMTiles, kNTiles = Tile::kNTiles;
  extern __shared__ __align__(16) unsigned char smem[];
  T* q_s = reinterpret_cast<T*>(smem);
  T* k_s = q_s + kRows * kStride;  // stage s at s * kKeys rows

  const int chunk = blockIdx.x;
  const int group = p.q_heads / p.kv_heads;
  const int kvh = blockIdx.y % p.kv_heads;
  const int row0 = (blockIdx.y / p.kv_heads) * kRows;
  const int b = blockIdx.z;
  const int n = p.n_len[b];
  const int rows_valid = p.t_len[b] * group;
  const int lo = chunk * p.key_chunk;
  if (lo >= n || row0 >= rows_valid) return;  // no partial of this block is read
  const int hi = min(n, lo + p.key_chunk);
  const int n_tiles = ceil_div(hi - lo, kKeys);

  const T* q_base = static_cast<const T*>(p.q);
  load_tile_async<T, kRows, kHeadDim, kStride, kMmaThreads>(
      q_s,
      [&](int r) -> const T* {
        const int gr = row0 + r;
        if (gr >= rows_valid) return nullptr;
        const int h = kvh * group + gr % group;
        return q_base + b * p.q_stride_b + static_cast<int64_t>(gr / group) * p.q_stride_t + h * p.q_stride_h;
      },
      p.head_dim, q_base);
  const T* k_bh = static_cast<const T*>(p.k) + b * p.k_stride_b + kvh * p.k_stride_h;
  auto load_k = [&](int t) {
    const int key0 = lo + t * kKeys;
    load_tile_async<T, kKeys, kHeadDim, kStride, kMmaThreads>(
        k_s + (t & 1) * kKeys * kStride,
        [&](int r) { return key0 + r < hi ? k_bh + static_cast<int64_t>(key0 + r) * p.k_stride_n : nullptr; },
        p.head_dim, k_bh);
  };
  load_k(0);
  cp_async_commit();  // Q and the first stage

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  RowState st[kMTiles][2];
#pragma unroll
  for (int m = 0; m < kMTiles; ++m) st[m][0] = st[m][1] = empty_row_state();
  const T* q_warp = q_s + warp * kMTiles * 16 * kStride;

  for (int t = 0; t < n_tiles; ++t) {
    if (t + 1 < n_tiles) load_k(t + 1);
    cp_async_commit();  // possibly empty: the wait below still leaves stage t complete
    cp_async_wait<1>();
    __syncthreads();
    float s[kMTiles][kNTiles][4];
    warp_scores<T, kMTiles, kNTiles, kHeadDim, kStride>(s, q_warp, k_s + (t & 1) * kKeys * kStride);
    const int key_base = lo + t * kKeys + 2 * (lane % 4);
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        // Row lane / 4 (+ 8) of tile m; its keys spread over the quad.
        float row[2 * kNTiles];
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            row[2 * nt + e] = key_base + nt * 8 + e < hi ? s[m][nt][2 * half + e] * p.scale : -CUDART_INF_F;
          }
        }
        online_softmax_step<4>(st[m][half], row);  // the weights themselves are not needed
      }
    }
    __syncthreads();  // this stage is refilled by the next iteration's copies
  }
  cp_async_wait<0>();

#pragma unroll
  for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float l = group_sum<4>(st[m][half].l);
      const int gr = row0 + (warp * kMTiles + m) * 16 + lane / 4 + 8 * half;
      if (lane % 4 == 0 && gr < rows_valid) {
        const int h = kvh * group + gr % group;
        *reinterpret_cast<float2*>(lse_partial_at(p, b, chunk, h, gr / group)) = make_float2(st[m][half].m, l);
      }
    }
  }
}

// Tiles of the score kernel: 16 text tokens x 64 visual tokens per block,
// 16 per warp; query heads staged kHeads at a time.
template <int kHeadDim>
struct ScoreTile {
  static constexpr int kText = FOVEAL_TGS_MMA_TEXT;
  static constexpr int kNTiles = 2;               // 8-key tiles per warp
  static constexpr int kKeys = 4 * 8 * kNTiles;  // keys per block
  static constexpr int kHeads = kHeadDim > 128 ? 2 : 4;  // query heads per stage (even: taken in pairs)
  static constexpr int kStride = kHeadDim + 8;
  static constexpr size_t kKBytes = static_cast<size_t>(kKeys) * kStride * 2;
  static constexpr size_t kQBytes = static_cast<size_t>(kHeads) * kText * kStride * 2;  // one stage
  static constexpr size_t kLBytes = static_cast<size_t>(kHeads) * kText * 2 * 4;       // one stage
  static constexpr size_t kSmemBytes = kKBytes + 2 * (kQBytes + kLBytes);
};

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kMmaThreads) scores_partial_mma_kernel(const foveal_text_guided_select_params p) {
  using Tile = ScoreTile<kHeadDim>;
  constexpr int kText = Tile::kText, kNTiles = Tile::kNTiles, kKeys = Tile::kKeys, kHeads = Tile::kHeads;
  constexpr int kStride = Tile::kStride;
  extern __shared__ __align__(16) unsigned char smem[];
  T* k_s = reinterpret_cast<T*>(smem);                                // [kKeys][kStride]
  T* q_s = reinterpret_cast<T*>(smem + Tile::kKBytes);                // stage s: [kHeads * kText][kStride]
  float* l_s = reinterpret_cast<float*>(smem + Tile::kKBytes + 2 * Tile::kQBytes);  // stage s: [kHeads * kText][2]

  const int i0 = blockIdx.x * kKeys;
  const int js = blockIdx.y;
  const int b = blockIdx.z;
  const int n = p.n_len[b];
  if (i0 >= n) return;
  int j0;
  int j1;
  text_range(p, js, p.t_len[b], j0, j1);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  float* out = p.s_partial + (static_cast<int64_t>(b) * p.text_splits + js) * p.visual;
  if (j0 >= j1) {  // no text token in this split: it adds 0 to S
    for (int i = i0 + threadIdx.x; i < min(n, i0 + kKeys); i += kMmaThreads) out[i] = 0.f;
    return;
  }

  const int group = p.q_heads / p.kv_heads;
  const int chunks = ceil_div(group, kHeads);  // stages per KV head
  const int stages = p.kv_heads * chunks;
  const T* q_base = static_cast<const T*>(p.q) + b * p.q_stride_b;
  // Stage s: KV head s / chunks, its query heads from (s % chunks) * kHeads
  // (up to kHeads of them), 16 text tokens each; with the first stage of a
  // KV head, the block's keys of it.
  auto load_stage = [&](int s) {
    const int kvh = s / chunks;
    const int g0 = (s % chunks) * kHeads;
    const int hc = min(kHeads, group - g0);
    const int h0 = kvh * group + g0;
    if (g0 == 0) {
      const T* k_bh = static_cast<const T*>(p.k) + b * p.k_stride_b + kvh * p.k_stride_h;
      load_tile_async<T, kKeys, kHeadDim, kStride, kMmaThreads>(
          k_s, [&](int r) { return i0 + r < n ? k_bh + static_cast<int64_t>(i0 + r) * p.k_stride_n : nullptr; },
          p.head_dim, k_bh);
    }
    load_tile_async<T, kHeads * kText, kHeadDim, kStride, kMmaThreads>(
        q_s + (s & 1) * kHeads * kText * kStride,
        [&](int r) -> const T* {
          const int j = j0 + r % kText;
          if (r / kText >= hc || j >= j1) return nullptr;
          return q_base + static_cast<int64_t>(j) * p.q_stride_t + (h0 + r / kText) * p.q_stride_h;
        },
        p.head_dim, q_base);
    // (max, ln sum) of each staged row; 0 for the zero rows
    float* l_stage = l_s + (s & 1) * kHeads * kText * 2;
    for (int r = threadIdx.x; r < kHeads * kText; r += kMmaThreads) {
      const int j = j0 + r % kText;
      const bool valid = r / kText < hc && j < j1;
      cp_async_8(l_stage + 2 * r, valid ? lse_at(p, b, h0 + r / kText, j) : p.lse, valid);
    }
  };

  // best[nt][e]: max over the heads so far of the log-probability of text
  // token j0 + lane / 4 (+ 8 for e >= 2) and key i0 + 16 warp + 8 nt +
  // 2 (lane % 4) + e % 2 (the accumulator layout).
  float best[kNTiles][4];
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) best[nt][e] = -CUDART_INF_F;
  }
  uint32_t kf[kHeadDim / 16][kNTiles][2];  // the warp's key fragments, per KV head

  load_stage(0);
  cp_async_commit();
  for (int s = 0; s < stages; ++s) {
    cp_async_wait<0>();  // stage s (the only group in flight)
    __syncthreads();
    const int g0 = (s % chunks) * kHeads;
    const int hc = min(kHeads, group - g0);
    if (g0 == 0) {
      load_b_fragments<T, kNTiles, kHeadDim, kStride>(kf, k_s + warp * 8 * kNTiles * kStride);
      __syncthreads();  // the key tile is free for the next KV head's copies
    }
    if (s + 1 < stages) load_stage(s + 1);
    cp_async_commit();

    const T* q_stage = q_s + (s & 1) * kHeads * kText * kStride;
    const float* l_stage = l_s + (s & 1) * kHeads * kText * 2;
    // Two heads at a time (four independent accumulator chains per warp).
#pragma unroll 1
    for (int c = 0; c < hc; c += 2) {
      float acc[2][kNTiles][4];
      warp_scores_b<T, 2, kNTiles, kHeadDim, kStride>(acc, q_stage + c * kText * kStride, kf);
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        if (c + m >= hc) break;  // a zero tile past the stage's heads
        const float* lr = l_stage + (c + m) * kText * 2;
        const float2 lse0 = *reinterpret_cast<const float2*>(lr + 2 * (lane / 4));
        const float2 lse1 = *reinterpret_cast<const float2*>(lr + 2 * (lane / 4 + 8));
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float2 l = e < 2 ? lse0 : lse1;
            best[nt][e] = fmaxf(best[nt][e], softmax_log_prob(acc[m][nt][e] * p.scale, l.x, l.y));
          }
        }
      }
    }
  }
  cp_async_wait<0>();

  // S's partial per key: sum over the split's text tokens of exp(best),
  // over the thread's two rows, then over the 8 row groups of the warp.
  const bool row0_valid = j0 + lane / 4 < j1;
  const bool row1_valid = j0 + lane / 4 + 8 < j1;
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float v = (row0_valid ? expf(best[nt][e]) : 0.f) + (row1_valid ? expf(best[nt][e + 2]) : 0.f);
#pragma unroll
      for (int offset = 4; offset < 32; offset *= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
      const int i = i0 + warp * 8 * kNTiles + nt * 8 + 2 * (lane % 4) + e;
      if (lane < 4 && i < n) out[i] = v;
    }
  }
}

// ------------------------------------------------------- f32 kernels

constexpr int kKeys = FOVEAL_TGS_KEYS_PER_BLOCK;
constexpr int kWarps = kKeys / 32;
constexpr int kChunk = 8;  // query heads staged at once

// Stages the query heads h0..h0+gc of text token j.
__device__ __forceinline__ void stage_q(const foveal_text_guided_select_params& p, int b, int j, int h0, int gc,
                                        float (*q_s)[kMaxD]) {
  const float* q = static_cast<const float*>(p.q) + b * p.q_stride_b + static_cast<int64_t>(j) * p.q_stride_t;
  for (int idx = threadIdx.x; idx < gc * p.head_dim; idx += kKeys) {
    const int g = idx / p.head_dim;
    const int d = idx - g * p.head_dim;
    q_s[g][d] = q[(h0 + g) * p.q_stride_h + d];
  }
}

// acc[g] = q_s[g] . k_row for every slot g (one read of the key for the
// chunk); the callers keep the staged ones (g < gc). Uniform code: the
// guarded form spilled registers.
__device__ __forceinline__ void group_dots(const float* k_row, const float (*q_s)[kMaxD], int head_dim,
                                           float (&acc)[kChunk]) {
#pragma unroll
  for (int g = 0; g < kChunk; ++g) acc[g] = 0.0f;
  for (int d = 0; d < head_dim; d += 4) {
    float kf[4];
    load16_as_float(k_row + d, kf);
#pragma unroll
    for (int g = 0; g < kChunk; ++g) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[g] = fmaf(q_s[g][d + e], kf[e], acc[g]);
    }
  }
}

// At least 1 block per SM: ptxas's default target (9 blocks of 128 threads,
// 56 registers) spilled a pointer.
__global__ void __launch_bounds__(kKeys, 1) lse_partial_f32_kernel(const foveal_text_guided_select_params p) {
  __shared__ float q_s[kChunk][kMaxD];
  __shared__ float red_m[kWarps][kChunk];
  __shared__ float red_l[kWarps][kChunk];
  const int chunk = blockIdx.x;
  const int js = blockIdx.y;
  const int b = blockIdx.z;
  const int n = p.n_len[b];
  const int i0 = chunk * kKeys;
  if (i0 >= n) return;  // the whole block: no partial is read for this chunk
  int j0;
  int j1;
  text_range(p, js, p.t_len[b], j0, j1);
  const int i = i0 + threadIdx.x;
  const bool valid = i < n;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int group = p.q_heads / p.kv_heads;
  const float* k_base =
      static_cast<const float*>(p.k) + b * p.k_stride_b + static_cast<int64_t>(valid ? i : 0) * p.k_stride_n;
  // One flat loop over (text token, chunk of up to kChunk heads of a KV
  // head).
  const int chunks = ceil_div(group, kChunk);
  const int steps = (j1 - j0) * p.kv_heads * chunks;
  for (int step = 0; step < max(steps, 0); ++step) {
    const int j = j0 + step / (p.kv_heads * chunks);
    const int hk = (step / chunks) % p.kv_heads;
    const int h0 = hk * group + (step % chunks) * kChunk;
    const int gc = min(kChunk, (hk + 1) * group - h0);
    __syncthreads();
    stage_q(p, b, j, h0, gc, q_s);
    __syncthreads();
    float acc[kChunk];
    if (valid) group_dots(k_base + hk * p.k_stride_h, q_s, p.head_dim, acc);
    // Every slot reduced (uniform code, no spill); only the gc staged heads are kept.
#pragma unroll
    for (int g = 0; g < kChunk; ++g) {
      const float x = valid && g < gc ? acc[g] * p.scale : -CUDART_INF_F;
      const float m = group_max<32>(x);
      const float l = group_sum<32>(softmax_weight(x, m));
      if (lane == 0) {
        red_m[warp][g] = m;
        red_l[warp][g] = l;
      }
    }
    __syncthreads();
    if (threadIdx.x < gc) {
      const int g = threadIdx.x;
      float m;
      float l;
      merge_max_sum(&red_m[0][g], &red_l[0][g], kWarps, kChunk, m, l);
      *reinterpret_cast<float2*>(lse_partial_at(p, b, chunk, h0 + g, j)) = make_float2(m, l);
    }
  }
}

__global__ void __launch_bounds__(kKeys) scores_partial_f32_kernel(const foveal_text_guided_select_params p) {
  __shared__ float q_s[kChunk][kMaxD];
  __shared__ float lse_s[kChunk][2];  // per staged head: max, ln of the sum of exponentials
  const int chunk = blockIdx.x;
  const int js = blockIdx.y;
  const int b = blockIdx.z;
  const int n = p.n_len[b];
  const int i0 = chunk * kKeys;
  if (i0 >= n) return;
  int j0;
  int j1;
  text_range(p, js, p.t_len[b], j0, j1);
  const int i = i0 + threadIdx.x;
  const bool valid = i < n;
  const int group = p.q_heads / p.kv_heads;
  const float* k_base =
      static_cast<const float*>(p.k) + b * p.k_stride_b + static_cast<int64_t>(valid ? i : 0) * p.k_stride_n;
  // One flat loop over (text token, chunk of up to kChunk heads of a KV
  // head); nested loops kept the running sum in a spilled register.
  const int chunks = ceil_div(group, kChunk);
  const int per_text = p.kv_heads * chunks;
  const int steps = (j1 - j0) * per_text;
  float s = 0.0f;
  float best = -CUDART_INF_F;
  for (int step = 0; step < max(steps, 0); ++step) {
    const int j = j0 + step / per_text;
    const int hk = (step / chunks) % p.kv_heads;
    const int h0 = hk * group + (step % chunks) * kChunk;
    const int gc = min(kChunk, (hk + 1) * group - h0);
    __syncthreads();
    stage_q(p, b, j, h0, gc, q_s);
    if (threadIdx.x < 2 * gc) {
      const int g = threadIdx.x / 2;
      lse_s[g][threadIdx.x % 2] = lse_at(p, b, h0 + g, j)[threadIdx.x % 2];
    }
    __syncthreads();
    if (valid) {
      float acc[kChunk];
      group_dots(k_base + hk * p.k_stride_h, q_s, p.head_dim, acc);
#pragma unroll
      for (int g = 0; g < kChunk; ++g) {
        const float x = softmax_log_prob(acc[g] * p.scale, lse_s[g][0], lse_s[g][1]);
        best = g < gc ? fmaxf(best, x) : best;
      }
    }
    if (step % per_text == per_text - 1) {  // the text token's last heads
      s += expf(best);
      best = -CUDART_INF_F;
    }
  }
  if (valid) p.s_partial[(static_cast<int64_t>(b) * p.text_splits + js) * p.visual + i] = s;
}

// --------------------------------------------------------- both paths

// Per (row, head, text token): the key chunks' partial states merged in
// chunk order, as (max, ln sum); (0, 0) past t_len (up to the 16-token
// tiles) and for a row without visual tokens.
__global__ void __launch_bounds__(kCombineThreads) lse_combine_kernel(const foveal_text_guided_select_params p) {
  const int stride = lse_text_stride(p);
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kCombineThreads + threadIdx.x;
  if (idx >= static_cast<int64_t>(p.batch) * p.q_heads * stride) return;
  const int j = static_cast<int>(idx % stride);
  const int h = static_cast<int>((idx / stride) % p.q_heads);
  const int b = static_cast<int>(idx / (static_cast<int64_t>(stride) * p.q_heads));
  const int n = p.n_len[b];
  float2 out = make_float2(0.f, 0.f);
  if (j < p.t_len[b] && n > 0) {
    const float* part = lse_partial_at(p, b, 0, h, j);
    const int64_t chunk_stride = static_cast<int64_t>(p.q_heads) * p.text * 2;
    float m;
    float l;
    merge_max_sum(part, part + 1, ceil_div(n, p.key_chunk), chunk_stride, m, l);
    out = make_float2(m, logf(l));
  }
  *reinterpret_cast<float2*>(p.lse + 2 * idx) = out;
}

// S in 32.32 fixed point (the CPU reference's `quantize`): NaN and values
// <= 0 give 0, values are capped at 2.
__device__ __forceinline__ unsigned long long quantize(float s) {
  return s > 0.0f ? static_cast<unsigned long long>(static_cast<double>(fminf(s, 2.0f)) * 4294967296.0) : 0ull;
}

// One warp's step of the radix walk: the digit at which the keys' running
// fixed-point sum from the top reaches `need`, given the sum `acc` and the
// count `above` of the keys above the current prefix. Lane l holds digits
// 255 - 8 l down to 248 - 8 l; a scan over the lanes gives each the sum
// above its digits, and the first digit (from the top) where the running sum
// reaches `need`, or digit 0, is the serial walk's stopping point:
//   d = 255; while (d > 0 && acc + sum[d] < need) { acc += sum[d]; above += count[d]; --d; }
// The winning lane writes the new prefix, acc and above (and, at the last
// digit, how many keys equal to the pivot are taken).
__device__ __forceinline__ void find_digit(const int* hist_count, const unsigned long long* hist_sum, int shift,
                                           uint32_t prefix, unsigned long long need, unsigned long long& sh_acc,
                                           int& sh_above, uint32_t& sh_prefix, int& sh_take) {
  const int lane = threadIdx.x % 32;
  const unsigned long long acc0 = sh_acc;
  const int above0 = sh_above;
  unsigned long long sum[8];
  int count[8];
  unsigned long long own = 0;
  int own_count = 0;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    sum[k] = hist_sum[255 - 8 * lane - k];
    count[k] = hist_count[255 - 8 * lane - k];
    own += sum[k];
    own_count += count[k];
  }
  unsigned long long before = own;  // inclusive scan over lanes 0..lane
  int before_count = own_count;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const unsigned long long x = __shfl_up_sync(0xffffffffu, before, offset);
    const int c = __shfl_up_sync(0xffffffffu, before_count, offset);
    if (lane >= offset) {
      before += x;
      before_count += c;
    }
  }
  unsigned long long run = acc0 + (before - own);
  int run_count = above0 + (before_count - own_count);
  int stop = -1;
  unsigned long long acc_at = 0;
  int above_at = 0;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const int d = 255 - 8 * lane - k;
    if (stop < 0 && (d == 0 || run + sum[k] >= need)) {
      stop = k;
      acc_at = run;
      above_at = run_count;
    }
    run += sum[k];
    run_count += count[k];
  }
  const int winner = __ffs(__ballot_sync(0xffffffffu, stop >= 0)) - 1;  // lane 31 holds digit 0: always one
  __syncwarp();  // every lane has read the shared state
  if (lane == winner) {
    const int d = 255 - 8 * lane - stop;
    sh_acc = acc_at;
    sh_above = above_at;
    sh_prefix = prefix | (static_cast<uint32_t>(d) << shift);
    if (shift == 0) {
      // Every key equal to the pivot has the same fixed-point value.
      const unsigned long long q = hist_sum[d] / static_cast<unsigned long long>(max(hist_count[d], 1));
      const unsigned long long missing = need - acc_at;
      sh_take = q == 0 ? hist_count[d]
                       : static_cast<int>(min((missing + q - 1) / q, static_cast<unsigned long long>(hist_count[d])));
    }
  }
}

__global__ void __launch_bounds__(kSelectThreads) select_kernel(const foveal_text_guided_select_params p) {
  using BlockReduce = cub::BlockReduce<unsigned long long, kSelectThreads>;
  using BlockScan = cub::BlockScan<int, kSelectThreads>;
  __shared__ union {
    typename BlockReduce::TempStorage reduce;
    typename BlockScan::TempStorage scan;
  } temp;
  __shared__ int hist_count[256];
  __shared__ unsigned long long hist_sum[256];
  __shared__ unsigned long long sh_need, sh_acc;
  __shared__ int sh_above, sh_take, sh_keep_all, sh_carry[2];
  __shared__ uint32_t sh_prefix;

  const int b = blockIdx.x;
  const int n = p.n_len[b];
  const int t = p.t_len[b];
  float* S = p.scores + b * p.scores_stride_b;
  int32_t* out = p.keep_idx + b * p.keep_stride_b;

  // 1. S (splits summed in order, / t_len) and its fixed-point total.
  unsigned long long total = 0;
  for (int i = threadIdx.x; i < p.visual; i += kSelectThreads) {
    float s = 0.0f;
    if (i < n && t > 0) {
      for (int js = 0; js < p.text_splits; ++js) s += p.s_partial[(static_cast<int64_t>(b) * p.text_splits + js) * p.visual + i];
      s = __fdiv_rn(s, static_cast<float>(t));
    }
    S[i] = s;
    total += quantize(s);
  }
  total = BlockReduce(temp.reduce).Sum(total);
  if (threadIdx.x == 0) {
    // Keep the smallest top-k whose fixed-point sum exceeds gamma * total,
    // i.e. reaches floor(gamma * total) + 1; all of them when none does.
    const unsigned long long need =
        static_cast<unsigned long long>(floor(static_cast<double>(p.gamma) * static_cast<double>(total))) + 1ull;
    sh_need = need;
    sh_keep_all = need > total;
    sh_acc = 0;
    sh_above = 0;
    sh_take = 0;
    sh_prefix = 0;
  }
  __syncthreads();
  const bool keep_all = sh_keep_all;

  // 2. Radix walk: the key of the k-th largest, the sum and count above it.
  if (!keep_all) {
    uint32_t mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int d = threadIdx.x; d < 256; d += kSelectThreads) {
        hist_count[d] = 0;
        hist_sum[d] = 0;
      }
      __syncthreads();
      const uint32_t prefix = sh_prefix;
      for (int i = threadIdx.x; i < n; i += kSelectThreads) {
        const float s = S[i];
        const uint32_t key = rank_key(s);
        if ((key & mask) == prefix) {
          const int d = (key >> shift) & 0xffu;
          atomicAdd(&hist_count[d], 1);
          atomicAdd(&hist_sum[d], quantize(s));
        }
      }
      __syncthreads();
      if (threadIdx.x < 32) find_digit(hist_count, hist_sum, shift, prefix, sh_need, sh_acc, sh_above, sh_prefix, sh_take);
      mask |= 0xffu << shift;
      __syncthreads();
    }
  }
  const int k = keep_all ? n : sh_above + sh_take;

  // 3. Kept indices ascending, then the padding and the count.
  write_kept_ascending<kSelectThreads>(n, keep_all, !keep_all, sh_prefix, sh_take, [&](int i) { return rank_key(S[i]); },
                                       out, temp.scan, sh_carry);
  for (int j = k + threadIdx.x; j < p.visual; j += kSelectThreads) out[j] = -1;
  if (threadIdx.x == 0) p.keep_count[b * p.count_stride] = k;
}

// ---------------------------------------------------------------- launch

using Kernel = void (*)(foveal_text_guided_select_params);

// The tensor-core kernels of a head dim bucket and their dynamic shared
// memory.
struct MmaKernels {
  Kernel lse;
  size_t lse_smem;
  Kernel scores;
  size_t scores_smem;
};

template <typename T, int kHeadDim>
MmaKernels mma_kernels() {
  return {lse_partial_mma_kernel<T, kHeadDim>, LseTile<kHeadDim>::kSmemBytes, scores_partial_mma_kernel<T, kHeadDim>,
          ScoreTile<kHeadDim>::kSmemBytes};
}

// Every tensor-core instance fits 99 KiB of shared memory per block (sm_86,
// sm_89 and sm_120 opt-in limit; sm_80 allows 163 KiB, sm_90 227 KiB).
constexpr size_t kOptinSm86 = 99 * 1024;
template <int kHeadDim>
constexpr bool fits_sm86() {
  return LseTile<kHeadDim>::kSmemBytes <= kOptinSm86 && ScoreTile<kHeadDim>::kSmemBytes <= kOptinSm86;
}
static_assert(fits_sm86<64>() && fits_sm86<96>() && fits_sm86<128>() && fits_sm86<256>(),
              "text_guided_select's tiles fit 99 KiB");

template <typename T>
MmaKernels mma_kernels_for(int head_dim) {
  // Whole 16-byte vectors; the tiles zero-pad a row up to the bucket.
  if (head_dim % Vec16<T>::kElems != 0 || head_dim <= 0 || head_dim > kMaxD) return {nullptr, 0, nullptr, 0};
  if (head_dim <= 64) return mma_kernels<T, 64>();
  if (head_dim <= 96) return mma_kernels<T, 96>();
  if (head_dim <= 128) return mma_kernels<T, 128>();
  return mma_kernels<T, 256>();
}

MmaKernels mma_kernels_of(const foveal_text_guided_select_params& p) {
  if (p.dtype == FOVEAL_F16) return mma_kernels_for<__half>(p.head_dim);
  if (p.dtype == FOVEAL_BF16) return mma_kernels_for<__nv_bfloat16>(p.head_dim);
  return {nullptr, 0, nullptr, 0};
}

int launch_scores(const foveal_text_guided_select_params& p, cudaStream_t stream) {
  const int key_chunks = ceil_div(p.visual, p.key_chunk);
  const int64_t pairs = static_cast<int64_t>(p.batch) * p.q_heads * lse_text_stride(p);
  const int combine_blocks = static_cast<int>((pairs + kCombineThreads - 1) / kCombineThreads);
  if (p.dtype == FOVEAL_F32) {
    if (p.key_chunk != kKeys) return FOVEAL_ERR_UNSUPPORTED;
    const dim3 grid(key_chunks, p.text_splits, p.batch);
    lse_partial_f32_kernel<<<grid, kKeys, 0, stream>>>(p);
    lse_combine_kernel<<<combine_blocks, kCombineThreads, 0, stream>>>(p);
    scores_partial_f32_kernel<<<grid, kKeys, 0, stream>>>(p);
    return 0;
  }
  const MmaKernels k = mma_kernels_of(p);
  if (k.lse == nullptr || p.key_chunk % FOVEAL_TGS_KEY_CHUNK != 0 || p.text_per_split > FOVEAL_TGS_MMA_TEXT) {
    return FOVEAL_ERR_UNSUPPORTED;
  }
  // Static plus dynamic against the device's opt-in limit, before anything
  // is enqueued (FOVEAL_ERR_SHARED_MEMORY past it).
  int status = prepare_shared_memory(k.lse, k.lse_smem);
  if (status == 0) status = prepare_shared_memory(k.scores, k.scores_smem);
  if (status != 0) return status;
  const int rows = p.head_dim > 128 ? FOVEAL_TGS_MMA_ROWS_WIDE : FOVEAL_TGS_MMA_ROWS;
  const dim3 lse_grid(key_chunks, ceil_div(p.text * (p.q_heads / p.kv_heads), rows) * p.kv_heads, p.batch);
  k.lse<<<lse_grid, kMmaThreads, k.lse_smem, stream>>>(p);
  lse_combine_kernel<<<combine_blocks, kCombineThreads, 0, stream>>>(p);
  const dim3 scores_grid(ceil_div(p.visual, ScoreTile<64>::kKeys), p.text_splits, p.batch);
  k.scores<<<scores_grid, kMmaThreads, k.scores_smem, stream>>>(p);
  return 0;
}

}  // namespace
}  // namespace foveal

extern "C" int foveal_text_guided_select(const foveal_text_guided_select_params* p, foveal_stream_t stream) {
  if (p->batch == 0) return 0;
  if (p->head_dim > foveal::kMaxD || p->kv_heads < 1 || p->q_heads % p->kv_heads != 0 || p->text_splits < 1 ||
      p->key_chunk < 1 || p->text_per_split < 1 ||
      static_cast<int64_t>(p->text_splits) * p->text_per_split < p->text) {
    return FOVEAL_ERR_UNSUPPORTED;
  }
  if (p->visual > 0 && p->text > 0) {
    const int status = foveal::launch_scores(*p, stream);
    if (status != 0) return status;
  }
  foveal::select_kernel<<<p->batch, foveal::kSelectThreads, 0, stream>>>(*p);
  return foveal::launch_status();
}

extern "C" int foveal_text_guided_select_shared_memory(const foveal_text_guided_select_params* p,
                                                       foveal_shared_memory* out) {
  if (p->dtype == FOVEAL_F32) {  // static shared memory only
    return foveal::shared_memory_of(foveal::scores_partial_f32_kernel, 0, *out);
  }
  const foveal::MmaKernels k = foveal::mma_kernels_of(*p);
  if (k.lse == nullptr) return FOVEAL_ERR_UNSUPPORTED;
  foveal_shared_memory lse;
  foveal_shared_memory scores;
  int status = foveal::shared_memory_of(k.lse, k.lse_smem, lse);
  if (status == 0) status = foveal::shared_memory_of(k.scores, k.scores_smem, scores);
  if (status != 0) return status;
  *out = lse.static_bytes + lse.dynamic_bytes >= scores.static_bytes + scores.dynamic_bytes ? lse : scores;
  return 0;
}
