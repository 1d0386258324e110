// gaze_decode: Gaze Attention's sparse decode attention (SPEC "Gaze Attention /
// gaze_decode"): each query head attends its row's always-visible keys and the
// tokens of the regions it routed, with an exact softmax.
//
// The work unit is (row, KV head, chunk of up to FOVEAL_GAZE_MAX_GROUP query
// heads of its GQA group). Three launches on the caller's stream, no host
// synchronisation:
//  1. plan, one block per unit: marks in shared memory, per region of the row,
//     which of the unit's heads routed it (a byte of head bits per region),
//     then lists the unit's attended set in order as segments: the visible
//     ranges (every head), then the routed regions ascending (the union over
//     the unit's heads, with their head mask), each with its token span in the
//     concatenated set (a block-wide prefix sum). Unrouted regions get no
//     segment, so no later pass ever touches their tokens.
//  2. attend, grid (split, unit, row): the flash-decoding split. Block `split`
//     takes one contiguous slice of the unit's attended tokens (sizes only the
//     GPU knows: the slice is computed from the plan's token count). A lane
//     group reads one token's key and value with 16-byte loads, ONCE for all
//     the unit's heads (their queries sit in registers); a head whose mask
//     bit is clear skips the token, so each head's softmax is over exactly
//     its own set. Online softmax (common.cuh) with f32 accumulators, a few
//     tokens per step; the lane groups' states merge in shared memory (fixed
//     order) into the block's partial (max, sum, unnormalised output).
//  3. merge, one block per (row, query head): combines the splits' partials by
//     log-sum-exp in split order, writes o (0 when nothing was attended) and
//     lse (-inf then).
// Every reduction has a fixed order (the only atomic is a bitwise OR), so the
// output is bit-identical run to run.

#include <cub/block/block_scan.cuh>

#include "gaze_attend.cuh"

namespace foveal {
namespace {

constexpr int kPlanThreads = 256;
constexpr int kMergeThreads = 128;

__global__ void __launch_bounds__(kPlanThreads) gaze_plan_kernel(const foveal_gaze_decode_params p) {
  using BlockScan = cub::BlockScan<int, kPlanThreads>;
  extern __shared__ uint32_t route_bits[];  // byte r % 4 of word r / 4: the heads that routed region r
  __shared__ typename BlockScan::TempStorage scan;
  const int unit = blockIdx.x;
  const int b = blockIdx.y;
  const Unit u = unit_of(p.q_heads, p.kv_heads, unit);
  const int regions = p.region_count[b];
  const int n_visible = p.visible_count[b];

  for (int w = threadIdx.x; w < ceil_div(regions, 4); w += kPlanThreads) route_bits[w] = 0;
  __syncthreads();
  const int32_t* routes = p.routes + (static_cast<int64_t>(b) * p.q_heads + u.h0) * p.route_k;
  for (int i = threadIdx.x; i < u.heads * p.route_k; i += kPlanThreads) {
    const int r = routes[i];  // head i / route_k of the unit; -1 pads
    if (r >= 0) atomicOr(&route_bits[r / 4], 1u << (8 * (r % 4) + i / p.route_k));
  }
  __syncthreads();

  // Items: the visible ranges, then every region; the routed ones become segments.
  int4* segs = reinterpret_cast<int4*>(p.segments) +
               (static_cast<int64_t>(b) * units_per_row(p.q_heads, p.kv_heads) + unit) * p.max_segments;
  const int32_t* visible = p.visible + static_cast<int64_t>(b) * p.max_visible * 2;
  const int all_heads = (1 << u.heads) - 1;
  const int items = n_visible + regions;
  int n_segs = 0;
  int n_tokens = 0;
  for (int base = 0; base < items; base += kPlanThreads) {
    const int i = base + threadIdx.x;
    int id = 0, mask = 0, len = 0;
    if (i < n_visible) {
      id = visible[2 * i];
      len = visible[2 * i + 1] - id;
      mask = all_heads | kVisibleFlag;
    } else if (i < items) {
      id = i - n_visible;
      mask = (route_bits[id / 4] >> (8 * (id % 4))) & 0xff;
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
  if (threadIdx.x == 0) {
    int32_t* info = p.unit_tokens + (static_cast<int64_t>(b) * units_per_row(p.q_heads, p.kv_heads) + unit) * 2;
    info[0] = n_segs;
    info[1] = n_tokens;
  }
}

template <typename T, int kHeadDimMax, int kGroupMax>
__global__ void __launch_bounds__(kAttendThreads, 2) gaze_attend_kernel(const foveal_gaze_decode_params p) {
  const int split = blockIdx.x;
  const int unit = blockIdx.y;
  const int b = blockIdx.z;
  const int64_t unit_index = static_cast<int64_t>(b) * gridDim.y + unit;
  const int n_segs = p.unit_tokens[unit_index * 2];
  const int total = p.unit_tokens[unit_index * 2 + 1];
  const int4* segs = reinterpret_cast<const int4*>(p.segments) + unit_index * p.max_segments;
  gaze_attend_slice<T, kHeadDimMax, kGroupMax>(p, split, unit, b, segs, n_segs, total);
}

// One block per (query head, row): the splits' partials merged by
// log-sum-exp in split order (merge_splits).
template <typename T>
__global__ void __launch_bounds__(kMergeThreads) gaze_merge_kernel(const foveal_gaze_decode_params p) {
  extern __shared__ float weight[];  // [num_splits]
  __shared__ float sm_lse;
  merge_splits<T, kMergeThreads>(p, blockIdx.y, blockIdx.x, weight, &sm_lse);
}

template <typename T, int kHeadDimMax, int kGroupMax>
void launch_attend(const foveal_gaze_decode_params& p, int units, cudaStream_t stream) {
  const dim3 grid(p.num_splits, units, p.batch);
  gaze_attend_kernel<T, kHeadDimMax, kGroupMax><<<grid, kAttendThreads, 0, stream>>>(p);
}

template <typename T, int kHeadDimMax>
void launch_attend_for_group(const foveal_gaze_decode_params& p, int units, cudaStream_t stream) {
  const int group = p.q_heads / p.kv_heads;
  if (group <= 1) launch_attend<T, kHeadDimMax, 1>(p, units, stream);
  else if (group <= 2) launch_attend<T, kHeadDimMax, 2>(p, units, stream);
  else if (group <= 4) launch_attend<T, kHeadDimMax, 4>(p, units, stream);
  else launch_attend<T, kHeadDimMax, FOVEAL_GAZE_MAX_GROUP>(p, units, stream);
}

template <typename T>
int launch_gaze_decode(const foveal_gaze_decode_params& p, cudaStream_t stream) {
  if (p.head_dim <= 0 || p.head_dim % Vec16<T>::kElems != 0 || p.head_dim > FOVEAL_GAZE_MAX_HEAD_DIM ||
      p.kv_heads <= 0 || p.q_heads % p.kv_heads != 0 || p.num_splits <= 0 || p.max_regions < 0 ||
      p.max_regions > FOVEAL_GAZE_MAX_REGIONS) {
    return FOVEAL_ERR_UNSUPPORTED;
  }
  const int units = p.kv_heads * ceil_div(p.q_heads / p.kv_heads, FOVEAL_GAZE_MAX_GROUP);
  const size_t plan_smem = static_cast<size_t>(ceil_div(p.max_regions, 4)) * sizeof(uint32_t);
  const size_t merge_smem = static_cast<size_t>(p.num_splits) * sizeof(float);
  // Both launches with dynamic shared memory checked before anything is enqueued.
  int status = prepare_shared_memory(gaze_plan_kernel, plan_smem);
  if (status == 0) status = prepare_shared_memory(gaze_merge_kernel<T>, merge_smem);
  if (status != 0) return status;
  gaze_plan_kernel<<<dim3(units, p.batch), kPlanThreads, plan_smem, stream>>>(p);
  if (p.head_dim <= 64) launch_attend_for_group<T, 64>(p, units, stream);
  else if (p.head_dim <= 128) launch_attend_for_group<T, 128>(p, units, stream);
  else launch_attend_for_group<T, 256>(p, units, stream);
  gaze_merge_kernel<T><<<dim3(p.q_heads, p.batch), kMergeThreads, merge_smem, stream>>>(p);
  return launch_status();
}

}  // namespace
}  // namespace foveal

extern "C" int foveal_gaze_decode(const foveal_gaze_decode_params* p, foveal_stream_t stream) {
  if (p->batch == 0 || p->q_heads == 0) return 0;  // nothing to write
  FOVEAL_DISPATCH_DTYPE(p->dtype, T, return foveal::launch_gaze_decode<T>(*p, stream));
  return 0;
}
