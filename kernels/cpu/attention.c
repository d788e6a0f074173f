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

typedef float v16 __attribute__((vector_size(64)));
#define LANES 16

static inline v16 load16(const float *p) {
  v16 v;
  memcpy(&v, p, sizeof v);
  return v;
}

static inline float hsum(v16 v) {
  float s = 0.0f;
  for (int i = 0; i < LANES; i++) s += v[i];
  return s;
}

static float dot(const float *a, const float *b, long D) {
  v16 acc = {0};
  long d = 0;
  for (; d + LANES <= D; d += LANES) acc += load16(a + d) * load16(b + d);
  float s = hsum(acc);
  for (; d < D; d++) s += a[d] * b[d];
  return s;
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
    for (long t = 0; t < L; t++) {
      const float *vt = vh + t * D;
      float w = p[t];
      long d = 0;
      for (; d + LANES <= D; d += LANES) {
        v16 a = load16(acc + d) + w * load16(vt + d);
        memcpy(acc + d, &a, sizeof a);
      }
      for (; d < D; d++) acc[d] += w * vt[d];
    }
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

void varserve_paged_attention(const float *q, const float *k, const float *v, const int *block_table,
                              const long *positions, const unsigned char *key_valid, float *out, long R,
                              long H, long H_kv, long S, long block_size, long max_blocks,
                              long valid_width, long D, float scale) {
  long group = H / H_kv;
#pragma omp parallel for schedule(dynamic)
  for (long rh = 0; rh < R * H; rh++) {
    long r = rh / H, h = rh % H, kvh = h / group;
    const long *pos = positions + r * S;
    long L = 0;  // keys 0..L-1 are read; query s sees 0..pos[s]
    for (long s = 0; s < S; s++) L = pos[s] + 1 > L ? pos[s] + 1 : L;
    const float *qr = q + rh * S * D;
    const int *table = block_table + r * max_blocks;
    const unsigned char *valid = key_valid ? key_valid + r * valid_width : NULL;
    float *p = malloc(sizeof(float) * S * L);  // scores, then weights, (S, L)
    float top[S], total[S];
    for (long s = 0; s < S; s++) top[s] = -1e30f;  // finite: the file builds with -ffast-math
    for (long t = 0; t < L; t++) {
      const float *kt = k + ((table[t / block_size] * H_kv + kvh) * block_size + t % block_size) * D;
      int padded = valid && t < valid_width && !valid[t];
      for (long s = 0; s < S; s++) {
        float x = (t > pos[s] || (padded && t != pos[s])) ? -1e30f : scale * dot(qr + s * D, kt, D);
        p[s * L + t] = x;
        top[s] = x > top[s] ? x : top[s];
      }
    }
    for (long s = 0; s < S; s++) {
      total[s] = 0.0f;
      for (long t = 0; t < L; t++) {
        float w = expf(p[s * L + t] - top[s]);
        p[s * L + t] = w;
        total[s] += w;
      }
    }
    float acc[S * D];
    memset(acc, 0, sizeof acc);
    for (long t = 0; t < L; t++) {
      const float *vt = v + ((table[t / block_size] * H_kv + kvh) * block_size + t % block_size) * D;
      for (long s = 0; s < S; s++) {
        if (t > pos[s]) continue;  // not a key this query sees
        float w = p[s * L + t], *a = acc + s * D;
        long d = 0;
        for (; d + LANES <= D; d += LANES) {
          v16 x = load16(a + d) + w * load16(vt + d);
          memcpy(a + d, &x, sizeof x);
        }
        for (; d < D; d++) a[d] += w * vt[d];
      }
    }
    free(p);
    float *o = out + rh * S * D;
    for (long s = 0; s < S; s++)
      for (long d = 0; d < D; d++) o[s * D + d] = acc[s * D + d] / total[s];
  }
}
