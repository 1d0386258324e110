// window_mean: the mean (or max) of each w x w window of a channels-last
// feature map (SPEC "FocusLLaVA / Vision-guided sampler"; the contract is
// restated in the Rust module foveal::window_mean, the design in
// docs/ops/window_mean.md).
//
// Memory-bound: the map is read once. Grid (window, column block, row); a
// thread owns one column of a window: kVec consecutive channels, one 16-byte
// vector (8 bf16/f16, 4 f32) where the view allows it (16-byte aligned base
// and strides, C a multiple of kVec), else one channel (the scalar path).
// It walks the window's cells in raster order, issuing kUnroll loads (a whole
// default 4 x 4 window) before it adds them, and reduces each channel in f32
// in that order: the same additions, in the same order, as the CPU reference
// on either path (no FMA contraction, IEEE division), so the output is
// bit-identical to it and deterministic.
#include "common.cuh"

namespace foveal {
namespace {

constexpr int kThreads = 64;  // columns of a block: two or more blocks per window at C >= 1024
constexpr int kUnroll = 16;   // loads in flight per thread: every cell of a 4 x 4 window
constexpr int kMaxColumnBlocks = 65535;  // grid.y; the threads stride over further columns

template <bool kMax, typename T, int kVec>
__device__ __forceinline__ void reduce(float (&acc)[kVec], const RawVec<T, kVec>& v) {
#pragma unroll
  for (int e = 0; e < kVec; ++e) acc[e] = kMax ? fmaxf(acc[e], v.at(e)) : __fadd_rn(acc[e], v.at(e));
}

// The cells of a tile, loaded at once: kRows rows of kCols cells from
// `first` (byte strides `step_x` along a row, `step_y` between rows); only
// the first `rows` x `cols` exist (the others are neither loaded nor added;
// kFull: all of them, no predicates). Then added to acc in raster order. The
// addresses are formed by adding strides, so every load can issue before the
// first result is needed.
template <bool kMax, int kRows, int kCols, bool kFull, typename T, int kVec>
__device__ __forceinline__ void reduce_tile(float (&acc)[kVec], const char* first, int64_t step_x, int64_t step_y,
                                            int rows, int cols) {
  RawVec<T, kVec> v[kRows][kCols];
  const char* row = first;
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const char* cell = row;
#pragma unroll
    for (int j = 0; j < kCols; ++j) {
      if (kFull || (i < rows && j < cols)) v[i][j].load(reinterpret_cast<const T*>(cell));
      cell += step_x;
    }
    row += step_y;
  }
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
#pragma unroll
    for (int j = 0; j < kCols; ++j) {
      if (kFull || (i < rows && j < cols)) reduce<kMax>(acc, v[i][j]);
    }
  }
}

// kSmall: every window has w <= 4 and is read as one 4 x 4 tile (all its
// cells in flight at once); otherwise the window is read a row at a time, in
// chunks of kUnroll cells. Either way the cells are added in raster order.
template <typename T, int kVec, bool kMax, bool kSmall>
__global__ void __launch_bounds__(kThreads) window_mean_kernel(const foveal_window_mean_params p) {
  const int m = blockIdx.x;
  const int b = blockIdx.z;
  const int w = p.window;
  const int wins_x = ceil_div(p.width, w);
  const int y0 = (m / wins_x) * w;
  const int x0 = (m % wins_x) * w;
  const int rows = min(w, p.height - y0);  // no overflow for any window
  const int cols = min(w, p.width - x0);
  const float count = static_cast<float>(rows * cols);  // <= Hx * Wx < 2^31
  const int64_t step_x = p.x_stride_x * static_cast<int64_t>(sizeof(T));
  const int64_t step_y = p.x_stride_y * static_cast<int64_t>(sizeof(T));
  const char* window = reinterpret_cast<const char*>(static_cast<const T*>(p.x) + b * p.x_stride_b +
                                                     y0 * p.x_stride_y + x0 * p.x_stride_x);
  T* out = static_cast<T*>(p.out) + b * p.out_stride_b + m * p.out_stride_m;
  const int columns = p.channels / kVec;

  for (int col = blockIdx.y * kThreads + threadIdx.x; col < columns; col += gridDim.y * kThreads) {
    const char* x = window + static_cast<int64_t>(col) * (kVec * sizeof(T));
    float acc[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[e] = kMax ? -CUDART_INF_F : 0.0f;
    if (kSmall && rows == 4 && cols == 4) {  // the interior windows of the default w = 4
      reduce_tile<kMax, 4, 4, true, T>(acc, x, step_x, step_y, 4, 4);
    } else if (kSmall) {
      reduce_tile<kMax, 4, 4, false, T>(acc, x, step_x, step_y, rows, cols);
    } else {
      for (int y = 0; y < rows; ++y, x += step_y) {
        int c0 = 0;
        for (; c0 + kUnroll <= cols; c0 += kUnroll) {
          reduce_tile<kMax, 1, kUnroll, true, T>(acc, x + c0 * step_x, step_x, step_y, 1, kUnroll);
        }
        if (c0 < cols) reduce_tile<kMax, 1, kUnroll, false, T>(acc, x + c0 * step_x, step_x, step_y, 1, cols - c0);
      }
    }
    if (!kMax) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[e] = __fdiv_rn(acc[e], count);
    }
    store_from_float<T, kVec>(out + col * kVec, acc);
  }
}

template <typename T, int kVec, bool kSmall>
void launch(const foveal_window_mean_params& p, cudaStream_t stream) {
  const int m = ceil_div(p.height, p.window) * ceil_div(p.width, p.window);
  const dim3 grid(m, min(ceil_div(p.channels / kVec, kThreads), kMaxColumnBlocks), p.batch);
  if (p.pool == FOVEAL_POOL_MAX) {
    window_mean_kernel<T, kVec, true, kSmall><<<grid, kThreads, 0, stream>>>(p);
  } else {
    window_mean_kernel<T, kVec, false, kSmall><<<grid, kThreads, 0, stream>>>(p);
  }
}

// The 16-byte path where every base and stride allows it and C is a
// multiple of the vector; the scalar path otherwise (the same results).
template <typename T>
void launch_widest(const foveal_window_mean_params& p, cudaStream_t stream) {
  constexpr int kVec = Vec16<T>::kElems;
  const uint64_t parts = reinterpret_cast<uintptr_t>(p.x) | reinterpret_cast<uintptr_t>(p.out) |
                         (stepped_stride(p.x_stride_b, p.batch) | stepped_stride(p.x_stride_y, p.height) |
                          stepped_stride(p.x_stride_x, p.width) | stepped_stride(p.out_stride_b, p.batch) |
                          static_cast<uint64_t>(p.out_stride_m)) * sizeof(T);
  const bool small = p.window <= 4;
  if (p.channels % kVec != 0 || !aligned16(parts)) {
    small ? launch<T, 1, true>(p, stream) : launch<T, 1, false>(p, stream);
  } else {
    small ? launch<T, kVec, true>(p, stream) : launch<T, kVec, false>(p, stream);
  }
}

}  // namespace
}  // namespace foveal

extern "C" int foveal_window_mean(const foveal_window_mean_params* p, foveal_stream_t stream) {
  if (p->batch == 0 || p->height == 0 || p->width == 0 || p->channels == 0) return 0;
  FOVEAL_DISPATCH_DTYPE(p->dtype, T, foveal::launch_widest<T>(*p, stream));
  return foveal::launch_status();
}
