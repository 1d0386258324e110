// Shared pieces of the kernels that keep the top n of a row (select_keep,
// text_guided_select, route_topk): the order-preserving key of a float
// score, the radix select of the n-th largest key, and the ordered pass that
// writes the kept indices in ascending order.
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

// The n-th largest (1 <= n <= count) of the keys key_of(0..count): a 4-pass
// most-significant-digit radix select over 8-bit digits (histograms of
// shared-memory integer atomics, which commute: deterministic). On return
// (after a barrier) *pivot is that key and *take_equal how many keys equal to
// it are among the top n when ties go to the lower index. Every thread of the
// block must call it; `hist` is 256 shared ints, pivot and take_equal shared.
template <int kThreads, typename KeyFn>
__device__ void radix_select_nth(int count, int n, KeyFn key_of, int* hist, uint32_t* pivot, int* take_equal) {
  if (threadIdx.x == 0) {
    *pivot = 0;
    *take_equal = n;
  }
  __syncthreads();
  uint32_t mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int d = threadIdx.x; d < 256; d += kThreads) hist[d] = 0;
    __syncthreads();
    const uint32_t prefix = *pivot;
    for (int i = threadIdx.x; i < count; i += kThreads) {
      const uint32_t key = key_of(i);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xffu], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      // The digit holding the remaining-th largest of the matching keys.
      int remaining = *take_equal;
      int d = 255;
      while (hist[d] < remaining) {
        remaining -= hist[d];
        --d;
      }
      *take_equal = remaining;
      *pivot = prefix | (static_cast<uint32_t>(d) << shift);
    }
    mask |= 0xffu << shift;
    __syncthreads();
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
