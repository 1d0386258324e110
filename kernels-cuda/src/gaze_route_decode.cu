// gaze_route_decode: route_topk (one decode query) and gaze_decode in ONE
// kernel launch (SPEC "Gaze Attention / gaze_decode", the fused variant; the
// design is in docs/ops/gaze_route_decode.md).
//
// Grid (split, unit, row); a unit is (row, KV head, chunk of up to
// FOVEAL_GAZE_MAX_GROUP query heads), as in gaze_decode. Every block:
//  1. scores the row's regions for the unit's heads: one thread per region
//     reads its descriptor row once for all the heads (16-byte loads) and
//     forms q_h . desc[r] as route_topk.cu does (__fmul_rn / __fadd_rn, d
//     ascending: bit-identical scores), stored as order-preserving keys in
//     shared memory [heads][max_regions];
//  2. per head, selects the top min(top_k, regions) with route_topk's radix
//     select (top_select.cuh: ties to the lower id, NaN lowest) and marks the
//     kept regions in a byte of head bits per region; block split 0 also
//     writes the routes;
//  3. lists the unit's attended set as segments (visible ranges, then the
//     routed regions ascending with their head masks: gaze_decode's plan) in
//     its own slice of the workspace;
//  4. attends its share of the set (gaze_attend.cuh: each K/V row read once
//     per unit, online softmax in f32) and writes its partial;
//  5. takes a ticket of its unit (threadfence + atomicAdd); the last block of
//     the unit merges the partials in split order (gaze_decode's merge),
//     writes o and lse, and resets the ticket to 0.
// Every block computes the same plan from the same data (deterministic), so
// the slices agree. Every float reduction has a fixed order: bit-identical
// run to run. The launcher zeroes the tickets before the kernel (a memset of
// B x units words), since the workspace is shared with other ops.

#include "gaze_attend.cuh"
#include "top_select.cuh"

namespace foveal {
namespace {

constexpr int kThreads = kAttendThreads;
constexpr int kMaxSplits = FOVEAL_GAZE_ROUTE_MAX_SPLITS;

template <typename T, int kHeadDimMax, int kGroupMax>
__global__ void __launch_bounds__(kThreads) gaze_route_decode_kernel(const foveal_gaze_route_decode_params P) {
  using BlockScan = cub::BlockScan<int, kThreads>;
  const foveal_gaze_decode_params& p = P.decode;
  __shared__ typename BlockScan::TempStorage scan;
  __shared__ float q_s[kGroupMax][kHeadDimMax];
  __shared__ int hist[256];
  __shared__ int sh_take, sh_carry[2], sh_last;
  __shared__ uint32_t sh_pivot;
  __shared__ float weight[kMaxSplits];
  __shared__ float sh_lse;
  extern __shared__ uint32_t dyn[];  // keys [kGroupMax-bounded heads][max_regions], then head bits [max_regions] bytes

  const int split = blockIdx.x;
  const int unit = blockIdx.y;
  const int b = blockIdx.z;
  const Unit u = unit_of(p.q_heads, p.kv_heads, unit);
  const int regions = p.region_count[b];
  const int heads_per_unit = min(p.q_heads / p.kv_heads, FOVEAL_GAZE_MAX_GROUP);
  uint32_t* keys = dyn;
  uint8_t* bits = reinterpret_cast<uint8_t*>(dyn + static_cast<int64_t>(heads_per_unit) * p.max_regions);

  // 1. Scores, as route_topk's scores kernel forms them.
  const T* q_b = static_cast<const T*>(p.q) + b * p.q_stride_b;
  for (int idx = threadIdx.x; idx < u.heads * p.head_dim; idx += kThreads) {
    const int g = idx / p.head_dim;
    const int d = idx - g * p.head_dim;
    q_s[g][d] = to_float(q_b[(u.h0 + g) * p.q_stride_h + d]);
  }
  for (int r = threadIdx.x; r < regions; r += kThreads) bits[r] = 0;
  __syncthreads();
  for (int r = threadIdx.x; r < regions; r += kThreads) {
    const float* row = P.desc + b * P.desc_stride_b + u.kv_head * P.desc_stride_h + r * P.desc_stride_r;
    float acc[kGroupMax];
#pragma unroll
    for (int g = 0; g < kGroupMax; ++g) acc[g] = 0.0f;
    for (int d = 0; d < p.head_dim; d += 4) {
      const float4 x = __ldg(reinterpret_cast<const float4*>(row + d));
      const float xs[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
      for (int g = 0; g < kGroupMax; ++g) {
        if (g < u.heads) {
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[g] = __fadd_rn(acc[g], __fmul_rn(q_s[g][d + e], xs[e]));
        }
      }
    }
#pragma unroll
    for (int g = 0; g < kGroupMax; ++g) {
      if (g < u.heads) keys[g * p.max_regions + r] = rank_key(acc[g]);
    }
  }
  __syncthreads();

  // 2. Each head's top min(top_k, regions), as route_topk's select kernel.
  const int keep = min(P.top_k, regions);
  for (int g = 0; g < u.heads; ++g) {
    int32_t* out = P.routes + (static_cast<int64_t>(b) * p.q_heads + u.h0 + g) * P.top_k;
    const uint8_t bit = static_cast<uint8_t>(1u << g);
    if (keep == regions) {
      for (int r = threadIdx.x; r < regions; r += kThreads) {
        bits[r] |= bit;
        if (split == 0) out[r] = r;
      }
    } else {
      const uint32_t* keys_g = keys + g * p.max_regions;
      auto key_of = [&](int i) { return keys_g[i]; };
      radix_select_nth<kThreads>(regions, keep, key_of, hist, &sh_pivot, &sh_take);
      for_kept_ascending<kThreads>(
          regions, false, true, sh_pivot, sh_take, key_of,
          [&](int slot, int i) {
            bits[i] |= bit;
            if (split == 0) out[slot] = i;
          },
          scan, sh_carry);
    }
    if (split == 0) {
      for (int j = keep + threadIdx.x; j < P.top_k; j += kThreads) out[j] = -1;
    }
    __syncthreads();
  }

  // 3. The unit's attended set, as gaze_decode's plan kernel lists it.
  const int units = gridDim.y;
  int4* segs = reinterpret_cast<int4*>(p.segments) +
               ((static_cast<int64_t>(b) * units + unit) * p.num_splits + split) * p.max_segments;
  const int n_visible = p.visible_count[b];
  const int32_t* visible = p.visible + static_cast<int64_t>(b) * p.max_visible * 2;
  const int all_heads = (1 << u.heads) - 1;
  const int items = n_visible + regions;
  int n_segs = 0;
  int n_tokens = 0;
  for (int base = 0; base < items; base += kThreads) {
    const int i = base + threadIdx.x;
    int id = 0, mask = 0, len = 0;
    if (i < n_visible) {
      id = visible[2 * i];
      len = visible[2 * i + 1] - id;
      mask = all_heads | kVisibleFlag;
    } else if (i < items) {
      id = i - n_visible;
      mask = bits[id];
      len = mask != 0 ? p.region_len[static_cast<int64_t>(b) * p.max_regions + id] : 0;
    }
    int seg_at, seg_total, tok_at, tok_total;
    BlockScan(scan).ExclusiveSum(static_cast<int>(mask != 0), seg_at, seg_total);
    __syncthreads();  // `scan` is reused
    BlockScan(scan).ExclusiveSum(len, tok_at, tok_total);
    __syncthreads();
    if (mask != 0) segs[n_segs + seg_at] = make_int4(id, mask, n_tokens + tok_at, n_tokens + tok_at + len);
    n_segs += seg_total;
    n_tokens += tok_total;
  }
  __syncthreads();  // the segments are read by every thread below

  // 4. This block's share of the set.
  gaze_attend_slice<T, kHeadDimMax, kGroupMax>(p, split, unit, b, segs, n_segs, n_tokens);

  // 5. The last block of the unit merges.
  __threadfence();
  __syncthreads();
  uint32_t* ticket = P.tickets + static_cast<int64_t>(b) * units + unit;
  if (threadIdx.x == 0) sh_last = atomicAdd(ticket, 1u) == static_cast<uint32_t>(p.num_splits - 1);
  __syncthreads();
  if (!sh_last) return;
  __threadfence();
  for (int g = 0; g < u.heads; ++g) {
    merge_splits<T, kThreads>(p, b, u.h0 + g, weight, &sh_lse);
    __syncthreads();  // `weight` and `sh_lse` are reused
  }
  if (threadIdx.x == 0) *ticket = 0;  // ready for the next launch (graph replays)
}

using Kernel = void (*)(const foveal_gaze_route_decode_params);

template <typename T, int kHeadDimMax>
Kernel instance_for_group(int group) {
  if (group <= 1) return gaze_route_decode_kernel<T, kHeadDimMax, 1>;
  if (group <= 2) return gaze_route_decode_kernel<T, kHeadDimMax, 2>;
  if (group <= 4) return gaze_route_decode_kernel<T, kHeadDimMax, 4>;
  return gaze_route_decode_kernel<T, kHeadDimMax, FOVEAL_GAZE_MAX_GROUP>;
}

// The kernel instance for the call's head dim and group, or nullptr when
// none serves it.
template <typename T>
Kernel instance(const foveal_gaze_route_decode_params& P) {
  const foveal_gaze_decode_params& p = P.decode;
  if (p.head_dim <= 0 || p.head_dim % Vec16<T>::kElems != 0 || p.head_dim % 4 != 0 ||
      p.head_dim > FOVEAL_GAZE_MAX_HEAD_DIM || p.kv_heads <= 0 || p.q_heads % p.kv_heads != 0 ||
      p.num_splits <= 0 || p.num_splits > kMaxSplits || p.max_regions < 0 ||
      p.max_regions > FOVEAL_GAZE_ROUTE_MAX_REGIONS || P.top_k <= 0) {
    return nullptr;
  }
  const int group = p.q_heads / p.kv_heads;
  if (p.head_dim <= 64) return instance_for_group<T, 64>(group);
  if (p.head_dim <= 128) return instance_for_group<T, 128>(group);
  return instance_for_group<T, 256>(group);
}

Kernel instance_of(const foveal_gaze_route_decode_params& P) {
  switch (P.decode.dtype) {
    case FOVEAL_F32: return instance<float>(P);
    case FOVEAL_F16: return instance<__half>(P);
    case FOVEAL_BF16: return instance<__nv_bfloat16>(P);
    default: return nullptr;
  }
}

// Dynamic shared memory: the keys of the unit's heads [heads][max_regions],
// then a byte of head bits per region (rounded up to 16 bytes).
size_t dynamic_smem(const foveal_gaze_route_decode_params& P) {
  const foveal_gaze_decode_params& p = P.decode;
  const int heads_per_unit = min(p.q_heads / p.kv_heads, FOVEAL_GAZE_MAX_GROUP);
  return static_cast<size_t>(heads_per_unit) * p.max_regions * sizeof(uint32_t) +
         static_cast<size_t>(ceil_div(p.max_regions, 16)) * 16;
}

int launch_gaze_route_decode(const foveal_gaze_route_decode_params& P, cudaStream_t stream) {
  const Kernel kernel = instance_of(P);
  if (kernel == nullptr) return FOVEAL_ERR_UNSUPPORTED;
  const size_t smem = dynamic_smem(P);
  const int status = prepare_shared_memory(kernel, smem);  // before anything is enqueued
  if (status != 0) return status;
  const foveal_gaze_decode_params& p = P.decode;
  const int units = p.kv_heads * ceil_div(p.q_heads / p.kv_heads, FOVEAL_GAZE_MAX_GROUP);
  const cudaError_t e =
      cudaMemsetAsync(P.tickets, 0, static_cast<size_t>(p.batch) * units * sizeof(uint32_t), stream);
  if (e != cudaSuccess) return static_cast<int>(e);
  const dim3 grid(p.num_splits, units, p.batch);
  kernel<<<grid, kThreads, smem, stream>>>(P);
  return launch_status();
}

}  // namespace
}  // namespace foveal

extern "C" int foveal_gaze_route_decode(const foveal_gaze_route_decode_params* p, foveal_stream_t stream) {
  if (p->decode.batch == 0 || p->decode.q_heads == 0) return 0;  // nothing to write
  return foveal::launch_gaze_route_decode(*p, stream);
}

extern "C" int foveal_gaze_route_decode_shared_memory(const foveal_gaze_route_decode_params* p,
                                                      foveal_shared_memory* out) {
  const foveal::Kernel kernel = foveal::instance_of(*p);
  if (kernel == nullptr) return FOVEAL_ERR_UNSUPPORTED;
  return foveal::shared_memory_of(kernel, foveal::dynamic_smem(*p), *out);
}
