// out[M, N] = x[M, K] @ W[N, K]^T on CPU in float32, with W stored once in panel layout:
// wp[N / 16, K, 16], i.e. 16 output columns at a time, K-major (see kernels/linear.py: pack_weight).
//
// Why our own: on this machine MKL's SGEMM reads the weights of a decode step (1-32 rows) at a
// fraction of the memory bandwidth: it repacks W on every call and its small-M paths are not tuned
// for the CPU. Here W is packed once, at load time, so that a product streams it exactly once, in
// address order: each thread walks its own contiguous run of panels, which is what the hardware
// prefetchers handle best. For each k the kernel loads 16 weights of each of two panels and
// broadcasts x[m, k] for up to MR rows: an outer-product register tile of MR x 32 outputs, the
// classic GEMM micro-kernel, so the same loop is bandwidth-bound at 1-2 rows and FMA-bound at 32.
//
// Every output element is one sum over k in order, whatever M is: a row's result does not depend on
// the other rows of the call, so batching never changes a request's numbers.
//
// Written with GCC vector extensions rather than intrinsics: AVX-512 here, AVX2 halves or NEON
// quarters elsewhere, one source. Threads come from OpenMP; it resolves to the libgomp torch has
// already loaded, so the kernel shares torch's thread pool instead of competing with it.

#include <string.h>

typedef float v16 __attribute__((vector_size(64)));

#define LANES 16  // output columns per panel
#define MR 8      // input rows per register tile: 8 x 2 panels = 16 accumulators

static inline v16 load16(const float *p) {
  v16 v;
  memcpy(&v, p, sizeof v);
  return v;
}

static inline void store16(float *p, v16 v) { memcpy(p, &v, sizeof v); }

// One tile: rows [0, mr) of x against np (1 or 2) panels. mr and np are constants at each call
// site, so the loops over them unroll and the accumulators live in registers.
static inline __attribute__((always_inline)) void tile(const float *x, const float *wp, float *out,
                                                        long K, long N, int mr, int np) {
  v16 acc[MR][2];
  for (int i = 0; i < mr; i++)
    for (int j = 0; j < np; j++) acc[i][j] = (v16){0};
  const float *w0 = wp, *w1 = wp + K * LANES;
  for (long k = 0; k < K; k++) {
    v16 a = load16(w0 + k * LANES);
    v16 b = np > 1 ? load16(w1 + k * LANES) : a;
    for (int i = 0; i < mr; i++) {
      v16 xb = (v16){0} + x[i * K + k];  // broadcast
      acc[i][0] += xb * a;
      if (np > 1) acc[i][1] += xb * b;
    }
  }
  for (int i = 0; i < mr; i++)
    for (int j = 0; j < np; j++) store16(out + i * N + j * LANES, acc[i][j]);
}

#define ROWS(np)                                                                    \
  do {                                                                              \
    long m = 0;                                                                     \
    for (; m + MR <= M; m += MR) tile(x + m * K, wp, out + m * N, K, N, MR, np);    \
    const float *xr = x + m * K;                                                    \
    float *orow = out + m * N;                                                      \
    switch (M - m) {                                                                \
      case 7: tile(xr, wp, orow, K, N, 7, np); break;                               \
      case 6: tile(xr, wp, orow, K, N, 6, np); break;                               \
      case 5: tile(xr, wp, orow, K, N, 5, np); break;                               \
      case 4: tile(xr, wp, orow, K, N, 4, np); break;                               \
      case 3: tile(xr, wp, orow, K, N, 3, np); break;                               \
      case 2: tile(xr, wp, orow, K, N, 2, np); break;                               \
      case 1: tile(xr, wp, orow, K, N, 1, np); break;                               \
    }                                                                               \
  } while (0)

// x: (M, K), wp: (N / 16, K, 16), out: (M, N); all contiguous, N a multiple of 16.
void varserve_linear_panels(const float *x, const float *w_panels, float *out_all, long M, long N,
                            long K) {
  long panels = N / LANES, pairs = (panels + 1) / 2;
#pragma omp parallel for schedule(static)
  for (long pair = 0; pair < pairs; pair++) {
    long p = 2 * pair;
    const float *wp = w_panels + p * K * LANES;
    float *out = out_all + p * LANES;
    if (panels - p >= 2)
      ROWS(2);
    else
      ROWS(1);
  }
}
