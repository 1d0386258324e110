// pos_conv1d: VISOR's conditional position embedding, out = x + depthwise
// Conv1d(x) (kernel 7, padding 3) over each row's valid tokens (SPEC "VISOR
// / pos_conv1d"; the contract is restated in the Rust module
// foveal::pos_conv1d).
//
// A thread owns one 16-byte vector of channels (one channel where the
// tensors do not allow vectors) over a run of kTokens consecutive tokens: it
// keeps the 7-token window of x in registers, so each token is loaded once
// per run (plus 6 at the run's edges, which the block's neighbouring runs
// load too and the L1 serves), and writes each output vector once. The taps
// are summed in order with separately rounded products and sums, exactly as
// the CPU reference, so the two agree bit for bit.

#include "common.cuh"

namespace foveal {
namespace {

constexpr int kTaps = 7;
constexpr int kPad = 3;
constexpr int kTokens = 8;      // tokens per thread
constexpr int kVecThreads = 32;  // channel vectors per block
constexpr int kRunThreads = 4;   // runs of tokens per block

template <typename T, int kVec>
__global__ void __launch_bounds__(kVecThreads* kRunThreads) pos_conv1d_kernel(const foveal_pos_conv1d_params p) {
  const int c0 = (blockIdx.x * kVecThreads + threadIdx.x) * kVec;
  const int i0 = (blockIdx.y * kRunThreads + threadIdx.y) * kTokens;
  const int b = blockIdx.z;
  if (c0 >= p.channels || i0 >= p.tokens) return;
  const int len = p.len[b];
  const T* x = static_cast<const T*>(p.x) + b * p.x_stride_b + c0;
  T* out = static_cast<T*>(p.out) + b * p.out_stride_b + c0;

  float w[kTaps][kVec], bias[kVec];
  {
    const T* wb = static_cast<const T*>(p.weight);
    const T* bb = static_cast<const T*>(p.bias);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      bias[e] = to_float(bb[c0 + e]);
#pragma unroll
      for (int t = 0; t < kTaps; ++t) w[t][e] = to_float(wb[(c0 + e) * p.weight_stride_c + t]);
    }
  }
  // win[t] holds token i + t - 3 of the current token i (zeros outside the row).
  float win[kTaps][kVec];
  auto load = [&](int j, float(&dst)[kVec]) {
    if (j >= 0 && j < len) {
      load_as_float<T, kVec>(x + j * p.x_stride_n, dst);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) dst[e] = 0.f;
    }
  };
#pragma unroll
  for (int t = 0; t < kTaps; ++t) load(i0 + t - kPad, win[t]);

#pragma unroll
  for (int k = 0; k < kTokens; ++k) {
    const int i = i0 + k;
    if (i >= p.tokens) break;
    float o[kVec];
    if (i < len) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        float acc = bias[e];
#pragma unroll
        for (int t = 0; t < kTaps; ++t) {
          const int j = i + t - kPad;
          if (j >= 0 && j < len) acc = __fadd_rn(acc, __fmul_rn(w[t][e], win[t][e]));
        }
        o[e] = __fadd_rn(win[kPad][e], acc);
      }
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) o[e] = 0.f;
    }
    store_from_float<T, kVec>(out + i * p.out_stride_n, o);
    if (k + 1 < kTokens) {
#pragma unroll
      for (int t = 0; t + 1 < kTaps; ++t) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) win[t][e] = win[t + 1][e];
      }
      load(i + kTaps - kPad, win[kTaps - 1]);
    }
  }
}

template <typename T, int kVec>
void launch(const foveal_pos_conv1d_params& p, cudaStream_t stream) {
  const dim3 block(kVecThreads, kRunThreads);
  const dim3 grid(ceil_div(ceil_div(p.channels, kVec), kVecThreads), ceil_div(p.tokens, kTokens * kRunThreads),
                  p.batch);
  pos_conv1d_kernel<T, kVec><<<grid, block, 0, stream>>>(p);
}

template <typename T>
int launch_pos_conv1d(const foveal_pos_conv1d_params& p, cudaStream_t stream) {
  constexpr int kVec = Vec16<T>::kElems;
  const uint64_t parts = reinterpret_cast<uintptr_t>(p.x) | reinterpret_cast<uintptr_t>(p.out) |
                         static_cast<uint64_t>((p.x_stride_b | p.x_stride_n | p.out_stride_b | p.out_stride_n) *
                                               static_cast<int64_t>(sizeof(T)));
  if (aligned16(parts) && p.channels % kVec == 0) {
    launch<T, kVec>(p, stream);
  } else {
    launch<T, 1>(p, stream);
  }
  return launch_status();
}

}  // namespace
}  // namespace foveal

extern "C" int foveal_pos_conv1d(const foveal_pos_conv1d_params* p, foveal_stream_t stream) {
  if (p->batch == 0 || p->tokens == 0 || p->channels == 0) return 0;
  FOVEAL_DISPATCH_DTYPE(p->dtype, T, return foveal::launch_pos_conv1d<T>(*p, stream));
  return 0;
}
