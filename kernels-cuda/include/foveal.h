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
/* A kernel needs more shared memory per block (static plus dynamic) than the
 * device allows a kernel that opts in (cudaDevAttrMaxSharedMemoryPerBlockOptin);
 * returned before anything is launched. */
#define FOVEAL_ERR_SHARED_MEMORY (-2)

/* Shared memory of one kernel launch, in bytes: the compiled kernel's static
 * part (cudaFuncGetAttributes), the launch's dynamic part, and the current
 * device's per-block limit for a kernel that opts in. Launchers opt a kernel
 * in (cudaFuncAttributeMaxDynamicSharedMemorySize) when static plus dynamic
 * passes the default 48 KiB, and return FOVEAL_ERR_SHARED_MEMORY when it
 * passes the limit. */
typedef struct foveal_shared_memory {
  size_t static_bytes, dynamic_bytes, limit_bytes;
} foveal_shared_memory;

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
  /* Cap at floor(max_ratio * nv) (the f64 product, no tolerance) when has_max_ratio. */
  double max_ratio;
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

/* ------------------------------------------------------------------- window_mean */

typedef enum foveal_pool {
  FOVEAL_POOL_MEAN = 0,
  FOVEAL_POOL_MAX = 1,
} foveal_pool;

typedef struct foveal_window_mean_params {
  /* x [B, Hx, Wx, C] channels last. */
  const void *x;
  int64_t x_stride_b, x_stride_y, x_stride_x;
  /* out [B, M, C], M = ceil(Hx / w) * ceil(Wx / w) windows in raster order. */
  void *out;
  int64_t out_stride_b, out_stride_m;
  int32_t batch, height, width, channels, window;
  foveal_pool pool;
  foveal_dtype dtype;
} foveal_window_mean_params;

int foveal_window_mean(const foveal_window_mean_params *p, foveal_stream_t stream);

/* ------------------------------------------------------------- multiscale_gather */

/* Most pooling scales of one call. */
#define FOVEAL_MULTISCALE_MAX_SCALES 16

typedef struct foveal_multiscale_gather_params {
  /* x [B, Hx, Wx, C] channels last. */
  const void *x;
  int64_t x_stride_b, x_stride_y, x_stride_x;
  /* z [B, M, S] float selector logits. */
  const float *z;
  int64_t z_stride_b, z_stride_m;
  /* Pooling kernels (kh, kw) of the S scales, each dividing the window. */
  int32_t scale_h[FOVEAL_MULTISCALE_MAX_SCALES];
  int32_t scale_w[FOVEAL_MULTISCALE_MAX_SCALES];
  int32_t num_scales;
  /* Multiply each token by the chosen scale's softmax probability (Eq. 2). */
  int32_t scale_by_prob;
  /* tokens [B, n_out_max, C], positions [B, n_out_max] (y * Wx + x of the
   * pooled cell's top-left; -1 past the count), count [B]. */
  void *tokens;
  int64_t tokens_stride_b, tokens_stride_n;
  int32_t *positions;
  int64_t positions_stride_b;
  int32_t *count;
  int64_t count_stride;
  /* Workspace: per window the chosen scale (int32 [B, M]), its probability
   * (float [B, M]) and its first output slot (int32 [B, M]). */
  int32_t *choice;
  float *prob;
  int32_t *offset;
  int32_t batch, height, width, channels, window, n_out_max;
  foveal_dtype dtype;
} foveal_multiscale_gather_params;

int foveal_multiscale_gather(const foveal_multiscale_gather_params *p, foveal_stream_t stream);

/* ------------------------------------------------------------ text_guided_select */

/* f32 (CUDA cores): visual tokens per block of the log-sum-exp kernel (one
 * per thread); its key chunks are this size. */
#define FOVEAL_TGS_KEYS_PER_BLOCK 128
/* bf16/f16 (tensor cores): query rows (text token x query head of a KV
 * head's group) per block of the log-sum-exp kernel (ROWS_WIDE for head
 * dims above 128); its key chunks are multiples of KEY_CHUNK keys; the score
 * kernel's blocks take TEXT text tokens (text_per_split = TEXT). */
#define FOVEAL_TGS_MMA_ROWS 128
#define FOVEAL_TGS_MMA_ROWS_WIDE 64
#define FOVEAL_TGS_KEY_CHUNK 64
#define FOVEAL_TGS_MMA_TEXT 16
/* Largest head dim. */
#define FOVEAL_TGS_MAX_HEAD_DIM 256

typedef struct foveal_text_guided_select_params {
  /* q [B, T, Hq, D] text queries, k [B, N, Hkv, D] visual keys. */
  const void *q;
  int64_t q_stride_b, q_stride_t, q_stride_h;
  const void *k;
  int64_t k_stride_b, k_stride_n, k_stride_h;
  /* Valid text tokens t_len[b] <= T and visual tokens n_len[b] <= N. */
  const int32_t *t_len;
  const int32_t *n_len;
  /* scores [B, N] float: S per visual token (0 past n_len). */
  float *scores;
  int64_t scores_stride_b;
  /* keep_idx [B, N] ascending, padded with -1; keep_count [B]. */
  int32_t *keep_idx;
  int64_t keep_stride_b;
  int32_t *keep_count;
  int64_t count_stride;
  /* Workspace: lse_partial [B, ceil(N / key_chunk), Hq, T, 2] (max and sum
   * of exponentials per key chunk), lse [B, Hq, T16, 2] with T16 = T
   * rounded up to a multiple of 16 (max and ln of the sum of exponentials;
   * 0 past t_len), s_partial [B, text_splits, N]. */
  float *lse_partial;
  float *lse;
  float *s_partial;
  int32_t batch, text, visual, q_heads, kv_heads, head_dim;
  /* Visual tokens per block of the log-sum-exp kernel (f32:
   * FOVEAL_TGS_KEYS_PER_BLOCK; bf16/f16: a multiple of FOVEAL_TGS_KEY_CHUNK). */
  int32_t key_chunk;
  /* Blocks that share one row's text tokens, text_per_split tokens each
   * (bf16/f16: FOVEAL_TGS_MMA_TEXT); text_splits * text_per_split >= T. */
  int32_t text_splits;
  int32_t text_per_split;
  float scale;
  float gamma;
  foveal_dtype dtype;
} foveal_text_guided_select_params;

int foveal_text_guided_select(const foveal_text_guided_select_params *p, foveal_stream_t stream);

/* The largest shared memory (static plus dynamic) of foveal_text_guided_select's
 * kernels for these parameters (only dtype and head_dim are read) on the
 * current device; 0, FOVEAL_ERR_UNSUPPORTED (no kernel for them) or a
 * cudaError_t. */
int foveal_text_guided_select_shared_memory(const foveal_text_guided_select_params *p, foveal_shared_memory *out);

/* ------------------------------------------------------------ region_descriptors */

/* Threads per block (one per region, KV head and 16-byte column of the head
 * dim); the grid's x dimension holds the blocks. */
#define FOVEAL_REGION_DESCRIPTORS_THREADS 64

typedef struct foveal_region_descriptors_params {
  /* k [B, S, Hkv, D] of one layer, any memory order. */
  const void *k;
  int64_t k_stride_b, k_stride_s, k_stride_h;
  /* The regions of each row: count [B], length [B, r_max], token positions
   * [B, r_max, p_max] (padded with -1; every listed position < S). */
  const int32_t *region_count;
  const int32_t *region_len;
  const int32_t *region_pos;
  int32_t r_max, p_max;
  /* desc [B, Hkv, R, D] float, R >= r_max. */
  float *desc;
  int64_t desc_stride_b, desc_stride_h, desc_stride_r;
  /* Regions r_begin <= r < min(r_end, count[b]) of each row are written. */
  int32_t r_begin, r_end;
  int32_t batch, kv_heads, head_dim;
  foveal_dtype dtype;
} foveal_region_descriptors_params;

int foveal_region_descriptors(const foveal_region_descriptors_params *p, foveal_stream_t stream);

/* -------------------------------------------------------------------- route_topk */

/* Largest head dim; query heads scored per block of the score kernel. */
#define FOVEAL_ROUTE_MAX_HEAD_DIM 256
#define FOVEAL_ROUTE_HEAD_CHUNK 4
/* Regions scored per block (one per thread). */
#define FOVEAL_ROUTE_REGIONS_PER_BLOCK 64

typedef struct foveal_route_topk_params {
  /* q [B, Nq, Hq, D] queries after RoPE. */
  const void *q;
  int64_t q_stride_b, q_stride_n, q_stride_h;
  /* desc [B, Hkv, R, D] float (16-byte aligned rows), R >= r_max. */
  const float *desc;
  int64_t desc_stride_b, desc_stride_h, desc_stride_r;
  /* Regions of each row: count [B] (each <= r_max). */
  const int32_t *region_count;
  int32_t r_max;
  /* Workspace: scores [B, Nq, Hq, r_max] float. */
  float *scores;
  /* routes [B, Nq, Hq, k] int32, contiguous: ascending ids, padded with -1. */
  int32_t *routes;
  int32_t batch, queries, q_heads, kv_heads, head_dim, k;
  foveal_dtype dtype;
} foveal_route_topk_params;

int foveal_route_topk(const foveal_route_topk_params *p, foveal_stream_t stream);
/* ------------------------------------------------------------------- gaze_decode */

/* Largest head dim, query heads served by one pass over a KV head's tiles
 * (larger GQA groups are served in chunks of this many), and most regions
 * of a row (the per-region head masks live in shared memory). */
#define FOVEAL_GAZE_MAX_HEAD_DIM 256
#define FOVEAL_GAZE_MAX_GROUP 8
#define FOVEAL_GAZE_MAX_REGIONS 32768
/* int32 words per unit in the workspace's unit_info. */
#define FOVEAL_GAZE_UNIT_WORDS 8

typedef struct foveal_gaze_decode_params {
  /* q [B, Hq, D], the new token's queries. */
  const void *q;
  int64_t q_stride_b, q_stride_h;
  /* k, v [B, S, Hkv, D], any memory order. */
  const void *k;
  int64_t k_stride_b, k_stride_s, k_stride_h;
  const void *v;
  int64_t v_stride_b, v_stride_s, v_stride_h;
  /* The GazeLayout: region_count [B], region_len [B, max_regions],
   * region_pos [B, max_regions, max_region_len] (padded with -1),
   * visible_count [B], visible [B, max_visible, 2] (start, end) pairs. */
  const int32_t *region_count;
  const int32_t *region_len;
  const int32_t *region_pos;
  const int32_t *visible_count;
  const int32_t *visible;
  int32_t max_regions, max_region_len, max_visible;
  /* routes [B, 1, Hq, route_k]: region ids ascending, padded with -1. */
  const int32_t *routes;
  int32_t route_k;
  /* o [B, Hq, D] in the input type; lse [B, Hq] float, or NULL. */
  void *o;
  int64_t o_stride_b, o_stride_h;
  float *lse;
  int64_t lse_stride_b, lse_stride_h;
  /* Workspace. Per unit (row, KV head, chunk of up to FOVEAL_GAZE_MAX_GROUP
   * query heads): segments [B, units, max_segments, 4] int32 (the attended
   * set as visible ranges and routed regions, each holding at least one
   * token: id, head mask, first and one past the last token index);
   * unit_info [B, units, FOVEAL_GAZE_UNIT_WORDS] int32 (segment count,
   * token count, and the kernels' tickets and flags), followed by one more
   * word (gaze_route_decode's block counter); token_pos [B, units,
   * max_tokens] int32 and token_mask [B, units, max_tokens] uint8 (each
   * attended token's cache position and the unit's heads attending it, in
   * the set's order, written by the attend blocks for their own shares);
   * per query head and split: partial_o [B, Hq, num_splits, D] and
   * partial_ml [B, Hq, num_splits, 2] float (running max of scale * q.k, sum
   * of exponentials relative to it). */
  int32_t *segments;
  int32_t *unit_info;
  int32_t *token_pos;
  uint8_t *token_mask;
  float *partial_o;
  float *partial_ml;
  int32_t batch, q_heads, kv_heads, head_dim;
  /* Bound on the segments of a unit: max_visible + min(max_regions, heads per unit * route_k). */
  int32_t max_segments;
  /* Bound on the attended tokens of a unit (visible keys plus the largest union of its heads' regions). */
  int32_t max_tokens;
  /* Blocks that share one unit's attended tokens (flash-decoding split). */
  int32_t num_splits;
  float scale;
  foveal_dtype dtype;
} foveal_gaze_decode_params;

int foveal_gaze_decode(const foveal_gaze_decode_params *p, foveal_stream_t stream);

/* ------------------------------------------------------------- gaze_route_decode */

/* Most regions of a row (their scores and head masks live in shared
 * memory) and most blocks sharing one unit's attended set. */
#define FOVEAL_GAZE_ROUTE_MAX_REGIONS 4096
#define FOVEAL_GAZE_ROUTE_MAX_SPLITS 256

typedef struct foveal_gaze_route_decode_params {
  /* The attention's arguments as gaze_decode takes them (workspace
   * included; unit_info is zeroed by the launcher before the kernel), except
   * `routes`, unused: the routes are written to `routes` below. */
  foveal_gaze_decode_params decode;
  /* desc [B, Hkv, R, D] float (16-byte aligned rows), R >= max_regions. */
  const float *desc;
  int64_t desc_stride_b, desc_stride_h, desc_stride_r;
  /* Routes out, [B, 1, Hq, top_k] int32, contiguous: ascending, -1 padded. */
  int32_t *routes;
  int32_t top_k;
} foveal_gaze_route_decode_params;

int foveal_gaze_route_decode(const foveal_gaze_route_decode_params *p, foveal_stream_t stream);

/* The shared memory foveal_gaze_route_decode's kernel needs for these
 * parameters (only the sizes, dtype and group are read) on the current
 * device; 0, FOVEAL_ERR_UNSUPPORTED (no kernel for them) or a cudaError_t. */
int foveal_gaze_route_decode_shared_memory(const foveal_gaze_route_decode_params *p, foveal_shared_memory *out);

/* --------------------------------------------------------------- cross_attention */

/* Largest head dim. Rows (query x GQA group: row r is query r / G, head
 * r % G of the KV head's group) per block of each kernel: the tensor-core
 * kernels (bf16/f16) take DECODE_ROWS-row tiles when every row's
 * q_len * G fits one (decode), PREFILL_ROWS otherwise (PREFILL_ROWS_WIDE
 * for head dims above 128); the f32 kernel takes F32_ROWS. */
#define FOVEAL_CROSS_ATTN_MAX_HEAD_DIM 256
#define FOVEAL_CROSS_ATTN_DECODE_ROWS 16
#define FOVEAL_CROSS_ATTN_PREFILL_ROWS 128
#define FOVEAL_CROSS_ATTN_PREFILL_ROWS_WIDE 64
#define FOVEAL_CROSS_ATTN_F32_ROWS 16

typedef struct foveal_cross_attention_params {
  /* q [B, Nq, Hq, D]; k, v [B, Nk, Hkv, D], any memory order. */
  const void *q;
  int64_t q_stride_b, q_stride_n, q_stride_h;
  const void *k;
  int64_t k_stride_b, k_stride_n, k_stride_h;
  const void *v;
  int64_t v_stride_b, v_stride_n, v_stride_h;
  /* Valid queries q_len[b] <= Nq and keys kv_len[b] <= Nk of each row. */
  const int32_t *q_len;
  const int32_t *kv_len;
  /* o [B, Nq, Hq, D] in the input type; lse [B, Hq, Nq] float, or NULL. */
  void *o;
  int64_t o_stride_b, o_stride_n, o_stride_h;
  float *lse;
  int64_t lse_stride_b, lse_stride_h, lse_stride_n;
  /* Workspace, used when num_splits > 1: per (row, query, query head) and
   * split, partial_o [B, Nq, Hq, num_splits, D] (unnormalised output) and
   * partial_ml [B, Nq, Hq, num_splits, 2] float (max of the scores, sum of
   * exp(score - max)). */
  float *partial_o;
  float *partial_ml;
  int32_t batch, queries, keys, q_heads, kv_heads, head_dim;
  /* Rows per block (one of the FOVEAL_CROSS_ATTN_*_ROWS above, matching the
   * dtype and head dim) and blocks sharing one tile's keys (split-KV). */
  int32_t tile_rows;
  int32_t num_splits;
  float scale;
  foveal_dtype dtype;
} foveal_cross_attention_params;

int foveal_cross_attention(const foveal_cross_attention_params *p, foveal_stream_t stream);

/* The shared memory foveal_cross_attention's attention kernel needs for
 * these parameters (only dtype, head_dim and tile_rows are read) on the
 * current device; 0, FOVEAL_ERR_UNSUPPORTED (no kernel for them) or a
 * cudaError_t. */
int foveal_cross_attention_shared_memory(const foveal_cross_attention_params *p, foveal_shared_memory *out);

/* ------------------------------------------------------------------- pos_conv1d */

typedef struct foveal_pos_conv1d_params {
  /* x [B, N, C], out [B, N, C] (channels contiguous). */
  const void *x;
  int64_t x_stride_b, x_stride_n;
  void *out;
  int64_t out_stride_b, out_stride_n;
  /* Valid tokens len[b] <= N of each row. */
  const int32_t *len;
  /* weight [C, 7] (taps contiguous), bias [C] contiguous, input type. */
  const void *weight;
  int64_t weight_stride_c;
  const void *bias;
  int32_t batch, tokens, channels;
  foveal_dtype dtype;
} foveal_pos_conv1d_params;

int foveal_pos_conv1d(const foveal_pos_conv1d_params *p, foveal_stream_t stream);

/* ------------------------------------------------------------------- token_pack */

typedef struct foveal_token_pack_params {
  /* x [B, h, w, C] channels last. */
  const void *x;
  int64_t x_stride_b, x_stride_y, x_stride_x;
  /* out [B, H'/2, W'/2, 4C]. */
  void *out;
  int64_t out_stride_b, out_stride_y, out_stride_x;
  /* h, w, C and the resized grid H', W' (even). */
  int32_t batch, height, width, channels, out_height, out_width;
  foveal_dtype dtype;
} foveal_token_pack_params;

int foveal_token_pack(const foveal_token_pack_params *p, foveal_stream_t stream);
/* ----------------------------------------------------------------- glance_fusion */

/* Most layers fused by one call, and the largest width dt. */
#define FOVEAL_GLANCE_MAX_LAYERS 8
#define FOVEAL_GLANCE_MAX_DIM 4096

typedef struct foveal_glance_fusion_params {
  /* vq [S, B, N, dt]: the S layers' visual tokens, any layer / row / token
   * strides (dt contiguous). */
  const void *vq;
  int64_t vq_stride_s, vq_stride_b, vq_stride_n;
  /* e [S, B, M, dt]: the instruction embedding of each layer. */
  const void *e;
  int64_t e_stride_s, e_stride_b, e_stride_m;
  /* Valid tokens n_len[b] <= N and instruction tokens 1 <= m_len[b] <= M. */
  const int32_t *n_len;
  const int32_t *m_len;
  /* out [B, N, dt] in the input type; weights [B, N, S] float, or NULL.
   * Rows n >= n_len[b] are written as 0. */
  void *out;
  int64_t out_stride_b, out_stride_n;
  float *weights;
  int64_t weights_stride_b, weights_stride_n;
  /* Workspace: e_mean [S, B, ceil(dt / v) * v] float (v = 16 / element
   * bytes), the mean instruction vectors. */
  float *e_mean;
  int32_t layers, batch, tokens, instr, dim;
  /* Blocks that share one row's tokens. */
  int32_t tiles;
  /* 1: vq, e and out start on 16-byte boundaries and their strides and dt
   * are multiples of 16 bytes (16-byte accesses); 0: element accesses. */
  int32_t vec16;
  /* 1 / sqrt(dt). */
  float scale;
  foveal_dtype dtype;
} foveal_glance_fusion_params;

int foveal_glance_fusion(const foveal_glance_fusion_params *p, foveal_stream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* FOVEAL_H */
