// token_pack: VISOR-TR's token packing, a bilinear resize of each h x w grid
// (half-pixel centres, torch's align_corners=False) to H' x W', then
// space-to-depth by 2 (SPEC "VISOR / token_pack"; the contract is restated
// in the Rust module foveal::token_pack).
//
// One thread per (resized pixel, 16-byte vector of channels; one channel
// where the tensors do not allow vectors): it reads the pixel's four source
// vectors and writes its vector at the packed position, so consecutive
// threads read and write consecutive channels. Source rows, columns and
// weights are computed in f32 with separately rounded operations, the
// interpolation likewise, exactly as the CPU reference: the two agree bit
// for bit.

#include <algorithm>

#include "common.cuh"

namespace foveal {
namespace {

constexpr int kPackThreads = 256;

struct Source {
  int i0, i1;
  float l1;
};

// Output index `dst` of a resize from `in` to `out`: torch's
// area_pixel_compute_source_index with align_corners=False, clamped at 0.
__device__ __forceinline__ Source source_index(int dst, int in, int out) {
  const float scale = __fdiv_rn(static_cast<float>(in), static_cast<float>(out));
  const float src = fmaxf(__fsub_rn(__fmul_rn(scale, __fadd_rn(static_cast<float>(dst), 0.5f)), 0.5f), 0.f);
  const int i0 = min(static_cast<int>(src), in - 1);
  return {i0, i0 + 1 < in ? i0 + 1 : i0, __fsub_rn(src, static_cast<float>(i0))};
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kPackThreads) token_pack_kernel(const foveal_token_pack_params p) {
  const int vecs = p.channels / kVec;
  const int64_t total = static_cast<int64_t>(p.batch) * p.out_height * p.out_width * vecs;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kPackThreads + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * kPackThreads) {
    const int c = static_cast<int>(idx % vecs) * kVec;
    const int64_t pixel = idx / vecs;
    const int xo = static_cast<int>(pixel % p.out_width);
    const int yo = static_cast<int>((pixel / p.out_width) % p.out_height);
    const int b = static_cast<int>(pixel / (static_cast<int64_t>(p.out_width) * p.out_height));
    const Source sy = source_index(yo, p.height, p.out_height);
    const Source sx = source_index(xo, p.width, p.out_width);
    const T* x = static_cast<const T*>(p.x) + b * p.x_stride_b + c;
    float v00[kVec], v01[kVec], v10[kVec], v11[kVec];
    load_as_float<T, kVec>(x + sy.i0 * p.x_stride_y + sx.i0 * p.x_stride_x, v00);
    load_as_float<T, kVec>(x + sy.i0 * p.x_stride_y + sx.i1 * p.x_stride_x, v01);
    load_as_float<T, kVec>(x + sy.i1 * p.x_stride_y + sx.i0 * p.x_stride_x, v10);
    load_as_float<T, kVec>(x + sy.i1 * p.x_stride_y + sx.i1 * p.x_stride_x, v11);
    const float hy = __fsub_rn(1.f, sy.l1);
    const float hx = __fsub_rn(1.f, sx.l1);
    float y[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const float top = __fadd_rn(__fmul_rn(hx, v00[e]), __fmul_rn(sx.l1, v01[e]));
      const float bottom = __fadd_rn(__fmul_rn(hx, v10[e]), __fmul_rn(sx.l1, v11[e]));
      y[e] = __fadd_rn(__fmul_rn(hy, top), __fmul_rn(sy.l1, bottom));
    }
    const int q = 2 * (yo % 2) + xo % 2;
    T* out = static_cast<T*>(p.out) + b * p.out_stride_b + (yo / 2) * p.out_stride_y + (xo / 2) * p.out_stride_x +
             q * p.channels + c;
    store_from_float<T, kVec>(out, y);
  }
}

template <typename T, int kVec>
void launch(const foveal_token_pack_params& p, int sms, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(p.batch) * p.out_height * p.out_width * (p.channels / kVec);
  // Enough blocks for a few waves; the loop strides over the rest.
  const int64_t blocks = std::min<int64_t>((total + kPackThreads - 1) / kPackThreads, static_cast<int64_t>(sms) * 16);
  token_pack_kernel<T, kVec><<<static_cast<unsigned>(blocks), kPackThreads, 0, stream>>>(p);
}

template <typename T>
int launch_token_pack(const foveal_token_pack_params& p, cudaStream_t stream) {
  if (p.out_height % 2 != 0 || p.out_width % 2 != 0 || p.height <= 0 || p.width <= 0) {
    return FOVEAL_ERR_UNSUPPORTED;
  }
  int device = 0, sms = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (e != cudaSuccess) return static_cast<int>(e);
  constexpr int kVec = Vec16<T>::kElems;
  const uint64_t parts =
      reinterpret_cast<uintptr_t>(p.x) | reinterpret_cast<uintptr_t>(p.out) |
      static_cast<uint64_t>((p.x_stride_b | p.x_stride_y | p.x_stride_x | p.out_stride_b | p.out_stride_y |
                             p.out_stride_x) *
                            static_cast<int64_t>(sizeof(T)));
  if (aligned16(parts) && p.channels % kVec == 0) {
    launch<T, kVec>(p, sms, stream);
  } else {
    launch<T, 1>(p, sms, stream);
  }
  return launch_status();
}

}  // namespace
}  // namespace foveal

extern "C" int foveal_token_pack(const foveal_token_pack_params* p, foveal_stream_t stream) {
  if (p->batch == 0 || p->channels == 0) return 0;
  FOVEAL_DISPATCH_DTYPE(p->dtype, T, return foveal::launch_token_pack<T>(*p, stream));
  return 0;
}
