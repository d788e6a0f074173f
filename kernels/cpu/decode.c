// The decoder layers of a LlamaGen decode step (or verify window) on CPU, float32, in one call:
// for each layer, RMSNorm, the fused QKV product, 2D RoPE on q and k, the new keys and values
// written into the (paged) cache, attention over it, the output product and residual add, RMSNorm,
// SwiGLU and its residual add.
//
// Why one call: at batch 1 a step streams 390 MB of weights (GPT-B) in a few milliseconds, and the
// PyTorch layer between the products is ~50 small operators (norms, RoPE through complex views,
// index_put into the cache, transposes, silu, adds), each a dispatcher round trip of 5-30 us at one
// or two rows: 6 ms of a 12.7 ms step on a 55 GB/s host. Here that glue is a few loops over
// (rows, dim) floats between the products.
//
// The products and the attention are not re-implemented: the caller passes the addresses of
// varserve_linear_panels (kernels/cpu/linear.c, weights packed in 16-column panels) and
// varserve_paged_attention (kernels/cpu/attention.c), each built with its own flags, so the step
// computes exactly what the layer-by-layer path computes there. Only the glue is ours, and it is
// written so that a row's numbers never depend on the other rows: every per-row loop runs the
// same instructions for every row (vector chunks, the tail padded into a vector rather than a
// scalar remainder), and the file builds with -ffp-contract=off, so no loop's vector and scalar
// forms round differently.
//
// Shapes (R rows of S columns; M tokens, row r's column s at slot r * S + s):
//   slots: (M) long, the slot of each token, ascending, each row's its first columns, or NULL for
//     every slot (M = R * S). A pass of ragged windows (one speculative row of 16 beside plain rows
//     of 1) runs only its real tokens through the products and writes only their keys: the columns
//     past a row's window are padding, which only attention sees (as zero queries at their scratch
//     positions) and whose outputs nobody reads;
//   x: (M, dim), the embedded tokens in, the last layer's output out (after the final norm when
//     final_norm (dim) is given);
//   head: the output head's panels (vocab / 16, dim, 16) or NULL; logits (M, vocab) its output;
//   positions: (R, S) long, every slot's (padding at its scratch position); rope: (n_rope, D / 2, 2) [cos, sin] per position and rotated pair;
//   weights: n_layer * 7 pointers, per layer attention_norm (dim), wqkv panels ((H + 2 H_kv) D / 16,
//     dim, 16), wo panels (dim / 16, H D, 16), ffn_norm (dim), w1 and w3 panels (hidden / 16, dim,
//     16), w2 panels (dim / 16, hidden, 16);
//   k_cache, v_cache: n_layer pointers each to a pool (n_blocks, H_kv, block_size, D);
//   block_table: (R, max_blocks) int32; key_valid: (R, valid_width) bytes or NULL.
// Returns 0, or -1 (nothing written) when a position has no RoPE entry or no block, or the slots
// are not ascending within R * S or not each row's first columns.

#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__)
#define VW 16
#elif defined(__AVX__)
#define VW 8
#else
#define VW 4
#endif

typedef float vec __attribute__((vector_size(VW * sizeof(float))));
typedef int ivec __attribute__((vector_size(VW * sizeof(int))));

typedef void (*linear_fn)(const float *x, const float *w_panels, float *out, long M, long N, long K);
typedef void (*attention_fn)(const float *q, const float *k, const float *v, const int *block_table,
                             const long *positions, const unsigned char *key_valid, float *out,
                             long R, long H, long H_kv, long S, long block_size, long max_blocks,
                             long valid_width, long D, float scale);

static inline vec loadv(const float *p) {
  vec v;
  memcpy(&v, p, sizeof v);
  return v;
}

static inline void storev(float *p, vec v) { memcpy(p, &v, sizeof v); }

// n floats (n < VW) into a vector, the rest zero, and back: a row's tail takes the vector code too.
static inline vec load_part(const float *p, long n) {
  vec v = {0};
  memcpy(&v, p, n * sizeof(float));
  return v;
}

static inline void store_part(float *p, vec v, long n) { memcpy(p, &v, n * sizeof(float)); }

// a where mask (-1) else b, lane by lane (C has no vector ?:).
static inline vec where(ivec mask, vec a, vec b) {
  ivec ai, bi;
  memcpy(&ai, &a, sizeof ai);
  memcpy(&bi, &b, sizeof bi);
  ai = (ai & mask) | (bi & ~mask);
  memcpy(&a, &ai, sizeof a);
  return a;
}

// exp over a vector, Cephes' expf: 2^n * e^r with |r| <= ln 2 / 2, a degree-7 polynomial for
// e^r; within 2 ulp of expf on its range, inputs clamped to it (so 2^n stays a normal float).
static inline vec exp_vec(vec x) {
  const vec hi = (vec){0} + 88.3762626647949f, lo = (vec){0} + -87.3365447504019f;
  x = where(x > hi, hi, x);
  x = where(x < lo, lo, x);
  vec t = x * 1.44269504088896341f + 0.5f;
  ivec n = __builtin_convertvector(t, ivec);  // toward zero: one too many below zero
  vec fn = __builtin_convertvector(n, vec);
  ivec over = fn > t;  // -1 where the truncation rounded up
  n += over;
  fn = __builtin_convertvector(n, vec);
  vec r = x - fn * 0.693359375f - fn * -2.12194440e-4f;
  vec p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  ivec bits = (n + 127) << 23;
  vec scale;
  memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// out = x / rms(x) * weight per row of x (rows, dim), as F.rms_norm.
static void rms_norm(const float *x, const float *weight, float *out, long rows, long dim, float eps) {
  for (long m = 0; m < rows; m++) {
    const float *xr = x + m * dim;
    vec acc = {0};
    long d = 0;
    for (; d + VW <= dim; d += VW) acc += loadv(xr + d) * loadv(xr + d);
    if (d < dim) {
      vec v = load_part(xr + d, dim - d);
      acc += v * v;
    }
    float ss = 0.0f;
    for (int l = 0; l < VW; l++) ss += acc[l];
    float inv = 1.0f / sqrtf(ss / (float)dim + eps);
    for (d = 0; d < dim; d++) out[m * dim + d] = xr[d] * inv * weight[d];
  }
}

// x += y over n floats.
static void add_into(float *x, const float *y, long n) {
  for (long i = 0; i < n; i++) x[i] += y[i];
}

// a = silu(a) * b over rows of `hidden` floats, SwiGLU's gate.
static void silu_mul(float *a, const float *b, long rows, long hidden) {
  for (long m = 0; m < rows; m++) {
    float *ar = a + m * hidden;
    const float *br = b + m * hidden;
    long i = 0;
    for (; i + VW <= hidden; i += VW) {
      vec g = loadv(ar + i);
      storev(ar + i, g / (1.0f + exp_vec(-g)) * loadv(br + i));
    }
    if (i < hidden) {
      vec g = load_part(ar + i, hidden - i);
      store_part(ar + i, g / (1.0f + exp_vec(-g)) * load_part(br + i, hidden - i), hidden - i);
    }
  }
}

// (x0, x1) pairs of src rotated by rope_pos (D / 2 [cos, sin]) into dst: (x0 c - x1 s, x0 s + x1 c).
static inline void rotate(const float *src, const float *rope_pos, float *dst, long D) {
  for (long i = 0; i < D / 2; i++) {
    float x0 = src[2 * i], x1 = src[2 * i + 1], c = rope_pos[2 * i], s = rope_pos[2 * i + 1];
    dst[2 * i] = x0 * c - x1 * s;
    dst[2 * i + 1] = x0 * s + x1 * c;
  }
}

int varserve_decode_layers(float *x, const long *positions, const float *rope, long n_rope,
                           const float *const *weights, float *const *k_cache, float *const *v_cache,
                           const int *block_table, long block_size, long max_blocks,
                           const unsigned char *key_valid, long valid_width, long R, long S,
                           long n_layer, long dim, long H, long H_kv, long D, long hidden, float eps,
                           float scale, linear_fn linear, attention_fn attention,
                           const float *final_norm, const float *head, long vocab, float *logits,
                           const long *slots, long M) {
  long qkv_dim = (H + 2 * H_kv) * D, q_dim = H * D;
  if (!slots) M = R * S;
  for (long m = 0; m < R * S; m++) {
    long pos = positions[m];
    if (pos < 0 || pos >= n_rope || pos / block_size >= max_blocks) return -1;
  }
  // each row's slots are its first columns (a window from column 0), ascending over the rows
  for (long m = 0; slots && m < M; m++) {
    long slot = slots[m];
    if (slot < 0 || slot >= R * S || (m && slot <= slots[m - 1])) return -1;
    if (slot % S && (!m || slots[m - 1] != slot - 1)) return -1;
  }
  // one allocation for the step's activations; q and the attention's output hold every slot
  long sizes[] = {M * dim, M * qkv_dim, R * S * q_dim, R * S * q_dim, M * q_dim, M * hidden, M * hidden};
  long total = 0;
  for (int i = 0; i < 7; i++) total += sizes[i];
  float *work = malloc(sizeof(float) * total);
  if (!work) return -2;
  float *normed = work, *qkv = normed + sizes[0], *q = qkv + sizes[1], *att = q + sizes[2];
  float *y = att + sizes[3], *h1 = y + sizes[4], *h3 = h1 + sizes[5];
  float *o = qkv;  // the output products reuse the qkv buffer (M x dim <= M x qkv_dim)
  // padding slots' queries stay zero: finite, and no layer writes them
  if (slots) memset(q, 0, sizes[2] * sizeof(float));

  for (long layer = 0; layer < n_layer; layer++) {
    const float *const *w = weights + 7 * layer;
    float *kc = k_cache[layer], *vc = v_cache[layer];

    rms_norm(x, w[0], normed, M, dim, eps);
    linear(normed, w[1], qkv, M, qkv_dim, dim);
    // q rotated into (R, H, S, D) for the attention kernel; k rotated and v copied to the cache
    for (long m = 0; m < M; m++) {
      long slot = slots ? slots[m] : m, r = slot / S, s = slot % S, pos = positions[slot];
      const float *t = qkv + m * qkv_dim, *rope_pos = rope + pos * D;
      for (long h = 0; h < H; h++) rotate(t + h * D, rope_pos, q + ((r * H + h) * S + s) * D, D);
      long block = block_table[r * max_blocks + pos / block_size], offset = pos % block_size;
      for (long h = 0; h < H_kv; h++) {
        long at = ((block * H_kv + h) * block_size + offset) * D;
        rotate(t + (H + h) * D, rope_pos, kc + at, D);
        memcpy(vc + at, t + (H + H_kv + h) * D, D * sizeof(float));
      }
    }
    attention(q, kc, vc, block_table, positions, key_valid, att, R, H, H_kv, S, block_size,
              max_blocks, valid_width, D, scale);
    for (long m = 0; m < M; m++) {  // (R, H, S, D) at the tokens' slots -> (M, H * D)
      long slot = slots ? slots[m] : m, r = slot / S, s = slot % S;
      for (long h = 0; h < H; h++)
        memcpy(y + m * q_dim + h * D, att + ((r * H + h) * S + s) * D, D * sizeof(float));
    }
    linear(y, w[2], o, M, dim, q_dim);
    add_into(x, o, M * dim);

    rms_norm(x, w[3], normed, M, dim, eps);
    linear(normed, w[4], h1, M, hidden, dim);
    linear(normed, w[5], h3, M, hidden, dim);
    silu_mul(h1, h3, M, hidden);
    linear(h1, w[6], o, M, dim, hidden);
    add_into(x, o, M * dim);
  }
  // the model's final norm (in place) and output head, when given: at batch 1 each was a PyTorch
  // call dearer than its arithmetic
  if (final_norm) rms_norm(x, final_norm, x, M, dim, eps);
  if (head) linear(x, head, logits, M, vocab, dim);
  free(work);
  return 0;
}
