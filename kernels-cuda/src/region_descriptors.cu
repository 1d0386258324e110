// region_descriptors: the mean key of each Gaze Attention region, per KV head
// (SPEC "Gaze Attention / region_descriptors"; the contract is restated in
// the Rust module foveal::region_descriptors, the design in
// docs/ops/region_descriptors.md).
//
// Memory-bound: every key of every region in the range is read once. One
// thread per (region, KV head, 16-byte column of the head dim), blocks of 64
// threads (one region's 4 heads x 16 columns at Qwen2.5-VL-7B's bf16 D 128:
// 3.5 blocks a SM at batch 1 and 16K tokens): a warp covers two or more
// heads' rows of one token, so each load instruction reads whole 32-byte
// sectors, whichever the cache's memory order. A thread walks its region's
// tokens in list order kUnroll at a time: it issues the batch's kUnroll
// 16-byte key loads, then the next batch's positions (so that a key load
// never waits for its position), then adds the keys in list order in f32:
// the same additions, in the same order, as the CPU reference (no FMA
// contraction, IEEE division), so the descriptors are bit-identical to it.
#include "common.cuh"

namespace foveal {
namespace {

constexpr int kThreads = FOVEAL_REGION_DESCRIPTORS_THREADS;
constexpr int kUnroll = 16;  // 16-byte key loads in flight per thread

template <typename T>
__global__ void __launch_bounds__(kThreads) region_descriptors_kernel(const foveal_region_descriptors_params p) {
  constexpr int E = Vec16<T>::kElems;
  const int cols = p.head_dim / E;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t per_region = static_cast<int64_t>(p.kv_heads) * cols;
  const int r = p.r_begin + static_cast<int>(idx / per_region);
  const int b = blockIdx.y;
  if (r >= p.r_end || r >= p.region_count[b]) return;
  const int h = static_cast<int>((idx % per_region) / cols);
  const int c = static_cast<int>(idx % cols);

  const int64_t slot = static_cast<int64_t>(b) * p.r_max + r;
  const int len = p.region_len[slot];
  const int32_t* pos = p.region_pos + slot * p.p_max;
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride_b + h * p.k_stride_h + c * E;

  float acc[E];
#pragma unroll
  for (int e = 0; e < E; ++e) acc[e] = 0.0f;
  if (len > 0) {
    // The positions of tokens t0 .. t0 + kUnroll - 1; past the region's end,
    // its last token again (a valid address whose key is loaded and not added).
    int next[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) next[u] = pos[min(u, len - 1)];
    for (int t0 = 0; t0 < len; t0 += kUnroll) {
      RawVec<T, E> key[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) key[u].load(k + static_cast<int64_t>(next[u]) * p.k_stride_s);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) next[u] = pos[min(t0 + kUnroll + u, len - 1)];
      const int n = min(kUnroll, len - t0);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (u < n) {
#pragma unroll
          for (int e = 0; e < E; ++e) acc[e] = __fadd_rn(acc[e], key[u].at(e));
        }
      }
    }
  }
  const float inv = __fdiv_rn(1.0f, static_cast<float>(len));
  float* out = p.desc + b * p.desc_stride_b + h * p.desc_stride_h + r * p.desc_stride_r + c * E;
#pragma unroll
  for (int e = 0; e < E; ++e) out[e] = __fmul_rn(acc[e], inv);
}

}  // namespace
}  // namespace foveal

extern "C" int foveal_region_descriptors(const foveal_region_descriptors_params* p, foveal_stream_t stream) {
  if (p->batch == 0 || p->kv_heads == 0 || p->r_end <= p->r_begin) return 0;
  int status = 0;
  FOVEAL_DISPATCH_DTYPE(p->dtype, T, {
    constexpr int E = foveal::Vec16<T>::kElems;
    if (p->head_dim <= 0 || p->head_dim % E != 0) return FOVEAL_ERR_UNSUPPORTED;
    const int64_t threads = static_cast<int64_t>(p->r_end - p->r_begin) * p->kv_heads * (p->head_dim / E);
    const int64_t blocks = (threads + foveal::kThreads - 1) / foveal::kThreads;
    if (blocks > 0x7fffffff || p->batch > 65535) return FOVEAL_ERR_UNSUPPORTED;
    const dim3 grid(static_cast<unsigned>(blocks), p->batch);
    foveal::region_descriptors_kernel<T><<<grid, foveal::kThreads, 0, stream>>>(*p);
    status = foveal::launch_status();
  });
  return status;
}
