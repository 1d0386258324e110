// gaze_route_decode: route_topk (one decode query) and gaze_decode in ONE
// kernel launch (SPEC "Gaze Attention / gaze_decode", the fused variant; the
// design is in docs/ops/gaze_route_decode.md).
//
// A unit is (row, KV head, chunk of up to FOVEAL_GAZE_MAX_GROUP query heads),
// as in gaze_decode. Each block takes a logical index from a counter in the
// order blocks start (the launcher zeroes the counter and the units' records
// with one memset before the kernel); the first B x units x heads indices
// are routers, the rest attend blocks:
//  - a router serves one (unit, query head): it scores the row's regions for
//    its head (one thread per region, 4 regions at a time, reading each
//    descriptor row with 16-byte loads and forming q . desc[r] as
//    route_topk.cu does: __fmul_rn / __fadd_rn, d ascending, so the scores
//    are bit-identical), keeps the top min(top_k, regions) with route_topk's
//    radix select (top_select.cuh: ties to the lower id, NaN lowest) and
//    writes the head's routes. The last router of a unit to finish (a
//    ticket, no waiting) lists the unit's attended set as segments
//    (gaze_plan.cuh, from the routes just written) and publishes it (a
//    release store of the unit's ready flag).
//  - an attend block serves one split of one unit: it waits for the unit's
//    flag (acquire), then runs gaze_decode's attend step (gaze_attend.cuh:
//    whole tiles of the unit's attended tokens through a cp.async ring, each
//    K/V row read once per unit, online softmax in f32), and the last
//    attend block of the unit merges the splits (gaze_merge.cuh).
// So each head is routed once per call, not once per split block. No
// deadlock whatever order blocks run in: a block waits only on routers,
// which took their indices earlier (so they are running or done) and never
// wait. Every float reduction has a fixed order and the atomics are integer
// ones (histograms, tickets, the counter: which block gets which index
// changes nothing): bit-identical run to run.

#include "gaze_plan.cuh"
#include "top_select.cuh"

namespace foveal {
namespace {

constexpr int kThreads = kAttendThreads;
constexpr int kScoreRegions = 4;  // regions a router thread scores at a time

__device__ __forceinline__ int load_acquire(const int32_t* p) {
  int32_t v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void store_release(int32_t* p, int32_t v) {
  asm volatile("st.release.gpu.global.b32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// Dynamic shared memory of a router: the head's query (kHeadDimMax floats),
// its region keys, the plan's head bits (a byte per region, in words).
template <int kHeadDimMax>
constexpr size_t router_smem_bytes(int max_regions) {
  return static_cast<size_t>(kHeadDimMax) * 4 + static_cast<size_t>(max_regions) * 4 +
         static_cast<size_t>(ceil_div(max_regions, 4)) * 4;
}

// A router (`router` < B x units x heads per unit): routes one query head,
// and, the last of its unit, plans the unit.
template <typename T, int kHeadDimMax>
__device__ void route_head(const foveal_gaze_route_decode_params& P, int router, unsigned char* smem,
                           typename cub::BlockScan<int, kThreads>::TempStorage& scan) {
  const foveal_gaze_decode_params& p = P.decode;
  __shared__ __align__(16) int hist[256];
  __shared__ int sh_take, sh_carry[2], sh_last;
  __shared__ uint32_t sh_pivot;
  const int heads_per_unit = min(p.q_heads / p.kv_heads, FOVEAL_GAZE_MAX_GROUP);
  const int units = units_per_row(p.q_heads, p.kv_heads);
  const int g = router % heads_per_unit;
  const int unit = router / heads_per_unit % units;
  const int b = router / heads_per_unit / units;
  const Unit u = unit_of(p.q_heads, p.kv_heads, unit);
  float* q_s = reinterpret_cast<float*>(smem);
  uint32_t* keys = reinterpret_cast<uint32_t*>(smem + kHeadDimMax * 4);
  uint32_t* route_bits = keys + p.max_regions;

  if (g < u.heads) {
    const int h = u.h0 + g;
    const int regions = p.region_count[b];
    // 1. Scores, as route_topk's scores kernel forms them.
    const T* q = static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h;
    for (int d = threadIdx.x; d < p.head_dim; d += kThreads) q_s[d] = to_float(q[d]);
    __syncthreads();
    const float* desc = P.desc + b * P.desc_stride_b + u.kv_head * P.desc_stride_h;
    for (int r0 = threadIdx.x; r0 < regions; r0 += kScoreRegions * kThreads) {
      float acc[kScoreRegions];
      const float* row[kScoreRegions];
#pragma unroll
      for (int j = 0; j < kScoreRegions; ++j) {
        acc[j] = 0.0f;
        row[j] = desc + min(r0 + j * kThreads, regions - 1) * P.desc_stride_r;
      }
      for (int d = 0; d < p.head_dim; d += 4) {
        float4 x[kScoreRegions];
#pragma unroll
        for (int j = 0; j < kScoreRegions; ++j) x[j] = __ldg(reinterpret_cast<const float4*>(row[j] + d));
        const float4 qd = *reinterpret_cast<const float4*>(q_s + d);
#pragma unroll
        for (int j = 0; j < kScoreRegions; ++j) {
          acc[j] = __fadd_rn(acc[j], __fmul_rn(qd.x, x[j].x));
          acc[j] = __fadd_rn(acc[j], __fmul_rn(qd.y, x[j].y));
          acc[j] = __fadd_rn(acc[j], __fmul_rn(qd.z, x[j].z));
          acc[j] = __fadd_rn(acc[j], __fmul_rn(qd.w, x[j].w));
        }
      }
#pragma unroll
      for (int j = 0; j < kScoreRegions; ++j) {
        if (r0 + j * kThreads < regions) keys[r0 + j * kThreads] = rank_key(acc[j]);
      }
    }
    __syncthreads();

    // 2. The head's top min(top_k, regions), as route_topk's select kernel.
    const int keep = min(P.top_k, regions);
    int32_t* out = P.routes + (static_cast<int64_t>(b) * p.q_heads + h) * P.top_k;
    if (keep == regions) {
      for (int r = threadIdx.x; r < regions; r += kThreads) out[r] = r;
    } else {
      auto key_of = [&](int i) { return keys[i]; };
      radix_select_nth<kThreads>(regions, keep, key_of, hist, &sh_pivot, &sh_take);
      write_kept_ascending<kThreads>(regions, false, true, sh_pivot, sh_take, key_of, out, scan, sh_carry);
    }
    for (int j = keep + threadIdx.x; j < P.top_k; j += kThreads) out[j] = -1;
  }

  // 3. The last router of the unit plans it and publishes the plan.
  __threadfence();  // this head's routes, before its ticket
  __syncthreads();
  int32_t* record = unit_record(p, b, unit);
  if (threadIdx.x == 0) sh_last = atomicAdd(record + kInfoRouteTicket, 1) == heads_per_unit - 1;
  __syncthreads();
  if (!sh_last) return;
  __threadfence();  // the other heads' routes, after their tickets
  const int32_t* routes = P.routes + (static_cast<int64_t>(b) * p.q_heads + u.h0) * P.top_k;
  plan_unit<kThreads>(p, b, unit, routes, route_bits, scan);
  __threadfence();  // the plan, before the flag
  __syncthreads();
  if (threadIdx.x == 0) store_release(record + kInfoReady, 1);
}

// The kernel body: a logical index, then a router's or an attend block's work.
template <typename T, int kHeadDimMax, int kGroupMax>
__device__ __forceinline__ void route_decode_body(const foveal_gaze_route_decode_params& P, int stages) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ typename cub::BlockScan<int, kThreads>::TempStorage scan;
  __shared__ int sh_index;
  const foveal_gaze_decode_params& p = P.decode;
  const int units = units_per_row(p.q_heads, p.kv_heads);
  const int heads_per_unit = min(p.q_heads / p.kv_heads, FOVEAL_GAZE_MAX_GROUP);
  const int routers = p.batch * units * heads_per_unit;
  if (threadIdx.x == 0) {
    int32_t* counter = p.unit_info + static_cast<int64_t>(p.batch) * units * FOVEAL_GAZE_UNIT_WORDS;
    sh_index = atomicAdd(counter, 1);
  }
  __syncthreads();
  const int index = sh_index;
  if (index < routers) {
    route_head<T, kHeadDimMax>(P, index, smem, scan);
    return;
  }
  const int attend = index - routers;  // (row, unit, split), split fastest
  const int split = attend % p.num_splits;
  const int unit = attend / p.num_splits % units;
  const int b = attend / p.num_splits / units;
  const int32_t* record = unit_record(p, b, unit);
  if (threadIdx.x == 0) {
    while (load_acquire(record + kInfoReady) == 0) __nanosleep(128);
  }
  __syncthreads();  // the plan (read with __ldcg) after the flag
  const int4* segs = reinterpret_cast<const int4*>(p.segments) +
                     (static_cast<int64_t>(b) * units + unit) * p.max_segments;
  gaze_attend_slice<T, kHeadDimMax, kGroupMax>(p, split, unit, b, segs, __ldcg(record + kInfoSegments),
                                               __ldcg(record + kInfoTokens), stages, smem);
  merge_if_last<T>(p, unit, b, reinterpret_cast<float*>(smem));
}

// Lane-group instances ask for 2 blocks per SM (without it ptxas spills the
// small ones); tensor-core instances are left to ptxas's own choice (asked
// for 2 they take every register and spill at head dim 256).
template <typename T, int kHeadDimMax, int kGroupMax>
__global__ void __launch_bounds__(kThreads, 2) gaze_route_decode_kernel(const foveal_gaze_route_decode_params P,
                                                                        int stages) {
  route_decode_body<T, kHeadDimMax, kGroupMax>(P, stages);
}

template <typename T, int kHeadDimMax, int kGroupMax>
__global__ void __launch_bounds__(kThreads) gaze_route_decode_mma_kernel(const foveal_gaze_route_decode_params P,
                                                                         int stages) {
  route_decode_body<T, kHeadDimMax, kGroupMax>(P, stages);
}

using Kernel = void (*)(const foveal_gaze_route_decode_params, int);

// A launch: the instance, its stages and dynamic shared memory.
struct Launch {
  Kernel kernel;
  int stages;
  size_t smem;
};

template <typename T, int kHeadDimMax, int kGroupMax>
int plan_launch(const foveal_gaze_route_decode_params& P, Launch& out) {
  using Shape = AttendShape<T, kHeadDimMax, kGroupMax>;
  if constexpr (Shape::kMma) {
    out.kernel = gaze_route_decode_mma_kernel<T, kHeadDimMax, kGroupMax>;
  } else {
    out.kernel = gaze_route_decode_kernel<T, kHeadDimMax, kGroupMax>;
  }
  if (!attend_merge_fits<Shape>(P.decode.num_splits)) return FOVEAL_ERR_UNSUPPORTED;
  cudaFuncAttributes attr;
  const cudaError_t e = cudaFuncGetAttributes(&attr, out.kernel);
  if (e != cudaSuccess) return static_cast<int>(e);
  const size_t router = router_smem_bytes<kHeadDimMax>(P.decode.max_regions);
  out.stages = attend_stages(Shape::kStageBytes, Shape::kKeys, attr.sharedSizeBytes);
  out.smem = max(attend_smem_bytes(out.stages, Shape::kStageBytes, Shape::kKeys), router);
  return 0;
}

template <typename T, int kHeadDimMax>
int plan_for_group(const foveal_gaze_route_decode_params& P, int group, Launch& out) {
  if (group <= 1) return plan_launch<T, kHeadDimMax, 1>(P, out);
  if (group <= 2) return plan_launch<T, kHeadDimMax, 2>(P, out);
  if constexpr (sizeof(T) == 2) {
    return plan_launch<T, kHeadDimMax, FOVEAL_GAZE_MAX_GROUP>(P, out);
  } else {
    if (group <= 4) return plan_launch<T, kHeadDimMax, 4>(P, out);
    return plan_launch<T, kHeadDimMax, FOVEAL_GAZE_MAX_GROUP>(P, out);
  }
}

// The launch for the call's type, head dim and group (its shared memory not
// yet checked against the device), or FOVEAL_ERR_UNSUPPORTED.
template <typename T>
int plan_for(const foveal_gaze_route_decode_params& P, Launch& out) {
  const foveal_gaze_decode_params& p = P.decode;
  if (p.head_dim <= 0 || p.head_dim % Vec16<T>::kElems != 0 || p.head_dim % 4 != 0 ||
      p.head_dim > FOVEAL_GAZE_MAX_HEAD_DIM || p.kv_heads <= 0 || p.q_heads % p.kv_heads != 0 ||
      p.num_splits <= 0 || p.num_splits > FOVEAL_GAZE_ROUTE_MAX_SPLITS || p.max_regions < 0 ||
      p.max_regions > FOVEAL_GAZE_ROUTE_MAX_REGIONS || P.top_k <= 0) {
    return FOVEAL_ERR_UNSUPPORTED;
  }
  const int group = p.q_heads / p.kv_heads;
  if (p.head_dim <= 64) return plan_for_group<T, 64>(P, group, out);
  if (p.head_dim <= 128) return plan_for_group<T, 128>(P, group, out);
  return plan_for_group<T, 256>(P, group, out);
}

int plan_of(const foveal_gaze_route_decode_params& P, Launch& out) {
  switch (P.decode.dtype) {
    case FOVEAL_F32: return plan_for<float>(P, out);
    case FOVEAL_F16: return plan_for<__half>(P, out);
    case FOVEAL_BF16: return plan_for<__nv_bfloat16>(P, out);
    default: return FOVEAL_ERR_UNSUPPORTED;
  }
}

int launch_gaze_route_decode(const foveal_gaze_route_decode_params& P, cudaStream_t stream) {
  Launch launch{};
  int status = plan_of(P, launch);
  if (status == 0) status = prepare_shared_memory(launch.kernel, launch.smem);  // before anything is enqueued
  if (status != 0) return status;
  const foveal_gaze_decode_params& p = P.decode;
  const int units = units_per_row(p.q_heads, p.kv_heads);
  const int heads_per_unit = min(p.q_heads / p.kv_heads, FOVEAL_GAZE_MAX_GROUP);
  const int64_t unit_count = static_cast<int64_t>(p.batch) * units;
  const int64_t blocks = unit_count * (heads_per_unit + p.num_splits);
  if (blocks > 0x7fffffff) return FOVEAL_ERR_UNSUPPORTED;
  // The units' records and the block counter: the workspace is shared with
  // other ops, which may leave anything there.
  const size_t info_bytes = static_cast<size_t>(unit_count * FOVEAL_GAZE_UNIT_WORDS + 1) * sizeof(int32_t);
  const cudaError_t e = cudaMemsetAsync(p.unit_info, 0, info_bytes, stream);
  if (e != cudaSuccess) return static_cast<int>(e);
  launch.kernel<<<static_cast<unsigned>(blocks), kThreads, launch.smem, stream>>>(P, launch.stages);
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
  foveal::Launch launch{};
  const int status = foveal::plan_of(*p, launch);
  if (status != 0) return status;
  return foveal::shared_memory_of(launch.kernel, launch.smem, *out);
}
