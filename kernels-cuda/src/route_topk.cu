// route_topk: each (row, query, query head)'s k best regions (SPEC "Gaze
// Attention / route_topk"; the contract is restated in the Rust module
// foveal::route_topk, the design in docs/ops/route_topk.md).
//
// Two kernels:
// 1. scores: one block per (row and query, 64 regions, KV head and chunk of
//    up to 4 of its query heads), one thread per region. The chunk's queries
//    are staged in shared memory; each thread reads its descriptor row once
//    for the chunk (16-byte loads) and forms score[r] = q_h . desc[h / G, r]
//    as the CPU reference does: products and sums rounded separately (no FMA
//    contraction), d ascending, so the scores are bit-identical to it. The
//    scores go to the workspace [B, Nq, Hq, r_max].
// 2. select: one block per (row, query, query head) keeps the top
//    min(k, count) by a radix select over order-preserving keys (ties to the
//    lower region id, NaN lowest; top_select.cuh) and writes the ids
//    ascending, then -1 padding. Keys are cached in shared memory for rows of
//    up to kCachedKeys regions and re-read from the workspace for longer ones.
// Integer shared-memory atomics only: deterministic.
#include "top_select.cuh"

namespace foveal {
namespace {

constexpr int kRegions = FOVEAL_ROUTE_REGIONS_PER_BLOCK;
constexpr int kChunk = FOVEAL_ROUTE_HEAD_CHUNK;
constexpr int kMaxD = FOVEAL_ROUTE_MAX_HEAD_DIM;
constexpr int kSelectThreads = 256;
constexpr int kCachedKeys = 4096;

template <typename T>
__global__ void __launch_bounds__(kRegions) scores_kernel(const foveal_route_topk_params p) {
  __shared__ float q_s[kChunk][kMaxD];
  const int b = blockIdx.x / p.queries;
  const int n = blockIdx.x % p.queries;
  const int group = p.q_heads / p.kv_heads;
  const int chunks = ceil_div(group, kChunk);
  const int hk = blockIdx.z / chunks;
  const int h0 = hk * group + (blockIdx.z % chunks) * kChunk;
  const int gc = min(kChunk, (hk + 1) * group - h0);

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride_b + n * p.q_stride_n;
  for (int idx = threadIdx.x; idx < gc * p.head_dim; idx += kRegions) {
    const int g = idx / p.head_dim;
    const int d = idx - g * p.head_dim;
    q_s[g][d] = to_float(q[(h0 + g) * p.q_stride_h + d]);
  }
  __syncthreads();

  const int r = blockIdx.y * kRegions + threadIdx.x;
  if (r >= p.region_count[b]) return;
  const float* row = p.desc + b * p.desc_stride_b + hk * p.desc_stride_h + r * p.desc_stride_r;
  float acc[kChunk];
#pragma unroll
  for (int g = 0; g < kChunk; ++g) acc[g] = 0.0f;
  for (int d = 0; d < p.head_dim; d += 4) {
    const float4 x = __ldg(reinterpret_cast<const float4*>(row + d));
    const float xs[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
    for (int g = 0; g < kChunk; ++g) {
      if (g < gc) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[g] = __fadd_rn(acc[g], __fmul_rn(q_s[g][d + e], xs[e]));
      }
    }
  }
  float* out = p.scores + ((static_cast<int64_t>(b) * p.queries + n) * p.q_heads + h0) * p.r_max + r;
#pragma unroll
  for (int g = 0; g < kChunk; ++g) {
    if (g < gc) out[static_cast<int64_t>(g) * p.r_max] = acc[g];
  }
}

__global__ void __launch_bounds__(kSelectThreads) select_kernel(const foveal_route_topk_params p) {
  using BlockScan = cub::BlockScan<int, kSelectThreads>;
  __shared__ typename BlockScan::TempStorage scan;
  __shared__ uint32_t keys_s[kCachedKeys];
  __shared__ int hist[256];
  __shared__ int sh_take, sh_carry[2];
  __shared__ uint32_t sh_pivot;

  const int64_t list = blockIdx.x;  // (b * Nq + n) * Hq + h
  const int b = static_cast<int>(list / (static_cast<int64_t>(p.queries) * p.q_heads));
  const int count = p.region_count[b];
  const int keep = min(p.k, count);
  const float* s = p.scores + list * p.r_max;
  int32_t* out = p.routes + list * p.k;

  if (keep == count) {
    // Every region of the row (none when it has none).
    for (int j = threadIdx.x; j < count; j += kSelectThreads) out[j] = j;
  } else {
    const bool cached = count <= kCachedKeys;
    if (cached) {
      for (int i = threadIdx.x; i < count; i += kSelectThreads) keys_s[i] = rank_key(s[i]);
    }
    __syncthreads();
    auto key_of = [&](int i) { return cached ? keys_s[i] : rank_key(s[i]); };
    radix_select_nth<kSelectThreads>(count, keep, key_of, hist, &sh_pivot, &sh_take);
    write_kept_ascending<kSelectThreads>(count, false, true, sh_pivot, sh_take, key_of, out, scan, sh_carry);
  }
  for (int j = keep + threadIdx.x; j < p.k; j += kSelectThreads) out[j] = -1;
}

}  // namespace
}  // namespace foveal

extern "C" int foveal_route_topk(const foveal_route_topk_params* p, foveal_stream_t stream) {
  const int64_t lists = static_cast<int64_t>(p->batch) * p->queries * p->q_heads;
  if (lists == 0 || p->k <= 0) return 0;
  if (p->head_dim <= 0 || p->head_dim > foveal::kMaxD || p->head_dim % 4 != 0 || p->kv_heads < 1 ||
      p->q_heads % p->kv_heads != 0 || lists > 0x7fffffff)
    return FOVEAL_ERR_UNSUPPORTED;
  const int group = p->q_heads / p->kv_heads;
  const int64_t head_blocks = static_cast<int64_t>(p->kv_heads) * foveal::ceil_div(group, foveal::kChunk);
  const int region_blocks = foveal::ceil_div(p->r_max, foveal::kRegions);
  const int64_t rows = static_cast<int64_t>(p->batch) * p->queries;
  if (head_blocks > 65535 || region_blocks > 65535) return FOVEAL_ERR_UNSUPPORTED;
  if (region_blocks > 0) {
    const dim3 grid(static_cast<unsigned>(rows), region_blocks, static_cast<unsigned>(head_blocks));
    FOVEAL_DISPATCH_DTYPE(p->dtype, T, (foveal::scores_kernel<T><<<grid, foveal::kRegions, 0, stream>>>(*p)));
  }
  foveal::select_kernel<<<static_cast<unsigned>(lists), foveal::kSelectThreads, 0, stream>>>(*p);
  return foveal::launch_status();
}
