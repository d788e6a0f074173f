// kv_merge on CPU, float32: each segment of the ragged KV slab keeps some of its candidates
// [stored | current] and folds every other one into the kept key it is nearest to, in place.
// Semantics and the PyTorch reference: kernels/kv_merge.py, which this is tested against.
//
// Why our own: the PyTorch form materialises the (segments x candidates x kept) similarities,
// reduces them with argmax (as slow as the product here), then gathers candidates, their counts
// and norms into padded blocks and index_adds them onto the kept slots: at a 50 % budget and a
// batch of 16 these cost ~0.4 s of a 1.5 s batch of var-shapes. Here a segment is one work item:
//
//   1. the kept keys are packed into panels of 16 keys, d-major (kt[P][D][16]);
//   2. each evicted candidate's nearest kept key: MR = 4 candidates at a time against a panel,
//      for each d one load of 16 lanes of the panel and one broadcast per candidate (the GEMM
//      micro-kernel of scale_attention.c, smaller), and a lane-wise running max whose lane keeps
//      the first panel reaching it; the first column of the largest value is then the smallest
//      of the lanes holding it: the argmax's first-of-equal rule, without the similarity matrix;
//   3. in candidate order (the reference's index_add order), count, count x key, count x |key|
//      and count x value summed onto the candidate's kept key, in per-segment buffers;
//   4. the kept keys, values, log counts and positions written to the front of the segment's
//      slots (after every read: kept keys move down within their own slots).
//
// Each segment is the same sequence of operations whatever the batch or the other segments, so
// an image does not depend on its company; OpenMP over segments, dynamic (segments differ in size).
//
// varserve_kv_compact is the same write without the merge (a policy that evicts): the kept columns
// moved to the front of their segment's slots in one call, where PyTorch took a dozen small gathers
// and scatters (~25 ms of the same batch).

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));
typedef int i8 __attribute__((vector_size(32)));

#define LANES 16  // kept keys per panel: two v8
#define MR 4      // candidates per register tile: 4 x 2 accumulators, 2 running maxima, 2 panels

static inline v8 load8(const float *p) {
  v8 v;
  memcpy(&v, p, sizeof v);
  return v;
}

static inline v8 splat(float x) { return (v8){0} + x; }

static inline v8 select8(i8 mask, v8 a, v8 b) { return (v8)(((i8)a & mask) | ((i8)b & ~mask)); }

static inline i8 select_i8(i8 mask, i8 a, i8 b) { return (a & mask) | (b & ~mask); }

struct segment {
  const float *k_slab, *k_new;
  long D, off, max_stored;
};

// a candidate's key: stored slot off + c, or current token c - max_stored of the segment
static inline const float *key_of(const struct segment *s, long c) {
  return c < s->max_stored ? s->k_slab + (s->off + c) * s->D : s->k_new + (c - s->max_stored) * s->D;
}

// nearest[i] for the rows cand[0..r): the kept column of largest dot product, the first of equal
static void nearest_tile(const struct segment *s, const float *kt, long panels, const float *lane_pad,
                         const long *cand, int r, long *nearest) {
  const long D = s->D;
  const float *key[MR];
  for (int i = 0; i < MR; i++) key[i] = key_of(s, cand[i < r ? i : 0]);
  v8 best[MR][2];
  i8 best_panel[MR][2];
  for (int i = 0; i < MR; i++)
    for (int h = 0; h < 2; h++) best[i][h] = splat(-INFINITY), best_panel[i][h] = (i8){0};
  for (long p = 0; p < panels; p++) {
    v8 acc[MR][2] = {{{0}}};
    const float *panel = kt + p * D * LANES;
    for (long d = 0; d < D; d++) {
      v8 b0 = load8(panel + d * LANES), b1 = load8(panel + d * LANES + 8);
      for (int i = 0; i < MR; i++) {
        v8 a = splat(key[i][d]);
        acc[i][0] += a * b0;
        acc[i][1] += a * b1;
      }
    }
    // padding lanes of the last panel: -inf, never the nearest
    v8 pad0 = p == panels - 1 ? load8(lane_pad) : splat(0), pad1 = p == panels - 1 ? load8(lane_pad + 8) : splat(0);
    i8 here = (i8){0} + (int)p;
    for (int i = 0; i < MR; i++) {
      v8 s0 = acc[i][0] + pad0, s1 = acc[i][1] + pad1;
      i8 gt0 = s0 > best[i][0], gt1 = s1 > best[i][1];
      best[i][0] = select8(gt0, s0, best[i][0]);
      best[i][1] = select8(gt1, s1, best[i][1]);
      best_panel[i][0] = select_i8(gt0, here, best_panel[i][0]);
      best_panel[i][1] = select_i8(gt1, here, best_panel[i][1]);
    }
  }
  for (int i = 0; i < r; i++) {
    float v[LANES];
    int panel[LANES];
    memcpy(v, &best[i][0], sizeof best[i][0]);
    memcpy(v + 8, &best[i][1], sizeof best[i][1]);
    memcpy(panel, &best_panel[i][0], sizeof best_panel[i][0]);
    memcpy(panel + 8, &best_panel[i][1], sizeof best_panel[i][1]);
    float top = v[0];
    for (int l = 1; l < LANES; l++) top = v[l] > top ? v[l] : top;
    long col = -1;
    for (int l = 0; l < LANES; l++) {
      long c = (long)panel[l] * LANES + l;
      if (v[l] == top && (col < 0 || c < col)) col = c;
    }
    nearest[i] = col;
  }
}

// Whether segment g's slots and kept columns are in range: its slots in the slab, its kept columns
// ascending candidates (no padding column), then only -1.
static int segment_ok(long S, long off, long stored, long max_stored, const int64_t *cols, long W, long n) {
  if (off < 0 || stored < 0 || stored > max_stored || off + stored > S) return 0;
  long kept = 0;
  while (kept < W && cols[kept] >= 0) kept++;
  if (off + kept > S) return 0;
  for (long j = 0; j < W; j++) {
    if (j >= kept) {
      if (cols[j] != -1) return 0;
    } else if (cols[j] >= max_stored + n || (cols[j] >= stored && cols[j] < max_stored) ||
               (j && cols[j] <= cols[j - 1])) {
      return 0;
    }
  }
  return 1;
}

// One segment (checked by segment_ok); returns 0, or 1 where a buffer could not be allocated.
static int merge_segment(float *k_slab, float *v_slab, float *bias, int32_t *pos, long D, long off,
                         long stored, long max_stored, const int64_t *cols, long W, const float *k_new,
                         const float *v_new, long n, long pos_start) {
  long kept = 0;
  while (kept < W && cols[kept] >= 0) kept++;
  if (kept == 0) return 0;  // nothing to fold into (a plan never asks this of a segment)
  const long M = max_stored + n, panels = (kept + LANES - 1) / LANES;
  struct segment s = {k_slab, k_new, D, off, max_stored};
  long *target = malloc(M * sizeof *target);
  float *kt = calloc(panels * D * LANES, sizeof *kt);
  float *sums = calloc(kept * (2 + 2 * D), sizeof *sums);  // per kept key: count, |key|, key, value
  int32_t *kept_pos = malloc(kept * sizeof *kept_pos);
  if (!target || !kt || !sums || !kept_pos) {
    free(target), free(kt), free(sums), free(kept_pos);
    return 1;
  }
  for (long c = 0; c < M; c++) target[c] = (c < max_stored && c >= stored) ? -2 : -1;  // -2: padding
  for (long j = 0; j < kept; j++) {
    long c = cols[j];
    target[c] = j;
    kept_pos[j] = c < max_stored ? pos[off + c] : (int32_t)(pos_start + c - max_stored);
    const float *k = key_of(&s, c);
    float *panel = kt + (j / LANES) * D * LANES + j % LANES;
    for (long d = 0; d < D; d++) panel[d * LANES] = k[d];
  }
  float lane_pad[LANES];
  for (int l = 0; l < LANES; l++) lane_pad[l] = (panels - 1) * LANES + l < kept ? 0.0f : -INFINITY;

  long cand[MR], nearest[MR];
  int r = 0;
  for (long c = 0; c < M; c++) {
    if (target[c] != -1) continue;  // kept, or padding
    cand[r++] = c;
    if (r == MR) {
      nearest_tile(&s, kt, panels, lane_pad, cand, r, nearest);
      for (int i = 0; i < r; i++) target[cand[i]] = nearest[i];
      r = 0;
    }
  }
  if (r) {
    nearest_tile(&s, kt, panels, lane_pad, cand, r, nearest);
    for (int i = 0; i < r; i++) target[cand[i]] = nearest[i];
  }

  const long width = 2 + 2 * D;
  for (long c = 0; c < M; c++) {
    if (target[c] < 0) continue;
    int is_stored = c < max_stored;
    const float *k = key_of(&s, c);
    const float *v = is_stored ? v_slab + (off + c) * D : v_new + (c - max_stored) * D;
    float count = is_stored ? expf(bias[off + c]) : 1.0f;
    float norm2 = 0.0f;
    for (long d = 0; d < D; d++) norm2 += k[d] * k[d];
    float *sum = sums + target[c] * width;
    sum[0] += count;
    sum[1] += count * sqrtf(norm2);
    for (long d = 0; d < D; d++) sum[2 + d] += count * k[d];
    for (long d = 0; d < D; d++) sum[2 + D + d] += count * v[d];
  }

  for (long j = 0; j < kept; j++) {
    const float *sum = sums + j * width;
    float total = sum[0], safe = total > 1e-30f ? total : 1e-30f;
    float norm2 = 0.0f;
    for (long d = 0; d < D; d++) norm2 += sum[2 + d] * sum[2 + d];
    float length = sqrtf(norm2), rescale = (sum[1] / safe) / (length > 1e-30f ? length : 1e-30f);
    float *k = k_slab + (off + j) * D, *v = v_slab + (off + j) * D;
    for (long d = 0; d < D; d++) k[d] = sum[2 + d] * rescale;
    for (long d = 0; d < D; d++) v[d] = sum[2 + D + d] / safe;
    bias[off + j] = logf(total);
    pos[off + j] = kept_pos[j];
  }
  free(target), free(kt), free(sums), free(kept_pos);
  return 0;
}

// k_slab, v_slab: (S, D); bias: (S,) log counts; pos: (S,) int32; offsets, stored: (G,) int64;
// cols: (G, W) int64, each row's kept columns ascending, -1 past its keep; k_new, v_new: (G, n, D)
// contiguous. Returns 0, 1 (no memory) or 2 (a segment outside the slab, or a kept column that is
// no candidate; nothing written).
int varserve_kv_merge(float *k_slab, float *v_slab, float *bias, int32_t *pos, long S, long D,
                      const int64_t *offsets, const int64_t *stored, long max_stored, long G,
                      const int64_t *cols, long W, const float *k_new, const float *v_new, long n,
                      long pos_start) {
  // every segment checked before any is written: a bad call changes nothing
  for (long g = 0; g < G; g++)
    if (!segment_ok(S, offsets[g], stored[g], max_stored, cols + g * W, W, n)) return 2;
  int status = 0;
#pragma omp parallel for schedule(dynamic, 1) if (G > 1) reduction(| : status)
  for (long g = 0; g < G; g++)
    status |= merge_segment(k_slab, v_slab, bias, pos, D, offsets[g], stored[g], max_stored, cols + g * W, W,
                            k_new + g * n * D, v_new + g * n * D, n, pos_start);
  return status;
}

// The same kept columns without merging (a policy's plain eviction): cols (G, W) of [stored, padded
// to max_stored | the n current tokens] written to the front of each segment's slots, kept stored
// keys moved down within their own slots (a kept column is never below its destination, so the
// forward copy reads every source before it is overwritten). k, v (S, D) of `elem` bytes a value
// (copied as bytes: any dtype), pos (S,) int32. The current keys and values are read in place from
// the model's (rows, H, n, D) tensors of the slab's dtype, segment g = row * H + head, at any
// strides but a unit one over D (in values: new_strides = row, head, token of k, then of v), so
// appending a scale costs no copy of it first. Returns 0, or 2 (nothing written) where a segment
// or column is out of range.
int varserve_kv_compact(char *k_slab, char *v_slab, int32_t *pos, long S, long D, long elem,
                        const int64_t *offsets, const int64_t *stored, long max_stored, long G,
                        const int64_t *cols, long W, const char *k_new, const char *v_new,
                        const int64_t *new_strides, long H, long n, long pos_start) {
  for (long g = 0; g < G; g++)  // every segment checked before any is written
    if (!segment_ok(S, offsets[g], stored[g], max_stored, cols + g * W, W, n)) return 2;
  const size_t row = (size_t)D * elem;
#pragma omp parallel for schedule(static) if (G > 1)
  for (long g = 0; g < G; g++) {
    const int64_t *c = cols + g * W;
    const long off = offsets[g];
    const char *kg = k_new + ((g / H) * new_strides[0] + (g % H) * new_strides[1]) * elem;
    const char *vg = v_new + ((g / H) * new_strides[3] + (g % H) * new_strides[4]) * elem;
    for (long j = 0; j < W && c[j] >= 0; j++) {
      const long dest = off + j;
      if (c[j] < max_stored) {
        const long src = off + c[j];
        if (src != dest) {
          memcpy(k_slab + dest * row, k_slab + src * row, row);
          memcpy(v_slab + dest * row, v_slab + src * row, row);
          pos[dest] = pos[src];
        }
      } else {
        const long t = c[j] - max_stored;
        memcpy(k_slab + dest * row, kg + t * new_strides[2] * elem, row);
        memcpy(v_slab + dest * row, vg + t * new_strides[5] * elem, row);
        pos[dest] = (int32_t)(pos_start + t);
      }
    }
  }
  return 0;
}
