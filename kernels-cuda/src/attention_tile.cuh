// The tile machinery of foveal's attention kernels: staged K/V tiles in
// shared memory (cp.async), the tensor-core fragments of mma.sync
// m16n8k16 (bf16/f16 in, f32 accumulate; sm_80 and later), and the online
// softmax of a row held by a group of lanes. cross_attention.cu and
// text_guided_select.cu are built on it; gaze_decode's attend loop is to move
// onto it.
//
// Conventions:
// - Scores are in natural-log units, s = scale * q . k, and every softmax
//   rule is common.cuh's (softmax_weight, softmax_lse), applied per element:
//   a weight is exp(s - m) with the difference taken before the scaling by
//   log2 e, so that logits of any size keep the precision of s - m (scores
//   pre-scaled by log2 e round at the logits' size: 4% off in the weights at
//   logits of 1e6).
// - A tile in shared memory is row-major, `kStride` elements per row
//   (a row's length plus 16 bytes, so that the 8 rows an ldmatrix reads fall
//   in distinct banks for any row length that is a multiple of 16 bytes).
// - Fragment layouts are those of the PTX ISA for mma.m16n8k16 (.row.col):
//   lane = 4 * group + quad; an accumulator tile c[4] holds (row group,
//   columns 2 quad, 2 quad + 1) in c[0..2] and row group + 8 in c[2..4].
//   So each row of a 16-row tile is held by the 4 lanes of one quad.
// - -inf guards (common.cuh's): a score of -inf weighs 0 even when the
//   running max is still -inf; a rescale from an empty state (max -inf) is 0
//   and leaves it empty; an empty state (max -inf, sum 0) contributes nothing
//   to a merge. A NaN score is ignored by the max and makes the sum NaN.
#pragma once

#include "common.cuh"

namespace foveal {
namespace attn {

// ------------------------------------------------------------------ cp.async

// Copies 16 bytes from global to shared memory without blocking; with
// `valid` false it writes 16 zero bytes and reads nothing (src-size 0; `src`
// must still be a valid address, e.g. the tensor's base).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(n));
}

// Closes the group of copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most `kPending` committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// Issues the copies of one tile of `kRows` rows of `kCols` elements (a
// multiple of the 16-byte vector) into shared memory at `dst` (`kStride`
// elements per row), spread over the block's `kThreads` threads. Row r comes
// from `row_ptr(r)`, which returns nullptr for a row to zero-fill; columns at
// or past `cols` (the runtime row length, <= kCols) are zero-filled too.
// `fallback` is any valid global address (read by no copy).
template <typename T, int kRows, int kCols, int kStride, int kThreads, typename RowPtr>
__device__ __forceinline__ void load_tile_async(T* dst, RowPtr row_ptr, int cols, const T* fallback) {
  constexpr int kVec = Vec16<T>::kElems;
  constexpr int kChunks = kCols / kVec;
  static_assert(kCols % kVec == 0, "rows of whole 16-byte vectors");
  // Not unrolled: the row addresses are recomputed per tile instead of held
  // (as loop invariants) in registers the math needs.
#pragma unroll 1
  for (int it = 0; it < ceil_div(kRows * kChunks, kThreads); ++it) {
    const int idx = it * kThreads + threadIdx.x;
    if (kRows * kChunks % kThreads != 0 && idx >= kRows * kChunks) break;
    const int r = idx / kChunks;
    const int c = idx % kChunks;
    const T* src = row_ptr(r);
    const bool valid = src != nullptr && c * kVec < cols;
    cp_async_16(dst + r * kStride + c * kVec, valid ? src + c * kVec : fallback, valid);
  }
}

// ----------------------------------------------------- mma.sync m16n8k16

// Loads four 8 x 8 b16 matrices; lanes 8i..8i+7 give the row addresses of
// matrix i, and lane l receives (row l / 4, columns 2 (l % 4), +1) of each.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

// The same, each matrix transposed: lane l receives (rows 2 (l % 4), +1,
// column l / 4).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

// c += a b for a 16 x 16 A (row-major fragment), a 16 x 8 B (column-major
// fragment b0, b1) and a 16 x 8 f32 accumulator.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                          uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats rounded to T and packed, `lo` in the low half (the lower column).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// A warp's scores S = Q K^T for kMTiles x 16 query rows and kNTiles x 8 keys
// (kNTiles even): `q` points at the warp's first row of a [rows][kStride]
// tile, `k` at its first key of a [keys][kStride] tile; kDim columns (a
// multiple of 16) are summed. s[m][n] is accumulator tile (m, n); it is
// overwritten.
template <typename T, int kMTiles, int kNTiles, int kDim, int kStride>
__device__ __forceinline__ void warp_scores(float (&s)[kMTiles][kNTiles][4], const T* q, const T* k) {
  static_assert(kNTiles % 2 == 0 && kDim % 16 == 0, "whole 16 x 16 steps");
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[m][n][e] = 0.f;
    }
  }
  // Unrolled by 2 only: fully unrolled, ptxas hoists the fragments of every
  // step and spills at kDim 128 with 32 rows per warp.
#pragma unroll 2
  for (int kk = 0; kk < kDim / 16; ++kk) {
    uint32_t a[kMTiles][4];
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
      // matrices: rows 0-7 / 8-15 x columns 0-7, then x columns 8-15
      ldmatrix_x4(a[m], q + (m * 16 + lane % 16) * kStride + kk * 16 + (lane / 16) * 8);
    }
#pragma unroll
    for (int n = 0; n < kNTiles; n += 2) {
      // matrices: keys 0-7 x dims 0-7, 8-15; keys 8-15 x dims 0-7, 8-15
      uint32_t b[4];
      ldmatrix_x4(b, k + (n * 8 + lane % 8 + (lane / 16) * 8) * kStride + kk * 16 + ((lane / 8) % 2) * 8);
#pragma unroll
      for (int m = 0; m < kMTiles; ++m) {
        mma_16816<T>(s[m][n], a[m], b[0], b[1]);
        mma_16816<T>(s[m][n + 1], a[m], b[2], b[3]);
      }
    }
  }
}

// o += P V for a warp: P is the warp's weights in the accumulator layout of
// warp_scores (rounded to T here: the A fragment of keys 16 kk..16 kk + 15 is
// accumulator tiles 2 kk and 2 kk + 1), V a [keys][kStride] tile starting at
// the warp's first key, o[m][d] the accumulator tile of rows m and columns
// 8 d..8 d + 7 of kDim (a multiple of 16).
template <typename T, int kMTiles, int kNTiles, int kDim, int kStride>
__device__ __forceinline__ void warp_pv(float (&o)[kMTiles][kDim / 8][4], const float (&p)[kMTiles][kNTiles][4],
                                        const T* v) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int kk = 0; kk < kNTiles / 2; ++kk) {
    uint32_t a[kMTiles][4];
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
      a[m][0] = pack2<T>(p[m][2 * kk][0], p[m][2 * kk][1]);
      a[m][1] = pack2<T>(p[m][2 * kk][2], p[m][2 * kk][3]);
      a[m][2] = pack2<T>(p[m][2 * kk + 1][0], p[m][2 * kk + 1][1]);
      a[m][3] = pack2<T>(p[m][2 * kk + 1][2], p[m][2 * kk + 1][3]);
    }
#pragma unroll
    for (int d = 0; d < kDim / 8; d += 2) {
      // transposed matrices: keys 0-7 / 8-15 x columns 8 d..8 d + 7, then 8 (d + 1)..
      uint32_t b[4];
      ldmatrix_x4_trans(b, v + (kk * 16 + lane % 16) * kStride + d * 8 + (lane / 16) * 8);
#pragma unroll
      for (int m = 0; m < kMTiles; ++m) {
        mma_16816<T>(o[m][d], a[m], b[0], b[1]);
        mma_16816<T>(o[m][d + 1], a[m], b[2], b[3]);
      }
    }
  }
}

// The floats of two packed T (the inverse of pack2; `lo` from the low half).
template <typename T>
__device__ __forceinline__ void unpack2(uint32_t v, float& lo, float& hi);
template <>
__device__ __forceinline__ void unpack2<__nv_bfloat16>(uint32_t v, float& lo, float& hi) {
  lo = __uint_as_float(v << 16);
  hi = __uint_as_float(v & 0xffff0000u);
}
template <>
__device__ __forceinline__ void unpack2<__half>(uint32_t v, float& lo, float& hi) {
  const __half2 h = *reinterpret_cast<const __half2*>(&v);
  const float2 f = __half22float2(h);
  lo = f.x;
  hi = f.y;
}

// --------------------------------------------- decode: at most 8 query rows
//
// A decode tile whose A operand holds at most 8 rows (the query heads of one
// KV head, gaze_attend.cuh): rows 8-15 of every m16n8k16 are zero, so a
// thread keeps only row lane / 4 of its fragments (a[0], a[2]; accumulator
// c[0], c[1]) and a warp serves 16 keys (two 8-key n-tiles). Used with
// K / V tiles of 16-key slices in shared memory, `kStride` elements per row.

// The A fragments of row lane / 4 of a tile of at most 8 query rows: q[kk]
// holds columns 16 kk + 2 (lane % 4), +1 and 16 kk + 8 + 2 (lane % 4), +1 of
// `row` (global memory, 4-byte aligned), zero past `dim` or where `row` is
// nullptr (rows past the heads).
template <typename T, int kDim>
__device__ __forceinline__ void load_q_rows8(uint32_t (&q)[kDim / 16][2], const T* row, int dim) {
  const int col = 2 * (threadIdx.x % 4);
#pragma unroll
  for (int kk = 0; kk < kDim / 16; ++kk) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int c = kk * 16 + h * 8 + col;
      q[kk][h] = row != nullptr && c < dim ? __ldg(reinterpret_cast<const uint32_t*>(row + c)) : 0u;
    }
  }
}

// Scores of the warp's 16 keys (`k`: their first row) for rows 0-7:
// s[n][e] = q_{lane / 4} . k_{8 n + 2 (lane % 4) + e}, f32 accumulation over
// kDim columns.
template <typename T, int kDim, int kStride>
__device__ __forceinline__ void warp_scores_rows8(float (&s)[2][2], const uint32_t (&q)[kDim / 16][2], const T* k) {
  const int lane = threadIdx.x % 32;
  float c[2][4] = {};
#pragma unroll
  for (int kk = 0; kk < kDim / 16; ++kk) {
    // matrices: keys 0-7 x dims 0-7, 8-15; keys 8-15 x dims 0-7, 8-15
    uint32_t b[4];
    ldmatrix_x4(b, k + (lane % 8 + (lane / 16) * 8) * kStride + kk * 16 + ((lane / 8) % 2) * 8);
    const uint32_t a[4] = {q[kk][0], 0u, q[kk][1], 0u};
    mma_16816<T>(c[0], a, b[0], b[1]);
    mma_16816<T>(c[1], a, b[2], b[3]);
  }
#pragma unroll
  for (int n = 0; n < 2; ++n) {
    s[n][0] = c[n][0];
    s[n][1] = c[n][1];
  }
}

// o += P V over a subset of the warp's 16 keys, for row lane / 4 of rows
// 0-7, where the row takes part: P (the weights in warp_scores_rows8's
// layout) times the V rows of the keys whose bit is set in `keys` (bit j:
// key j; the others are zeroed in the V fragments), formed afresh and added
// to o only when `row_takes` (o[d][e]: column 8 d + 2 (lane % 4) + e). So a
// row never accumulates a product with a value row outside `keys`, nor any
// product when it does not take part: a select, never a multiplication by a
// zero weight (0 x inf is NaN). P is split into P_hi + P_lo, each rounded to
// T (two mma): the weights keep about 16 bits (bf16) or 22 (f16), not the 8
// or 11 of one rounding. `v`: the first of the 16 keys' rows.
template <typename T, int kDim, int kStride>
__device__ __forceinline__ void warp_pv_rows8(float (&o)[kDim / 8][2], const float (&p)[2][2], const T* v,
                                              uint32_t keys, bool row_takes) {
  const int lane = threadIdx.x % 32;
  const int quad = lane % 4;
  // B fragments hold keys 2 quad, +1 (b[0], b[2]) and 8 + 2 quad, +1 (b[1], b[3]).
  auto half_mask = [&](int key) {
    return ((keys >> key) & 1u ? 0x0000ffffu : 0u) | ((keys >> (key + 1)) & 1u ? 0xffff0000u : 0u);
  };
  const uint32_t z0 = half_mask(2 * quad);
  const uint32_t z1 = half_mask(8 + 2 * quad);
  uint32_t hi[4] = {pack2<T>(p[0][0], p[0][1]), 0u, pack2<T>(p[1][0], p[1][1]), 0u};
  uint32_t lo[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int n = 0; n < 2; ++n) {
    float h0, h1;
    unpack2<T>(hi[2 * n], h0, h1);
    lo[2 * n] = pack2<T>(p[n][0] - h0, p[n][1] - h1);
  }
#pragma unroll
  for (int d = 0; d < kDim / 8; d += 2) {
    // transposed matrices: keys 0-7 / 8-15 x columns 8 d..8 d + 7, then 8 (d + 1)..
    uint32_t b[4];
    ldmatrix_x4_trans(b, v + (lane % 16) * kStride + d * 8 + (lane / 16) * 8);
    b[0] &= z0;
    b[1] &= z1;
    b[2] &= z0;
    b[3] &= z1;
    float c0[4] = {}, c1[4] = {};
    mma_16816<T>(c0, hi, b[0], b[1]);
    mma_16816<T>(c0, lo, b[0], b[1]);
    mma_16816<T>(c1, hi, b[2], b[3]);
    mma_16816<T>(c1, lo, b[2], b[3]);
    if (row_takes) {
      o[d][0] += c0[0];
      o[d][1] += c0[1];
      o[d + 1][0] += c1[0];
      o[d + 1][1] += c1[1];
    }
  }
}

// ------------------------------------- held key fragments (text_guided_select)
// Added for text_guided_select's score kernel, whose warps keep their keys'
// fragments in registers while many 16-row query tiles stream past them.

// Copies 8 bytes (8-byte aligned addresses) from global to shared memory
// without blocking, through L1 (cp.async.ca); with `valid` false writes 8
// zero bytes and reads nothing (`src` must still be a valid address).
__device__ __forceinline__ void cp_async_8(void* dst, const void* src, bool valid) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  const int n = valid ? 8 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(s), "l"(src), "r"(n));
}

// The B fragments (mma_16816's b0, b1) of a warp's kNTiles x 8 keys (kNTiles
// even) for every 16-column step of kDim: `k` points at the warp's first key
// of a [keys][kStride] tile. The same ldmatrix as warp_scores', all steps at
// once: held in registers (kDim / 4 x kNTiles / 2 of them) they serve any
// number of query tiles (warp_scores_b).
template <typename T, int kNTiles, int kDim, int kStride>
__device__ __forceinline__ void load_b_fragments(uint32_t (&b)[kDim / 16][kNTiles][2], const T* k) {
  static_assert(kNTiles % 2 == 0 && kDim % 16 == 0, "whole 16 x 16 steps");
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int kk = 0; kk < kDim / 16; ++kk) {
#pragma unroll
    for (int n = 0; n < kNTiles; n += 2) {
      // matrices: keys 0-7 x dims 0-7, 8-15; keys 8-15 x dims 0-7, 8-15
      uint32_t r[4];
      ldmatrix_x4(r, k + (n * 8 + lane % 8 + (lane / 16) * 8) * kStride + kk * 16 + ((lane / 8) % 2) * 8);
      b[kk][n][0] = r[0];
      b[kk][n][1] = r[1];
      b[kk][n + 1][0] = r[2];
      b[kk][n + 1][1] = r[3];
    }
  }
}

// A warp's scores S = Q K^T for kMTiles x 16 query rows (`q` points at the
// warp's first row of a [rows][kStride] tile) against the keys whose B
// fragments `b` holds (load_b_fragments). s[m][n] is accumulator tile
// (m, n); it is overwritten. Each step reads only Q from shared memory.
template <typename T, int kMTiles, int kNTiles, int kDim, int kStride>
__device__ __forceinline__ void warp_scores_b(float (&s)[kMTiles][kNTiles][4], const T* q,
                                              const uint32_t (&b)[kDim / 16][kNTiles][2]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[m][n][e] = 0.f;
    }
  }
#pragma unroll
  for (int kk = 0; kk < kDim / 16; ++kk) {
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
      uint32_t a[4];
      ldmatrix_x4(a, q + (m * 16 + lane % 16) * kStride + kk * 16 + (lane / 16) * 8);
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) mma_16816<T>(s[m][n], a, b[kk][n][0], b[kk][n][1]);
    }
  }
}

// -------------------------------------------------------- online softmax

// Max over aligned groups of `kWidth` lanes (a power of two), NaN ignored;
// every lane of the group ends with it.
template <int kWidth>
__device__ __forceinline__ float group_max(float x) {
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// The running softmax state of one row: max `m` and this lane's
// share `l` of the sum of weights relative to it (the row's sum is the
// group_sum over its lanes, taken once at the end).
struct RowState {
  float m;
  float l;
};

__device__ __forceinline__ RowState empty_row_state() { return {-CUDART_INF_F, 0.f}; }

// One step of a row's online softmax. The row's new scores are spread over
// the `kLanes` lanes of an aligned group, `N` per lane in `s` (masked ones
// -inf). Replaces `s` by the weights relative to the new max, updates the
// state and returns the factor by which the row's accumulators must be
// rescaled before the new weights are added.
template <int kLanes, int N>
__device__ __forceinline__ float online_softmax_step(RowState& st, float (&s)[N]) {
  float mx = st.m;
#pragma unroll
  for (int j = 0; j < N; ++j) mx = fmaxf(mx, s[j]);
  mx = group_max<kLanes>(mx);
  const float alpha = softmax_weight(st.m, mx);  // 0 from an empty state
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    s[j] = softmax_weight(s[j], mx);
    sum += s[j];
  }
  st.l = st.l * alpha + sum;
  st.m = mx;
  return alpha;
}

}  // namespace attn
}  // namespace foveal
