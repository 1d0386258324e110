// text_guided_select: FocusLLaVA's text-guided sampler (SPEC "FocusLLaVA /
// text_guided_select"; the math is restated in the Rust module
// foveal::text_guided_select, the design in docs/ops/text_guided_select.md).
//
// The attention A is never stored. Four kernels:
// 1. lse_partial: one block per (chunk of 128 visual tokens, split of the text
//    tokens, row), one thread per visual token. For each text token j and KV
//    head, the query heads of the group (8 at a time) are staged in shared
//    memory and each thread forms its key's logits with one read of the key
//    per group chunk; a warp then a fixed-order block combine give each
//    (chunk, head, j) its running max and sum of exponentials.
// 2. lse_combine: per (row, head, text token), the chunks combined in order:
//    the max and the ln of the sum of exponentials over the row's visual
//    tokens (split-K), kept apart so that a log-probability is formed as
//    (logit - max) - ln sum, without rounding max + ln sum at the logits' size.
// 3. scores_partial: the same blocks recompute the logits and accumulate, per
//    visual token, sum_j exp(max_h (logit - lse)) over their text split.
// 4. select: one block per row sums the splits in order, divides by t_len
//    (S), quantises S to 32.32 fixed point so that every cumulative sum is an
//    exact integer, finds the smallest top-k whose sum reaches the threshold
//    by a most-significant-digit radix walk over the order-preserving keys
//    (digit histograms of counts and of fixed-point sums), and writes the
//    kept indices ascending (top_select.cuh). Ties to the lower index.
// No float atomics (integer shared-memory atomics only, which commute):
// deterministic.
#include <cub/block/block_reduce.cuh>

#include "top_select.cuh"

namespace foveal {
namespace {

constexpr int kKeys = FOVEAL_TGS_KEYS_PER_BLOCK;
constexpr int kWarps = kKeys / 32;
constexpr int kChunk = 8;  // query heads staged at once
constexpr int kMaxD = FOVEAL_TGS_MAX_HEAD_DIM;
constexpr int kSelectThreads = 512;
constexpr int kCombineThreads = 256;

// S in 32.32 fixed point (the CPU reference's `quantize`): NaN and values
// <= 0 give 0, values are capped at 2.
__device__ __forceinline__ unsigned long long quantize(float s) {
  return s > 0.0f ? static_cast<unsigned long long>(static_cast<double>(fminf(s, 2.0f)) * 4294967296.0) : 0ull;
}

// Text tokens [j0, j1) of split js of a row with t valid ones.
__device__ __forceinline__ void text_range(const foveal_text_guided_select_params& p, int js, int t, int& j0, int& j1) {
  const int per = ceil_div(p.text, p.text_splits);
  j0 = js * per;
  j1 = min(j0 + per, t);
}

// Stages the query heads h0..h0+gc of text token j as floats.
template <typename T>
__device__ __forceinline__ void stage_q(const foveal_text_guided_select_params& p, int b, int j, int h0, int gc,
                                        float (*q_s)[kMaxD]) {
  const T* q = static_cast<const T*>(p.q) + b * p.q_stride_b + static_cast<int64_t>(j) * p.q_stride_t;
  for (int idx = threadIdx.x; idx < gc * p.head_dim; idx += kKeys) {
    const int g = idx / p.head_dim;
    const int d = idx - g * p.head_dim;
    q_s[g][d] = to_float(q[(h0 + g) * p.q_stride_h + d]);
  }
}

// acc[g] = q_s[g] . k_row for g < gc (one read of the key for the chunk).
template <typename T>
__device__ __forceinline__ void group_dots(const T* k_row, const float (*q_s)[kMaxD], int head_dim, int gc,
                                           float (&acc)[kChunk]) {
  constexpr int V = Vec16<T>::kElems;
#pragma unroll
  for (int g = 0; g < kChunk; ++g) acc[g] = 0.0f;
  for (int d = 0; d < head_dim; d += V) {
    float kf[V];
    load16_as_float(k_row + d, kf);
#pragma unroll
    for (int g = 0; g < kChunk; ++g) {
      if (g < gc) {
#pragma unroll
        for (int e = 0; e < V; ++e) acc[g] = fmaf(q_s[g][d + e], kf[e], acc[g]);
      }
    }
  }
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

template <typename T>
__global__ void __launch_bounds__(kKeys) lse_partial_kernel(const foveal_text_guided_select_params p) {
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
  const int key_chunks = ceil_div(p.visual, kKeys);
  const T* k_base = static_cast<const T*>(p.k) + b * p.k_stride_b + static_cast<int64_t>(valid ? i : 0) * p.k_stride_n;
  for (int j = j0; j < j1; ++j) {
    for (int hk = 0; hk < p.kv_heads; ++hk) {
      for (int h0 = hk * group; h0 < (hk + 1) * group; h0 += kChunk) {
        const int gc = min(kChunk, (hk + 1) * group - h0);
        __syncthreads();
        stage_q<T>(p, b, j, h0, gc, q_s);
        __syncthreads();
        float acc[kChunk];
        if (valid) group_dots<T>(k_base + hk * p.k_stride_h, q_s, p.head_dim, gc, acc);
#pragma unroll
        for (int g = 0; g < kChunk; ++g) {
          if (g < gc) {
            const float x = valid ? acc[g] * p.scale : -CUDART_INF_F;
            const float m = warp_max(x);
            const float l = group_sum<32>(softmax_weight(x, m));
            if (lane == 0) {
              red_m[warp][g] = m;
              red_l[warp][g] = l;
            }
          }
        }
        __syncthreads();
        if (threadIdx.x < gc) {
          const int g = threadIdx.x;
          float m;
          float l;
          merge_max_sum(&red_m[0][g], &red_l[0][g], kWarps, kChunk, m, l);
          float* out = p.lse_partial + ((((static_cast<int64_t>(b) * key_chunks + chunk) * p.q_heads + h0 + g) * p.text + j) * 2);
          out[0] = m;
          out[1] = l;
        }
      }
    }
  }
}

__global__ void __launch_bounds__(kCombineThreads) lse_combine_kernel(const foveal_text_guided_select_params p) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kCombineThreads + threadIdx.x;
  if (idx >= static_cast<int64_t>(p.batch) * p.q_heads * p.text) return;
  const int j = static_cast<int>(idx % p.text);
  const int h = static_cast<int>((idx / p.text) % p.q_heads);
  const int b = static_cast<int>(idx / (static_cast<int64_t>(p.text) * p.q_heads));
  const int n = p.n_len[b];
  if (j >= p.t_len[b] || n == 0) return;
  const int key_chunks = ceil_div(p.visual, kKeys);
  const int chunks = ceil_div(n, kKeys);
  const float* part = p.lse_partial + (((static_cast<int64_t>(b) * key_chunks) * p.q_heads + h) * p.text + j) * 2;
  const int64_t chunk_stride = static_cast<int64_t>(p.q_heads) * p.text * 2;
  float m;
  float l;
  merge_max_sum(part, part + 1, chunks, chunk_stride, m, l);
  p.lse[2 * idx] = m;
  p.lse[2 * idx + 1] = logf(l);
}

template <typename T>
__global__ void __launch_bounds__(kKeys) scores_partial_kernel(const foveal_text_guided_select_params p) {
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
  const T* k_base = static_cast<const T*>(p.k) + b * p.k_stride_b + static_cast<int64_t>(valid ? i : 0) * p.k_stride_n;
  float s = 0.0f;
  for (int j = j0; j < j1; ++j) {
    float best = -CUDART_INF_F;
    for (int hk = 0; hk < p.kv_heads; ++hk) {
      for (int h0 = hk * group; h0 < (hk + 1) * group; h0 += kChunk) {
        const int gc = min(kChunk, (hk + 1) * group - h0);
        __syncthreads();
        stage_q<T>(p, b, j, h0, gc, q_s);
        if (threadIdx.x < 2 * gc) {
          const int g = threadIdx.x / 2;
          lse_s[g][threadIdx.x % 2] = p.lse[((static_cast<int64_t>(b) * p.q_heads + h0 + g) * p.text + j) * 2 + threadIdx.x % 2];
        }
        __syncthreads();
        if (valid) {
          float acc[kChunk];
          group_dots<T>(k_base + hk * p.k_stride_h, q_s, p.head_dim, gc, acc);
#pragma unroll
          for (int g = 0; g < kChunk; ++g) {
            if (g < gc) best = fmaxf(best, softmax_log_prob(acc[g] * p.scale, lse_s[g][0], lse_s[g][1]));
          }
        }
      }
    }
    s += expf(best);
  }
  if (valid) p.s_partial[(static_cast<int64_t>(b) * p.text_splits + js) * p.visual + i] = s;
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
      if (threadIdx.x == 0) {
        unsigned long long acc = sh_acc;
        int above = sh_above;
        int d = 255;
        while (d > 0 && acc + hist_sum[d] < sh_need) {
          acc += hist_sum[d];
          above += hist_count[d];
          --d;
        }
        sh_acc = acc;
        sh_above = above;
        sh_prefix = prefix | (static_cast<uint32_t>(d) << shift);
        if (shift == 0) {
          // Every key equal to the pivot has the same fixed-point value.
          const unsigned long long q = hist_sum[d] / static_cast<unsigned long long>(max(hist_count[d], 1));
          const unsigned long long missing = sh_need - acc;
          sh_take = q == 0 ? hist_count[d] : static_cast<int>(min((missing + q - 1) / q, static_cast<unsigned long long>(hist_count[d])));
        }
      }
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

}  // namespace
}  // namespace foveal

extern "C" int foveal_text_guided_select(const foveal_text_guided_select_params* p, foveal_stream_t stream) {
  if (p->batch == 0) return 0;
  if (p->head_dim > foveal::kMaxD || p->kv_heads < 1 || p->q_heads % p->kv_heads != 0 || p->text_splits < 1)
    return FOVEAL_ERR_UNSUPPORTED;
  const int key_chunks = foveal::ceil_div(p->visual, foveal::kKeys);
  if (key_chunks > 0 && p->text > 0) {
    const dim3 grid(key_chunks, p->text_splits, p->batch);
    const int64_t pairs = static_cast<int64_t>(p->batch) * p->q_heads * p->text;
    const int combine_blocks = static_cast<int>((pairs + foveal::kCombineThreads - 1) / foveal::kCombineThreads);
    FOVEAL_DISPATCH_DTYPE(p->dtype, T, {
      foveal::lse_partial_kernel<T><<<grid, foveal::kKeys, 0, stream>>>(*p);
      foveal::lse_combine_kernel<<<combine_blocks, foveal::kCombineThreads, 0, stream>>>(*p);
      foveal::scores_partial_kernel<T><<<grid, foveal::kKeys, 0, stream>>>(*p);
    });
  }
  foveal::select_kernel<<<p->batch, foveal::kSelectThreads, 0, stream>>>(*p);
  return foveal::launch_status();
}
