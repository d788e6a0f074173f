// Speculative decoding's per-pass arithmetic on CPU, float32: the target distributions of a
// verification window and the acceptance tests over it (kernels/speculative.py holds the PyTorch
// reference, the shapes and the rules; this file follows them line for line).
//
// Why in C: on the bundled 256-token model a verification pass is a forward of ~2 ms, and the
// PyTorch ops around it (top-k, softmax, top-p, the residuals, two exponential races per column,
// gathers and masks: ~50 operators on (rows, window, vocabulary) tensors) cost about as much
// again, each a dispatcher round trip that takes longer than its arithmetic at these sizes. Here
// they are loops over each row's columns, and the races only visit the tokens a column's target
// gives mass to (at most top-k of them) instead of the whole vocabulary.
//
// Every (row, column) runs the same instructions whatever else is in the call, so a request's
// numbers never depend on its batch.

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
  float value;
  long index;
} candidate;

// The order of the candidates: larger value first, ties by smaller index (a strict total order,
// so selection and sorting agree).
static inline int before(candidate a, candidate b) {
  return a.value > b.value || (a.value == b.value && a.index < b.index);
}

static int compare(const void *pa, const void *pb) {
  candidate a = *(const candidate *)pa, b = *(const candidate *)pb;
  return before(a, b) ? -1 : (before(b, a) ? 1 : 0);
}

// Reorders c[0, n) so that c[0, k) are its k first in `before` order (Hoare quickselect).
static void select_first(candidate *c, long n, long k) {
  long lo = 0, hi = n - 1;
  while (lo < hi) {
    candidate pivot = c[lo + (hi - lo) / 2];
    long i = lo, j = hi;
    while (i <= j) {
      while (before(c[i], pivot)) i++;
      while (before(pivot, c[j])) j--;
      if (i <= j) {
        candidate t = c[i];
        c[i] = c[j];
        c[j] = t;
        i++;
        j--;
      }
    }
    if (k - 1 <= j)
      hi = j;
    else if (k - 1 >= i)
      lo = i;
    else
      break;
  }
}

// One column's candidates: c[0, kept) are the top_k largest of logits x (V,) (k <= V), divided by
// the temperature, softmax; with use_p the candidates after the smallest prefix (in order) whose
// mass reaches top_p are dropped (the first always stays); the rest renormalised. c: V of scratch.
// Returns kept.
static long column_candidates(const float *x, long k, int use_p, float top_p, float temp,
                              candidate *c, long V) {
  for (long i = 0; i < V; i++) c[i] = (candidate){x[i], i};
  if (k < V) select_first(c, V, k);
  if (use_p) qsort(c, k, sizeof(candidate), compare);
  float top = -INFINITY;
  for (long i = 0; i < k; i++) top = fmaxf(top, c[i].value / temp);
  float sum = 0.0f;
  for (long i = 0; i < k; i++) {
    c[i].value = expf(c[i].value / temp - top);
    sum += c[i].value;
  }
  long kept = k;
  if (use_p) {
    // the mass of the strictly better candidates, against top_p
    float mass = 0.0f, kept_sum = 0.0f;
    for (long i = 0; i < k; i++) {
      float prob = c[i].value / sum;
      if (i > 0 && mass >= top_p) {
        kept = i;
        break;
      }
      mass += prob;
      kept_sum += prob;
      c[i].value = prob;
    }
    sum = kept_sum;
  }
  for (long i = 0; i < kept; i++) c[i].value /= sum;
  return kept;
}

// Every column of logits (b, S, V) with its row's settings (top_k (b,), <= 0: the whole
// vocabulary; temperature, top_p (b,)), its candidates (column_candidates) then either written out
// as probabilities (probs: (b, S, V), zero off the candidates) or raced with the column's noise
// (uniform (b, S, V) in [0, 1) per vocabulary id, tokens (b, S)): argmax p / -log1p(-u) over the
// candidates, equal scores (as where two uniforms are 0) to the smaller token. Returns 0, or -1
// when out of memory (nothing useful written).
static int each_column(const float *logits, const long *top_k, const float *temperature,
                       const float *top_p, long b, long S, long V, float *probs,
                       const float *uniform, long *tokens) {
  int status = 0;
#pragma omp parallel for schedule(static) if (b * S * V > (1L << 18)) reduction(| : status)
  for (long j = 0; j < b; j++) {
    candidate *c = malloc(sizeof(candidate) * V);
    if (!c) {
      status |= 1;
      continue;
    }
    long k = top_k[j] > 0 && top_k[j] < V ? top_k[j] : V;
    int use_p = top_p[j] > 0.0f && top_p[j] < 1.0f;
    float temp = temperature[j] > 1e-5f ? temperature[j] : 1e-5f;
    for (long t = 0; t < S; t++) {
      long at = (j * S + t) * V;
      long kept = column_candidates(logits + at, k, use_p, top_p[j], temp, c, V);
      if (probs) {
        memset(probs + at, 0, sizeof(float) * V);
        for (long i = 0; i < kept; i++) probs[at + c[i].index] = c[i].value;
        continue;
      }
      long best = c[0].index;
      float best_score = -1.0f;
      for (long i = 0; i < kept; i++) {
        if (!(c[i].value > 0.0f)) continue;
        float score = c[i].value / -log1pf(-uniform[at + c[i].index]);
        if (score > best_score || (score == best_score && c[i].index < best)) {
          best = c[i].index;
          best_score = score;
        }
      }
      tokens[j * S + t] = best;
    }
    free(c);
  }
  return status ? -1 : 0;
}

// The target distributions of a pass: out p (b, S, V), written whole (each_column).
int varserve_target_probs(const float *logits, const long *top_k, const float *temperature,
                          const float *top_p, float *out, long b, long S, long V) {
  return each_column(logits, top_k, temperature, top_p, b, S, V, out, NULL, NULL);
}

// Plain decoding's draw (models/sampling.py: sample): tokens (b, S) raced over each column's
// candidates with uniform (b, S, V) (each_column). With top_k 1 the one candidate is the largest
// logit, the first of equals: argmax. The reference's candidates among logits tied at the k-th
// place are torch.topk's; here the smaller tokens.
int varserve_sample(const float *logits, const long *top_k, const float *temperature,
                    const float *top_p, const float *uniform, long *tokens, long b, long S,
                    long V) {
  return each_column(logits, top_k, temperature, top_p, b, S, V, NULL, uniform, tokens);
}

// A draw proportional to w (V,) >= 0 with uniforms e (V,): argmax w / -log1p(-e) over the tokens
// with w > 0 (the first of equals), the exponential race; -1 when w is zero everywhere.
static long race(const float *w, const float *e, long V) {
  long best = -1;
  float best_score = 0.0f;
  for (long i = 0; i < V; i++) {
    if (!(w[i] > 0.0f)) continue;
    float score = w[i] / -log1pf(-e[i]);
    if (best < 0 || score > best_score) {
      best = i;
      best_score = score;
    }
  }
  return best;
}

// The residual race: a draw from norm(max(0, p - q)), or from p where that is zero everywhere.
static long residual_race(const float *p, const float *q, const float *e, float *scratch, long V) {
  float sum = 0.0f;
  for (long i = 0; i < V; i++) {
    float r = p[i] > q[i] ? p[i] - q[i] : 0.0f;
    scratch[i] = r;
    sum += r;
  }
  return sum > 0.0f ? race(scratch, e, V) : race(p, e, V);
}

// One pass's verification of b rows, S columns, committed in place (kernels/speculative.py:
// commit_reference). Row j is tokens_all row idx[j] (N tokens: n[j] committed, then its drafts)
// and q_all row qrows[j] (W >= S distributions, by offset after the committed tokens).
// p, e: (b, S, V); windows: (b,) long; u: (b, S); coupled: (b,) bytes; grouped: (b, S) or NULL,
// taken where use_group[j] (bytes, NULL with grouped). Writes the window's tokens at n[j] + t for
// t < windows[j], q rows t < S to p's column min(k + 1 + t, S - 1), and accepted (b,) long.
// Returns 0, or -1 when out of memory (nothing written).
int varserve_commit(const float *p, float *q_all, const long *qrows, long *tokens_all,
                    const long *idx, const long *n, const long *windows, const float *u,
                    const float *e, const unsigned char *coupled, const float *grouped,
                    const unsigned char *use_group, long *accepted, long b, long S, long V, long W,
                    long N) {
  int status = 0;
#pragma omp parallel for schedule(static) if (b * S * V > (1L << 18)) reduction(| : status)
  for (long j = 0; j < b; j++) {
    float *scratch = malloc(sizeof(float) * V);
    unsigned char *passed = malloc(S);
    long *window_tokens = malloc(sizeof(long) * S);
    if (!scratch || !passed || !window_tokens) {
      free(scratch);
      free(passed);
      free(window_tokens);
      status |= 1;
      continue;
    }
    long *tokens = tokens_all + idx[j] * N;
    float *q = q_all + qrows[j] * W * V;
    long L = windows[j], k = 0, at = n[j];
    int leading = 1;
    for (long t = 0; t < S; t++) {
      long row = j * S + t, d = tokens[at + t < N ? at + t : N - 1];
      float q_d = q[t * V + d] > 1e-30f ? q[t * V + d] : 1e-30f;
      float ratio = fminf(p[row * V + d] / q_d, 1.0f);
      if (grouped && use_group[j]) ratio = grouped[row];
      passed[t] = t < L - 1 && u[row] < ratio;
      leading = leading && passed[t];
      k += leading;
    }
    for (long t = 0; t < L; t++) {
      long row = j * S + t, d = tokens[at + t];
      const float *pt = p + row * V, *qt = q + t * V, *et = e + row * V;
      int is_draft = t < L - 1;
      long token;
      if (t < k)
        token = d;
      else if (t == k || (coupled[j] && !passed[t]))
        // the first rejection (or past the last draft), or a later rejected draft coupled to its
        // new target: a draft's residual, a draw of p past the drafts
        token = is_draft ? residual_race(pt, qt, et, scratch, V) : race(pt, et, V);
      else if (coupled[j])
        token = d;  // a later draft that passed its own test stays
      else
        token = race(pt, et, V);
      window_tokens[t] = token;
    }
    for (long t = 0; t < L; t++) tokens[at + t] = window_tokens[t];
    // the next drafts' q: the targets of the columns after the committed ones
    for (long t = 0; t < S; t++) {
      long src = k + 1 + t < S - 1 ? k + 1 + t : S - 1;
      memcpy(q + t * V, p + (j * S + src) * V, sizeof(float) * V);
    }
    accepted[j] = k;
    free(scratch);
    free(passed);
    free(window_tokens);
  }
  return status ? -1 : 0;
}

// Tops rows up to their drafts (kernels/speculative.py: fill_drafts_reference). Row j is
// tokens_all row idx[j] (N tokens, n[j] committed) and q_all row qrows[j] (W distributions):
// offsets lo[j] <= t < hi[j] after the committed tokens get a fresh draft, a copy of the token
// one grid row up (on the first grid row: its left neighbour), in order, and a one-hot q.
void varserve_fill_drafts(long *tokens_all, float *q_all, const long *idx, const long *qrows,
                          const long *n, const long *lo, const long *hi, long b, long V, long W,
                          long N, long grid) {
  for (long j = 0; j < b; j++) {
    long *tokens = tokens_all + idx[j] * N;
    float *q = q_all + qrows[j] * W * V;
    for (long t = lo[j]; t < hi[j]; t++) {
      long at = n[j] + t < N - 1 ? n[j] + t : N - 1;
      long token = tokens[at >= grid ? at - grid : at - 1];
      tokens[at] = token;
      memset(q + t * V, 0, sizeof(float) * V);
      q[t * V + token] = 1.0f;
    }
  }
}

// The index of the z-th token (0-based, in index order) without mass, given the tokens with mass
// in ascending index order: skip every one at or before the candidate.
static long zero_token(long z, const long *ascending, long n) {
  long i = z;
  for (long s = 0; s < n && ascending[s] <= i; s++) i++;
  return i;
}

// GSD's grouped test (kernels/speculative.py: grouped_ratio_reference). p, q: (b, S, V); drafts:
// (b, S) long; embeddings: (V, dim); half: (b,) long; p_threshold, d_threshold: (b,). The ranking
// is p descending, ties (the tokens without mass among them) by index. Out: (b, S).
// Returns 0, or -1 when out of memory.
int varserve_grouped_ratio(const float *p, const float *q, const long *drafts,
                           const float *embeddings, const long *half, const float *p_threshold,
                           const float *d_threshold, float *out, long b, long S, long V, long dim) {
  int status = 0;
#pragma omp parallel for schedule(static) if (b * S * V > (1L << 18)) reduction(| : status)
  for (long j = 0; j < b; j++) {
    candidate *ranked = malloc(sizeof(candidate) * V);
    long *ascending = malloc(sizeof(long) * V);
    if (!ranked || !ascending) {
      free(ranked);
      free(ascending);
      status |= 1;
      continue;
    }
    for (long t = 0; t < S; t++) {
      long row = j * S + t, d = drafts[row];
      const float *pt = p + row * V, *qt = q + row * V, *ed = embeddings + d * dim;
      long n = 0;
      for (long i = 0; i < V; i++)
        if (pt[i] > 0.0f) {
          ranked[n] = (candidate){pt[i], i};
          ascending[n++] = i;
        }
      qsort(ranked, n, sizeof(candidate), compare);  // ascending is in index order already
      float p_d = pt[d];
      long at = -1;
      if (p_d > 0.0f) {
        for (long r = 0; r < n && at < 0; r++)
          if (ranked[r].index == d) at = r;
      } else {  // after every token with mass, among those without by index
        long before = 0;
        while (before < n && ascending[before] < d) before++;
        at = n + d - before;
      }
      float group_p = 0.0f, group_q = 0.0f;
      for (long off = -half[j]; off <= half[j]; off++) {
        long r = at + off;
        if (r < 0 || r >= V) continue;
        long c = r < n ? ranked[r].index : zero_token(r - n, ascending, n);
        int member = off == 0;
        if (!member && fabsf(pt[c] - p_d) < p_threshold[j]) {
          const float *ec = embeddings + c * dim;
          float dist = 0.0f;
          for (long x = 0; x < dim; x++) dist += (ec[x] - ed[x]) * (ec[x] - ed[x]);
          member = dist <= d_threshold[j];
        }
        if (member) {
          group_p += pt[c];
          group_q += qt[c];
        }
      }
      out[row] = fminf(group_p / (group_q > 1e-30f ? group_q : 1e-30f), 1.0f);
    }
    free(ranked);
    free(ascending);
  }
  return status ? -1 : 0;
}
