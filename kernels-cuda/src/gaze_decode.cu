// gaze_decode: Gaze Attention's sparse decode attention (SPEC "Gaze Attention /
// gaze_decode"): each query head attends its row's always-visible keys and the
// tokens of the regions it routed, with an exact softmax.
//
// The work unit is (row, KV head, chunk of up to FOVEAL_GAZE_MAX_GROUP query
// heads of its GQA group). Two launches on the caller's stream, no host
// synchronisation:
//  1. plan, one block per unit (gaze_plan.cuh): marks in shared memory, per
//     region of the row, which of the unit's heads routed it (a byte of head
//     bits per region), then lists the unit's attended set in order as
//     segments: the visible ranges (every head), then the routed regions
//     ascending (the union over the unit's heads, with their head mask), each
//     with its token span in the concatenated set (a block-wide prefix sum).
//     Unrouted regions get no segment, so no later pass ever touches their
//     tokens. It also zeroes the unit's merge ticket.
//  2. attend, grid (split, unit, row): the flash-decoding split
//     (gaze_attend.cuh). Block `split` takes whole tiles of the unit's
//     attended tokens (sizes only the GPU knows: the slice comes from the
//     plan's token count), lists their positions flat, and streams their K/V
//     rows through a cp.async ring in shared memory, ONCE for all the unit's
//     heads; a head whose mask bit is clear skips the token (a select), so
//     each head's softmax is over exactly its own set. Online softmax
//     (common.cuh) with f32 accumulators, one update per tile; tensor cores
//     for bf16/f16 units of 3 or more heads. The last block of the unit to
//     finish (a ticket) merges the splits' partials by log-sum-exp in split
//     order (gaze_merge.cuh) and writes o (0 when nothing was attended) and
//     lse (-inf then).
// Every float reduction has a fixed order (the only atomics are integer ones:
// the plan's bitwise OR and the ticket, whose winner changes nothing), so the
// output is bit-identical run to run.

#include "gaze_plan.cuh"

namespace foveal {
namespace {

constexpr int kPlanThreads = 256;

__global__ void __launch_bounds__(kPlanThreads) gaze_plan_kernel(const foveal_gaze_decode_params p) {
  extern __shared__ uint32_t route_bits[];  // byte r % 4 of word r / 4: the heads that routed region r
  __shared__ typename cub::BlockScan<int, kPlanThreads>::TempStorage scan;
  const int unit = blockIdx.x;
  const int b = blockIdx.y;
  const Unit u = unit_of(p.q_heads, p.kv_heads, unit);
  const int32_t* routes = p.routes + (static_cast<int64_t>(b) * p.q_heads + u.h0) * p.route_k;
  plan_unit<kPlanThreads>(p, b, unit, routes, route_bits, scan);
  if (threadIdx.x == 0) unit_record(p, b, unit)[kInfoMergeTicket] = 0;  // for the attend kernel's last block
}

template <typename T, int kHeadDimMax, int kGroupMax>
__device__ __forceinline__ void attend_body(const foveal_gaze_decode_params& p, int stages) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int split = blockIdx.x;
  const int unit = blockIdx.y;
  const int b = blockIdx.z;
  const int32_t* info = unit_record(p, b, unit);
  const int4* segs = reinterpret_cast<const int4*>(p.segments) +
                     (static_cast<int64_t>(b) * gridDim.y + unit) * p.max_segments;
  gaze_attend_slice<T, kHeadDimMax, kGroupMax>(p, split, unit, b, segs, info[kInfoSegments], info[kInfoTokens],
                                               stages, smem);
  merge_if_last<T>(p, unit, b, reinterpret_cast<float*>(smem));
}

// Lane-group instances ask for 2 blocks per SM (without it ptxas spills the
// small ones); tensor-core instances are left to ptxas's own choice (asked
// for 2 they take every register and spill at head dim 256).
template <typename T, int kHeadDimMax, int kGroupMax>
__global__ void __launch_bounds__(kAttendThreads, 2) gaze_attend_kernel(const foveal_gaze_decode_params p, int stages) {
  attend_body<T, kHeadDimMax, kGroupMax>(p, stages);
}

template <typename T, int kHeadDimMax, int kGroupMax>
__global__ void __launch_bounds__(kAttendThreads) gaze_attend_mma_kernel(const foveal_gaze_decode_params p,
                                                                         int stages) {
  attend_body<T, kHeadDimMax, kGroupMax>(p, stages);
}

// A prepared attend launch: the kernel instance for the call's type, head
// dim and group, its stages and dynamic shared memory (checked against the
// device and opted in).
struct AttendLaunch {
  void (*kernel)(const foveal_gaze_decode_params, int);
  int stages;
  size_t smem;
};

template <typename T, int kHeadDimMax, int kGroupMax>
int prepare_attend(const foveal_gaze_decode_params& p, AttendLaunch& out) {
  using Shape = AttendShape<T, kHeadDimMax, kGroupMax>;
  if constexpr (Shape::kMma) {
    out.kernel = gaze_attend_mma_kernel<T, kHeadDimMax, kGroupMax>;
  } else {
    out.kernel = gaze_attend_kernel<T, kHeadDimMax, kGroupMax>;
  }
  if (!attend_merge_fits<Shape>(p.num_splits)) return FOVEAL_ERR_UNSUPPORTED;
  cudaFuncAttributes attr;
  const cudaError_t e = cudaFuncGetAttributes(&attr, out.kernel);
  if (e != cudaSuccess) return static_cast<int>(e);
  out.stages = attend_stages(Shape::kStageBytes, Shape::kKeys, attr.sharedSizeBytes);
  out.smem = attend_smem_bytes(out.stages, Shape::kStageBytes, Shape::kKeys);
  return prepare_shared_memory(out.kernel, out.smem);
}

// Lane groups for units of 1 or 2 heads (and every f32 unit); tensor cores
// for bf16/f16 units of 3 to 8 (one instance: their rows are one 16-row tile).
template <typename T, int kHeadDimMax>
int prepare_attend_for_group(const foveal_gaze_decode_params& p, AttendLaunch& out) {
  const int group = p.q_heads / p.kv_heads;
  if (group <= 1) return prepare_attend<T, kHeadDimMax, 1>(p, out);
  if (group <= 2) return prepare_attend<T, kHeadDimMax, 2>(p, out);
  if constexpr (sizeof(T) == 2) {
    return prepare_attend<T, kHeadDimMax, FOVEAL_GAZE_MAX_GROUP>(p, out);
  } else {
    if (group <= 4) return prepare_attend<T, kHeadDimMax, 4>(p, out);
    return prepare_attend<T, kHeadDimMax, FOVEAL_GAZE_MAX_GROUP>(p, out);
  }
}

template <typename T>
int prepare_attend_for_dim(const foveal_gaze_decode_params& p, AttendLaunch& out) {
  if (p.head_dim <= 64) return prepare_attend_for_group<T, 64>(p, out);
  if (p.head_dim <= 128) return prepare_attend_for_group<T, 128>(p, out);
  return prepare_attend_for_group<T, 256>(p, out);
}

template <typename T>
int launch_gaze_decode(const foveal_gaze_decode_params& p, cudaStream_t stream) {
  if (p.head_dim <= 0 || p.head_dim % Vec16<T>::kElems != 0 || p.head_dim > FOVEAL_GAZE_MAX_HEAD_DIM ||
      p.kv_heads <= 0 || p.q_heads % p.kv_heads != 0 || p.num_splits <= 0 || p.max_regions < 0 ||
      p.max_regions > FOVEAL_GAZE_MAX_REGIONS) {
    return FOVEAL_ERR_UNSUPPORTED;
  }
  const int units = units_per_row(p.q_heads, p.kv_heads);
  const size_t plan_smem = static_cast<size_t>(ceil_div(p.max_regions, 4)) * sizeof(uint32_t);
  // Both launches' shared memory checked (and opted in) before anything is enqueued.
  int status = prepare_shared_memory(gaze_plan_kernel, plan_smem);
  AttendLaunch attend{};
  if (status == 0) status = prepare_attend_for_dim<T>(p, attend);
  if (status != 0) return status;
  gaze_plan_kernel<<<dim3(units, p.batch), kPlanThreads, plan_smem, stream>>>(p);
  attend.kernel<<<dim3(p.num_splits, units, p.batch), kAttendThreads, attend.smem, stream>>>(p, attend.stages);
  return launch_status();
}

}  // namespace
}  // namespace foveal

extern "C" int foveal_gaze_decode(const foveal_gaze_decode_params* p, foveal_stream_t stream) {
  if (p->batch == 0 || p->q_heads == 0) return 0;  // nothing to write
  FOVEAL_DISPATCH_DTYPE(p->dtype, T, return foveal::launch_gaze_decode<T>(*p, stream));
  return 0;
}
