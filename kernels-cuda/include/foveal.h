/*
 * foveal: launch functions and parameter structs of the CUDA kernels.
 *
 * Conventions (SPEC "Conventions for every kernel"):
 * - Tensors are strided: a base pointer and strides in elements (bytes where a
 *   field says so); the last dimension is contiguous.
 * - Index and length arrays are int32 device arrays.
 * - Every launch function enqueues its kernels on `stream` and returns at once
 *   with 0 or a cudaError_t code (negative: a foveal code below). None of
 *   them synchronises the host.
 * - The safe Rust API (crate foveal) validates every argument before it calls
 *   these; called directly, they trust their arguments.
 */
#ifndef FOVEAL_H
#define FOVEAL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Same type as cudaStream_t / CUstream. */
typedef struct CUstream_st *foveal_stream_t;

typedef enum foveal_dtype {
  FOVEAL_F32 = 0,
  FOVEAL_F16 = 1,
  FOVEAL_BF16 = 2,
} foveal_dtype;

/* Negative status codes of foveal itself. */
#define FOVEAL_ERR_UNSUPPORTED (-1)

/* A readable name of a status code returned by a launch function. */
const char *foveal_status_string(int status);

/* ---------------------------------------------------------------- glimpse_scores */

typedef enum foveal_score_mode {
  FOVEAL_SCORES_LOGITS = 0,
  FOVEAL_SCORES_LOG_SOFTMAX = 1,
  FOVEAL_SCORES_SOFTMAX = 2,
} foveal_score_mode;

/* Largest head dim and GQA group handled in one pass. */
#define FOVEAL_GLIMPSE_MAX_HEAD_DIM 256
#define FOVEAL_GLIMPSE_MAX_GROUP 8

typedef struct foveal_glimpse_scores_params {
  /* q [B, Hq, D], the glimpse token's query after RoPE. */
  const void *q;
  int64_t q_stride_b, q_stride_h;
  /* k [B, S, Hkv, D] of layer K, any memory order. */
  const void *k;
  int64_t k_stride_b, k_stride_s, k_stride_h;
  /* Valid keys of row b: start[b] <= p < end[b]; the glimpse token is end[b]-1. */
  const int32_t *row_start;
  const int32_t *row_end;
  /* vis_pos [B, nv_max] ascending sequence positions, nv [B] counts. */
  const int32_t *vis_pos;
  int64_t vis_stride_b;
  const int32_t *nv;
  /* out [B, nv_max, Hq] float. */
  float *out;
  int64_t out_stride_b, out_stride_i;
  /* Workspace: pos_to_vis [B, S] int32, partial [B, num_splits, Hq, 2] float
   * (running max and sum of exponentials of each split). */
  int32_t *pos_to_vis;
  float *partial;
  int32_t batch, seq, q_heads, kv_heads, head_dim, nv_max;
  /* Blocks that share one row's keys (flash-decoding split). */
  int32_t num_splits;
  float scale;
  foveal_score_mode mode;
  foveal_dtype dtype;
} foveal_glimpse_scores_params;

int foveal_glimpse_scores(const foveal_glimpse_scores_params *p, foveal_stream_t stream);

/* ------------------------------------------------------------------- select_keep */

typedef struct foveal_select_keep_params {
  /* logits [B, nv_max] float, nv [B]. */
  const float *logits;
  int64_t logits_stride_b;
  const int32_t *nv;
  /* keep_idx [B, nv_max] (ascending, padded with -1), keep_count [B]. */
  int32_t *keep_idx;
  int64_t keep_stride_b;
  int32_t *keep_count;
  int32_t batch, nv_max;
  /* Keep logit > threshold_logit (= ln(t / (1 - t))). */
  double threshold_logit;
  /* Cap at floor(max_ratio * nv) when has_max_ratio. */
  float max_ratio;
  int32_t has_max_ratio;
  /* Keep at least min(min_keep, nv). */
  int32_t min_keep;
} foveal_select_keep_params;

int foveal_select_keep(const foveal_select_keep_params *p, foveal_stream_t stream);

/* ---------------------------------------------------------------- keep_positions */

typedef struct foveal_keep_positions_params {
  const int32_t *row_start;
  const int32_t *row_end;
  const int32_t *vis_pos;
  int64_t vis_stride_b;
  const int32_t *nv;
  /* The output of select_keep over the same rows. */
  const int32_t *keep_idx;
  int64_t keep_stride_b;
  const int32_t *keep_count;
  /* Drop position end-1 (the glimpse token). */
  int32_t drop_last;
  /* positions [B, width] (ascending, padded with -1), lengths [B]. */
  int32_t *positions;
  int64_t positions_stride_b;
  int32_t *lengths;
  int32_t batch, seq, width;
} foveal_keep_positions_params;

int foveal_keep_positions(const foveal_keep_positions_params *p, foveal_stream_t stream);

/* -------------------------------------------------------------------- compact_kv */

/* Planes (a layer's K or V, a hidden-state tensor, a position-id section)
 * gathered by one launch. */
#define FOVEAL_GATHER_MAX_PLANES 128

typedef struct foveal_gather_params {
  /* Plane i: [B, S, H, row_bytes] source and [B, S_dst, H, row_bytes]
   * destination; every plane shares the strides below (in BYTES). */
  const void *src[FOVEAL_GATHER_MAX_PLANES];
  void *dst[FOVEAL_GATHER_MAX_PLANES];
  int32_t num_planes;
  int64_t src_stride_b, src_stride_s, src_stride_h;
  int64_t dst_stride_b, dst_stride_s, dst_stride_h;
  int32_t batch, heads, row_bytes, dst_seq;
  /* positions [B, >= lengths[b]] of source entries to keep, lengths [B]. */
  const int32_t *positions;
  int64_t positions_stride_b;
  const int32_t *lengths;
  /* 0: kept entries first; 1: zeros first. */
  int32_t left_pad;
} foveal_gather_params;

int foveal_gather_positions(const foveal_gather_params *p, foveal_stream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* FOVEAL_H */
