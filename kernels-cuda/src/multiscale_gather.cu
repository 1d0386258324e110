// multiscale_gather: FocusLLaVA's vision-guided sampler after the selector
// (SPEC "FocusLLaVA / Vision-guided sampler"; the contract is restated in the
// Rust module foveal::multiscale_gather).
//
// 1. One block per row: per window the chosen scale (argmax of the logits,
//    ties to the first scale, NaN lowest), its softmax probability and its
//    token count; a block scan (cub) over the windows gives each window's
//    first output slot (exclusive prefix sum, chunks of 256 with a carry) and
//    the row's count. Nothing is read back by the host.
// 2. One launch for the tokens and the padding (docs/ops/multiscale_gather.md):
//    blocks (window, column block, row) pool a window's tokens, one column
//    of channels a thread (16 bytes where the views allow it, else one
//    channel), every pixel of a 4 x 4 window in flight at once; blocks
//    (chunk of slots, column block, row) past the windows zero the slots
//    past the row's count (read on the device) and set their positions to -1.
// Every reduction has a fixed order: deterministic.
#include <cub/block/block_scan.cuh>

#include "common.cuh"

namespace foveal {
namespace {

constexpr int kPlanThreads = 256;
constexpr int kPoolThreads = 64;  // columns of a pool block
constexpr int kUnroll = 16;       // loads in flight per thread: every pixel of a 4 x 4 window
constexpr int kPadSlots = 64;     // slots of a padding block
constexpr int kMaxColumnBlocks = 65535;  // grid.y; the threads stride over further columns

// Tokens of a window of h x w existing pixels at scale (kh, kw).
__device__ __forceinline__ int tokens_of(int h, int w, int kh, int kw) { return ceil_div(h, kh) * ceil_div(w, kw); }

// The window's pixel extent: rows [y0, y1), columns [x0, x1).
struct Window {
  int y0, x0, y1, x1;
};

__device__ __forceinline__ Window window_at(const foveal_multiscale_gather_params& p, int m) {
  const int wins_x = ceil_div(p.width, p.window);
  Window win;
  win.y0 = (m / wins_x) * p.window;
  win.x0 = (m % wins_x) * p.window;
  win.y1 = win.y0 + min(p.window, p.height - win.y0);  // no overflow for any window
  win.x1 = win.x0 + min(p.window, p.width - win.x0);
  return win;
}

__global__ void __launch_bounds__(kPlanThreads) plan_kernel(const foveal_multiscale_gather_params p) {
  using BlockScan = cub::BlockScan<int, kPlanThreads>;
  __shared__ typename BlockScan::TempStorage scan;
  __shared__ int carry;
  const int b = blockIdx.x;
  const int num_windows = ceil_div(p.height, p.window) * ceil_div(p.width, p.window);
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int base = 0; base < num_windows; base += kPlanThreads) {
    const int m = base + threadIdx.x;
    int n = 0;
    if (m < num_windows) {
      const float* z = p.z + b * p.z_stride_b + m * p.z_stride_m;
      // argmax: ties to the first scale; NaN below every number.
      int c = 0;
      float best = z[0];
      for (int s = 1; s < p.num_scales; ++s) {
        const float v = z[s];
        if (!isnan(v) && (isnan(best) || v > best)) {
          best = v;
          c = s;
        }
      }
      float prob = 1.0f;
      if (p.scale_by_prob) {
        // exp(z_c - z_c) / sum_s exp(z_s - z_c), the sum in scale order.
        float sum = 0.0f;
        for (int s = 0; s < p.num_scales; ++s) sum = __fadd_rn(sum, expf(z[s] - best));
        prob = __fdiv_rn(1.0f, sum);
      }
      const Window win = window_at(p, m);
      n = tokens_of(win.y1 - win.y0, win.x1 - win.x0, p.scale_h[c], p.scale_w[c]);
      p.choice[static_cast<int64_t>(b) * num_windows + m] = c;
      p.prob[static_cast<int64_t>(b) * num_windows + m] = prob;
    }
    int first;
    int total;
    BlockScan(scan).ExclusiveSum(n, first, total);
    if (m < num_windows) p.offset[static_cast<int64_t>(b) * num_windows + m] = carry + first;
    __syncthreads();
    if (threadIdx.x == 0) carry += total;
    __syncthreads();
  }
  if (threadIdx.x == 0) p.count[b * p.count_stride] = carry;
}

// Stores a token's column: its max, times the window's probability where
// asked.
template <typename T, int kVec>
__device__ __forceinline__ void store_token(T* out, float (&acc)[kVec], bool scale_by_prob, float prob) {
  if (scale_by_prob) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[e] = __fmul_rn(acc[e], prob);
  }
  store_from_float<T, kVec>(out, acc);
}

// kUnroll entries of a window's token-major pixel list (below), as every
// thread of the block reads them.
struct PoolChunk {
  int64_t pixel[kUnroll];  // byte offset of the entry's pixel from the window's first pixel
  int64_t token[kUnroll];  // byte offset of the entry's token from the window's first token
  uint32_t ends;           // bit u: entry u is its token's last
};

// Block (window m, column block, row b): the window's tokens, one column
// (kVec channels) a thread.
//
// The window's pixels are listed token by token (tokens in raster order,
// each token's kh x kw pixels in raster order; a pixel of a border token
// that lies past the map is replaced by the token's first pixel, which is
// in the map: the max is unchanged). The block builds the list kUnroll
// entries at a time in shared memory, uniform for all its threads, so a
// thread's loads need no index arithmetic of their own: it issues the
// chunk's kUnroll loads (every pixel of a 4 x 4 window) before it takes the
// maxima, and stores each token's column after its last entry. Entries past
// the list's end (its last chunk's) load the window's first pixel, without
// a predicate, into a max that is never stored. Each token's
// pixels are taken in the CPU's order (fmaxf from -inf: NaN pixels are
// skipped); the repeats of a border token's first pixel leave its max as it is.
template <typename T, int kVec>
__device__ __forceinline__ void pool_window(const foveal_multiscale_gather_params& p, int num_windows, int m,
                                            int b) {
  __shared__ PoolChunk chunk;
  const int64_t plan = static_cast<int64_t>(b) * num_windows + m;
  const int choice = p.choice[plan];
  const float prob = p.prob[plan];
  const int first = p.offset[plan];
  const Window win = window_at(p, m);
  const int rows = win.y1 - win.y0;
  const int cols = win.x1 - win.x0;
  // A kernel taller or wider than the window's existing pixels pools them
  // all: the same tokens as the kernel cut to them.
  const int kh = min(p.scale_h[choice], rows);
  const int kw = min(p.scale_w[choice], cols);
  const int cells_x = ceil_div(cols, kw);
  const int n = ceil_div(rows, kh) * cells_x;
  const int per_token = kh * kw;  // <= rows * cols <= Hx * Wx < 2^31
  const int64_t entries = static_cast<int64_t>(n) * per_token;  // < 4 * rows * cols
  const int64_t step_x = p.x_stride_x * static_cast<int64_t>(sizeof(T));
  const int64_t step_y = p.x_stride_y * static_cast<int64_t>(sizeof(T));
  const int64_t step_token = p.tokens_stride_n * static_cast<int64_t>(sizeof(T));
  const char* window = reinterpret_cast<const char*>(static_cast<const T*>(p.x) + b * p.x_stride_b +
                                                     win.y0 * p.x_stride_y + win.x0 * p.x_stride_x);
  char* tokens = reinterpret_cast<char*>(static_cast<T*>(p.tokens) + b * p.tokens_stride_b +
                                         static_cast<int64_t>(first) * p.tokens_stride_n);
  const int columns = p.channels / kVec;

  // Every thread takes every turn (the barriers); a thread past the columns loads nothing.
  for (int col0 = blockIdx.y * kPoolThreads; col0 < columns; col0 += gridDim.y * kPoolThreads) {
    const int col = col0 + threadIdx.x;
    const bool active = col < columns;
    const int64_t column = static_cast<int64_t>(col) * (kVec * sizeof(T));
    float acc[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[e] = -CUDART_INF_F;
    for (int64_t q0 = 0; q0 < entries; q0 += kUnroll) {
      __syncthreads();  // the previous chunk is read
      if (threadIdx.x < 32) {
        const int u = threadIdx.x;
        const int64_t q = q0 + u;
        bool end = false;
        if (u < kUnroll && q < entries) {
          const int t = static_cast<int>(q / per_token);
          const int c = static_cast<int>(q - static_cast<int64_t>(t) * per_token);
          const int ty = t / cells_x;
          const int tx = t - ty * cells_x;
          int y = ty * kh + c / kw;
          int x = tx * kw + c % kw;
          if (y >= rows || x >= cols) {
            y = ty * kh;
            x = tx * kw;
          }
          chunk.pixel[u] = y * step_y + x * step_x;
          chunk.token[u] = t * step_token;
          end = c == per_token - 1;
        } else if (u < kUnroll) {
          chunk.pixel[u] = 0;
          chunk.token[u] = 0;
        }
        const uint32_t ends = __ballot_sync(0xffffffffu, end);
        if (u == 0) chunk.ends = ends;
      }
      __syncthreads();
      if (!active) continue;
      const uint32_t ends = chunk.ends;
      RawVec<T, kVec> v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u].load(reinterpret_cast<const T*>(window + column + chunk.pixel[u]));
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[e] = fmaxf(acc[e], v[u].at(e));
        if ((ends >> u) & 1u) {
          store_token<T, kVec>(reinterpret_cast<T*>(tokens + column + chunk.token[u]), acc, p.scale_by_prob, prob);
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc[e] = -CUDART_INF_F;
        }
      }
    }
  }
  if (blockIdx.y == 0) {
    for (int t = threadIdx.x; t < n; t += kPoolThreads) {
      const int y0 = win.y0 + (t / cells_x) * kh;
      const int x0 = win.x0 + (t % cells_x) * kw;
      p.positions[b * p.positions_stride_b + first + t] = y0 * p.width + x0;
    }
  }
}

// Block (chunk of kPadSlots slots, column block, row b): zero tokens and
// position -1 in the slots past the row's count (read on the device).
template <typename T, int kVec>
__device__ __forceinline__ void pad_slots(const foveal_multiscale_gather_params& p, int chunk, int b) {
  const int count = p.count[b * p.count_stride];
  const int slot0 = chunk * kPadSlots;
  const int slot1 = min(slot0 + kPadSlots, p.n_out_max);
  const int columns = p.channels / kVec;
  float zero[kVec];
#pragma unroll
  for (int e = 0; e < kVec; ++e) zero[e] = 0.0f;
  for (int s = max(slot0, count); s < slot1; ++s) {
    T* out = static_cast<T*>(p.tokens) + b * p.tokens_stride_b + static_cast<int64_t>(s) * p.tokens_stride_n;
    for (int col = blockIdx.y * kPoolThreads + threadIdx.x; col < columns; col += gridDim.y * kPoolThreads) {
      store_from_float<T, kVec>(out + col * kVec, zero);
    }
  }
  if (blockIdx.y == 0) {
    for (int s = max(slot0, count) + threadIdx.x; s < slot1; s += kPoolThreads) {
      p.positions[b * p.positions_stride_b + s] = -1;
    }
  }
}

// One launch for the tokens and the padding: blocks x < M pool window x,
// the others pad their chunk of slots.
template <typename T, int kVec>
__global__ void __launch_bounds__(kPoolThreads) pool_kernel(const foveal_multiscale_gather_params p, int num_windows) {
  const int b = blockIdx.z;
  if (static_cast<int>(blockIdx.x) < num_windows) {
    pool_window<T, kVec>(p, num_windows, blockIdx.x, b);
  } else {
    pad_slots<T, kVec>(p, blockIdx.x - num_windows, b);
  }
}

template <typename T, int kVec>
void launch_pool(const foveal_multiscale_gather_params& p, int num_windows, cudaStream_t stream) {
  // At least one column block: the positions are written with no channel.
  const dim3 grid(num_windows + ceil_div(p.n_out_max, kPadSlots),
                  max(1, min(ceil_div(p.channels / kVec, kPoolThreads), kMaxColumnBlocks)), p.batch);
  pool_kernel<T, kVec><<<grid, kPoolThreads, 0, stream>>>(p, num_windows);
}

// The 16-byte path where the map's and the tokens' bases and strides allow
// it and C is a multiple of the vector; the scalar path otherwise (the same
// results).
template <typename T>
void launch_widest(const foveal_multiscale_gather_params& p, int num_windows, cudaStream_t stream) {
  constexpr int kVec = Vec16<T>::kElems;
  const uint64_t parts = reinterpret_cast<uintptr_t>(p.x) | reinterpret_cast<uintptr_t>(p.tokens) |
                         (stepped_stride(p.x_stride_b, p.batch) | stepped_stride(p.x_stride_y, p.height) |
                          stepped_stride(p.x_stride_x, p.width) | stepped_stride(p.tokens_stride_b, p.batch) |
                          static_cast<uint64_t>(p.tokens_stride_n)) * sizeof(T);
  if (p.channels % kVec == 0 && aligned16(parts)) {
    launch_pool<T, kVec>(p, num_windows, stream);
  } else {
    launch_pool<T, 1>(p, num_windows, stream);
  }
}

}  // namespace
}  // namespace foveal

extern "C" int foveal_multiscale_gather(const foveal_multiscale_gather_params* p, foveal_stream_t stream) {
  if (p->batch == 0) return 0;
  if (p->num_scales < 1 || p->num_scales > FOVEAL_MULTISCALE_MAX_SCALES) return FOVEAL_ERR_UNSUPPORTED;
  const int num_windows = foveal::ceil_div(p->height, p->window) * foveal::ceil_div(p->width, p->window);
  // The plan also writes the counts of a map without windows (0).
  foveal::plan_kernel<<<p->batch, foveal::kPlanThreads, 0, stream>>>(*p);
  if (num_windows == 0) return foveal::launch_status();
  if (static_cast<int64_t>(num_windows) + foveal::ceil_div(p->n_out_max, foveal::kPadSlots) > 0x7fffffff) {
    return FOVEAL_ERR_UNSUPPORTED;  // past the grid's x dimension
  }
  FOVEAL_DISPATCH_DTYPE(p->dtype, T, foveal::launch_widest<T>(*p, num_windows, stream));
  return foveal::launch_status();
}
