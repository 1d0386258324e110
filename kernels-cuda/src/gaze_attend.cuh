// The attend step of gaze_decode (SPEC "Gaze Attention / gaze_decode"),
// shared by gaze_decode.cu (its attend kernel) and gaze_route_decode.cu (its
// attend blocks): a block attends one slice of a unit's attended set (listed
// as segments by gaze_plan.cuh), writes its partial softmax state, and the
// last block of the unit merges the partials (gaze_merge.cuh). The design is
// in docs/ops/gaze_decode.md.
//
// A block's slice is whole tiles of the unit's attended tokens. Its prologue
// lists the slice's tokens flat (cache position, head mask) in the
// workspace; then K/V tiles are staged into shared memory by cp.async in a
// ring of 2 to 4 stages, the positions of a tile loaded a tile ahead of the
// copies that use them, one barrier and one online-softmax update per tile.
// Math: tensor cores (attention_tile.cuh, at most 8 query rows) for bf16/f16
// groups of 3 or more heads (every unit of them); lane groups over 16-byte
// chunks otherwise.
#pragma once

#include "attention_tile.cuh"
#include "gaze_merge.cuh"

namespace foveal {
namespace {

constexpr int kAttendThreads = 128;
constexpr int kVisibleFlag = 1 << 8;  // segment mask bit: a visible range (id = its first position)

// The words of a unit's record in p.unit_info (FOVEAL_GAZE_UNIT_WORDS int32).
constexpr int kInfoSegments = 0;     // segments listed by the plan
constexpr int kInfoTokens = 1;       // attended tokens
constexpr int kInfoMergeTicket = 2;  // attend blocks done (the last merges)
constexpr int kInfoRouteTicket = 3;  // gaze_route_decode: routers done (the last plans)
constexpr int kInfoReady = 4;        // gaze_route_decode: the plan is published
static_assert(kInfoReady < FOVEAL_GAZE_UNIT_WORDS, "unit record");

// Stages of the K/V ring: the launcher picks how many fit (attend_stages).
constexpr int kMinStages = 2;
constexpr int kMaxStages = 4;

// Query heads of one unit, and where they start.
struct Unit {
  int kv_head, h0, heads;
};

__device__ __forceinline__ Unit unit_of(int q_heads, int kv_heads, int unit) {
  const int group = q_heads / kv_heads;
  const int chunks = ceil_div(group, FOVEAL_GAZE_MAX_GROUP);
  const int kvh = unit / chunks;
  const int chunk = unit % chunks;
  return {kvh, kvh * group + chunk * FOVEAL_GAZE_MAX_GROUP, min(FOVEAL_GAZE_MAX_GROUP, group - chunk * FOVEAL_GAZE_MAX_GROUP)};
}

__host__ __device__ __forceinline__ int units_per_row(int q_heads, int kv_heads) {
  return kv_heads * ceil_div(q_heads / kv_heads, FOVEAL_GAZE_MAX_GROUP);
}

__device__ __forceinline__ int32_t* unit_record(const foveal_gaze_decode_params& p, int b, int unit) {
  return p.unit_info + (static_cast<int64_t>(b) * units_per_row(p.q_heads, p.kv_heads) + unit) * FOVEAL_GAZE_UNIT_WORDS;
}

// The shapes of one attend instance: element type T, head dims up to
// kHeadDimMax (the runtime one is any multiple of the 16-byte vector up to
// it, zero-padded), units of up to kGroupMax heads.
template <typename T, int kHeadDimMax, int kGroupMax>
struct AttendShape {
  static constexpr int kVec = Vec16<T>::kElems;
  static constexpr int kChunks = kHeadDimMax / kVec;  // 16-byte chunks of a row
  static constexpr int kStride = kHeadDimMax + kVec;  // elements per staged row: the row + 16 bytes
  static constexpr int kRowBytes = kStride * static_cast<int>(sizeof(T));
  // Tensor cores: bf16/f16 units of 3 to 8 heads; a warp owns 16 keys of a tile.
  static constexpr bool kMma = sizeof(T) == 2 && kGroupMax >= 3 && kGroupMax <= 8;
  // Lane groups: kLanes lanes share a token's row, kHeadSplit of them side by
  // side hold kHeadsPerThread heads each; kKeyGroups groups per block.
  static constexpr int kLanes = kChunks < 32 ? kChunks : 32;
  static constexpr int kChunksPerLane = kChunks / kLanes;
  static constexpr int kHeadsPerThread = kGroupMax < 4 ? kGroupMax : 4;
  static constexpr int kHeadSplit = kGroupMax / kHeadsPerThread;
  static constexpr int kKeyGroups = kAttendThreads / (kLanes * kHeadSplit);
  // Keys per tile: a stage of K and V within about 36 KB; for lane groups
  // at most 8 tokens per group (their scores are held for the tile's update).
  static constexpr int kBudget = 36 * 1024;
  static constexpr int kKeysBySize = 2 * 64 * kRowBytes <= kBudget ? 64 : 2 * 32 * kRowBytes <= kBudget ? 32 : 16;
  static constexpr int kKeys = kMma || kKeysBySize <= 8 * kKeyGroups ? kKeysBySize : 8 * kKeyGroups;
  static constexpr int kUnroll = kKeys / kKeyGroups;    // tokens per lane group and tile
  static constexpr int kSlice = kChunksPerLane * kVec;  // output elements a lane holds per head
  static_assert(kMma || (kKeys % kKeyGroups == 0 && kUnroll >= 1), "whole tiles per lane group");
  static constexpr int kMmaWarps = kKeys / 16;
  static constexpr int kStageBytes = 2 * kKeys * kRowBytes;  // K then V
  // Each thread copies one fixed chunk column of kCopies rows of K and of V per tile.
  static constexpr int kRowsPerPass = kAttendThreads / kChunks;
  static constexpr int kCopies = kKeys / kRowsPerPass;
  static_assert(kAttendThreads % kChunks == 0 && kKeys % kRowsPerPass == 0, "whole copy passes");
  // The states merged at the end: warps (mma) or lane groups, each [heads][D] floats.
  static constexpr int kStates = kMma ? kMmaWarps : kKeyGroups;
  static constexpr int kStateRows = kMma ? 8 : kGroupMax;
  static constexpr size_t kEpilogueBytes = static_cast<size_t>(kStates) * kStateRows * kHeadDimMax * 4;
  static_assert(kEpilogueBytes <= static_cast<size_t>(kMinStages) * kStageBytes, "the epilogue reuses the ring");
};

// Dynamic shared memory of the attend step with `stages` stages: the K/V
// ring, then stages + 1 slots of positions and of masks. The epilogue reuses
// the ring (it is at least 2 stages of 16 keys, more than any epilogue).
__host__ __device__ constexpr size_t attend_smem_bytes(int stages, int stage_bytes, int keys) {
  return static_cast<size_t>(stages) * stage_bytes + static_cast<size_t>(stages + 1) * keys * 5;
}

// Whether the merge's weights (`splits` floats) fit the ring's smallest size
// (merge_if_last keeps them there).
template <typename Shape>
constexpr bool attend_merge_fits(int splits) {
  return static_cast<size_t>(splits) * sizeof(float) <= static_cast<size_t>(kMinStages) * Shape::kStageBytes;
}

// The stages a launch uses: as many as fit, up to kMaxStages, in half the
// multiprocessor's shared memory less `fixed` (the kernel's static part and
// any other dynamic part) and a kilobyte (so two blocks share an SM: 113 KB
// on sm_90, 81 KB on sm_80); at least kMinStages (prepare_shared_memory then
// checks the block against the device's limit).
inline int attend_stages(int stage_bytes, int keys, size_t fixed) {
  int device = 0, per_sm = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device) != cudaSuccess) {
    return kMinStages;
  }
  const size_t budget = static_cast<size_t>(per_sm) / 2 - 1024;
  int stages = kMinStages;
  while (stages < kMaxStages && fixed + attend_smem_bytes(stages + 1, stage_bytes, keys) <= budget) ++stages;
  return stages;
}

// ------------------------------------------------------------------ prologue

// The first segment of `segs[0..n)` (ends ascending) whose end is past token
// x, found by the whole block: each round samples kAttendThreads segments
// evenly and narrows to the gap holding the answer (2 rounds up to 16,384
// segments). Every thread gets it; every thread must call it.
__device__ int segment_of(const int4* segs, int n, int x) {
  int base = 0;  // the answer lies in [base, base + n]
  for (;;) {
    const int stride = ceil_div(max(n, 1), kAttendThreads);
    const int k = threadIdx.x * stride;
    const bool below = k < n && __ldcg(&segs[base + k].w) <= x;
    const int c = __syncthreads_count(below);
    if (stride == 1) return base + c;
    // samples 0..c-1 end at or before x; sample c (if any) after it
    const int first = c == 0 ? base : base + (c - 1) * stride + 1;
    const int last = base + min(c * stride, n);
    base = first;
    n = last - first;
  }
}

// Lists the unit's attended tokens [lo, hi) flat: pos[t] its cache
// position, mask[t] the unit's heads attending it (the segment's mask). The
// tokens of each round of kAttendThreads lie in the kAttendThreads segments
// from the one holding the round's first token (each holds at least one
// token): a window of them in shared memory, searched by each thread for its
// token, and loaded again only when a round starts in another segment. Every thread must call it;
// on return (after a barrier) the block's writes are visible to the block.
__device__ void list_tokens(const foveal_gaze_decode_params& p, int b, const int4* segs, int n_segs, int lo, int hi,
                           int32_t* pos, uint8_t* mask) {
  __shared__ int4 window[kAttendThreads];
  // The next round's first segment, double-buffered by round: thread
  // kAttendThreads - 1 writes round r's entry while a slower thread may
  // still be reading round r - 1's (no barrier between them when a round
  // keeps its window).
  __shared__ int next[2];
  if (lo >= hi) return;
  const int32_t* region_pos = p.region_pos + static_cast<int64_t>(b) * p.max_regions * p.max_region_len;
  int seg = segment_of(segs, n_segs, lo);
  int loaded = -1;  // the first segment of the window in shared memory
  for (int base = lo, round = 0; base < hi; base += kAttendThreads, round ^= 1) {
    if (seg != loaded) {  // (uniform) a long segment keeps its window
      if (seg + static_cast<int>(threadIdx.x) < n_segs) window[threadIdx.x] = __ldcg(&segs[seg + threadIdx.x]);
      loaded = seg;
      __syncthreads();
    }
    const int t = base + threadIdx.x;
    if (t < hi) {
      int a = 0, e = min(kAttendThreads, n_segs - seg);  // the last entry starting at or before t
      // (the window starts at the segment holding `base`, so t's segment is in it)
      while (e - a > 1) {
        const int mid = (a + e) / 2;
        if (window[mid].z <= t) a = mid; else e = mid;
      }
      const int4 s = window[a];
      const int i = t - s.z;
      pos[t] = (s.y & kVisibleFlag) ? s.x + i : __ldg(region_pos + static_cast<int64_t>(s.x) * p.max_region_len + i);
      mask[t] = static_cast<uint8_t>(s.y & 0xff);
      // the segment of the next round's first token, t + 1
      if (threadIdx.x == kAttendThreads - 1) next[round] = seg + a + (s.w <= t + 1);
    }
    __syncthreads();
    seg = next[round];
  }
}

// ------------------------------------------------------------------ the ring

// The K/V ring of one block in dynamic shared memory (AttendShape's
// layout), and the copies of one tile into a stage.
template <typename Shape, typename T>
struct Ring {
  unsigned char* base;
  int stages;

  __device__ T* k(int stage) const { return reinterpret_cast<T*>(base + stage * Shape::kStageBytes); }
  __device__ T* v(int stage) const { return k(stage) + Shape::kKeys * Shape::kStride; }
  __device__ int32_t* pos(int slot) const {
    return reinterpret_cast<int32_t*>(base + stages * Shape::kStageBytes) + slot * Shape::kKeys;
  }
  __device__ uint8_t* mask(int slot) const {
    return reinterpret_cast<uint8_t*>(base + stages * Shape::kStageBytes) + (stages + 1) * Shape::kKeys * 4 +
           slot * Shape::kKeys;
  }
};

// Waits until at most `pending` committed copy groups are in flight (0 to
// kMaxStages - 2; the immediate must be a constant).
__device__ __forceinline__ void cp_async_wait_pending(int pending) {
  if (pending >= 2) attn::cp_async_wait<2>();
  else if (pending == 1) attn::cp_async_wait<1>();
  else attn::cp_async_wait<0>();
}

// Where tile t of the attend loop lives: its stage of the ring and its
// slot of positions, the stage and slot that tile t + stages - 1's copies
// go to, and the slot that takes tile t + stages's positions (t - 1's, free
// once tile t's barrier has passed). Advanced by one compare-and-reset per
// index rather than `t % stages` (a runtime modulo costs ~20 instructions).
struct RingCursor {
  int stage, slot, issue_stage, issue_slot, store_slot;

  __device__ explicit RingCursor(int stages)
      : stage(0), slot(0), issue_stage(stages - 1), issue_slot(stages - 1), store_slot(stages) {}

  __device__ void advance(int stages) {
    stage = wrap_next(stage, stages);
    issue_stage = wrap_next(issue_stage, stages);
    slot = wrap_next(slot, stages + 1);
    issue_slot = wrap_next(issue_slot, stages + 1);
    store_slot = wrap_next(store_slot, stages + 1);
  }

  __device__ static int wrap_next(int i, int n) { return i + 1 == n ? 0 : i + 1; }
};

// ---------------------------------------------------------------- the attend

// One block's share of a unit's attended set and its partial: block `split`
// of p.num_splits takes whole tiles [lo, hi) of the unit's `total` tokens
// (listed as `n_segs` segments `segs`), attends them with `stages` stages
// of dynamic shared memory `smem`, and writes each of the unit's heads'
// partial (max, sum, unnormalised o) to p.partial_ml / p.partial_o. Every
// thread must call it. `segs` and the unit's token lists may have been
// written by other blocks of this launch (they are read with __ldcg).
template <typename T, int kHeadDimMax, int kGroupMax>
__device__ __forceinline__ void gaze_attend_slice(const foveal_gaze_decode_params& p, int split, int unit, int b,
                                                  const int4* segs, int n_segs, int total, int stages,
                                                  unsigned char* smem) {
  using Shape = AttendShape<T, kHeadDimMax, kGroupMax>;
  constexpr int kKeys = Shape::kKeys, kStride = Shape::kStride, kVec = Shape::kVec;
  const Unit u = unit_of(p.q_heads, p.kv_heads, unit);
  const int n_chunks = p.head_dim / kVec;
  const int64_t unit_index = static_cast<int64_t>(b) * units_per_row(p.q_heads, p.kv_heads) + unit;
  int32_t* list_pos = p.token_pos + unit_index * p.max_tokens;
  uint8_t* list_mask = p.token_mask + unit_index * p.max_tokens;

  // This block's slice [lo, hi): whole tiles (the last block's may be
  // shorter, later ones empty).
  const int64_t per_split = static_cast<int64_t>(ceil_div(ceil_div(total, p.num_splits), kKeys)) * kKeys;
  const int lo = static_cast<int>(min(static_cast<int64_t>(total), split * per_split));
  const int hi = static_cast<int>(min(static_cast<int64_t>(total), lo + per_split));
  const int n_tiles = ceil_div(hi - lo, kKeys);

  list_tokens(p, b, segs, n_segs, lo, hi, list_pos, list_mask);

  const Ring<Shape, T> ring{smem, stages};
  if (n_chunks < Shape::kChunks) {
    // Columns past the head dim are never copied: zero them once in the K
    // stages (the mma dot products read them, against zero query columns).
    for (int s = 0; s < stages; ++s) {
      for (int i = threadIdx.x; i < kKeys * (kStride - n_chunks * kVec) / kVec; i += kAttendThreads) {
        const int per_row = (kStride - n_chunks * kVec) / kVec;
        *reinterpret_cast<uint4*>(ring.k(s) + (i / per_row) * kStride + n_chunks * kVec + (i % per_row) * kVec) =
            make_uint4(0, 0, 0, 0);
      }
    }
  }

  const T* k_bh = static_cast<const T*>(p.k) + b * p.k_stride_b + u.kv_head * p.k_stride_h;
  const T* v_bh = static_cast<const T*>(p.v) + b * p.v_stride_b + u.kv_head * p.v_stride_h;
  const int copy_chunk = threadIdx.x % Shape::kChunks;
  const int copy_row = threadIdx.x / Shape::kChunks;
  // The copies of tile `tile` into stage `stage`, its positions in slot
  // `slot`: kCopies 16-byte cp.async of K and of V per thread, none for
  // tokens past the slice (their rows are never used: masked out) or columns
  // past the head dim.
  auto issue_tile = [&](int tile, int stage, int slot) {
    if (tile < n_tiles && copy_chunk < n_chunks) {
      const int32_t* pos = ring.pos(slot);
      T* ks = ring.k(stage) + copy_chunk * kVec;
      T* vs = ring.v(stage) + copy_chunk * kVec;
#pragma unroll
      for (int i = 0; i < Shape::kCopies; ++i) {
        const int r = copy_row + i * Shape::kRowsPerPass;
        const int64_t at = pos[r];
        if (at >= 0) {
          attn::cp_async_16(ks + r * kStride, k_bh + at * p.k_stride_s + copy_chunk * kVec, true);
          attn::cp_async_16(vs + r * kStride, v_bh + at * p.v_stride_s + copy_chunk * kVec, true);
        }
      }
    }
    attn::cp_async_commit();  // possibly empty: the group count stays one per tile
  };
  // A tile's positions and masks (thread i < kKeys: token i of the tile; -1
  // and 0 past the slice), loaded into registers.
  auto load_meta = [&](int tile, int32_t& pos, uint8_t& mask) {
    const int t = lo + tile * kKeys + static_cast<int>(threadIdx.x);
    const bool in = threadIdx.x < kKeys && tile < n_tiles && t < hi;
    pos = in ? __ldcg(list_pos + t) : -1;
    mask = in ? __ldcg(list_mask + t) : 0;
  };
  auto store_meta = [&](int slot, int32_t pos, uint8_t mask) {
    if (threadIdx.x < kKeys) {
      ring.pos(slot)[threadIdx.x] = pos;
      ring.mask(slot)[threadIdx.x] = mask;
    }
  };

  // Prologue: the positions of tiles 0..stages-1 (loads issued together),
  // the copies of 0..stages-2.
  {
    int32_t pos[kMaxStages];
    uint8_t mask[kMaxStages];
#pragma unroll
    for (int j = 0; j < kMaxStages; ++j) load_meta(j < stages ? j : n_tiles, pos[j], mask[j]);
#pragma unroll
    for (int j = 0; j < kMaxStages; ++j) {
      if (j < stages) store_meta(j, pos[j], mask[j]);
    }
  }
  __syncthreads();
  // (Not unrolled: at most 3 tiles, and unrolled it would hold more copies
  // than the loop below, which the kernel report must find as the main loop.)
#pragma unroll 1
  for (int j = 0; j + 1 < stages; ++j) issue_tile(j, j, j);

  const float scale = p.scale;
  RingCursor cursor(stages);
  if constexpr (Shape::kMma) {
    // ---------------------------------------------------- tensor cores
    constexpr int kDimTiles = kHeadDimMax / 8;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int row = lane / 4;  // this thread's head of the unit (rows 0-7)
    const int quad = lane % 4;
    const bool computes = warp < Shape::kMmaWarps;
    uint32_t qa[kHeadDimMax / 16][2];
    const T* q_row = row < u.heads ? static_cast<const T*>(p.q) + b * p.q_stride_b + (u.h0 + row) * p.q_stride_h : nullptr;
    attn::load_q_rows8<T, kHeadDimMax>(qa, q_row, p.head_dim);
    float o[kDimTiles][2];
#pragma unroll
    for (int d = 0; d < kDimTiles; ++d) o[d][0] = o[d][1] = 0.f;
    float m = -CUDART_INF_F;
    float l = 0.f;  // this lane's share of the row's sum (its quad's total is taken at the end)

    for (int t = 0; t < n_tiles; ++t) {
      cp_async_wait_pending(stages - 2);
      __syncthreads();  // tile t landed; every thread is done with tile t - 1
      issue_tile(t + stages - 1, cursor.issue_stage, cursor.issue_slot);
      int32_t next_pos;
      uint8_t next_mask;
      load_meta(t + stages, next_pos, next_mask);
      if (computes) {
        const uint8_t* masks = ring.mask(cursor.slot) + warp * 16;
        const T* ks = ring.k(cursor.stage) + warp * 16 * kStride;
        const T* vs = ring.v(cursor.stage) + warp * 16 * kStride;
        float s[2][2];
        attn::warp_scores_rows8<T, kHeadDimMax, kStride>(s, qa, ks);
        // Scores scale * q . k of the keys this row's head attends; -inf
        // (weight 0) for the others: a select.
        float mx = m;
#pragma unroll
        for (int n = 0; n < 2; ++n) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const bool attends = (masks[8 * n + 2 * quad + e] >> row) & 1;
            s[n][e] = attends ? s[n][e] * scale : -CUDART_INF_F;
            mx = fmaxf(mx, s[n][e]);
          }
        }
        mx = attn::group_max<4>(mx);
        // One online-softmax update per tile (common.cuh's rules).
        const float alpha = softmax_weight(m, mx);
        float sum = 0.f;
#pragma unroll
        for (int n = 0; n < 2; ++n) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            s[n][e] = softmax_weight(s[n][e], mx);
            sum += s[n][e];
          }
        }
        l = l * alpha + sum;
        m = mx;
#pragma unroll
        for (int d = 0; d < kDimTiles; ++d) {
          o[d][0] *= alpha;
          o[d][1] *= alpha;
        }
        // O += P V, once per distinct head mask among the warp's 16 keys
        // (usually one): the keys of another mask are zeroed in that pass's
        // V fragments, and only the rows of the mask's heads take the
        // product (attention_tile.cuh, warp_pv_rows8).
        const uint32_t key_mask = lane < 16 ? masks[lane] : 0u;
        uint32_t todo = __ballot_sync(0xffffffffu, key_mask != 0);
        while (todo != 0) {
          const uint32_t heads = __shfl_sync(0xffffffffu, key_mask, __ffs(todo) - 1);
          const uint32_t keys = __ballot_sync(0xffffffffu, lane < 16 && key_mask == heads);
          todo &= ~keys;
          attn::warp_pv_rows8<T, kHeadDimMax, kStride>(o, s, vs, keys, (heads >> row) & 1);
        }
      }
      store_meta(cursor.store_slot, next_pos, next_mask);
      cursor.advance(stages);
    }
    attn::cp_async_wait<0>();
    __syncthreads();  // no copy in flight: the epilogue reuses the ring

    // The warps' states in shared memory, merged in warp order.
    float* eo = reinterpret_cast<float*>(smem);  // [warp][row][kHeadDimMax]
    __shared__ float em[Shape::kMmaWarps * 8], el[Shape::kMmaWarps * 8];
    if (computes) {
      const float lrow = group_sum<4>(l);
      if (quad == 0) {
        em[warp * 8 + row] = m;
        el[warp * 8 + row] = lrow;
      }
      float* out = eo + (warp * 8 + row) * kHeadDimMax + 2 * quad;
#pragma unroll
      for (int d = 0; d < kDimTiles; ++d) *reinterpret_cast<float2*>(out + d * 8) = make_float2(o[d][0], o[d][1]);
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < u.heads * p.head_dim; idx += kAttendThreads) {
      const int g = idx / p.head_dim;
      const int d = idx % p.head_dim;
      float mm = -CUDART_INF_F;
      for (int w = 0; w < Shape::kMmaWarps; ++w) mm = fmaxf(mm, em[w * 8 + g]);
      float ll = 0.f, oo = 0.f;
      for (int w = 0; w < Shape::kMmaWarps; ++w) {
        const float wt = softmax_weight(em[w * 8 + g], mm);  // 0 for an empty state
        ll += el[w * 8 + g] * wt;
        oo += eo[(w * 8 + g) * kHeadDimMax + d] * wt;
      }
      const int64_t part = (static_cast<int64_t>(b) * p.q_heads + u.h0 + g) * p.num_splits + split;
      p.partial_o[part * p.head_dim + d] = oo;
      if (d == 0) {
        p.partial_ml[part * 2] = mm;
        p.partial_ml[part * 2 + 1] = ll;
      }
    }
  } else {
    // ---------------------------------------------------- lane groups
    constexpr int kLanes = Shape::kLanes, kChunksPerLane = Shape::kChunksPerLane;
    constexpr int kHeadsPerThread = Shape::kHeadsPerThread, kHeadSplit = Shape::kHeadSplit;
    constexpr int kKeyGroups = Shape::kKeyGroups, kUnroll = Shape::kUnroll, kSlice = Shape::kSlice;
    const int lane = threadIdx.x % kLanes;
    const int g0 = (threadIdx.x / kLanes) % kHeadSplit * kHeadsPerThread;  // this thread's first head of the unit
    const int key_group = threadIdx.x / (kLanes * kHeadSplit);

    float q[kHeadsPerThread][kChunksPerLane][kVec];
    const T* q_b = static_cast<const T*>(p.q) + b * p.q_stride_b;
#pragma unroll
    for (int g = 0; g < kHeadsPerThread; ++g) {
#pragma unroll
      for (int c = 0; c < kChunksPerLane; ++c) {
        const int chunk = c * kLanes + lane;
        if (g0 + g < u.heads && chunk < n_chunks) {
          load16_as_float(q_b + (u.h0 + g0 + g) * p.q_stride_h + chunk * kVec, q[g][c]);
        } else {
#pragma unroll
          for (int e = 0; e < kVec; ++e) q[g][c][e] = 0.f;
        }
      }
    }
    float m[kHeadsPerThread], l[kHeadsPerThread], acc[kHeadsPerThread][kSlice];
#pragma unroll
    for (int g = 0; g < kHeadsPerThread; ++g) {
      m[g] = -CUDART_INF_F;
      l[g] = 0.f;
#pragma unroll
      for (int e = 0; e < kSlice; ++e) acc[g][e] = 0.f;
    }

    for (int t = 0; t < n_tiles; ++t) {
      cp_async_wait_pending(stages - 2);
      __syncthreads();  // tile t landed; every thread is done with tile t - 1
      issue_tile(t + stages - 1, cursor.issue_stage, cursor.issue_slot);
      int32_t next_pos;
      uint8_t next_mask;
      load_meta(t + stages, next_pos, next_mask);
      const uint8_t* masks = ring.mask(cursor.slot);
      const T* ks = ring.k(cursor.stage);
      const T* vs = ring.v(cursor.stage);

      // Scores scale * q . k of the lane group's tokens of the tile.
      int heads[kUnroll];  // the unit's heads attending each token
      float score[kUnroll][kHeadsPerThread];
#pragma unroll
      for (int s = 0; s < kUnroll; ++s) {
        const int r = s * kKeyGroups + key_group;
        heads[s] = masks[r];
        float kf[kChunksPerLane][kVec];
#pragma unroll
        for (int c = 0; c < kChunksPerLane; ++c) {
          const int chunk = c * kLanes + lane;
          uint4 raw = make_uint4(0, 0, 0, 0);
          if (chunk < n_chunks) raw = *reinterpret_cast<const uint4*>(ks + r * kStride + chunk * kVec);
          const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
          for (int i = 0; i < kVec; ++i) kf[c][i] = to_float(e[i]);
        }
#pragma unroll
        for (int g = 0; g < kHeadsPerThread; ++g) {
          float dot = 0.f;
#pragma unroll
          for (int c = 0; c < kChunksPerLane; ++c) {
#pragma unroll
            for (int e = 0; e < kVec; ++e) dot = fmaf(q[g][c][e], kf[c][e], dot);
          }
          score[s][g] = group_sum<kLanes>(dot) * scale;
        }
      }
      // One online-softmax update per head and tile over the tokens it
      // attends (common.cuh's rules); `score` becomes the weights.
#pragma unroll
      for (int g = 0; g < kHeadsPerThread; ++g) {
        float m_new = m[g];
#pragma unroll
        for (int s = 0; s < kUnroll; ++s) {
          if ((heads[s] >> (g0 + g)) & 1) m_new = fmaxf(m_new, score[s][g]);
        }
        const float alpha = softmax_weight(m[g], m_new);  // 0 while m[g] is -inf
        float sum = 0.f;
#pragma unroll
        for (int s = 0; s < kUnroll; ++s) {
          score[s][g] = ((heads[s] >> (g0 + g)) & 1) ? softmax_weight(score[s][g], m_new) : 0.f;
          sum += score[s][g];
        }
        l[g] = l[g] * alpha + sum;
        m[g] = m_new;
#pragma unroll
        for (int e = 0; e < kSlice; ++e) acc[g][e] *= alpha;
      }
#pragma unroll
      for (int s = 0; s < kUnroll; ++s) {
        const int r = s * kKeyGroups + key_group;
        float vf[kSlice];
#pragma unroll
        for (int c = 0; c < kChunksPerLane; ++c) {
          const int chunk = c * kLanes + lane;
          uint4 raw = make_uint4(0, 0, 0, 0);
          if (chunk < n_chunks) raw = *reinterpret_cast<const uint4*>(vs + r * kStride + chunk * kVec);
          const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
          for (int i = 0; i < kVec; ++i) vf[c * kVec + i] = to_float(e[i]);
        }
#pragma unroll
        for (int g = 0; g < kHeadsPerThread; ++g) {
          // Select, never multiply by a zero weight: a head that does not
          // attend the token leaves its accumulator as it is, so an inf or
          // NaN in a value row another head of the unit attends cannot
          // reach it (0 x inf is NaN).
          if ((heads[s] >> (g0 + g)) & 1) {
#pragma unroll
            for (int e = 0; e < kSlice; ++e) acc[g][e] = fmaf(score[s][g], vf[e], acc[g][e]);
          }
        }
      }
      store_meta(cursor.store_slot, next_pos, next_mask);
      cursor.advance(stages);
    }
    attn::cp_async_wait<0>();
    __syncthreads();  // no copy in flight: the epilogue reuses the ring

    // The lane groups' states in shared memory, merged in key-group order.
    float* sm_acc = reinterpret_cast<float*>(smem);  // [key group][head][kHeadDimMax]
    __shared__ float sm_m[kKeyGroups][kGroupMax], sm_l[kKeyGroups][kGroupMax];
#pragma unroll
    for (int g = 0; g < kHeadsPerThread; ++g) {
      if (lane == 0) {
        sm_m[key_group][g0 + g] = m[g];
        sm_l[key_group][g0 + g] = l[g];
      }
#pragma unroll
      for (int c = 0; c < kChunksPerLane; ++c) {
        const int chunk = c * kLanes + lane;
        if (chunk < n_chunks) {
          float* out = sm_acc + (key_group * kGroupMax + g0 + g) * kHeadDimMax + chunk * kVec;
#pragma unroll
          for (int e = 0; e < kVec; ++e) out[e] = acc[g][c * kVec + e];
        }
      }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < u.heads * p.head_dim; idx += kAttendThreads) {
      const int g = idx / p.head_dim;
      const int d = idx % p.head_dim;
      float mm = -CUDART_INF_F;
      for (int kg = 0; kg < kKeyGroups; ++kg) mm = fmaxf(mm, sm_m[kg][g]);
      float ll = 0.f, oo = 0.f;
      for (int kg = 0; kg < kKeyGroups; ++kg) {
        const float w = softmax_weight(sm_m[kg][g], mm);  // 0 for an empty group
        ll += sm_l[kg][g] * w;
        oo += sm_acc[(kg * kGroupMax + g) * kHeadDimMax + d] * w;
      }
      const int64_t part = (static_cast<int64_t>(b) * p.q_heads + u.h0 + g) * p.num_splits + split;
      p.partial_o[part * p.head_dim + d] = oo;
      if (d == 0) {
        p.partial_ml[part * 2] = mm;
        p.partial_ml[part * 2 + 1] = ll;
      }
    }
  }
}

// After a block's gaze_attend_slice: its ticket of the unit; the last block
// of the unit to finish merges the unit's partials in split order
// (merge_splits: o and lse of each head). `weight` holds p.num_splits floats
// of shared memory (the ring, free after the attend step:
// attend_merge_fits). Every thread must call it.
template <typename T>
__device__ __forceinline__ void merge_if_last(const foveal_gaze_decode_params& p, int unit, int b, float* weight) {
  __shared__ int sh_last;
  __shared__ float sh_lse;
  __threadfence();  // this block's partials, before its ticket
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t* ticket = unit_record(p, b, unit) + kInfoMergeTicket;
    sh_last = atomicAdd(ticket, 1) == p.num_splits - 1;
  }
  __syncthreads();
  if (!sh_last) return;
  __threadfence();  // the other blocks' partials, after their tickets
  const Unit u = unit_of(p.q_heads, p.kv_heads, unit);
  for (int g = 0; g < u.heads; ++g) {
    merge_splits<T, kAttendThreads>(p, b, u.h0 + g, weight, &sh_lse);
    __syncthreads();  // `weight` and `sh_lse` are reused
  }
}

}  // namespace
}  // namespace foveal
