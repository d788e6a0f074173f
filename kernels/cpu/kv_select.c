// kv_select on CPU: which candidates each segment of a ragged KV slab keeps. Semantics and the
// PyTorch reference: kernels/kv_select.py, which this is tested against.
//
// Why our own: PyTorch picks a segment's best `keep` candidates by (tier, key, lower column) with
// three full sorts of every (segments x candidates) row: at a 50 % budget and a batch of 16, ~28 ms
// of a 1.4 s batch of var-shapes, a quarter of what the smaller cache saves in attention. Here a
// segment is one work item:
//
//   1. each valid candidate's priority packed into one uint64, (tier + 1) << 48 | key << 16 |
//      (65535 - column), the key's float bits mapped to an unsigned order (-0.0 as +0.0, every NaN
//      as one NaN above +inf, where the reference's descending sort puts NaNs): larger
//      is better, and no two candidates are equal, so the order is total and is the reference's;
//   2. the keep-th largest found by quickselect (O(M), no sort), then the columns whose priority
//      is at least that, in column order: the kept columns, ascending, with no sort at all.
//
// Each segment's result depends on its own candidates only, so an image does not depend on its
// company; OpenMP over segments.

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_COLUMNS 65536
#define MAX_TIER 65534

static inline uint64_t priority(int64_t tier, float key, long col) {
  key += 0.0f;  // -0.0 -> +0.0: the reference's sort holds them equal
  uint32_t bits;
  memcpy(&bits, &key, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) bits = 0x7fc00000u;  // every NaN one, above +inf (as sort)
  bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return ((uint64_t)(tier + 1) << 48) | ((uint64_t)bits << 16) | (uint64_t)(65535 - col);
}

// The k-th largest (0-based) of x[0..n), reordering x.
static uint64_t kth_largest(uint64_t *x, long n, long k) {
  long lo = 0, hi = n - 1;
  while (lo < hi) {
    uint64_t a = x[lo], b = x[(lo + hi) / 2], c = x[hi];  // median of three as the pivot
    uint64_t pivot = a < b ? (b < c ? b : (a < c ? c : a)) : (a < c ? a : (b < c ? c : b));
    long i = lo, j = hi;
    while (i <= j) {
      while (x[i] > pivot) i++;
      while (x[j] < pivot) j--;
      if (i <= j) {
        uint64_t t = x[i];
        x[i++] = x[j];
        x[j--] = t;
      }
    }
    if (k <= j)
      hi = j;
    else if (k >= i)
      lo = i;
    else
      return x[k];
  }
  return x[k];
}

// One segment's kept columns into cols[0..W), ascending, -1 after its keep. buf: M slots.
// Returns 0, or 2 where keep exceeds the valid candidates or a tier is out of range.
static int select_segment(const int64_t *tier, const float *key, const uint8_t *valid, long M, long keep,
                          int64_t *cols, long W, uint64_t *buf) {
  long n = 0;
  for (long c = 0; c < M; c++) {
    if (!valid[c]) continue;
    if (tier[c] < 0 || tier[c] > MAX_TIER) return 2;
    buf[n++] = priority(tier[c], key[c], c);
  }
  if (keep < 0 || keep > n || keep > W) return 2;
  long j = 0;
  if (keep > 0) {
    uint64_t least = kth_largest(buf, n, keep - 1);
    for (long c = 0; c < M && j < keep; c++)
      if (valid[c] && priority(tier[c], key[c], c) >= least) cols[j++] = c;
  }
  for (; j < W; j++) cols[j] = -1;
  return 0;
}

// tier (G, M) int64, key (G, M) float32, valid (G, M) uint8, keep (G,) int64 -> cols (G, W) int64.
// Returns 0; 2 where a segment's keep or tiers are out of range (cols then undefined); 1 out of memory.
int varserve_kv_select(const int64_t *tier, const float *key, const uint8_t *valid, long G, long M,
                       const int64_t *keep, int64_t *cols, long W) {
  if (M >= MAX_COLUMNS) return 2;
  int status = 0, failed = 0;  // failed: shared, so no thread skips the loop every thread must reach
#pragma omp parallel if (G > 1)
  {
    uint64_t *buf = malloc((size_t)(M > 0 ? M : 1) * sizeof(uint64_t));
    if (!buf) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp barrier
#pragma omp for schedule(static) reduction(| : status)
    for (long g = 0; g < G; g++)
      if (!failed)
        status |= select_segment(tier + g * M, key + g * M, valid + g * M, M, keep[g], cols + g * W, W, buf);
    free(buf);
  }
  if (failed) return 1;
  return status & 2 ? 2 : status;
}
