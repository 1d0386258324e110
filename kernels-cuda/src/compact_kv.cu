// compact_kv: one-shot compaction of the KV caches of every layer before the
// pruning layer, and the same gather for hidden states and position ids
// (SPEC "GlimpsePrune / compact_kv").
//
// keep_positions builds each row's ascending list of positions to keep from
// the row layout and select_keep's output, without a pass over the whole row:
// the output slot of each position is a rank computed by binary search.
//   text position p:         slot = (p - start) - #visual<p + #kept visual<p
//   j-th kept visual at v:   slot = j + (v - start) - keep_idx[j]
// (#visual<v = keep_idx[j] since the visual positions ascend.)
//
// gather_positions moves every kept entry of every plane (a layer's K or V, a
// hidden-state tensor, a position-id section) in ONE launch: grid (slot tile,
// row, plane); each thread copies whole vectors of the widest width (16 bytes
// when the rows, strides and bases allow it) and zeroes the padded slots.
#include <algorithm>

#include "common.cuh"

namespace foveal {
namespace {

// Number of entries of the ascending array a[0, n) (reached through `at`)
// below `v`.
template <typename At>
__device__ __forceinline__ int count_below(int n, int v, At at) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (at(mid) < v) lo = mid + 1; else hi = mid;
  }
  return lo;
}

__global__ void keep_positions_kernel(const foveal_keep_positions_params p) {
  const int b = blockIdx.y;
  const int start = p.row_start[b];
  const int end = p.row_end[b] - (p.drop_last ? 1 : 0);
  const int nv = p.nv[b];
  const int count = p.keep_count[b];
  const int32_t* vis = p.vis_pos + b * p.vis_stride_b;
  const int32_t* kept = p.keep_idx + b * p.keep_stride_b;
  int32_t* out = p.positions + b * p.positions_stride_b;
  const int length = (end - start) - nv + count;
  auto vis_at = [vis](int i) { return vis[i]; };
  auto kept_pos_at = [vis, kept](int j) { return vis[kept[j]]; };

  const int n_items = max(p.seq, p.width);
  for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < n_items; t += gridDim.x * blockDim.x) {
    const int pos = start + t;
    if (pos < end) {
      const int visual_below = count_below(nv, pos, vis_at);
      const bool is_visual = visual_below < nv && vis[visual_below] == pos;
      if (!is_visual) out[t - visual_below + count_below(count, pos, kept_pos_at)] = pos;
    }
    if (t < count) {
      const int v = vis[kept[t]];
      out[t + (v - start) - kept[t]] = v;
    }
    if (t >= length && t < p.width) out[t] = -1;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) p.lengths[b] = length;
}

// Slots per block: enough vectors per block to keep every thread busy.
constexpr int kGatherThreads = 256;

template <typename V>
__global__ void __launch_bounds__(kGatherThreads) gather_positions_kernel(const foveal_gather_params p, int slots_per_block) {
  const int b = blockIdx.y;
  const int plane = blockIdx.z;
  const int vecs_per_row = p.row_bytes / static_cast<int>(sizeof(V));
  const int vecs_per_slot = p.heads * vecs_per_row;
  const int len = p.lengths[b];
  const int pad = p.left_pad ? p.dst_seq - len : 0;  // first slot holding a kept entry
  const int32_t* positions = p.positions + b * p.positions_stride_b;
  const char* src = static_cast<const char*>(p.src[plane]) + b * p.src_stride_b;
  char* dst = static_cast<char*>(p.dst[plane]) + b * p.dst_stride_b;

  const int slot0 = blockIdx.x * slots_per_block;
  const int n_items = slots_per_block * vecs_per_slot;
  for (int t = threadIdx.x; t < n_items; t += kGatherThreads) {
    const int j = slot0 + t / vecs_per_slot;
    if (j >= p.dst_seq) break;
    const int rem = t % vecs_per_slot;
    const int h = rem / vecs_per_row;
    const int c = rem % vecs_per_row;
    const int kept = j - pad;  // index into this row's kept positions
    V value{};
    if (kept >= 0 && kept < len) {
      const int64_t at = static_cast<int64_t>(positions[kept]) * p.src_stride_s + h * p.src_stride_h;
      value = reinterpret_cast<const V*>(src + at)[c];
    }
    reinterpret_cast<V*>(dst + j * p.dst_stride_s + h * p.dst_stride_h)[c] = value;
  }
}

template <typename V>
void launch_gather(const foveal_gather_params& p, cudaStream_t stream) {
  const int vecs_per_slot = p.heads * (p.row_bytes / static_cast<int>(sizeof(V)));
  const int slots_per_block = max(1, min(64, 4 * kGatherThreads / vecs_per_slot));
  const dim3 grid(ceil_div(p.dst_seq, slots_per_block), p.batch, p.num_planes);
  gather_positions_kernel<V><<<grid, kGatherThreads, 0, stream>>>(p, slots_per_block);
}

// The widest access that divides every row, stride and base address.
int gather_vector_bytes(const foveal_gather_params& p) {
  uint64_t bits = static_cast<uint64_t>(p.row_bytes) | static_cast<uint64_t>(p.src_stride_b) |
                  static_cast<uint64_t>(p.src_stride_s) | static_cast<uint64_t>(p.src_stride_h) |
                  static_cast<uint64_t>(p.dst_stride_b) | static_cast<uint64_t>(p.dst_stride_s) |
                  static_cast<uint64_t>(p.dst_stride_h);
  for (int i = 0; i < p.num_planes; ++i) {
    bits |= reinterpret_cast<uintptr_t>(p.src[i]) | reinterpret_cast<uintptr_t>(p.dst[i]);
  }
  for (int width = 16; width > 1; width /= 2) {
    if ((bits & static_cast<uint64_t>(width - 1)) == 0) return width;
  }
  return 1;
}

}  // namespace
}  // namespace foveal

extern "C" int foveal_keep_positions(const foveal_keep_positions_params* p, foveal_stream_t stream) {
  if (p->batch <= 0) return 0;
  const int n_items = std::max(std::max(p->seq, p->width), 1);
  const dim3 grid(std::min(foveal::ceil_div(n_items, 256), 1024), p->batch);
  foveal::keep_positions_kernel<<<grid, 256, 0, stream>>>(*p);
  return foveal::launch_status();
}

extern "C" int foveal_gather_positions(const foveal_gather_params* p, foveal_stream_t stream) {
  if (p->num_planes < 0 || p->num_planes > FOVEAL_GATHER_MAX_PLANES) return FOVEAL_ERR_UNSUPPORTED;
  if (p->num_planes == 0 || p->batch <= 0 || p->heads <= 0 || p->row_bytes <= 0 || p->dst_seq <= 0) return 0;
  switch (foveal::gather_vector_bytes(*p)) {
    case 16: foveal::launch_gather<uint4>(*p, stream); break;
    case 8: foveal::launch_gather<uint2>(*p, stream); break;
    case 4: foveal::launch_gather<uint32_t>(*p, stream); break;
    case 2: foveal::launch_gather<uint16_t>(*p, stream); break;
    default: foveal::launch_gather<uint8_t>(*p, stream); break;
  }
  return foveal::launch_status();
}
