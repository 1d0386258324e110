// glance_fusion: Glance2Gaze's Glance Fusion (SPEC "Glance2Gaze /
// glance_fusion"; the contract is restated in the Rust module
// foveal::glance_fusion, the design in docs/ops/glance_fusion.md).
//
//   g[s, n] = mean_m (vq[s, n] . e[s, m]) / sqrt(dt)
//           = (vq[s, n] . mean_m e[s, m]) / sqrt(dt)      (linearity, exact)
//   w[s, n] = softmax over s of g[s, n]
//   out[n]  = sum_s w[s, n] vq[s, n]
//
// Two kernels, both memory-bound:
//  1. instruction_mean: e_mean[s, b] = (sum_{m < M_b} e[s, b, m]) / M_b in
//     f32, into the workspace. A block owns 32 16-byte columns of one (layer,
//     row); its 16 thread rows sum interleaved instruction tokens (several
//     loads in flight each), then the 16 partial sums are added in order.
//  2. glance_fuse: one pass over vq. A block owns one row b and every
//     `tiles`-th token of it; thread t owns 16-byte column(s) t (+ threads)
//     of dt for every layer. Per token it loads its columns of all S layers
//     (the next token's loads are issued before this one's reduction), takes
//     S partial dot products with its slice of e_mean (kept in shared
//     memory: each thread reads back only what it wrote, so no barrier),
//     reduces them over the block (warp butterflies, one barrier, a fixed
//     order), takes the softmax over s in registers (lane s of every warp
//     holds layer s), and writes its columns of out from the values still in
//     registers: vq is read from memory once.
// Every reduction has a fixed order, so results are bit-identical run to run.
// Non-finite scores follow IEEE arithmetic, as torch.softmax does: a -inf
// score gives its layer weight 0 (while another score is finite); a NaN or
// +inf score, or every score -inf, makes the token's weights NaN.
#include "common.cuh"

namespace foveal {
namespace {

constexpr int kMeanLanes = 32;   // columns of one instruction_mean block
constexpr int kMeanGroups = 16;  // instruction tokens summed side by side
constexpr int kMeanUnroll = 4;   // loads in flight per thread of instruction_mean
constexpr int kMaxThreads = 512;  // threads of a glance_fuse block, at most
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr unsigned kFull = 0xffffffffu;

// How a thread reads and writes one column: kVec consecutive elements of dt,
// as one 16-byte access (kWide: every base and stride aligned, dt a multiple
// of kVec) or element by element (any alignment; the last column of a dt
// that is not a multiple of kVec has `count` < kVec elements, the rest read
// as 0 and never written). Either way the column lives in one uint4.
template <typename T, bool kWide>
struct Access {
  static constexpr int kVec = Vec16<T>::kElems;
  static __device__ __forceinline__ uint4 load(const T* p, int count) {
    if constexpr (kWide) {
      return __ldg(reinterpret_cast<const uint4*>(p));
    } else {
      uint4 r = make_uint4(0, 0, 0, 0);
      T* x = reinterpret_cast<T*>(&r);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        if (i < count) x[i] = __ldg(p + i);
      }
      return r;
    }
  }
  static __device__ __forceinline__ void widen(const uint4& r, float (&f)[kVec]) {
    const T* x = reinterpret_cast<const T*>(&r);
#pragma unroll
    for (int i = 0; i < kVec; ++i) f[i] = to_float(x[i]);
  }
  static __device__ __forceinline__ void store(T* p, const float (&f)[kVec], int count) {
    if constexpr (kWide) {
      uint4 r;
      T* x = reinterpret_cast<T*>(&r);
#pragma unroll
      for (int i = 0; i < kVec; ++i) x[i] = from_float<T>(f[i]);
      *reinterpret_cast<uint4*>(p) = r;
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        if (i < count) p[i] = from_float<T>(f[i]);
      }
    }
  }
};

// Columns of dt (the last one may be partial) and the padded row width of
// e_mean (its padding is 0).
template <typename T>
__device__ __host__ __forceinline__ int columns(int dim) {
  return ceil_div(dim, Vec16<T>::kElems);
}

template <typename T, bool kWide>
__global__ void __launch_bounds__(kMeanLanes* kMeanGroups)
    instruction_mean_kernel(const foveal_glance_fusion_params p) {
  using A = Access<T, kWide>;
  constexpr int kVec = A::kVec;
  __shared__ float part[kMeanGroups][kVec][kMeanLanes];
  const int lane = threadIdx.x;
  const int group = threadIdx.y;
  const int b = blockIdx.y;
  const int s = blockIdx.z;
  const int cols = columns<T>(p.dim);
  const int col = blockIdx.x * kMeanLanes + lane;
  const int count = min(kVec, p.dim - col * kVec);
  const int m_len = p.m_len[b];

  float acc[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) acc[j] = 0.0f;
  if (col < cols) {
    const T* e = static_cast<const T*>(p.e) + s * p.e_stride_s + b * p.e_stride_b + col * kVec;
    const int64_t step = static_cast<int64_t>(kMeanGroups) * p.e_stride_m;
    int m = group;
    for (; m + (kMeanUnroll - 1) * kMeanGroups < m_len; m += kMeanUnroll * kMeanGroups) {
      uint4 raw[kMeanUnroll];
      const T* row = e + m * p.e_stride_m;
#pragma unroll
      for (int u = 0; u < kMeanUnroll; ++u) raw[u] = A::load(row + u * step, count);
#pragma unroll
      for (int u = 0; u < kMeanUnroll; ++u) {
        float f[kVec];
        A::widen(raw[u], f);
#pragma unroll
        for (int j = 0; j < kVec; ++j) acc[j] += f[j];
      }
    }
    for (; m < m_len; m += kMeanGroups) {
      float f[kVec];
      A::widen(A::load(e + m * p.e_stride_m, count), f);
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc[j] += f[j];
    }
  }
#pragma unroll
  for (int j = 0; j < kVec; ++j) part[group][j][lane] = acc[j];
  __syncthreads();
  if (group != 0 || col >= cols) return;
  const float n = static_cast<float>(m_len);
  float mean[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    float sum = 0.0f;
#pragma unroll
    for (int g = 0; g < kMeanGroups; ++g) sum += part[g][j][lane];
    mean[j] = __fdiv_rn(sum, n);
  }
  float4* out = reinterpret_cast<float4*>(p.e_mean + ((static_cast<int64_t>(s) * p.batch + b) * cols + col) * kVec);
#pragma unroll
  for (int q = 0; q < kVec / 4; ++q) out[q] = make_float4(mean[4 * q], mean[4 * q + 1], mean[4 * q + 2], mean[4 * q + 3]);
}

// Loads this thread's columns of token n of every layer (`vq`: the row's
// base). Columns past dt read as 0 (and their e_mean slots hold 0), so the
// dot products take no per-thread branch.
template <typename A, int kS, int kChunks, typename T>
__device__ __forceinline__ void load_token(uint4 (&r)[kS][kChunks], const T* vq, const foveal_glance_fusion_params& p,
                                           int n, int t, int threads, int cols) {
#pragma unroll
  for (int s = 0; s < kS; ++s) {
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      const int col = t + k * threads;
      if (s < p.layers) {
        r[s][k] = col < cols ? A::load(vq + s * p.vq_stride_s + n * p.vq_stride_n + col * A::kVec, p.dim - col * A::kVec)
                             : make_uint4(0, 0, 0, 0);
      }
    }
  }
}

// kS: a bound on the layers (the runtime count is p.layers <= kS; kS is 1,
// 2, 4 or 8, so it divides the warp); kChunks: columns per thread and layer
// (column t + k * threads). With S <= 4 and one column a thread, two blocks
// of 512 threads share an SM (at most 64 registers each).
template <typename T, bool kWide, int kS, int kChunks>
__global__ void __launch_bounds__(kMaxThreads, kS <= 4 && kChunks == 1 ? 2 : 1)
    glance_fuse_kernel(const foveal_glance_fusion_params p) {
  using A = Access<T, kWide>;
  constexpr int kVec = A::kVec;
  constexpr int kParts = kVec / 4;  // float4s of e_mean per column
  // The next token's columns are loaded while this one is reduced, where
  // the registers allow it (at most 32 registers of loaded data per token).
  constexpr bool kPrefetch = kS * kChunks * 4 <= 32;

  // This thread's slice of e_mean, [layer][chunk][part][thread] float4s:
  // each thread reads back only what it wrote (no barrier), conflict-free.
  extern __shared__ float4 mean[];
  __shared__ float red[2][kMaxWarps * kS];

  const int S = p.layers;
  const int b = blockIdx.y;
  const int t = threadIdx.x;
  const int threads = blockDim.x;
  const int lane = t % 32;
  const int warp = t / 32;
  const int warps = threads / 32;
  const int cols = columns<T>(p.dim);
  const int n_len = p.n_len[b];

  const T* vq = static_cast<const T*>(p.vq) + b * p.vq_stride_b;

  int n = blockIdx.x;
  uint4 cur[kS][kChunks];
  if (kPrefetch && n < n_len) load_token<A, kS, kChunks>(cur, vq, p, n, t, threads, cols);

  // The mean instruction vectors (written by instruction_mean earlier on the stream).
#pragma unroll
  for (int s = 0; s < kS; ++s) {
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      const int col = t + k * threads;
      if (s < S) {
        const float4* src =
            reinterpret_cast<const float4*>(p.e_mean + ((static_cast<int64_t>(s) * p.batch + b) * cols + col) * kVec);
#pragma unroll
        for (int q = 0; q < kParts; ++q) {
          mean[((s * kChunks + k) * kParts + q) * threads + t] = col < cols ? src[q] : make_float4(0, 0, 0, 0);
        }
      }
    }
  }

  for (int stage = 0; n < p.tokens; n += p.tiles, stage ^= 1) {
    T* out = static_cast<T*>(p.out) + b * p.out_stride_b + n * p.out_stride_n;
    float* weights = p.weights ? p.weights + b * p.weights_stride_b + n * p.weights_stride_n : nullptr;
    if (n >= n_len) {  // padding: zeros (a block-uniform branch)
      float zero[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) zero[j] = 0.0f;
#pragma unroll
      for (int k = 0; k < kChunks; ++k) {
        const int col = t + k * threads;
        if (col < cols) A::store(out + col * kVec, zero, p.dim - col * kVec);
      }
      if (weights && t < S) weights[t] = 0.0f;
      continue;
    }
    if (!kPrefetch) load_token<A, kS, kChunks>(cur, vq, p, n, t, threads, cols);
    const int next = n + p.tiles;
    const bool fetch = kPrefetch && next < n_len;
    uint4 nxt[kS][kChunks];
    if (fetch) load_token<A, kS, kChunks>(nxt, vq, p, next, t, threads, cols);

    // Partial dot products of this thread's columns, one per layer.
    float dot[kS];
#pragma unroll
    for (int s = 0; s < kS; ++s) {
      dot[s] = 0.0f;
#pragma unroll
      for (int k = 0; k < kChunks; ++k) {
        if (s < S) {  // columns past dt hold zeros
          float v[kVec];
          A::widen(cur[s][k], v);
#pragma unroll
          for (int q = 0; q < kParts; ++q) {
            const float4 e = mean[((s * kChunks + k) * kParts + q) * threads + t];
            dot[s] = fmaf(v[4 * q], e.x, dot[s]);
            dot[s] = fmaf(v[4 * q + 1], e.y, dot[s]);
            dot[s] = fmaf(v[4 * q + 2], e.z, dot[s]);
            dot[s] = fmaf(v[4 * q + 3], e.w, dot[s]);
          }
        }
      }
      dot[s] = group_sum<32>(dot[s]);
    }
    if (lane == 0) {
#pragma unroll
      for (int s = 0; s < kS; ++s) red[stage][warp * kS + s] = dot[s];
    }
    // One barrier per token: `red` alternates between two buffers, and a
    // thread reads buffer `stage` before it reaches the next token's barrier.
    __syncthreads();

    // Lane i adds the warps' partials of layer i % kS (entries i, i + 32, ...
    // of [warp][layer]), then the lanes of that layer are summed.
    float g = 0.0f;
    for (int i = lane; i < warps * kS; i += 32) g += red[stage][i];
#pragma unroll
    for (int off = 16; off >= kS; off /= 2) g += __shfl_xor_sync(kFull, g, off);
    g *= p.scale;
    // Softmax over the kS lanes of a group (lanes of layers >= S take no
    // part): max, sum of exp(g - max), then w = exp((g - max) - ln(sum)).
    const bool layer = lane % kS < S;
    float mx = layer ? g : -CUDART_INF_F;
#pragma unroll
    for (int off = kS / 2; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, off));
    float sum = layer ? expf(g - mx) : 0.0f;
#pragma unroll
    for (int off = kS / 2; off > 0; off /= 2) sum += __shfl_xor_sync(kFull, sum, off);
    const float w_lane = expf((g - mx) - logf(sum));
    float w[kS];
#pragma unroll
    for (int s = 0; s < kS; ++s) w[s] = __shfl_sync(kFull, w_lane, s);

    // out = sum_s w[s] vq[s] from the registers. The sums start at -0, the
    // identity of IEEE addition, so one layer gives out = vq bit for bit.
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      const int col = t + k * threads;
      if (col < cols) {
        float o[kVec];
#pragma unroll
        for (int j = 0; j < kVec; ++j) o[j] = -0.0f;
#pragma unroll
        for (int s = 0; s < kS; ++s) {
          if (s < S) {
            float v[kVec];
            A::widen(cur[s][k], v);
#pragma unroll
            for (int j = 0; j < kVec; ++j) o[j] = fmaf(w[s], v[j], o[j]);
          }
        }
        A::store(out + col * kVec, o, p.dim - col * kVec);
      }
    }
    if (weights && t < S) weights[t] = w_lane;  // lane t holds layer t

    if (fetch) {
#pragma unroll
      for (int s = 0; s < kS; ++s) {
#pragma unroll
        for (int k = 0; k < kChunks; ++k) cur[s][k] = nxt[s][k];
      }
    }
  }
}

template <typename T, bool kWide, int kS, int kChunks>
int launch_fuse(const foveal_glance_fusion_params& p, int threads, cudaStream_t stream) {
  auto kernel = glance_fuse_kernel<T, kWide, kS, kChunks>;
  const size_t smem = static_cast<size_t>(p.layers) * kChunks * threads * Vec16<T>::kElems * sizeof(float);
  if (smem > 48 * 1024) {
    cudaFuncAttributes attr;
    int device = 0, optin = 0;
    if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess || cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
      return launch_status();
    }
    if (smem + attr.sharedSizeBytes > static_cast<size_t>(optin)) return FOVEAL_ERR_UNSUPPORTED;
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return static_cast<int>(e);
  }
  kernel<<<dim3(p.tiles, p.batch), threads, smem, stream>>>(p);
  return launch_status();
}

template <typename T, bool kWide, int kChunks>
int launch_layers(const foveal_glance_fusion_params& p, int threads, cudaStream_t stream) {
  if (p.layers <= 1) return launch_fuse<T, kWide, 1, kChunks>(p, threads, stream);
  if (p.layers <= 2) return launch_fuse<T, kWide, 2, kChunks>(p, threads, stream);
  if (p.layers <= 4) return launch_fuse<T, kWide, 4, kChunks>(p, threads, stream);
  return launch_fuse<T, kWide, FOVEAL_GLANCE_MAX_LAYERS, kChunks>(p, threads, stream);
}

template <typename T, bool kWide>
int launch_glance(const foveal_glance_fusion_params& p, cudaStream_t stream) {
  const int cols = columns<T>(p.dim);
  const dim3 mean_grid(ceil_div(cols, kMeanLanes), p.batch, p.layers);
  instruction_mean_kernel<T, kWide><<<mean_grid, dim3(kMeanLanes, kMeanGroups), 0, stream>>>(p);
  const int status = launch_status();
  if (status != 0) return status;
  // One column a thread covers dt <= 4,096 of a 2-byte type in 512 threads;
  // f32 past dt = 2,048 takes two.
  if constexpr (sizeof(T) == 4) {
    if (cols > kMaxThreads) return launch_layers<T, kWide, 2>(p, ceil_div(ceil_div(cols, 2), 32) * 32, stream);
  }
  return launch_layers<T, kWide, 1>(p, ceil_div(cols, 32) * 32, stream);
}

template <typename T>
int launch_glance_fusion(const foveal_glance_fusion_params& p, cudaStream_t stream) {
  return p.vec16 ? launch_glance<T, true>(p, stream) : launch_glance<T, false>(p, stream);
}

}  // namespace
}  // namespace foveal

extern "C" int foveal_glance_fusion(const foveal_glance_fusion_params* p, foveal_stream_t stream) {
  if (p->batch == 0 || p->tokens == 0) return 0;
  if (p->layers < 1 || p->layers > FOVEAL_GLANCE_MAX_LAYERS || p->dim < 1 || p->dim > FOVEAL_GLANCE_MAX_DIM ||
      p->instr < 1 || p->tiles < 1) {
    return FOVEAL_ERR_UNSUPPORTED;
  }
  FOVEAL_DISPATCH_DTYPE(p->dtype, T, return foveal::launch_glance_fusion<T>(*p, stream));
  return 0;
}
