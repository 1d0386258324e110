// The plan step of gaze_decode (SPEC "Gaze Attention / gaze_decode"),
// shared by gaze_decode.cu (its plan kernel) and gaze_route_decode.cu (the
// last router of a unit): a unit's attended set listed as segments. The
// design is in docs/ops/gaze_decode.md.
#pragma once

#include <cub/block/block_scan.cuh>

#include "gaze_attend.cuh"

namespace foveal {
namespace {

// Lists unit `unit` of row b's attended set in order as segments
// (id, head mask, first token, one past the last): the visible ranges (every
// head of the unit, kVisibleFlag), then the regions some head routed,
// ascending, with the mask of those heads; only segments holding a token.
// `routes` are the unit's heads' lists ([heads][p.route_k], -1 padded; read
// with __ldcg: they may come from other blocks of this launch). Writes the
// segments to the unit's list in p.segments and their count and token
// count to its record. `route_bits` is shared memory of ceil(regions / 4)
// words (a byte of head bits per region). Every thread must call it.
template <int kThreads>
__device__ void plan_unit(const foveal_gaze_decode_params& p, int b, int unit, const int32_t* routes,
                          uint32_t* route_bits, typename cub::BlockScan<int, kThreads>::TempStorage& scan) {
  using BlockScan = cub::BlockScan<int, kThreads>;
  const Unit u = unit_of(p.q_heads, p.kv_heads, unit);
  const int regions = p.region_count[b];
  const int n_visible = p.visible_count[b];

  for (int w = threadIdx.x; w < ceil_div(regions, 4); w += kThreads) route_bits[w] = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < u.heads * p.route_k; i += kThreads) {
    const int r = __ldcg(routes + i);  // head i / route_k of the unit; -1 pads
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
  for (int base = 0; base < items; base += kThreads) {
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
    const bool listed = mask != 0 && len > 0;
    int seg_at, seg_total, tok_at, tok_total;
    BlockScan(scan).ExclusiveSum(static_cast<int>(listed), seg_at, seg_total);
    __syncthreads();  // `scan` is reused
    BlockScan(scan).ExclusiveSum(listed ? len : 0, tok_at, tok_total);
    __syncthreads();
    if (listed) segs[n_segs + seg_at] = make_int4(id, mask, n_tokens + tok_at, n_tokens + tok_at + len);
    n_segs += seg_total;
    n_tokens += tok_total;
  }
  if (threadIdx.x == 0) {
    int32_t* info = unit_record(p, b, unit);
    info[kInfoSegments] = n_segs;
    info[kInfoTokens] = n_tokens;
  }
}

}  // namespace
}  // namespace foveal
