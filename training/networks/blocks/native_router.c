/* The selection and backward pass of noisy top-k routing (CPU, float32).
 *
 * Forward (after torch computed the noisy logits): for every token, the k largest of its
 * E logits (best first; equal values go to the lower expert, NaN counts as the largest, as
 * torch.topk) with their experts, and the noise draw and noise logit at each chosen expert
 * (kept for the backward pass); torch then takes the softmax of the k values (the gates).
 *
 * Backward: with gates g = softmax(top logits) and top logit l_j = clean_j + noise_j *
 * softplus(nl_j), the gate gradient reaches clean_j and nl_j of the k chosen experts only:
 *   dl_j = g_j (dg_j - sum_i g_i dg_i),  dclean_j = dl_j,  dnl_j = dl_j noise_j sigmoid(nl_j);
 * then, per token of sample b, dx = sum_j dclean_j Wt[b, e_j] + dnl_j Wt[b, E + e_j] and
 * dWt[b, e_j] += dclean_j x, dWt[b, E + e_j] += dnl_j x (and the biases), where Wt (B, 2E, C)
 * holds each sample's gate and noise router weights, one row per logit.
 *
 * Shapes: logits, noise (B, E, N) contiguous; noise logits at nl + b * nl_sample + e * N + n;
 * indices (B, N, k) int64; top (the k values), gates, noise_sel, nl_sel, sig_sel,
 * grad_gates (B, N, k); x and dx at b * xs_b + n * xs_n + c * xs_c; wt, dwt (B, 2E, C);
 * db (B, 2E) or NULL.
 * Vector code: k <= 2 runs LANES tokens at a time (compare-and-select, no branches) and so
 * does the backward pass where x's tokens are contiguous (a feature map's, xs_n = 1); the
 * rest, token by token.
 * Threads: tokens split in contiguous ranges (native_parallel.h); weight gradients summed
 * per thread, then in part order.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_parallel.h"

#define MAX_K 64
#define MAX_ROWS_X_C 2048 /* 2E * C accumulators of the vector backward pass */

#if defined(__AVX512F__)
#define LANES 16
#else
#define LANES 8
#endif
typedef float vf __attribute__((vector_size(4 * LANES)));
typedef float vfu __attribute__((vector_size(4 * LANES), aligned(4)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));

static inline vf load(const float *p) { return *(const vfu *)p; }
static inline void store(float *p, vf v) { *(vfu *)p = v; }
static inline vf splat(float s) { vf v = {0}; return v + s; }
static inline vi splati(int32_t s) { vi v = {0}; return v + s; }
/* mask ? a : b for a lane mask of all ones or zeros */
static inline vf pick(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }
static inline vi picki(vi mask, vi a, vi b) { return (mask & a) | (~mask & b); }
/* a ranks above b: larger, or NaN over a number */
static inline vi above_v(vf a, vf b) { return (a > b) | ((a != a) & (b == b)); }
static inline float hsum(vf v) {
    float s = 0.0f;
    for (int l = 0; l < LANES; ++l) s += v[l];
    return s;
}

typedef struct {
    int64_t B, E, N, k, C, threads, nl_sample, xs_b, xs_n, xs_c;
    const float *logits, *noise, *nl, *grad_gates, *gates, *noise_sel, *sig_sel, *x, *wt;
    const int64_t *idx_in;
    int64_t *indices;
    float *top_out, *noise_out, *nl_out, *dx, *dwt, *db;
} Args;

typedef struct {
    const Args *a;
    int64_t t0, t1; /* flat token range b * N + n */
    float *dwt, *db;
} Part;

/* a ranks above b: larger, or NaN over a number (torch.topk's order). */
static inline int above(float a, float b) { return a > b || (isnan(a) && !isnan(b)); }

/* Tokens n0..n1 of sample b, one at a time (any k). */
static void select_tokens(const Args *a, int64_t b, int64_t n0, int64_t n1) {
    const int64_t E = a->E, N = a->N, k = a->k;
    float top[MAX_K];
    int64_t who[MAX_K];
    for (int64_t n = n0; n < n1; ++n) {
        const float *row = a->logits + b * E * N + n;
        int64_t filled = 0;
        for (int64_t e = 0; e < E; ++e) {
            const float v = row[e * N];
            if (filled == k && !above(v, top[k - 1])) continue;
            int64_t at = filled < k ? filled++ : k - 1; /* the slot it enters at the end */
            while (at > 0 && above(v, top[at - 1])) { /* strict: ties keep the lower e first */
                top[at] = top[at - 1];
                who[at] = who[at - 1];
                --at;
            }
            top[at] = v;
            who[at] = e;
        }
        const float *noise = a->noise + b * E * N + n;
        const float *nl = a->nl + b * a->nl_sample + n;
        for (int64_t j = 0; j < k; ++j) {
            const int64_t o = (b * N + n) * k + j;
            a->indices[o] = who[j];
            a->top_out[o] = top[j];
            a->noise_out[o] = noise[who[j] * N];
            a->nl_out[o] = nl[who[j] * N];
        }
    }
}

/* LANES tokens n..n+LANES-1 of sample b, k <= 2 (E >= k). */
static void select_block(const Args *a, int64_t b, int64_t n) {
    const int64_t E = a->E, N = a->N, k = a->k;
    const float *lg = a->logits + b * E * N + n, *nz = a->noise + b * E * N + n;
    const float *nl = a->nl + b * a->nl_sample + n;
    vf v1 = load(lg), z1 = load(nz), l1 = load(nl);
    vi i1 = splati(0);
    vf v2 = v1, z2 = z1, l2 = l1;
    vi i2 = i1;
    int64_t e = 1;
    if (k == 2) { /* the first two rows, in order */
        const vf v = load(lg + N), z = load(nz + N), l = load(nl + N);
        const vi up = above_v(v, v1);
        v2 = pick(up, v1, v); z2 = pick(up, z1, z); l2 = pick(up, l1, l);
        i2 = picki(up, i1, splati(1));
        v1 = pick(up, v, v1); z1 = pick(up, z, z1); l1 = pick(up, l, l1);
        i1 = picki(up, splati(1), i1);
        e = 2;
    }
    for (; e < E; ++e) {
        const vf v = load(lg + e * N), z = load(nz + e * N), l = load(nl + e * N);
        const vi ie = splati((int32_t)e);
        const vi up1 = above_v(v, v1);
        if (k == 2) {
            const vi up2 = above_v(v, v2);
            v2 = pick(up1, v1, pick(up2, v, v2));
            z2 = pick(up1, z1, pick(up2, z, z2));
            l2 = pick(up1, l1, pick(up2, l, l2));
            i2 = picki(up1, i1, picki(up2, ie, i2));
        }
        v1 = pick(up1, v, v1); z1 = pick(up1, z, z1); l1 = pick(up1, l, l1);
        i1 = picki(up1, ie, i1);
    }
    const int64_t o = (b * N + n) * k;
    for (int l = 0; l < LANES; ++l) {
        a->indices[o + l * k] = i1[l];
        a->top_out[o + l * k] = v1[l];
        a->noise_out[o + l * k] = z1[l];
        a->nl_out[o + l * k] = l1[l];
        if (k == 2) {
            a->indices[o + l * k + 1] = i2[l];
            a->top_out[o + l * k + 1] = v2[l];
            a->noise_out[o + l * k + 1] = z2[l];
            a->nl_out[o + l * k + 1] = l2[l];
        }
    }
}

/* Run BODY once per sample b met in the flat tokens T0..T1, with its tokens n0..n1. */
#define FOR_SAMPLE_RUNS(T0, T1, N, BODY)                                    \
    for (int64_t t_ = (T0); t_ < (T1);) {                                   \
        const int64_t b = t_ / (N), n0 = t_ % (N);                          \
        const int64_t n1 = (T1) - b * (N) < (N) ? (T1) - b * (N) : (N);     \
        BODY;                                                               \
        t_ = b * (N) + n1;                                                  \
    }

static void *select_part(void *arg) {
    const Part *p = arg;
    const Args *a = p->a;
    FOR_SAMPLE_RUNS(p->t0, p->t1, a->N, {
        int64_t n = n0;
        if (a->k <= 2)
            for (; n + LANES <= n1; n += LANES) select_block(a, b, n);
        select_tokens(a, b, n, n1);
    })
    return NULL;
}

/* Tokens n0..n1 of sample b one at a time, into p's gradients. */
static void backward_tokens(const Part *p, int64_t b, int64_t n0, int64_t n1) {
    const Args *a = p->a;
    const int64_t E = a->E, N = a->N, k = a->k, C = a->C;
    for (int64_t n = n0; n < n1; ++n) {
        const int64_t t = b * N + n;
        const float *g = a->gates + t * k, *dg = a->grad_gates + t * k;
        const int64_t *idx = a->idx_in + t * k;
        float dot = 0.0f;
        for (int64_t j = 0; j < k; ++j) dot += g[j] * dg[j];
        const float *xt = a->x + b * a->xs_b + n * a->xs_n;
        float *dxt = a->dx ? a->dx + b * a->xs_b + n * a->xs_n : NULL;
        if (dxt)
            for (int64_t c = 0; c < C; ++c) dxt[c * a->xs_c] = 0.0f;
        for (int64_t j = 0; j < k; ++j) {
            const float dl = g[j] * (dg[j] - dot);
            const float dnl = dl * a->noise_sel[t * k + j] * a->sig_sel[t * k + j];
            const int64_t rows[2] = {b * 2 * E + idx[j], b * 2 * E + E + idx[j]};
            const float grads[2] = {dl, dnl};
            for (int r = 0; r < 2; ++r) {
                const float d = grads[r];
                const float *w = a->wt + rows[r] * C;
                float *dw = p->dwt + rows[r] * C;
                if (dxt)
                    for (int64_t c = 0; c < C; ++c) dxt[c * a->xs_c] += d * w[c];
                for (int64_t c = 0; c < C; ++c) dw[c] += d * xt[c * a->xs_c];
                if (p->db) p->db[rows[r]] += d;
            }
        }
    }
}

#define VEC_MAX_K 4

/* LANES tokens n..n+LANES-1 of sample b (xs_n = 1, k <= VEC_MAX_K): dx, and the weight and
 * bias gradients added to acc (2E * C vectors) and bacc (2E vectors). */
static void backward_block(const Args *a, int64_t b, int64_t n, vf *acc, vf *bacc, vf *d) {
    const int64_t E = a->E, N = a->N, k = a->k, C = a->C;
    const int64_t t0 = b * N + n;
    vf g[VEC_MAX_K], dl[VEC_MAX_K], dnl[VEC_MAX_K];
    vi ex[VEC_MAX_K];
    vf dot = splat(0.0f);
    for (int64_t j = 0; j < k; ++j) {
        vf dg = splat(0.0f), z = dg, s = dg;
        for (int l = 0; l < LANES; ++l) {
            const int64_t o = (t0 + l) * k + j;
            g[j][l] = a->gates[o];
            dg[l] = a->grad_gates[o];
            z[l] = a->noise_sel[o];
            s[l] = a->sig_sel[o];
            ex[j][l] = (int32_t)a->idx_in[o];
        }
        dot += g[j] * dg;
        dl[j] = dg;   /* finished below, once dot is known */
        dnl[j] = z * s;
    }
    for (int64_t j = 0; j < k; ++j) {
        dl[j] = g[j] * (dl[j] - dot);
        dnl[j] = dl[j] * dnl[j];
    }
    for (int64_t r = 0; r < E; ++r) { /* each logit row's gradient, zero where not chosen */
        vf dc = splat(0.0f), dn = splat(0.0f);
        const vi ir = splati((int32_t)r);
        for (int64_t j = 0; j < k; ++j) {
            const vi hit = ex[j] == ir;
            dc += pick(hit, dl[j], splat(0.0f));
            dn += pick(hit, dnl[j], splat(0.0f));
        }
        d[r] = dc;
        d[E + r] = dn;
        bacc[r] += dc;
        bacc[E + r] += dn;
    }
    const float *wt = a->wt + b * 2 * E * C;
    for (int64_t c = 0; c < C; ++c) {
        const int64_t at = b * a->xs_b + c * a->xs_c + n;
        const vf xc = load(a->x + at);
        vf dxc = splat(0.0f);
        for (int64_t r = 0; r < 2 * E; ++r) {
            dxc += d[r] * splat(wt[r * C + c]);
            acc[r * C + c] += d[r] * xc;
        }
        if (a->dx) store(a->dx + at, dxc);
    }
}

static void *backward_part(void *arg) {
    const Part *p = arg;
    const Args *a = p->a;
    const int64_t E = a->E, C = a->C;
    int vector = a->xs_n == 1 && a->k <= VEC_MAX_K && 2 * E * C <= MAX_ROWS_X_C;
    vf *acc = NULL, *bacc = NULL, *d = NULL;
    if (vector) { /* 64-byte multiple: aligned_alloc's rule */
        acc = aligned_alloc(64, sizeof(vf) * (size_t)((2 * E * C + 4 * E + 1) & ~1));
        vector = acc != NULL; /* without the memory: token by token */
        bacc = acc + 2 * E * C;
        d = bacc + 2 * E;
    }
    FOR_SAMPLE_RUNS(p->t0, p->t1, a->N, {
        int64_t n = n0;
        if (vector && n + LANES <= n1) {
            for (int64_t q = 0; q < 2 * E * C + 2 * E; ++q) acc[q] = splat(0.0f);
            for (; n + LANES <= n1; n += LANES) backward_block(a, b, n, acc, bacc, d);
            float *dw = p->dwt + b * 2 * E * C;
            for (int64_t q = 0; q < 2 * E * C; ++q) dw[q] += hsum(acc[q]);
            if (p->db)
                for (int64_t r = 0; r < 2 * E; ++r) p->db[b * 2 * E + r] += hsum(bacc[r]);
        }
        backward_tokens(p, b, n, n1);
    })
    free(acc);
    return NULL;
}

static int run_parts(const Args *a, void *(*fn)(void *), int backward) {
    const int64_t T = a->B * a->N;
    const int64_t n = part_count(a->threads, T);
    const int64_t wsize = a->B * 2 * a->E * a->C, bsize = a->B * 2 * a->E;
    Part parts[MAX_THREADS];
    float *scratch = NULL;
    if (backward) {
        memset(a->dwt, 0, sizeof(float) * wsize);
        if (a->db) memset(a->db, 0, sizeof(float) * bsize);
        if (n > 1) {
            scratch = calloc((size_t)((n - 1) * (wsize + bsize)), sizeof(float));
            if (!scratch) return -1;
        }
    }
    for (int64_t i = 0; i < n; ++i) {
        Part *p = &parts[i];
        p->a = a;
        p->t0 = T * i / n;
        p->t1 = T * (i + 1) / n;
        p->dwt = a->dwt;
        p->db = a->db;
        if (backward && i > 0) {
            p->dwt = scratch + (i - 1) * (wsize + bsize);
            p->db = a->db ? p->dwt + wsize : NULL;
        }
    }
    run_parallel(fn, parts, sizeof(Part), n);
    if (backward && n > 1) {
        for (int64_t i = 1; i < n; ++i) { /* in part order */
            for (int64_t q = 0; q < wsize; ++q) a->dwt[q] += parts[i].dwt[q];
            if (a->db)
                for (int64_t q = 0; q < bsize; ++q) a->db[q] += parts[i].db[q];
        }
        free(scratch);
    }
    return 0;
}

/* Fills indices, gates_out, noise_out, nl_out (B, N, k). k <= MAX_K. */
int dmoe_router_select(const Args *a) {
    if (a->k < 1 || a->k > MAX_K || a->k > a->E) return -2;
    return run_parts(a, select_part, 0);
}

/* Fills dx (unless NULL), dwt and db (unless NULL). */
int dmoe_router_backward(const Args *a) { return run_parts(a, backward_part, 1); }

int64_t dmoe_router_args_size(void) { return (int64_t)sizeof(Args); }
