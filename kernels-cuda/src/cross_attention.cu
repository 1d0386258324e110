// cross_attention: non-causal attention of a few queries over many keys
// (SPEC "VISOR / cross_attention"; the contract is restated in the Rust
// module foveal::cross_attention, the design in docs/ops/cross_attention.md).
//
// The work unit is (row b, KV head, tile of rows), where the rows of a KV
// head are its GQA group's (query, head) pairs stacked: row r is query r / G
// of head r % G. So one K/V tile in shared memory serves every query head of
// the group, and a decode step (Nq = 1) still fills a 16-row tensor-core
// tile with the group's heads. Grid: (tile x split, KV head, row).
//
// bf16/f16: mma.sync m16n8k16 with f32 accumulation (attention_tile.cuh).
// Q tile and K/V tiles in shared memory, K/V double-buffered with cp.async
// (the copy of tile t + 1 overlaps the math of tile t); S = Q K^T per warp in
// registers, masked past the row's keys, online softmax per row
// (common.cuh's rules, natural-log scores), P rounded to the input type for O += P V. Two warp layouts:
// - prefill: 4 warps over the rows (32 rows each, 16 for head dims above
//   128), each over all the stage's keys;
// - decode (every row's q_len * G <= 16): one 16-row tile, the 4 warps over
//   the keys of a 64-key stage, their states merged at the end.
// f32: the same tiles, scalar f32 dot products (no tensor cores).
//
// Split-KV: with num_splits > 1, split s of a tile takes a contiguous,
// stage-aligned share of the row's keys and writes its rows' partial
// (max, sum, unnormalised o) to the workspace; a merge kernel combines the
// splits in split order by log-sum-exp. Without splits the attention kernel
// writes o and lse itself. Every reduction has a fixed order and there is no
// atomic: the output is bit-identical run to run.

#include "attention_tile.cuh"

namespace foveal {
namespace {

using namespace attn;

constexpr int kThreads = 128;
constexpr int kMergeThreads = 128;

// What one block computes.
struct Unit {
  int b, kvh, group;
  int row0;        // first row of the tile
  int rows_valid;  // q_len[b] * G: rows past it are padding
  int slots;       // Nq * G: rows of the output
  int lo, hi;      // the split's keys
};

// The block's unit; `kKeys`: keys per stage (splits are whole stages).
template <int kKeys>
__device__ __forceinline__ Unit unit_of(const foveal_cross_attention_params& p, int tile_rows) {
  Unit u;
  const int tile = blockIdx.x / p.num_splits;
  const int split = blockIdx.x % p.num_splits;
  u.kvh = blockIdx.y;
  u.b = blockIdx.z;
  u.group = p.q_heads / p.kv_heads;
  u.row0 = tile * tile_rows;
  u.rows_valid = p.q_len[u.b] * u.group;
  u.slots = p.queries * u.group;
  const int n = p.kv_len[u.b];
  const int per_split = ceil_div(ceil_div(n, kKeys), p.num_splits) * kKeys;
  u.lo = static_cast<int>(min(static_cast<int64_t>(n), static_cast<int64_t>(split) * per_split));
  u.hi = static_cast<int>(min(static_cast<int64_t>(n), static_cast<int64_t>(u.lo) + per_split));
  return u;
}

// Address of row r's query (nullptr past the valid rows).
template <typename T>
__device__ __forceinline__ const T* q_row(const foveal_cross_attention_params& p, const Unit& u, int r) {
  const int gr = u.row0 + r;
  if (gr >= u.rows_valid) return nullptr;
  const int i = gr / u.group;
  const int h = u.kvh * u.group + gr % u.group;
  return static_cast<const T*>(p.q) + u.b * p.q_stride_b + i * p.q_stride_n + h * p.q_stride_h;
}

// Four output elements from floats.
__device__ __forceinline__ void store4(float* dst, float4 v) { *reinterpret_cast<float4*>(dst) = v; }
__device__ __forceinline__ void store4(__nv_bfloat16* dst, float4 v) {
  const __nv_bfloat162 a = __floats2bfloat162_rn(v.x, v.y);
  const __nv_bfloat162 b = __floats2bfloat162_rn(v.z, v.w);
  uint2 w;
  w.x = *reinterpret_cast<const uint32_t*>(&a);
  w.y = *reinterpret_cast<const uint32_t*>(&b);
  *reinterpret_cast<uint2*>(dst) = w;
}
__device__ __forceinline__ void store4(__half* dst, float4 v) {
  const __half2 a = __floats2half2_rn(v.x, v.y);
  const __half2 b = __floats2half2_rn(v.z, v.w);
  uint2 w;
  w.x = *reinterpret_cast<const uint32_t*>(&a);
  w.y = *reinterpret_cast<const uint32_t*>(&b);
  *reinterpret_cast<uint2*>(dst) = w;
}

__device__ __forceinline__ float4 scaled(float4 v, float w) { return make_float4(v.x * w, v.y * w, v.z * w, v.w * w); }

__device__ __forceinline__ float4 fma4(float w, float4 v, float4 acc) {
  return make_float4(fmaf(w, v.x, acc.x), fmaf(w, v.y, acc.y), fmaf(w, v.z, acc.z), fmaf(w, v.w, acc.w));
}

// The block's epilogue. Its rows' states lie in shared memory: for each of
// kStates partial states (warps that shared the rows' keys) the max em[s][r],
// the sum el[s][r] and the unnormalised output eo[(s * kRows + r) *
// kEoStride + d]. Merges them in state order, then writes o and lse (rows
// past q_len: o = 0, lse = -inf) or, with splits, the partial of each valid
// row. Every thread of the block calls it.
template <typename T, int kStates, int kRows, int kEoStride>
__device__ __forceinline__ void write_rows(const foveal_cross_attention_params& p, const Unit& u, const float* eo,
                                           const float* em, const float* el) {
  const int chunks = p.head_dim / 4;
  const bool split = p.num_splits > 1;
  for (int idx = threadIdx.x; idx < kRows * chunks; idx += kThreads) {
    const int r = idx / chunks;
    const int c = idx % chunks;
    const int gr = u.row0 + r;
    const bool valid = gr < u.rows_valid;
    if (gr >= u.slots || (split && !valid)) continue;
    float mm = -CUDART_INF_F;
#pragma unroll
    for (int s = 0; s < kStates; ++s) mm = fmaxf(mm, em[s * kRows + r]);
    float ll = 0.f;
    float4 oo = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int s = 0; s < kStates; ++s) {
      const float w = softmax_weight(em[s * kRows + r], mm);
      ll = fmaf(el[s * kRows + r], w, ll);
      oo = fma4(w, *reinterpret_cast<const float4*>(eo + (s * kRows + r) * kEoStride + 4 * c), oo);
    }
    const int i = gr / u.group;
    const int h = u.kvh * u.group + gr % u.group;
    if (split) {
      const int64_t part =
          ((static_cast<int64_t>(u.b) * p.queries + i) * p.q_heads + h) * p.num_splits + blockIdx.x % p.num_splits;
      store4(p.partial_o + part * p.head_dim + 4 * c, oo);
      if (c == 0) {
        p.partial_ml[part * 2] = mm;
        p.partial_ml[part * 2 + 1] = ll;
      }
      continue;
    }
    const bool any = valid && ll != 0.f;
    const float4 out = any ? make_float4(oo.x / ll, oo.y / ll, oo.z / ll, oo.w / ll) : make_float4(0.f, 0.f, 0.f, 0.f);
    store4(static_cast<T*>(p.o) + u.b * p.o_stride_b + i * p.o_stride_n + h * p.o_stride_h + 4 * c, out);
    if (c == 0 && p.lse != nullptr) {
      p.lse[u.b * p.lse_stride_b + h * p.lse_stride_h + i * p.lse_stride_n] = valid ? softmax_lse(mm, ll) : -CUDART_INF_F;
    }
  }
}

// ------------------------------------------------------ tensor-core kernel

// Tile shapes of the tensor-core kernel for a head dim (a bucket: the
// runtime head dim is any multiple of 16 up to it, zero-padded).
template <int kHeadDim, bool kDecode>
struct MmaTile {
  static constexpr int kWarpsM = kDecode ? 1 : 4;  // warps over the rows
  static constexpr int kWarpsN = 4 / kWarpsM;      // warps over a stage's keys
  static constexpr int kMTiles = kDecode || kHeadDim > 128 ? 1 : 2;  // 16-row tiles per warp
  static constexpr int kRows = 16 * kMTiles * kWarpsM;
  static constexpr int kWarpKeys = kDecode ? 16 : (kHeadDim <= 64 ? 64 : 32);
  static constexpr int kNTiles = kWarpKeys / 8;
  static constexpr int kKeys = kWarpKeys * kWarpsN;  // keys per stage
  static constexpr int kStride = kHeadDim + 8;       // elements per smem row (16 bytes of padding)
  static constexpr int kEoStride = kHeadDim + 4;     // floats per epilogue row
  static constexpr size_t kQBytes = static_cast<size_t>(kRows) * kStride * 2;
  static constexpr size_t kStageBytes = static_cast<size_t>(kKeys) * kStride * 2;  // one of K or V
  static constexpr size_t kLoopBytes = kQBytes + 2 * 2 * kStageBytes;             // Q, 2 stages of K and V
  static constexpr size_t kEpilogueBytes = static_cast<size_t>(kWarpsN) * kRows * kEoStride * 4;
  static constexpr size_t kSmemBytes = kLoopBytes > kEpilogueBytes ? kLoopBytes : kEpilogueBytes;  // dynamic
  static constexpr size_t kStaticBytes = static_cast<size_t>(2) * kWarpsN * kRows * 4;                // em, el
};

// The rows per block foveal.h promises the host.
static_assert(MmaTile<64, true>::kRows == FOVEAL_CROSS_ATTN_DECODE_ROWS &&
                  MmaTile<256, true>::kRows == FOVEAL_CROSS_ATTN_DECODE_ROWS,
              "decode tiles");
static_assert(MmaTile<64, false>::kRows == FOVEAL_CROSS_ATTN_PREFILL_ROWS &&
                  MmaTile<96, false>::kRows == FOVEAL_CROSS_ATTN_PREFILL_ROWS &&
                  MmaTile<128, false>::kRows == FOVEAL_CROSS_ATTN_PREFILL_ROWS &&
                  MmaTile<256, false>::kRows == FOVEAL_CROSS_ATTN_PREFILL_ROWS_WIDE,
              "prefill tiles");

template <typename T, int kHeadDim, bool kDecode>
__global__ void __launch_bounds__(kThreads) cross_attention_mma_kernel(const foveal_cross_attention_params p) {
  using Tile = MmaTile<kHeadDim, kDecode>;
  constexpr int kRows = Tile::kRows, kKeys = Tile::kKeys, kStride = Tile::kStride;
  constexpr int kMTiles = Tile::kMTiles, kNTiles = Tile::kNTiles, kDimTiles = kHeadDim / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float em[Tile::kWarpsN * kRows];  // Tile::kStaticBytes
  __shared__ float el[Tile::kWarpsN * kRows];
  T* q_s = reinterpret_cast<T*>(smem);
  T* kv_s = q_s + kRows * kStride;  // stage s: K at 2 s, V at 2 s + 1 (kKeys rows each)

  const Unit u = unit_of<kKeys>(p, kRows);
  if (p.num_splits > 1 && u.row0 >= u.rows_valid) return;  // no valid row: the merge writes the slots
  // A tile of padding rows only (without splits) skips the keys and writes zeros.
  const int lo = u.row0 < u.rows_valid ? u.lo : u.hi;
  const int n_tiles = ceil_div(max(u.hi - lo, 0), kKeys);

  const T* q_base = static_cast<const T*>(p.q);
  load_tile_async<T, kRows, kHeadDim, kStride, kThreads>(
      q_s, [&](int r) { return q_row<T>(p, u, r); }, p.head_dim, q_base);
  cp_async_commit();
  const T* k_bh = static_cast<const T*>(p.k) + u.b * p.k_stride_b + u.kvh * p.k_stride_h;
  const T* v_bh = static_cast<const T*>(p.v) + u.b * p.v_stride_b + u.kvh * p.v_stride_h;
  auto load_kv = [&](int t) {
    const int key0 = lo + t * kKeys;
    T* ks = kv_s + (2 * (t & 1)) * kKeys * kStride;
    load_tile_async<T, kKeys, kHeadDim, kStride, kThreads>(
        ks, [&](int r) { return key0 + r < u.hi ? k_bh + (key0 + r) * p.k_stride_n : nullptr; }, p.head_dim, k_bh);
    load_tile_async<T, kKeys, kHeadDim, kStride, kThreads>(
        ks + kKeys * kStride, [&](int r) { return key0 + r < u.hi ? v_bh + (key0 + r) * p.v_stride_n : nullptr; },
        p.head_dim, v_bh);
  };
  if (n_tiles > 0) load_kv(0);
  cp_async_commit();

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int wm = warp % Tile::kWarpsM;
  const int wn = warp / Tile::kWarpsM;
  float o[kMTiles][kDimTiles][4];
#pragma unroll
  for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
    for (int d = 0; d < kDimTiles; ++d) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o[m][d][e] = 0.f;
    }
  }
  RowState st[kMTiles][2];
#pragma unroll
  for (int m = 0; m < kMTiles; ++m) st[m][0] = st[m][1] = empty_row_state();
  const T* q_warp = q_s + wm * kMTiles * 16 * kStride;

  for (int t = 0; t < n_tiles; ++t) {
    if (t + 1 < n_tiles) load_kv(t + 1);
    cp_async_commit();  // possibly empty: the wait below then still leaves tile t complete
    cp_async_wait<1>();
    __syncthreads();
    const T* ks = kv_s + (2 * (t & 1)) * kKeys * kStride + wn * Tile::kWarpKeys * kStride;
    const T* vs = ks + kKeys * kStride;

    float s[kMTiles][kNTiles][4];
    warp_scores<T, kMTiles, kNTiles, kHeadDim, kStride>(s, q_warp, ks);
    // Natural-log scores; keys past the split's end masked.
    const int key_base = lo + t * kKeys + wn * Tile::kWarpKeys + 2 * (lane % 4);
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[m][n][e] = key_base + n * 8 + (e & 1) < u.hi ? s[m][n][e] * p.scale : -CUDART_INF_F;
        }
      }
    }
    // Online softmax of each of the thread's rows (row lane / 4 and + 8 of
    // each 16-row tile; a row's keys are spread over its quad).
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float row[2 * kNTiles];
#pragma unroll
        for (int n = 0; n < kNTiles; ++n) {
          row[2 * n] = s[m][n][2 * half];
          row[2 * n + 1] = s[m][n][2 * half + 1];
        }
        const float alpha = online_softmax_step<4>(st[m][half], row);
#pragma unroll
        for (int n = 0; n < kNTiles; ++n) {
          s[m][n][2 * half] = row[2 * n];
          s[m][n][2 * half + 1] = row[2 * n + 1];
        }
#pragma unroll
        for (int d = 0; d < kDimTiles; ++d) {
          o[m][d][2 * half] *= alpha;
          o[m][d][2 * half + 1] *= alpha;
        }
      }
    }
    warp_pv<T, kMTiles, kNTiles, kHeadDim, kStride>(o, s, vs);
    __syncthreads();  // this stage is refilled by the next iteration's copies
  }
  cp_async_wait<0>();
  __syncthreads();  // no copy in flight: the epilogue reuses the shared memory

  float* eo = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float l = group_sum<4>(st[m][half].l);
      const int r = (wm * kMTiles + m) * 16 + lane / 4 + 8 * half;
      if (lane % 4 == 0) {
        em[wn * kRows + r] = st[m][half].m;
        el[wn * kRows + r] = l;
      }
      float* row = eo + (wn * kRows + r) * Tile::kEoStride + 2 * (lane % 4);
#pragma unroll
      for (int d = 0; d < kDimTiles; ++d) {
        *reinterpret_cast<float2*>(row + d * 8) = make_float2(o[m][d][2 * half], o[m][d][2 * half + 1]);
      }
    }
  }
  __syncthreads();
  write_rows<T, Tile::kWarpsN, kRows, Tile::kEoStride>(p, u, eo, em, el);
}

// ------------------------------------------------------------ f32 kernel

// Scalar f32 path: 16 rows, 16-key stages; thread t serves row t / 8 with
// keys t % 8 and t % 8 + 8 of each stage, and output columns 4 (t % 8 + 8 j).
template <int kHeadDim>
struct F32Tile {
  static constexpr int kRows = FOVEAL_CROSS_ATTN_F32_ROWS;
  static constexpr int kKeys = 16;
  static constexpr int kStride = kHeadDim + 4;  // floats: rows 16 bytes apart in the banks
  static constexpr int kEoStride = kHeadDim + 4;
  static constexpr size_t kLoopBytes = static_cast<size_t>(kRows + 2 * 2 * kKeys) * kStride * 4;
  static constexpr size_t kEpilogueBytes = static_cast<size_t>(kRows) * kEoStride * 4;
  static constexpr size_t kSmemBytes = kLoopBytes > kEpilogueBytes ? kLoopBytes : kEpilogueBytes;  // dynamic
  static constexpr size_t kStaticBytes = static_cast<size_t>(kRows) * (kKeys + 1 + 2) * 4;           // p_s, em, el
};

template <int kHeadDim>
__global__ void __launch_bounds__(kThreads) cross_attention_f32_kernel(const foveal_cross_attention_params p) {
  using Tile = F32Tile<kHeadDim>;
  constexpr int kRows = Tile::kRows, kKeys = Tile::kKeys, kStride = Tile::kStride;
  constexpr int kChunks = kHeadDim / 32;  // float4 columns per thread
  static_assert(kRows * 8 == kThreads, "8 threads per row");
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float p_s[kRows][kKeys + 1];  // Tile::kStaticBytes
  __shared__ float em[kRows];
  __shared__ float el[kRows];
  float* q_s = reinterpret_cast<float*>(smem);
  float* kv_s = q_s + kRows * kStride;

  const Unit u = unit_of<kKeys>(p, kRows);
  if (p.num_splits > 1 && u.row0 >= u.rows_valid) return;
  const int lo = u.row0 < u.rows_valid ? u.lo : u.hi;
  const int n_tiles = ceil_div(max(u.hi - lo, 0), kKeys);

  load_tile_async<float, kRows, kHeadDim, kStride, kThreads>(
      q_s, [&](int r) { return q_row<float>(p, u, r); }, p.head_dim, static_cast<const float*>(p.q));
  cp_async_commit();
  const float* k_bh = static_cast<const float*>(p.k) + u.b * p.k_stride_b + u.kvh * p.k_stride_h;
  const float* v_bh = static_cast<const float*>(p.v) + u.b * p.v_stride_b + u.kvh * p.v_stride_h;
  auto load_kv = [&](int t) {
    const int key0 = lo + t * kKeys;
    float* ks = kv_s + (2 * (t & 1)) * kKeys * kStride;
    load_tile_async<float, kKeys, kHeadDim, kStride, kThreads>(
        ks, [&](int r) { return key0 + r < u.hi ? k_bh + (key0 + r) * p.k_stride_n : nullptr; }, p.head_dim, k_bh);
    load_tile_async<float, kKeys, kHeadDim, kStride, kThreads>(
        ks + kKeys * kStride, [&](int r) { return key0 + r < u.hi ? v_bh + (key0 + r) * p.v_stride_n : nullptr; },
        p.head_dim, v_bh);
  };
  if (n_tiles > 0) load_kv(0);
  cp_async_commit();

  const int row = threadIdx.x / 8;
  const int l8 = threadIdx.x % 8;
  float4 acc[kChunks];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) acc[c] = make_float4(0.f, 0.f, 0.f, 0.f);
  RowState st = empty_row_state();
  const float4* q4 = reinterpret_cast<const float4*>(q_s + row * kStride);

  for (int t = 0; t < n_tiles; ++t) {
    if (t + 1 < n_tiles) load_kv(t + 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const float* ks = kv_s + (2 * (t & 1)) * kKeys * kStride;
    const float* vs = ks + kKeys * kStride;
    float s[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int key = l8 + 8 * j;
      const float4* k4 = reinterpret_cast<const float4*>(ks + key * kStride);
      float dot = 0.f;
#pragma unroll 8
      for (int c = 0; c < kHeadDim / 4; ++c) {
        const float4 a = q4[c];
        const float4 b = k4[c];
        dot = fmaf(a.x, b.x, dot);
        dot = fmaf(a.y, b.y, dot);
        dot = fmaf(a.z, b.z, dot);
        dot = fmaf(a.w, b.w, dot);
      }
      s[j] = lo + t * kKeys + key < u.hi ? dot * p.scale : -CUDART_INF_F;
    }
    const float alpha = online_softmax_step<8>(st, s);
    p_s[row][l8] = s[0];
    p_s[row][l8 + 8] = s[1];
    __syncwarp();
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      float4 a = scaled(acc[c], alpha);
      const int col = 4 * (l8 + 8 * c);
#pragma unroll
      for (int key = 0; key < kKeys; ++key) a = fma4(p_s[row][key], *reinterpret_cast<const float4*>(vs + key * kStride + col), a);
      acc[c] = a;
    }
    __syncthreads();  // the stage is refilled next; p_s is rewritten
  }
  cp_async_wait<0>();
  __syncthreads();

  float* eo = reinterpret_cast<float*>(smem);
  const float l = group_sum<8>(st.l);
  if (l8 == 0) {
    em[row] = st.m;
    el[row] = l;
  }
#pragma unroll
  for (int c = 0; c < kChunks; ++c) *reinterpret_cast<float4*>(eo + row * Tile::kEoStride + 4 * (l8 + 8 * c)) = acc[c];
  __syncthreads();
  write_rows<float, 1, kRows, Tile::kEoStride>(p, u, eo, em, el);
}

// ------------------------------------------------------------------ merge

// One warp per (row, query, query head): the splits' partials combined by
// log-sum-exp in split order (lane-strided, then a fixed shuffle tree), o
// rounded to T, lse; o = 0 and lse = -inf for a slot past q_len or a row
// whose splits attended nothing.
template <typename T>
__global__ void __launch_bounds__(kMergeThreads) cross_attention_merge_kernel(const foveal_cross_attention_params p) {
  const int64_t slot = (static_cast<int64_t>(blockIdx.x) * kMergeThreads + threadIdx.x) / 32;
  const int64_t total = static_cast<int64_t>(p.batch) * p.queries * p.q_heads;
  if (slot >= total) return;
  const int lane = threadIdx.x % 32;
  const int h = static_cast<int>(slot % p.q_heads);
  const int i = static_cast<int>((slot / p.q_heads) % p.queries);
  const int b = static_cast<int>(slot / (static_cast<int64_t>(p.q_heads) * p.queries));
  const int n = p.num_splits;
  const bool valid = i < p.q_len[b];
  const float* ml = p.partial_ml + slot * n * 2;
  const float* po = p.partial_o + slot * n * p.head_dim;
  float mm = -CUDART_INF_F;
  float ll = 0.f;
  if (valid) {
    for (int s = lane; s < n; s += 32) mm = fmaxf(mm, ml[2 * s]);
    mm = group_max<32>(mm);
    for (int s = lane; s < n; s += 32) ll = fmaf(ml[2 * s + 1], softmax_weight(ml[2 * s], mm), ll);
    ll = group_sum<32>(ll);
  }
  const bool any = valid && ll != 0.f;
  T* o = static_cast<T*>(p.o) + b * p.o_stride_b + i * p.o_stride_n + h * p.o_stride_h;
  for (int c = lane; c < p.head_dim / 4; c += 32) {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    if (any) {
      for (int s = 0; s < n; ++s) {
        const float w = softmax_weight(ml[2 * s], mm);
        if (w != 0.f) acc = fma4(w, *reinterpret_cast<const float4*>(po + s * p.head_dim + 4 * c), acc);
      }
      acc = make_float4(acc.x / ll, acc.y / ll, acc.z / ll, acc.w / ll);
    }
    store4(o + 4 * c, acc);
  }
  if (lane == 0 && p.lse != nullptr) {
    p.lse[b * p.lse_stride_b + h * p.lse_stride_h + i * p.lse_stride_n] = valid ? softmax_lse(mm, ll) : -CUDART_INF_F;
  }
}

// ---------------------------------------------------------------- launch

// Shared memory per block a kernel may opt in to (static plus dynamic,
// cudaDevAttrMaxSharedMemoryPerBlockOptin): 163 KiB on sm_80, 227 KiB on
// sm_90 (the architectures compiled to machine code), 99 KiB on sm_86,
// sm_89 and sm_120 (which JIT the compute_80 PTX).
constexpr size_t kOptinSm80 = 163 * 1024;
constexpr size_t kOptinSm86 = 99 * 1024;

// Every instance fits sm_80 (so sm_90 too): the host check can refuse only
// on a device with less (the head dim 256 tiles on sm_86 / sm_89 / sm_120).
template <typename Tile>
constexpr size_t block_bytes() {
  return Tile::kSmemBytes + Tile::kStaticBytes;
}
template <int kHeadDim>
constexpr bool mma_fits(size_t limit) {
  return block_bytes<MmaTile<kHeadDim, true>>() <= limit && block_bytes<MmaTile<kHeadDim, false>>() <= limit;
}
template <int kHeadDim>
constexpr bool f32_fits(size_t limit) {
  return block_bytes<F32Tile<kHeadDim>>() <= limit;
}
static_assert(mma_fits<64>(kOptinSm80) && mma_fits<96>(kOptinSm80) && mma_fits<128>(kOptinSm80) &&
                  mma_fits<256>(kOptinSm80) && f32_fits<64>(kOptinSm80) && f32_fits<128>(kOptinSm80) &&
                  f32_fits<256>(kOptinSm80),
              "every cross_attention instance fits sm_80's shared memory");
static_assert(mma_fits<64>(kOptinSm86) && mma_fits<96>(kOptinSm86) && mma_fits<128>(kOptinSm86) &&
                  !mma_fits<256>(kOptinSm86) && f32_fits<256>(kOptinSm86),
              "on 99 KiB, only the bf16/f16 head dim 256 tiles are refused");

using Kernel = void (*)(foveal_cross_attention_params);

// The attention kernel instance that serves `p` and its dynamic shared
// memory; kernel nullptr when none does.
struct Instance {
  Kernel kernel;
  size_t smem;
};

template <typename Tile, typename K>
Instance instance(K kernel) {
  return {kernel, Tile::kSmemBytes};
}

template <typename T, int kHeadDim>
Instance mma_instance(int tile_rows) {
  using Decode = MmaTile<kHeadDim, true>;
  using Prefill = MmaTile<kHeadDim, false>;
  if (tile_rows == Decode::kRows) return instance<Decode>(cross_attention_mma_kernel<T, kHeadDim, true>);
  if (tile_rows == Prefill::kRows) return instance<Prefill>(cross_attention_mma_kernel<T, kHeadDim, false>);
  return {nullptr, 0};
}

template <typename T>
Instance instance_for(const foveal_cross_attention_params& p) {
  if (p.head_dim % 16 != 0) return {nullptr, 0};
  if (p.head_dim <= 64) return mma_instance<T, 64>(p.tile_rows);
  if (p.head_dim <= 96) return mma_instance<T, 96>(p.tile_rows);
  if (p.head_dim <= 128) return mma_instance<T, 128>(p.tile_rows);
  return mma_instance<T, 256>(p.tile_rows);
}

template <>
Instance instance_for<float>(const foveal_cross_attention_params& p) {
  if (p.head_dim % 4 != 0 || p.tile_rows != FOVEAL_CROSS_ATTN_F32_ROWS) return {nullptr, 0};
  if (p.head_dim <= 64) return instance<F32Tile<64>>(cross_attention_f32_kernel<64>);
  if (p.head_dim <= 128) return instance<F32Tile<128>>(cross_attention_f32_kernel<128>);
  return instance<F32Tile<256>>(cross_attention_f32_kernel<256>);
}

Instance instance_of(const foveal_cross_attention_params& p) {
  if (p.head_dim <= 0 || p.head_dim > FOVEAL_CROSS_ATTN_MAX_HEAD_DIM) return {nullptr, 0};
  switch (p.dtype) {
    case FOVEAL_F32: return instance_for<float>(p);
    case FOVEAL_F16: return instance_for<__half>(p);
    case FOVEAL_BF16: return instance_for<__nv_bfloat16>(p);
    default: return {nullptr, 0};
  }
}

template <typename T>
void launch_merge(const foveal_cross_attention_params& p, cudaStream_t stream) {
  const int64_t warps = static_cast<int64_t>(p.batch) * p.queries * p.q_heads;
  const int64_t blocks = (warps * 32 + kMergeThreads - 1) / kMergeThreads;
  cross_attention_merge_kernel<T><<<static_cast<unsigned>(blocks), kMergeThreads, 0, stream>>>(p);
}

int launch_cross_attention(const foveal_cross_attention_params& p, cudaStream_t stream) {
  if (p.kv_heads <= 0 || p.q_heads % p.kv_heads != 0 || p.num_splits <= 0 ||
      (p.num_splits > 1 && (p.partial_o == nullptr || p.partial_ml == nullptr))) {
    return FOVEAL_ERR_UNSUPPORTED;
  }
  const Instance in = instance_of(p);
  if (in.kernel == nullptr) return FOVEAL_ERR_UNSUPPORTED;
  // Static plus dynamic against the device's opt-in limit, before anything
  // is enqueued (FOVEAL_ERR_SHARED_MEMORY past it).
  const int status = prepare_shared_memory(in.kernel, in.smem);
  if (status != 0) return status;
  const int group = p.q_heads / p.kv_heads;
  const int tiles = ceil_div(p.queries * group, p.tile_rows);
  const dim3 grid(tiles * p.num_splits, p.kv_heads, p.batch);
  in.kernel<<<grid, kThreads, in.smem, stream>>>(p);
  if (p.num_splits > 1) {
    FOVEAL_DISPATCH_DTYPE(p.dtype, T, launch_merge<T>(p, stream));
  }
  return launch_status();
}

}  // namespace
}  // namespace foveal

extern "C" int foveal_cross_attention(const foveal_cross_attention_params* p, foveal_stream_t stream) {
  if (p->batch == 0 || p->queries == 0 || p->q_heads == 0) return 0;  // nothing to write
  return foveal::launch_cross_attention(*p, stream);
}

extern "C" int foveal_cross_attention_shared_memory(const foveal_cross_attention_params* p,
                                                    foveal_shared_memory* out) {
  const foveal::Instance in = foveal::instance_of(*p);
  if (in.kernel == nullptr) return FOVEAL_ERR_UNSUPPORTED;
  return foveal::shared_memory_of(in.kernel, in.smem, *out);
}
