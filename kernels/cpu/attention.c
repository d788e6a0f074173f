// Decode-step attention on CPU, float32: one new query per sequence against the keys and values
// cached so far, read straight from the preallocated cache (no slicing copies, no mask tensor).
//
// Why our own: a decode step's attention is a pure stream over the cache (at batch 16 with guidance
// ~28 MB per layer at mid-image), and PyTorch's CPU flash-attention kernel moved it at ~15 GB/s
// here, a third of the step. This kernel gives each (sequence, head) one thread-local pass over
// its keys (scores, then a softmax) and one over its values, both in address order.
//
// q: (B, H, D); k, v: (B, H_kv, T_max, D), row b's positions [0, lengths[b]) valid (each row its own
// length, read from memory, so the caller never copies a length to the host); key_valid: (B, T_max)
// bytes, 0 for a padded condition token, or NULL; out: (B, H, D). Query head h reads KV head
// h / (H / H_kv) (grouped-query attention, as the official repeat_interleave).

#include <math.h>
#include <stdlib.h>
#include <string.h>

// Vectors of the width the compiler targets (-march=native). A 16-float vector on an AVX2-only
// host is two registers that GCC kept on the stack, a store-to-load round trip per key: the paged
// kernel took 320 us for 2 rows x 12 heads x 150 keys there, a tenth of a batch-1 step.
#if defined(__AVX512F__)
#define VW 16
#elif defined(__AVX__)
#define VW 8
#else
#define VW 4
#endif
typedef float vec __attribute__((vector_size(VW * sizeof(float))));

static inline vec loadv(const float *p) {
  vec v;
  memcpy(&v, p, sizeof v);
  return v;
}

static inline void storev(float *p, vec v) { memcpy(p, &v, sizeof v); }

static inline float hsum(vec v) {
  float s = 0.0f;
  for (int i = 0; i < VW; i++) s += v[i];
  return s;
}

// Horizontal sums of VW vectors at once: lane i of the result is the sum of acc[i]'s lanes,
// through log2(VW) levels of pairwise shuffles and adds (each level halves the lanes each vector
// still spreads over), so a group of VW keys is scored with no scalar reduction per key.
#if VW == 16
typedef int lanes __attribute__((vector_size(16 * sizeof(int))));
#define EVEN1 ((lanes){0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30})
#define ODD1 ((lanes){1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31})
#define EVEN2 ((lanes){0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29})
#define ODD2 ((lanes){2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31})
#define EVEN4 ((lanes){0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27})
#define ODD4 ((lanes){4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31})
#define EVEN8 ((lanes){0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23})
#define ODD8 ((lanes){8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31})
#elif VW == 8
typedef int lanes __attribute__((vector_size(8 * sizeof(int))));
#define EVEN1 ((lanes){0, 8, 2, 10, 4, 12, 6, 14})
#define ODD1 ((lanes){1, 9, 3, 11, 5, 13, 7, 15})
#define EVEN2 ((lanes){0, 1, 8, 9, 4, 5, 12, 13})
#define ODD2 ((lanes){2, 3, 10, 11, 6, 7, 14, 15})
#define EVEN4 ((lanes){0, 1, 2, 3, 8, 9, 10, 11})
#define ODD4 ((lanes){4, 5, 6, 7, 12, 13, 14, 15})
#else
typedef int lanes __attribute__((vector_size(4 * sizeof(int))));
#define EVEN1 ((lanes){0, 4, 2, 6})
#define ODD1 ((lanes){1, 5, 3, 7})
#define EVEN2 ((lanes){0, 1, 4, 5})
#define ODD2 ((lanes){2, 3, 6, 7})
#endif

// One level: vectors a and b, each of whose sums spreads over groups of w lanes, into one vector
// whose groups of 2w lanes hold a's and b's sums, interleaved by groups of w.
#define LEVEL(a, b, w) (__builtin_shuffle((a), (b), EVEN##w) + __builtin_shuffle((a), (b), ODD##w))

static inline vec hsums(vec *acc) {
  vec l1[VW / 2];
  for (int i = 0; i < VW / 2; i++) l1[i] = LEVEL(acc[2 * i], acc[2 * i + 1], 1);
#if VW == 4
  return LEVEL(l1[0], l1[1], 2);
#else
  vec l2[VW / 4];
  for (int i = 0; i < VW / 4; i++) l2[i] = LEVEL(l1[2 * i], l1[2 * i + 1], 2);
#if VW == 8
  return LEVEL(l2[0], l2[1], 4);
#else
  vec l4[2] = {LEVEL(l2[0], l2[1], 4), LEVEL(l2[2], l2[3], 4)};
  return LEVEL(l4[0], l4[1], 8);
#endif
#endif
}

// scores[i] = q . k[i] for VW consecutive keys (rows D apart), D a multiple of VW: one vector of
// products per key over D, summed across lanes for all VW keys at once. Each key's sum runs the
// same instructions whichever keys and queries share the call.
static inline void dot_keys(const float *q, const float *k, long D, float *scores) {
  // d outermost: the VW keys' sums are independent chains the core runs side by side. One key's
  // chain at a time waited on its own adds (4 cycles each): scoring a window of 16 queries over
  // 241 keys (2 rows x 4 heads, D 32) took 380 us this way against 210, a decode step's 44 against 31.
  vec acc[VW];
  for (int i = 0; i < VW; i++) acc[i] = (vec){0};
  for (long d = 0; d < D; d += VW) {
    vec qd = loadv(q + d);
    for (int i = 0; i < VW; i++) acc[i] += qd * loadv(k + i * D + d);
  }
  storev(scores, hsums(acc));
}

// Four partial sums over the vectors of a row, so the products of one key do not wait on each
// other's adds (one chain of D / VW adds bounded the score pass).
static inline float dot(const float *a, const float *b, long D) {
  vec acc[4] = {{0}, {0}, {0}, {0}};
  long d = 0;
  for (; d + 4 * VW <= D; d += 4 * VW)
    for (int j = 0; j < 4; j++) acc[j] += loadv(a + d + j * VW) * loadv(b + d + j * VW);
  for (; d + VW <= D; d += VW) acc[0] += loadv(a + d) * loadv(b + d);
  float s = hsum((acc[0] + acc[1]) + (acc[2] + acc[3]));
  for (; d < D; d++) s += a[d] * b[d];
  return s;
}

// nv vectors of acc (a constant at each call site, so they live in registers) += sum over t < n, in
// order, of w[t] * x[t, 0:nv * VW); x rows D apart.
static inline __attribute__((always_inline)) void weighted_sum_part(float *acc, const float *w,
                                                                    const float *x, long n, long D,
                                                                    int nv) {
  vec a[8];
  for (int j = 0; j < nv; j++) a[j] = loadv(acc + j * VW);
  for (long t = 0; t < n; t++)
    for (int j = 0; j < nv; j++) a[j] += w[t] * loadv(x + t * D + j * VW);
  for (int j = 0; j < nv; j++) storev(acc + j * VW, a[j]);
}

// acc[0, D) += sum over t < n, in order, of w[t] * x[t, 0:D). Up to 8 vectors of acc are held in
// registers over the n keys (one chain of adds per vector would wait on its own latency).
static inline void weighted_sum(float *acc, const float *w, const float *x, long n, long D) {
  long d = 0;
  for (; d + 8 * VW <= D; d += 8 * VW) weighted_sum_part(acc + d, w, x + d, n, D, 8);
  if (d + 4 * VW <= D) {
    weighted_sum_part(acc + d, w, x + d, n, D, 4);
    d += 4 * VW;
  }
  if (d + 2 * VW <= D) {
    weighted_sum_part(acc + d, w, x + d, n, D, 2);
    d += 2 * VW;
  }
  if (d + VW <= D) {
    weighted_sum_part(acc + d, w, x + d, n, D, 1);
    d += VW;
  }
  for (; d < D; d++)
    for (long t = 0; t < n; t++) acc[d] += w[t] * x[t * D + d];
}

void varserve_decode_attention(const float *q, const float *k, const float *v,
                               const unsigned char *key_valid, float *out, long B, long H, long H_kv,
                               long T_max, const long *lengths, long D,
                               float scale) {
  long group = H / H_kv;
#pragma omp parallel for schedule(static)
  for (long bh = 0; bh < B * H; bh++) {
    long b = bh / H, h = bh % H;
    const float *qh = q + bh * D;
    const float *kh = k + (b * H_kv + h / group) * T_max * D;
    const float *vh = v + (b * H_kv + h / group) * T_max * D;
    const unsigned char *valid = key_valid ? key_valid + b * T_max : NULL;
    long L = lengths[b];
    float p[L > 0 ? L : 1];
    float top = -INFINITY;
    for (long t = 0; t < L; t++) {
      // the query's own key (the last) always counts, as in the reference
      p[t] = (valid && !valid[t] && t != L - 1) ? -INFINITY : scale * dot(qh, kh + t * D, D);
      top = p[t] > top ? p[t] : top;
    }
    float total = 0.0f;
    for (long t = 0; t < L; t++) {
      p[t] = expf(p[t] - top);
      total += p[t];
    }
    float acc[D];
    memset(acc, 0, sizeof acc);
    weighted_sum(acc, p, vh, L, D);
    float *oh = out + bh * D;
    for (long d = 0; d < D; d++) oh[d] = acc[d] / total;
  }
}

// Attention of S new tokens per sequence over a paged cache (a decode step, S = 1, or a verify
// window, causal inside it), float32.
//
// q: (R, H, S, D), row r's query s at position positions[r * S + s] (consecutive in a window; a
// speculative window's padding columns may sit at a scratch position past it); k, v pools:
// (n_blocks, H_kv, block_size, D); block_table: (R, max_blocks) int32, row r's positions
// [j * block_size, (j + 1) * block_size) in block block_table[r * max_blocks + j]; key_valid:
// (R, valid_width) bytes, 0 for a padded condition token, or NULL; out: (R, H, S, D).
//
// One thread per (row, head): each key is read once and scored against all S queries that see
// it (two passes, scores then values, so the window costs one stream over the row's blocks, not
// S of them). The query at position p reads keys 0..p; a padded key only when it is its own.
// A row's window is its consecutive positions from column 0; columns past them are padding (a
// shorter window in a wider pass, at the scratch position): they read no keys and their outputs,
// which nobody reads, are zero, so a plain row beside a speculative one streams its own keys, not
// its whole block table, and scores one query, not the pass's width. (A window ending at the last
// position has the scratch position next: its first padding column counts as the window's and
// reads the scratch slot too, and its output is read no more than the others'.)

void varserve_paged_attention(const float *q, const float *k, const float *v, const int *block_table,
                              const long *positions, const unsigned char *key_valid, float *out, long R,
                              long H, long H_kv, long S, long block_size, long max_blocks,
                              long valid_width, long D, float scale) {
  long group = H / H_kv;
#pragma omp parallel for schedule(dynamic)
  for (long rh = 0; rh < R * H; rh++) {
    long r = rh / H, h = rh % H, kvh = h / group;
    const long *pos = positions + r * S;
    long real = 1;  // the window's queries; the rest are padding
    while (real < S && pos[real] == pos[0] + real) real++;
    long L = pos[real - 1] + 1;  // keys 0..L-1 are read; query s sees 0..min(pos[s], L - 1)
    const float *qr = q + rh * S * D;
    const int *table = block_table + r * max_blocks;
    const unsigned char *valid = key_valid ? key_valid + r * valid_width : NULL;
    float *p = malloc(sizeof(float) * S * L);  // scores, then weights, (S, L)
    float top[S], total[S];
    for (long s = 0; s < S; s++) top[s] = -1e30f;  // finite: the file builds with -ffast-math
    // block by block: no division per key, each block's (block_size, D) tile read in order
    for (long t0 = 0; t0 < L; t0 += block_size) {
      const float *kb = k + (table[t0 / block_size] * H_kv + kvh) * block_size * D;
      long n = L - t0 < block_size ? L - t0 : block_size;
      if (D % VW == 0 && block_size % VW == 0) {
        // VW keys at a time (the block's keys past n are in memory, their scores never stored)
        for (long i0 = 0; i0 < n; i0 += VW) {
          // a whole group of keys, none padded: the queries that see all of it store its scores
          // as one vector
          int whole = i0 + VW <= n;
          for (long i = i0; whole && valid && i < i0 + VW; i++)
            whole = !(t0 + i < valid_width && !valid[t0 + i]);
          for (long s = 0; s < real; s++) {
            if (t0 + i0 > pos[s]) continue;  // keys past the query: never read (below)
            float scores[VW];
            dot_keys(qr + s * D, kb + i0 * D, D, scores);
            if (whole && t0 + i0 + VW - 1 <= pos[s]) {
              storev(p + s * L + t0 + i0, scale * loadv(scores));
              continue;
            }
            for (long i = i0; i < n && i < i0 + VW; i++) {
              long t = t0 + i;
              int padded = valid && t < valid_width && !valid[t];
              p[s * L + t] = (t > pos[s] || (padded && t != pos[s])) ? -1e30f : scale * scores[i - i0];
            }
          }
        }
      } else {
        for (long i = 0; i < n; i++) {
          long t = t0 + i;
          int padded = valid && t < valid_width && !valid[t];
          for (long s = 0; s < real; s++)
            p[s * L + t] = (t > pos[s] || (padded && t != pos[s])) ? -1e30f : scale * dot(qr + s * D, kb + i * D, D);
        }
      }
    }
    // Each query's softmax over exactly the keys it sees, 0..pos[s]: over the row's L keys (the
    // longest query's, a padding column's scratch position past every real one) its sums would be
    // split between vector lanes and tail by L, so its numbers would move with its company.
    for (long s = 0; s < real; s++) {
      long seen = pos[s] + 1 < L ? pos[s] + 1 : L;
      for (long t = 0; t < seen; t++) top[s] = p[s * L + t] > top[s] ? p[s * L + t] : top[s];
      total[s] = 0.0f;
      for (long t = 0; t < seen; t++) {
        float w = expf(p[s * L + t] - top[s]);
        p[s * L + t] = w;
        total[s] += w;
      }
    }
    float acc[S * D];
    memset(acc, 0, sizeof acc);
    for (long t0 = 0; t0 < L; t0 += block_size) {
      const float *vb = v + (table[t0 / block_size] * H_kv + kvh) * block_size * D;
      long n = L - t0 < block_size ? L - t0 : block_size;
      for (long s = 0; s < real; s++) {
        long seen = pos[s] - t0 + 1 < n ? pos[s] - t0 + 1 : n;  // the keys of the block it sees
        if (seen > 0) weighted_sum(acc + s * D, p + s * L + t0, vb, seen, D);
      }
    }
    free(p);
    float *o = out + rh * S * D;
    for (long s = 0; s < real; s++)
      for (long d = 0; d < D; d++) o[s * D + d] = acc[s * D + d] / total[s];
    memset(o + real * D, 0, (S - real) * D * sizeof(float));
  }
}
