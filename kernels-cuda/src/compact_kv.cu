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
// hidden-state tensor, a position-id section) in ONE launch: grid (slot tile
// x head, row, plane); each thread copies whole vectors of the widest width
// (16 bytes when the rows, strides and bases allow it), four slots at once,
// and zeroes the padded slots (docs/ops/compact_kv.md).
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

constexpr int kGatherThreads = 256;
constexpr int kGatherUnroll = 4;  // slots a thread moves at once: their loads all issued before the stores

// What a padded slot reads: zeros, from an address that is always valid, so
// that every load is unconditional (no branch between the loads and the
// stores for the compiler to schedule around).
__device__ __align__(16) const unsigned char kZeros[16] = {};

// Block (slot tile x head, row, plane), threads (x: vectors of a head's row,
// y: slots). A thread's head and column need no division (the head is the
// block's, the column its x), and its kGatherUnroll slots are y + u *
// blockDim.y of the tile: it loads their positions, then one vector of each
// (kGatherUnroll loads in flight), then stores them; a slot holding no kept
// entry (the padding) gets zeros (kZeros). The columns of a row past blockDim.x take
// further turns.
template <typename V>
__global__ void __launch_bounds__(kGatherThreads) gather_positions_kernel(const foveal_gather_params p) {
  const int h = blockIdx.x % p.heads;
  const int tile = blockIdx.x / p.heads;
  const int b = blockIdx.y;
  const int plane = blockIdx.z;
  const int vecs_per_row = p.row_bytes / static_cast<int>(sizeof(V));
  const int len = p.lengths[b];
  const int pad = p.left_pad ? p.dst_seq - len : 0;  // first slot holding a kept entry
  const int32_t* positions = p.positions + b * p.positions_stride_b;
  const char* src = static_cast<const char*>(p.src[plane]) + b * p.src_stride_b + h * p.src_stride_h;
  char* dst = static_cast<char*>(p.dst[plane]) + b * p.dst_stride_b + h * p.dst_stride_h;

  const int slot0 = tile * (blockDim.y * kGatherUnroll) + threadIdx.y;
  // Per slot: the source row (kZeros, not advancing with the column, for a
  // slot without a kept entry) and the destination row (null past dst_seq).
  const char* from[kGatherUnroll];
  int step[kGatherUnroll];
  char* to[kGatherUnroll];
#pragma unroll
  for (int u = 0; u < kGatherUnroll; ++u) {
    const int j = slot0 + u * static_cast<int>(blockDim.y);
    const int kept = j - pad;  // index into the row's kept positions
    const int pos = kept >= 0 && kept < len ? positions[kept] : -1;
    from[u] = pos >= 0 ? src + pos * p.src_stride_s : reinterpret_cast<const char*>(kZeros);
    step[u] = pos >= 0 ? static_cast<int>(sizeof(V)) : 0;
    to[u] = j < p.dst_seq ? dst + j * p.dst_stride_s : nullptr;
  }
  for (int c = threadIdx.x; c < vecs_per_row; c += blockDim.x) {
    V value[kGatherUnroll];
#pragma unroll
    for (int u = 0; u < kGatherUnroll; ++u) value[u] = *reinterpret_cast<const V*>(from[u] + c * step[u]);
#pragma unroll
    for (int u = 0; u < kGatherUnroll; ++u) {
      if (to[u] != nullptr) reinterpret_cast<V*>(to[u])[c] = value[u];
    }
  }
}

// The block of launch_gather for rows of `vecs` vectors: x covers a row in
// as few turns of at most kGatherThreads as possible (whole warps where a
// row has more than 32 vectors), y the slots.
dim3 gather_block(int vecs) {
  if (vecs <= 32) return dim3(vecs, kGatherThreads / vecs);
  const int turns = ceil_div(vecs, kGatherThreads);
  const int x = min(kGatherThreads, ceil_div(ceil_div(vecs, turns), 32) * 32);
  return dim3(x, kGatherThreads / x);
}

template <typename V>
int launch_gather(const foveal_gather_params& p, cudaStream_t stream) {
  const dim3 block = gather_block(p.row_bytes / static_cast<int>(sizeof(V)));
  const int64_t tiles = ceil_div(p.dst_seq, static_cast<int>(block.y) * kGatherUnroll);
  if (tiles * p.heads > 0x7fffffff || p.batch > 65535) return FOVEAL_ERR_UNSUPPORTED;
  const dim3 grid(static_cast<unsigned>(tiles * p.heads), p.batch, p.num_planes);
  gather_positions_kernel<V><<<grid, block, 0, stream>>>(p);
  return launch_status();
}

// The widest access that divides every row, stride and base address.
int gather_vector_bytes(const foveal_gather_params& p) {
  uint64_t bits = static_cast<uint64_t>(p.row_bytes) | stepped_stride(p.src_stride_b, p.batch) |
                  static_cast<uint64_t>(p.src_stride_s) | stepped_stride(p.src_stride_h, p.heads) |
                  stepped_stride(p.dst_stride_b, p.batch) | stepped_stride(p.dst_stride_s, p.dst_seq) |
                  stepped_stride(p.dst_stride_h, p.heads);
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
    case 16: return foveal::launch_gather<uint4>(*p, stream);
    case 8: return foveal::launch_gather<uint2>(*p, stream);
    case 4: return foveal::launch_gather<uint32_t>(*p, stream);
    case 2: return foveal::launch_gather<uint16_t>(*p, stream);
    default: return foveal::launch_gather<uint8_t>(*p, stream);
  }
}
