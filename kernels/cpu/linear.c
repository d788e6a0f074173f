// out[M, N] = x[M, K] @ W[N, K]^T on CPU in float32, with W stored once in panel layout:
// wp[N / 16, K, 16], i.e. 16 output columns at a time, K-major (see kernels/linear.py: pack_weight).
//
// Why our own: on this machine MKL's SGEMM reads the weights of a decode step (1-32 rows) at a
// fraction of the memory bandwidth: it repacks W on every call and its small-M paths are not tuned
// for the CPU. Here W is packed once, at load time, so that a product streams it exactly once, in
// address order: each thread walks its own contiguous run of panels, which is what the hardware
// prefetchers handle best. For each k the kernel loads the 16 weights of each panel in its tile and
// broadcasts x[m, k] for up to MR rows: an outer-product register tile, the classic GEMM
// micro-kernel, so the same loop is bandwidth-bound at 1-2 rows and FMA-bound at 32.
//
// The tile is sized to the register file the compiler targets (-march=native): with AVX-512 (32
// registers of 16 floats) 8 rows x 4 panels (32 accumulators: gcc spills a few at 8 rows, which
// measured no slower than 8 x 2 there; at 1-4 rows, a decode step's, all stay in registers); with
// AVX2 (16 registers of 8) a panel row is two registers, and 6 rows x 1 panel keeps 12
// accumulators, the 2 weights and the broadcast in registers. (The AVX-512 tile compiled for AVX2
// spilled: 0.5 GB/s at 8 rows, where this one streams at the read bandwidth.) Four panels, not
// two, because at 1-2 rows a core reads faster the more weight streams it has in flight: on the
// GPT-B products (AMD EPYC, AVX-512) 26-27 against 23-24 GB/s at one thread beside a 29 GB/s read
// probe, 49 against 43 GB/s at two threads beside a 50-55 GB/s one; from 16 rows on, where the
// FMAs bind, the two tiles run alike. A product with too few panels for its threads narrows its
// tiles, so that the threads share them evenly.
//
// Every output element is one sum over k in order, whatever M is and whatever the tile: a row's
// result does not depend on the other rows of the call, so batching never changes a request's
// numbers, and AVX2 and AVX-512 builds give the same bits.
//
// Written with GCC vector extensions rather than intrinsics, one source for AVX-512, AVX2 and
// NEON. Threads come from OpenMP; it resolves to the libgomp torch has already loaded, so the
// kernel shares torch's thread pool instead of competing with it.

#include <omp.h>
#include <string.h>

#define LANES 16  // output columns per panel

#if defined(__AVX512F__)
#define VW 16  // floats per vector register
#define MR 8   // input rows per register tile
#define NP 4   // panels per register tile
#elif defined(__AVX__)
#define VW 8
#define MR 6
#define NP 1
#else  // 128-bit vectors (NEON, SSE): 32 registers on AArch64
#define VW 4
#define MR 4
#define NP 1
#endif
#define VPP (LANES / VW)  // vectors per panel row

typedef float vec __attribute__((vector_size(VW * sizeof(float))));

static inline vec loadv(const float *p) {
  vec v;
  memcpy(&v, p, sizeof v);
  return v;
}

static inline void storev(float *p, vec v) { memcpy(p, &v, sizeof v); }

// A register of copies of a: one broadcast. Not `(vec){0} + a`, an add IEEE forbids folding (0 +
// -0 is +0), one more dependent instruction per row and k; a - 0 is a for every a, so it folds.
static inline vec splat(float a) { return a - (vec){0}; }

// One tile: rows [0, mr) of x against np (1..NP) panels. mr and np are constants at each call
// site, so the loops over them unroll and the accumulators live in registers.
static inline __attribute__((always_inline)) void tile(const float *x, const float *wp, float *out,
                                                        long K, long N, int mr, int np) {
  vec acc[MR][NP * VPP];
  for (int i = 0; i < mr; i++)
    for (int j = 0; j < np * VPP; j++) acc[i][j] = (vec){0};
  for (long k = 0; k < K; k++) {
    vec w[NP * VPP];
    for (int p = 0; p < np; p++)
      for (int u = 0; u < VPP; u++) w[p * VPP + u] = loadv(wp + (p * K + k) * LANES + u * VW);
    for (int i = 0; i < mr; i++) {
      vec xb = splat(x[i * K + k]);
      for (int j = 0; j < np * VPP; j++) acc[i][j] += xb * w[j];
    }
  }
  for (int i = 0; i < mr; i++)
    for (int p = 0; p < np; p++)
      for (int u = 0; u < VPP; u++) storev(out + i * N + p * LANES + u * VW, acc[i][p * VPP + u]);
}

// All M rows against np panels: full MR-row tiles, then one tile of the remainder.
static inline __attribute__((always_inline)) void rows(const float *x, const float *wp, float *out,
                                                        long M, long K, long N, int np) {
  long m = 0;
  for (; m + MR <= M; m += MR) tile(x + m * K, wp, out + m * N, K, N, MR, np);
  const float *xr = x + m * K;
  float *orow = out + m * N;
  switch (M - m) {
#if MR > 7
    case 7: tile(xr, wp, orow, K, N, 7, np); break;
    case 6: tile(xr, wp, orow, K, N, 6, np); break;
#endif
#if MR > 5
    case 5: tile(xr, wp, orow, K, N, 5, np); break;
    case 4: tile(xr, wp, orow, K, N, 4, np); break;
#endif
    case 3: tile(xr, wp, orow, K, N, 3, np); break;
    case 2: tile(xr, wp, orow, K, N, 2, np); break;
    case 1: tile(xr, wp, orow, K, N, 1, np); break;
  }
}

// `width` (1..NP) panels from `p` on: a tile width constant at each call, so its loops unroll.
static void panels_from(const float *x, const float *w_panels, float *out_all, long M, long N, long K,
                        long p, long width) {
  const float *wp = w_panels + p * K * LANES;
  float *out = out_all + p * LANES;
  switch (width) {
#if NP >= 4
    case 4: rows(x, wp, out, M, K, N, 4); break;
    case 3: rows(x, wp, out, M, K, N, 3); break;
#endif
#if NP >= 2
    case 2: rows(x, wp, out, M, K, N, 2); break;
#endif
    default: rows(x, wp, out, M, K, N, 1); break;
  }
}

// x: (M, K), wp: (N / 16, K, 16), out: (M, N); all contiguous, N a multiple of 16.
void varserve_linear_panels(const float *x, const float *w_panels, float *out_all, long M, long N,
                            long K) {
  long panels = N / LANES, threads = omp_get_max_threads();
  // The widest tile (NP, NP / 2, ..., 1) whose busiest thread reads at most a quarter more panels
  // than any tiling could give it (ceil(panels / threads), tiles of 1's): wide tiles read faster,
  // but 48 panels on 8 threads take tiles of 2 (6 panels a thread), not of 4 (12 tiles: 8 panels
  // for some threads, none for others).
  long least = (panels + threads - 1) / threads, width = NP;
  for (; width > 1; width /= 2) {
    long tiles = (panels + width - 1) / width, busiest = (tiles + threads - 1) / threads * width;
    if (4 * (busiest < panels ? busiest : panels) <= 5 * least) break;
  }
  long groups = (panels + width - 1) / width;
#pragma omp parallel for schedule(static)
  for (long g = 0; g < groups; g++) {
    long p = width * g, left = panels - p;
    panels_from(x, w_panels, out_all, M, N, K, p, left < width ? left : width);
  }
}
