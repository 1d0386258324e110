// window_mean: the mean (or max) of each w x w window of a channels-last
// feature map (SPEC "FocusLLaVA / Vision-guided sampler"; the contract is
// restated in the Rust module foveal::window_mean).
//
// One block per (window, row); the threads stride over the channels, so each
// cell's channel vector is read coalesced. Each thread reduces its channel
// over the window's existing cells in raster order (f32), a fixed order: the
// result is deterministic, and the same additions as the CPU reference.
#include "common.cuh"

namespace foveal {
namespace {

constexpr int kWindowThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kWindowThreads) window_mean_kernel(const foveal_window_mean_params p) {
  const int m = blockIdx.x;
  const int b = blockIdx.y;
  const int w = p.window;
  const int wins_x = ceil_div(p.width, w);
  const int y0 = (m / wins_x) * w;
  const int x0 = (m % wins_x) * w;
  const int y1 = y0 + min(w, p.height - y0);  // no overflow for any window
  const int x1 = x0 + min(w, p.width - x0);
  const T* x = static_cast<const T*>(p.x) + b * p.x_stride_b;
  T* out = static_cast<T*>(p.out) + b * p.out_stride_b + m * p.out_stride_m;
  const bool is_max = p.pool == FOVEAL_POOL_MAX;
  const float cells = static_cast<float>((y1 - y0) * (x1 - x0));
  for (int c = threadIdx.x; c < p.channels; c += kWindowThreads) {
    float acc = is_max ? -CUDART_INF_F : 0.0f;
    for (int y = y0; y < y1; ++y) {
      for (int xx = x0; xx < x1; ++xx) {
        const float v = to_float(x[y * p.x_stride_y + xx * p.x_stride_x + c]);
        acc = is_max ? fmaxf(acc, v) : __fadd_rn(acc, v);
      }
    }
    out[c] = from_float<T>(is_max ? acc : __fdiv_rn(acc, cells));
  }
}

}  // namespace
}  // namespace foveal

extern "C" int foveal_window_mean(const foveal_window_mean_params* p, foveal_stream_t stream) {
  if (p->batch == 0 || p->height == 0 || p->width == 0 || p->channels == 0) return 0;
  const int m = foveal::ceil_div(p->height, p->window) * foveal::ceil_div(p->width, p->window);
  const dim3 grid(m, p->batch);
  FOVEAL_DISPATCH_DTYPE(p->dtype, T, (foveal::window_mean_kernel<T><<<grid, foveal::kWindowThreads, 0, stream>>>(*p)));
  return foveal::launch_status();
}
