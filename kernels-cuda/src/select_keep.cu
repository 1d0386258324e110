// select_keep: importance logits to the kept visual tokens
// (SPEC "GlimpsePrune / select_keep"; the rule is restated in the Rust module
// foveal::select_keep).
//
// One block per row. The row keeps its top n tokens for the n the rule gives
// (count over the threshold, capped by the ratio, raised to min_keep), ranked
// by logit with ties to the lower index. The n-th largest key is found by a
// most-significant-digit radix select of at most 4 passes over
// order-preserving 32-bit keys (histograms in shared memory, each pass's
// digit found by a warp scan: top_select.cuh); then one ordered pass keeps
// the keys above it and the first `remaining` keys equal to it, and writes
// the kept indices in ascending order with a block scan. Counts and scans are exact,
// so the result is deterministic.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "top_select.cuh"

namespace foveal {
namespace {

constexpr int kSelectThreads = 512;

__global__ void __launch_bounds__(kSelectThreads) select_keep_kernel(const foveal_select_keep_params p) {
  using BlockReduce = cub::BlockReduce<int, kSelectThreads>;
  using BlockScan = cub::BlockScan<int, kSelectThreads>;
  __shared__ union {
    typename BlockReduce::TempStorage reduce;
    typename BlockScan::TempStorage scan;
  } temp;
  __shared__ int hist[256];
  __shared__ int sh_n, sh_remaining, sh_carry[2];
  __shared__ uint32_t sh_prefix;

  const int b = blockIdx.x;
  const int nv = p.nv[b];
  const float* x = p.logits + b * p.logits_stride_b;
  int32_t* out = p.keep_idx + b * p.keep_stride_b;

  // 1. How many pass the threshold, and how many the row keeps.
  int above = 0;
  for (int i = threadIdx.x; i < nv; i += kSelectThreads) above += static_cast<double>(x[i]) > p.threshold_logit;
  above = BlockReduce(temp.reduce).Sum(above);
  if (threadIdx.x == 0) {
    int n = above;
    if (p.has_max_ratio) {
      // floor(r * nv) of the f64 product, no tolerance (foveal::select_keep::ratio_cap).
      const int cap = static_cast<int>(floor(p.max_ratio * static_cast<double>(nv)));
      n = min(n, cap);
    }
    n = max(n, min(p.min_keep, nv));
    sh_n = n;
    sh_remaining = n;
    sh_prefix = 0;
  }
  __syncthreads();
  const int n = sh_n;

  // 2. Radix select of the n-th largest key (only when some, not all, are kept).
  const bool partial = n > 0 && n < nv;
  if (partial) radix_select_nth<kSelectThreads>(nv, n, [&](int i) { return rank_key(x[i]); }, hist, &sh_prefix, &sh_remaining);
  const uint32_t pivot = sh_prefix;     // the n-th largest key
  const int take_equal = sh_remaining;  // how many keys equal to the pivot are kept

  // 3. Ordered pass: keep, and write the kept indices ascending.
  write_kept_ascending<kSelectThreads>(nv, n == nv, partial, pivot, take_equal, [&](int i) { return rank_key(x[i]); },
                                       out, temp.scan, sh_carry);
  for (int j = n + threadIdx.x; j < p.nv_max; j += kSelectThreads) out[j] = -1;
  if (threadIdx.x == 0) p.keep_count[b] = n;
}

}  // namespace
}  // namespace foveal

extern "C" int foveal_select_keep(const foveal_select_keep_params* p, foveal_stream_t stream) {
  if (p->batch == 0) return 0;
  foveal::select_keep_kernel<<<p->batch, foveal::kSelectThreads, 0, stream>>>(*p);
  return foveal::launch_status();
}
