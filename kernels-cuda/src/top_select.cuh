// Shared pieces of the kernels that keep the top n of a row (select_keep,
// text_guided_select, route_topk, gaze_route_decode): the order-preserving
// key of a float score, the radix select of the n-th largest key, and the
// ordered pass that writes the kept indices in ascending order.
#pragma once

#include <cub/block/block_scan.cuh>

#include "common.cuh"

namespace foveal {

// Order-preserving key: larger score -> larger key; -0.0 ties with +0.0, and
// NaN takes key 0, below every number (-inf's key is 0x007fffff). The CPU
// references order the same way (foveal::select_keep::cpu::rank_key).
__device__ __forceinline__ uint32_t rank_key(float x) {
  if (isnan(x)) return 0u;
  const uint32_t bits = __float_as_uint(x + 0.0f);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// One warp's search, in a radix pass's histogram `hist` (256 bins of shared
// memory), for the digit holding the remaining-th largest of the keys it
// counts (1 <= remaining <= their number): the largest digit d whose bins
// d..255 hold at least `remaining` keys. Lane l owns the 8 bins
// 255 - 8 l .. 248 - 8 l (descending digits); a warp-wide exclusive scan of
// the lanes' counts finds the lane whose range holds the crossing, and that
// lane walks its 8 bins. Returns d in `digit` and, in `remaining`, how many
// of bin d's keys are still to take; `exact` tells whether that is all of bin d
// (the select may stop there). Clears the bins for the next pass. Every lane
// of the calling warp must call it; the results are valid in every lane.
__device__ __forceinline__ void find_digit_warp(int* hist, int& remaining, uint32_t& digit, bool& exact) {
  const int lane = threadIdx.x % 32;
  int c[8];
  int own = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    c[i] = hist[255 - 8 * lane - i];
    own += c[i];
  }
  // Exclusive prefix of the lanes' counts (lane 0 holds the largest digits).
  int before = own;
#pragma unroll
  for (int o = 1; o < 32; o *= 2) {
    const int x = __shfl_up_sync(0xffffffffu, before, o);
    if (lane >= o) before += x;
  }
  before -= own;
  const bool mine = before < remaining && remaining <= before + own;
  int d = 0, rem = 0, bin = 0;
  if (mine) {
    int acc = before;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (bin == 0 && acc + c[i] >= remaining && c[i] > 0) {
        d = 255 - 8 * lane - i;
        rem = remaining - acc;
        bin = c[i];
      }
      acc += c[i];
    }
  }
  const int src = __ffs(__ballot_sync(0xffffffffu, mine)) - 1;
  digit = static_cast<uint32_t>(__shfl_sync(0xffffffffu, d, src));
  remaining = __shfl_sync(0xffffffffu, rem, src);
  exact = __shfl_sync(0xffffffffu, bin, src) == remaining;
#pragma unroll
  for (int i = 0; i < 8; ++i) hist[255 - 8 * lane - i] = 0;
}

// The n-th largest (1 <= n <= count) of the keys key_of(0..count): a
// most-significant-digit radix select over 8-bit digits (histograms of
// shared-memory integer atomics, which commute: deterministic), at most 4
// passes; each pass's digit is found by warp 0 (find_digit_warp), and the
// select stops early once the pivot's bin holds exactly the keys still to
// take. On return (after a barrier) *pivot and *take_equal say which keys
// are among the top n when ties go to the lower index: every key above
// *pivot, and the first *take_equal keys equal to it. (Stopping early, the
// pivot's low digits are 0 and *take_equal counts every key of its bin:
// those with larger low digits are above it, none is equal and below.)
// Every thread of the block must call it; `hist` is 256 shared ints, pivot
// and take_equal shared.
template <int kThreads, typename KeyFn>
__device__ void radix_select_nth(int count, int n, KeyFn key_of, int* hist, uint32_t* pivot, int* take_equal) {
  static_assert(kThreads >= 32, "warp 0 finds the digits");
  for (int d = threadIdx.x; d < 256; d += kThreads) hist[d] = 0;
  if (threadIdx.x == 0) {
    *pivot = 0;
    *take_equal = n;
  }
  __syncthreads();
  uint32_t mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    const uint32_t prefix = *pivot;
    for (int i = threadIdx.x; i < count; i += kThreads) {
      const uint32_t key = key_of(i);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xffu], 1);
    }
    __syncthreads();
    bool done = false;
    if (threadIdx.x < 32) {
      int remaining = *take_equal;
      uint32_t digit;
      bool exact;
      find_digit_warp(hist, remaining, digit, exact);
      done = exact || shift == 0;
      if (threadIdx.x == 0) {
        *take_equal = remaining;
        *pivot = prefix | (digit << shift);
      }
    }
    mask |= 0xffu << shift;
    // (a barrier) Stop once the pivot's bin holds exactly the keys to take.
    if (__syncthreads_or(done)) break;
  }
}

// Ordered pass over the row's n entries (key_of(i) their keys): keeps every
// entry when `keep_all`; otherwise, when `partial`, the entries whose key is
// above `pivot` and the first `take_equal` (lowest indices) equal to it.
// Calls emit(slot, i) for each kept index i, slot its rank among the kept
// (so slots ascend with i), computed with block scans (exact,
// deterministic); the thread that owns i calls it. Every thread of the block
// must call it; `carry` is two shared ints.
template <int kThreads, typename KeyFn, typename EmitFn>
__device__ void for_kept_ascending(int n, bool keep_all, bool partial, uint32_t pivot, int take_equal, KeyFn key_of,
                                   EmitFn emit, typename cub::BlockScan<int, kThreads>::TempStorage& scan,
                                   int* carry) {
  using BlockScan = cub::BlockScan<int, kThreads>;
  if (threadIdx.x == 0) {
    carry[0] = 0;  // keys equal to the pivot seen so far
    carry[1] = 0;  // kept so far
  }
  __syncthreads();
  for (int base = 0; base < n; base += kThreads) {
    const int i = base + threadIdx.x;
    uint32_t key = 0;
    if (i < n) key = key_of(i);
    const bool eq = partial && i < n && key == pivot;
    int eq_rank;
    int eq_total;
    BlockScan(scan).ExclusiveSum(static_cast<int>(eq), eq_rank, eq_total);
    __syncthreads();
    bool keep = false;
    if (i < n) {
      if (keep_all) keep = true;
      else if (partial) keep = key > pivot || (eq && carry[0] + eq_rank < take_equal);
    }
    int slot;
    int keep_total;
    BlockScan(scan).ExclusiveSum(static_cast<int>(keep), slot, keep_total);
    if (keep) emit(carry[1] + slot, i);
    __syncthreads();
    if (threadIdx.x == 0) {
      carry[0] += eq_total;
      carry[1] += keep_total;
    }
    __syncthreads();
  }
}

// for_kept_ascending writing the kept indices ascending to out[0..].
template <int kThreads, typename KeyFn>
__device__ void write_kept_ascending(int n, bool keep_all, bool partial, uint32_t pivot, int take_equal, KeyFn key_of,
                                     int32_t* out, typename cub::BlockScan<int, kThreads>::TempStorage& scan,
                                     int* carry) {
  for_kept_ascending<kThreads>(n, keep_all, partial, pivot, take_equal, key_of, [&](int slot, int i) { out[slot] = i; },
                               scan, carry);
}

}  // namespace foveal
