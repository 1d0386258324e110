// multiscale_gather: FocusLLaVA's vision-guided sampler after the selector
// (SPEC "FocusLLaVA / Vision-guided sampler"; the contract is restated in the
// Rust module foveal::multiscale_gather).
//
// 1. One block per row: per window the chosen scale (argmax of the logits,
//    ties to the first scale, NaN lowest), its softmax probability and its
//    token count; a block scan (cub) over the windows gives each window's
//    first output slot (exclusive prefix sum, chunks of 256 with a carry) and
//    the row's count. Nothing is read back by the host.
// 2. One block per (window, row): each of the window's tokens max-pools its
//    cell (over the cells' existing pixels), the threads striding over the
//    channels; thread 0 writes the position.
// 3. One block per (chunk of slots, row): slots past the count get zero
//    tokens and position -1 (the count is read on the device).
// Every reduction has a fixed order: deterministic.
#include <cub/block/block_scan.cuh>

#include "common.cuh"

namespace foveal {
namespace {

constexpr int kPlanThreads = 256;
constexpr int kPoolThreads = 256;
constexpr int kPadSlots = 16;

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

template <typename T>
__global__ void __launch_bounds__(kPoolThreads) pool_kernel(const foveal_multiscale_gather_params p) {
  const int m = blockIdx.x;
  const int b = blockIdx.y;
  const int num_windows = gridDim.x;
  const int c_idx = p.choice[static_cast<int64_t>(b) * num_windows + m];
  const float prob = p.prob[static_cast<int64_t>(b) * num_windows + m];
  const int first = p.offset[static_cast<int64_t>(b) * num_windows + m];
  const int kh = p.scale_h[c_idx];
  const int kw = p.scale_w[c_idx];
  const Window win = window_at(p, m);
  const int cells_x = ceil_div(win.x1 - win.x0, kw);
  const int n = ceil_div(win.y1 - win.y0, kh) * cells_x;
  const T* x = static_cast<const T*>(p.x) + b * p.x_stride_b;
  for (int t = 0; t < n; ++t) {
    const int y0 = win.y0 + (t / cells_x) * kh;
    const int x0 = win.x0 + (t % cells_x) * kw;
    const int y1 = y0 + min(kh, win.y1 - y0);
    const int x1 = x0 + min(kw, win.x1 - x0);
    T* out = static_cast<T*>(p.tokens) + b * p.tokens_stride_b + static_cast<int64_t>(first + t) * p.tokens_stride_n;
    for (int c = threadIdx.x; c < p.channels; c += kPoolThreads) {
      float acc = -CUDART_INF_F;
      for (int y = y0; y < y1; ++y) {
        for (int xx = x0; xx < x1; ++xx) acc = fmaxf(acc, to_float(x[y * p.x_stride_y + xx * p.x_stride_x + c]));
      }
      out[c] = from_float<T>(p.scale_by_prob ? __fmul_rn(acc, prob) : acc);
    }
    if (threadIdx.x == 0) p.positions[b * p.positions_stride_b + first + t] = y0 * p.width + x0;
  }
}

template <typename T>
__global__ void __launch_bounds__(kPoolThreads) pad_kernel(const foveal_multiscale_gather_params p) {
  const int b = blockIdx.y;
  const int count = p.count[b * p.count_stride];
  const int slot0 = blockIdx.x * kPadSlots;
  for (int s = max(slot0, count); s < min(slot0 + kPadSlots, p.n_out_max); ++s) {
    T* out = static_cast<T*>(p.tokens) + b * p.tokens_stride_b + static_cast<int64_t>(s) * p.tokens_stride_n;
    for (int c = threadIdx.x; c < p.channels; c += kPoolThreads) out[c] = from_float<T>(0.0f);
    if (threadIdx.x == 0) p.positions[b * p.positions_stride_b + s] = -1;
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
  FOVEAL_DISPATCH_DTYPE(p->dtype, T, {
    foveal::pool_kernel<T><<<dim3(num_windows, p->batch), foveal::kPoolThreads, 0, stream>>>(*p);
    foveal::pad_kernel<T><<<dim3(foveal::ceil_div(p->n_out_max, foveal::kPadSlots), p->batch), foveal::kPoolThreads, 0,
                            stream>>>(*p);
  });
  return foveal::launch_status();
}
