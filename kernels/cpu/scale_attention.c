// One VAR scale's attention over a ragged per-(row, head) KV slab on CPU, float32: the forward
// (out, lse) and the per-key attention mass, over each segment's exact length (no padding, no
// mask). Layout and semantics: kernels/scale_attention.py, whose references this is tested against.
//
// Why our own: the PyTorch path gathers every segment into one block padded to the longest segment
// and runs one masked SDPA, so it reads and multiplies padding, copies the whole cache each call
// and computes the LSE with a second QK^T; it ran 1.3-2.6x slower than dense SDPA over the
// uncompressed cache. Here each segment is two small GEMMs around a softmax, as in a flash
// attention forward, over only the keys it keeps:
//
//   S = Q K^T   (MR queries x N keys, N = stored + current), in a thread-local row block,
//   P = exp2(S - max) row by row, l = sum P,
//   O = P V / l  (MR queries x D).
//
// Both products use one register tile, the classic GEMM micro-kernel (see linear.c): for each step
// of the reduction, load 16 lanes of B and broadcast one element of A for each of MR = 6 rows,
// 6 x 16 outputs in 12 AVX2 registers (6 on AVX-512), so every key (and value) loaded feeds six
// queries. For Q K^T, B is the segment's keys packed once per work item into panels of 16 keys,
// d-major (kt[N / 16][D][16]): a panel row is 16 keys' d-th components, and the packing is also
// what lets the slab part and the current part (two tensors, any strides) look like one matrix.
// For P V, B is V itself, read in place (rows at any stride, d contiguous), slab rows then current
// rows, 16 columns of D at a time. Queries go RB = 24 at a time (4 tiles), so that each key panel
// (4 KB at D = 64) and each block of values (16 KB) is loaded into L1 once for 4 tiles: with one
// tile per pass the loops streamed K and V from L2 and ran at 60 % of the speed.
//
// The softmax is two-pass over the materialised row block (max, then exp2 and sum), not online:
// the block is RB x N floats (65 KB at N = 680, in L2), and no accumulator rescaling sits in the
// P V loop. An online softmax would still take every exp2; it would save only the max pass, ~3 %
// of the time under perf at VAR-d16's last scale (the exp2 pass ~10 %, the two products ~75 %),
// so the two-pass form was kept without building the other. q is scaled by scale * log2(e) when
// packed, so the exponentials are base 2 (our own vector exp2, below: no libmvec, no -ffast-math).
//
// Threads: OpenMP over work items (segment, chunk of queries), dynamic schedule since segments
// have their own lengths. A segment is split into query chunks only when there are too few
// segments to keep every thread busy; the mass kernel keeps one item per segment, so that its
// sums over queries need no atomics. Each row's result is the same sequence of operations whatever
// the chunking, the batch or the other segments: batching never changes a request's numbers.
//
// Written with GCC vector extensions rather than intrinsics (as linear.c): AVX2 here, AVX-512 or
// NEON elsewhere, one source; D must be a multiple of 16 (the wrapper falls back otherwise).

#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

// 8 lanes, one AVX2 register: GCC splits wider generic vectors on AVX2 but then spills the
// tile's accumulators to the stack (8x slower here), so a tile row is two of these.
typedef float v8 __attribute__((vector_size(32)));
typedef int i8 __attribute__((vector_size(32)));

#define LANES 16  // keys per panel, columns of D per P V tile: two v8
#define MR 6      // queries per register tile: 6 x 2 v8 = 12 of AVX2's 16 registers
#define RB 24     // queries per row block: 4 tiles share each key panel and value block in L1

static inline v8 load8(const float *p) {
  v8 v;
  memcpy(&v, p, sizeof v);
  return v;
}

static inline void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }

static inline v8 splat(float x) { return (v8){0} + x; }

// 2^x for x <= 0, to ~2e-7 relative. Clamped at 2^-126 (the smallest normal), which is 0 to a
// softmax whose row sum is >= 1. n = round(x) by truncating x - 0.5 (x <= 0), f = x - n in
// [-0.5, 0.5], 2^f = e^(f ln 2) by its Taylor series to degree 7 (remainder < 1e-8 there), and
// 2^n built in the exponent bits.
static inline v8 exp2_neg(v8 x) {
  const v8 lo = splat(-126.0f);
  i8 small = x < lo;
  x = (v8)(((i8)x & ~small) | ((i8)lo & small));
  i8 n = __builtin_convertvector(x - 0.5f, i8);
  v8 t = (x - __builtin_convertvector(n, v8)) * 0.69314718055994531f;
  v8 p = splat(1.0f / 5040);
  p = p * t + 1.0f / 720;
  p = p * t + 1.0f / 120;
  p = p * t + 1.0f / 24;
  p = p * t + 1.0f / 6;
  p = p * t + 0.5f;
  p = p * t + 1.0f;
  p = p * t + 1.0f;
  return p * (v8)((n + 127) << 23);
}

static inline v8 vmax(v8 a, v8 b) {
  i8 gt = a > b;
  return (v8)(((i8)a & gt) | ((i8)b & ~gt));
}

static inline float hmax(v8 v) {
  float m = v[0];
  for (int i = 1; i < 8; i++) m = v[i] > m ? v[i] : m;
  return m;
}

static inline float hsum(v8 v) {
  float s = 0.0f;
  for (int i = 0; i < 8; i++) s += v[i];
  return s;
}

// acc[m][0..1] += sum_k a[m * lda + k] * b[k * ldb + 0..16), k in [0, K), m in [0, MR): the
// register tile of both products. Each output is one sum over k in order.
static inline __attribute__((always_inline)) void tile(v8 acc[MR][2], long K, const float *a, long lda,
                                                        const float *b, long ldb) {
  for (long k = 0; k < K; k++) {
    v8 b0 = load8(b + k * ldb), b1 = load8(b + k * ldb + 8);
    for (int m = 0; m < MR; m++) {
      float am = a[m * lda + k];
      acc[m][0] += am * b0;
      acc[m][1] += am * b1;
    }
  }
}

// Work item: rows [r0, r1) of segment seg. Buffers are the thread's: kt (Np x D), s (RB x Np),
// qp and ob (RB x D), col (Np) for the mass.
struct args {
  const float *q, *kc, *vc, *ks, *vs;
  const float *bias;  // (S) natural-log logit offsets of the slab's keys, or NULL
  long sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, sks, sksd, svs;
  const void *offsets, *lengths;
  int wide;  // offsets and lengths are int64, else int32
  float *out, *lse, *mass_slab, *mass_cur;
  const unsigned char *observed;  // (Lq) the queries whose mass is summed, or NULL: all
  long sob, soh, som;
  long H, Lq, Lc, D;
  float qscale;  // scale * log2(e)
};

static inline long index_at(const void *p, int wide, long i) {
  return wide ? ((const long long *)p)[i] : ((const int *)p)[i];
}

static inline void store_tile(float *c, long ldc, v8 acc[MR][2]) {
  for (int m = 0; m < MR; m++) {
    store8(c + m * ldc, acc[m][0]);
    store8(c + m * ldc + 8, acc[m][1]);
  }
}

static void segment(const struct args *A, long seg, long r0, long r1, float *kt, float *s, float *qp,
                    float *ob, float *col) {
  const long D = A->D, Lc = A->Lc, b = seg / A->H, h = seg % A->H;
  const long off = index_at(A->offsets, A->wide, seg), n = index_at(A->lengths, A->wide, seg), N = n + Lc;
  const long Np = (N + LANES - 1) / LANES * LANES;

  // keys -> panels kt[j / 16][d][j % 16]: stored keys, then current keys, then zero padding
  for (long j = 0; j < N; j++) {
    const float *src = j < n ? A->ks + (off + j) * A->sks : A->kc + b * A->skb + h * A->skh + (j - n) * A->skn;
    long sd = j < n ? A->sksd : A->skd;
    float *dst = kt + (j / LANES) * D * LANES + j % LANES;
    for (long d = 0; d < D; d++) dst[d * LANES] = src[d * sd];
  }
  for (long j = N; j < Np; j++)
    for (long d = 0; d < D; d++) kt[(j / LANES) * D * LANES + d * LANES + j % LANES] = 0.0f;
  if (col) memset(col, 0, Np * sizeof *col);

  const float *vs = A->vs + off * A->svs, *vc = A->vc ? A->vc + b * A->svb + h * A->svh : NULL;
  for (long r = r0; r < r1; r += RB) {
    const long rows = r1 - r < RB ? r1 - r : RB, tiles = (rows + MR - 1) / MR;
    // queries, pre-scaled; rows past the end are zeros (computed, never stored)
    for (long m = 0; m < tiles * MR; m++) {
      const float *src = A->q + b * A->sqb + h * A->sqh + (r + m) * A->sqm;
      for (long d = 0; d < D; d++) qp[m * D + d] = m < rows ? src[d * A->sqd] * A->qscale : 0.0f;
    }
    // S = Q K^T: each panel of 16 keys (4 KB at D = 64) stays in L1 for all the block's tiles
    for (long p = 0; p < Np / LANES; p++)
      for (long t = 0; t < tiles; t++) {
        v8 acc[MR][2] = {0};
        tile(acc, D, qp + t * MR * D, D, kt + p * D * LANES, LANES);
        store_tile(s + t * MR * Np + p * LANES, Np, acc);
      }
    float inv_l[RB];
    // softmax rows in base 2; padding columns get a finite -1e30 (exp2 -> 2^-126, never read)
    for (long m = 0; m < tiles * MR; m++) {
      float *row = s + m * Np;
      for (long j = N; j < Np; j++) row[j] = -1e30f;
      if (A->bias)  // a merged key stands for several: its log count, in the loop's base 2
        for (long j = 0; j < n; j++) row[j] += A->bias[off + j] * 1.4426950408889634f;
      v8 mx = load8(row);
      for (long j = 8; j < Np; j += 8) mx = vmax(load8(row + j), mx);
      const float top = hmax(mx);
      v8 sum = {0};
      for (long j = 0; j < Np; j += 8) {
        v8 e = exp2_neg(load8(row + j) - top);
        store8(row + j, e);
        sum += e;
      }
      const float l = hsum(sum);
      inv_l[m] = 1.0f / l;
      if (m >= rows) continue;
      if (A->lse) A->lse[seg * A->Lq + r + m] = (top + log2f(l)) * 0.69314718055994531f;
      if (col && (!A->observed || A->observed[r + m]))
        for (long j = 0; j < Np; j += 8) store8(col + j, load8(col + j) + load8(row + j) * inv_l[m]);
    }
    if (!A->out) continue;
    // O = P V / l over blocks of kb keys, whose values (kb x D, 16 KB) stay in L1 for all the
    // block's tiles, 16 columns of D per tile; partial sums wait in ob. Stored values, then current.
    const long kb = D >= 256 ? 16 : 4096 / D;
    for (long k0 = 0; k0 < N; k0 += kb) {
      const long k1 = k0 + kb < N ? k0 + kb : N;
      // [k0, ks) stored keys, [kc, k1) current keys
      const long ks = k1 < n ? k1 : n, kc = k0 > n ? k0 : n;
      for (long t = 0; t < tiles; t++) {
        const float *pt = s + t * MR * Np;
        for (long d0 = 0; d0 < D; d0 += LANES) {
          v8 acc[MR][2];
          for (int m = 0; m < MR; m++) {
            acc[m][0] = k0 ? load8(ob + (t * MR + m) * D + d0) : (v8){0};
            acc[m][1] = k0 ? load8(ob + (t * MR + m) * D + d0 + 8) : (v8){0};
          }
          if (ks > k0) tile(acc, ks - k0, pt + k0, Np, vs + k0 * A->svs + d0, A->svs);
          if (k1 > kc) tile(acc, k1 - kc, pt + kc, Np, vc + (kc - n) * A->svn + d0, A->svn);
          store_tile(ob + t * MR * D + d0, D, acc);
        }
      }
    }
    for (long m = 0; m < rows; m++) {
      float *o = A->out + b * A->sob + h * A->soh + (r + m) * A->som;
      for (long d = 0; d < D; d += 8) store8(o + d, load8(ob + m * D + d) * inv_l[m]);
    }
  }
  if (col) {
    for (long j = 0; j < n; j++) A->mass_slab[off + j] = col[j];
    for (long j = 0; j < Lc; j++) A->mass_cur[seg * Lc + j] = col[n + j];
  }
}

static void *alloc(long floats) {
  void *p = NULL;
  long bytes = (floats * (long)sizeof(float) + 63) / 64 * 64;
  return posix_memalign(&p, 64, bytes ? bytes : 64) ? NULL : p;
}

// q: (B, H, Lq, D), k_cur: (B, H, Lc, D) at any strides; v_cur: (B, H, Lc, D) with d contiguous;
// k_slab: (S, D) at any strides, v_slab: (S, D) with d contiguous; offsets, lengths: (B * H,)
// int64 if wide, else int32. out: (B, H, Lq, D) with d contiguous, or NULL (mass only: v_cur,
// v_slab unused); lse: (B * H * Lq) or NULL; mass_slab (S) and mass_cur (B * H * Lc), zeroed by
// the caller, or both NULL; observed: (Lq) nonzero for the queries whose mass is summed, or NULL
// for all (with out, the forward and the mass of some of its queries in one pass: the same bits
// as a mass-only call on those queries, which sums them in the same order); bias: (S) added to the logit of each stored key (natural log; a merged
// key's log count), or NULL. Strides in elements. Returns 0; -2 if a segment is not inside the
// slab; -1 if a buffer could not be allocated. Nothing is written unless 0.
int varserve_scale_attention(const float *q, long sqb, long sqh, long sqm, long sqd,       //
                             const float *kc, long skb, long skh, long skn, long skd,      //
                             const float *vc, long svb, long svh, long svn,                //
                             const float *ks, long sks, long sksd, const float *vs, long svs,  //
                             const float *bias,                                           //
                             const void *offsets, const void *lengths, int wide, long S,   //
                             float *out, long sob, long soh, long som,                     //
                             float *lse, float *mass_slab, float *mass_cur,                //
                             const unsigned char *observed,                                //
                             long B, long H, long Lq, long Lc, long D, float scale) {
  const long BH = B * H, blocks = (Lq + RB - 1) / RB;
  if (BH == 0 || Lq == 0) return 0;
  // the caller's segments are checked here, where reading them costs nothing
  long max_n = 0, keys = 0;
  for (long i = 0; i < BH; i++) {
    long off = index_at(offsets, wide, i), n = index_at(lengths, wide, i);
    if (n < 0 || (n > 0 && (off < 0 || off > S - n))) return -2;
    max_n = n > max_n ? n : max_n;
    keys += n + Lc;
  }
  const long Np = (max_n + Lc + LANES - 1) / LANES * LANES;
  // threads only for calls worth waking them (~1 MFLOP, tens of microseconds on one core: VAR's
  // first scales); segments split into query chunks only if there are fewer than ~4 items a thread
  const int parallel = 4.0 * Lq * D * keys > (1 << 20);
  const long threads = parallel ? omp_get_max_threads() : 1;
  long chunks = mass_slab ? 1 : (4 * threads + BH - 1) / BH;
  chunks = chunks < 1 ? 1 : chunks > blocks ? blocks : chunks;
  const long chunk_rows = (blocks + chunks - 1) / chunks * RB;
  const struct args A = {
      .q = q, .sqb = sqb, .sqh = sqh, .sqm = sqm, .sqd = sqd,
      .kc = kc, .skb = skb, .skh = skh, .skn = skn, .skd = skd,
      .vc = vc, .svb = svb, .svh = svh, .svn = svn,
      .ks = ks, .sks = sks, .sksd = sksd, .vs = vs, .svs = svs, .bias = bias,
      .offsets = offsets, .lengths = lengths, .wide = wide,
      .out = out, .sob = sob, .soh = soh, .som = som,
      .lse = lse, .mass_slab = mass_slab, .mass_cur = mass_cur, .observed = observed,
      .H = H, .Lq = Lq, .Lc = Lc, .D = D, .qscale = scale * 1.4426950408889634f,
  };
  int failed = 0;  // shared: a thread without its buffers stops every thread before any write
#pragma omp parallel if (parallel)
  {
    float *kt = alloc(Np * D), *s = alloc(RB * Np), *qp = alloc(RB * D), *ob = alloc(RB * D);
    float *col = mass_slab ? alloc(Np) : NULL;
    if (!kt || !s || !qp || !ob || (mass_slab && !col)) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp barrier
#pragma omp for schedule(dynamic, 1)
    for (long item = 0; item < BH * chunks; item++) {
      if (failed) continue;
      long seg = item / chunks, r0 = item % chunks * chunk_rows;
      long r1 = r0 + chunk_rows < Lq ? r0 + chunk_rows : Lq;
      if (r0 < r1) segment(&A, seg, r0, r1, kt, s, qp, ob, col);
    }
    free(kt), free(s), free(qp), free(ob), free(col);
  }
  return failed ? -1 : 0;
}
