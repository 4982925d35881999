/* Expert mixture of a dMoE layer for narrow experts, token by token (CPU, float32).
 *
 * out[t] = sum_j gates[t, j] * MLP_{idx[t, j]}(x[t]),  MLP_e(v) = relu(v W1[e] + b1[e]) W2[e] + b2[e]
 *
 * with expert dropout on the hidden units ("hidden", position 0) or on the output units
 * ("output", position 1) and the 1/(1-p) scale. Which units drop is decided per unit of
 * the (T, k, W) grid of assignment units (W = H or C) in one of two ways:
 *   - counter-based (seed != 0): unit n of assignment slot s is dropped when
 *     mix32(key(seed, s) ^ n * 0x9E3779B9) < drop_threshold (= p * 2^32), a hash of
 *     the seed (drawn by torch's default generator), the slot and the unit, so the
 *     backward pass regenerates the same mask and nothing is stored;
 *   - given (dropped_bits): a bit per unit, set = dropped (dmoe_mark_dropped), to replay a
 *     mask made elsewhere (tests compare with a reference this way).
 * The experts' weights (8 experts of C <= 64: at most 1 MB) stay in cache while every
 * token runs its own k experts: there is no sort, gather or padding, and nothing leaves
 * the registers but the (T, k, C) expert outputs, kept for the gate gradient. The
 * backward pass recomputes the hidden units.
 *
 * Shapes (all contiguous): x (T, C); idx (T, k) int64; gates (T, k); w1 (E, C, H);
 * b1 (E, H); w2 (E, H, C); b2 (E, C); w1t (E, H, C) and w2t (E, C, H) are w1 and w2
 * with their last two axes swapped (backward only); dropped_bits ((T * k * W + 7) / 8)
 * uint8, little-endian bit order, or NULL. No dropout: seed 0 and dropped_bits NULL.
 *
 * Threads: tokens are split into contiguous ranges, one per thread (native_parallel.h).
 * Each thread accumulates its own weight gradients; they are summed in part order, so
 * results do not depend on timing.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_parallel.h"

#define INLINE static inline __attribute__((always_inline))

typedef struct {
    int64_t T, k, C, H, E, threads, position;
    uint64_t seed, drop_threshold;
    double scale;
    const float *x, *gates, *w1, *b1, *w2, *b2, *w1t, *w2t, *grad_out;
    const int64_t *idx;
    const uint8_t *dropped_bits;
    float *out, *y_rows, *dx, *dgates, *dw1, *db1, *dw2, *db2;
} Args;

typedef struct {
    const Args *a;
    int64_t t0, t1;
    float *dw1, *db1, *dw2, *db2; /* this thread's weight gradients (backward) */
} Part;

/* ---- Counter-based dropout ---- */

INLINE uint64_t mix64(uint64_t z) { /* SplitMix64's finaliser */
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* The 32-bit key of assignment slot s. */
INLINE uint32_t slot_key(uint64_t seed, int64_t slot) {
    const uint64_t z = mix64(seed + (uint64_t)slot * 0x9E3779B97F4A7C15ull);
    return (uint32_t)(z ^ (z >> 32));
}

INLINE uint32_t mix32(uint32_t h) { /* MurmurHash3's finaliser: a bijection */
    h ^= h >> 16; h *= 0x85EBCA6Bu; h ^= h >> 13; h *= 0xC2B2AE35u; h ^= h >> 16;
    return h;
}

/* True when unit n of the slot with key `key` is dropped. */
INLINE int hashed_drop(uint32_t key, int64_t n, uint32_t threshold) {
    return mix32(key ^ ((uint32_t)n * 0x9E3779B9u)) < threshold;
}

/* Set the bits (as dropped_bits) of the counter-based mask of `slots` assignments of W
 * units each (tests read the mask this way). */
void dmoe_hashed_mask(uint64_t seed, uint64_t threshold, int64_t slots, int64_t W,
                      uint8_t *bits) {
    for (int64_t s = 0; s < slots; ++s) {
        const uint32_t key = slot_key(seed, s);
        for (int64_t n = 0; n < W; ++n)
            if (hashed_drop(key, n, (uint32_t)threshold)) {
                const int64_t unit = s * W + n;
                bits[unit >> 3] |= (uint8_t)(1u << (unit & 7));
            }
    }
}

/* Set the bits of the n dropped units at positions pos (any order). */
void dmoe_mark_dropped(const int64_t *pos, int64_t n, uint8_t *bits) {
    for (int64_t i = 0; i < n; ++i) bits[pos[i] >> 3] |= (uint8_t)(1u << (pos[i] & 7));
}

/* Zero v[0..W) where the units of assignment `slot` are dropped (scalar version). */
INLINE void zero_dropped(const Args *a, int64_t slot, int64_t W, float *v) {
    if (a->seed) {
        const uint32_t key = slot_key(a->seed, slot);
        for (int64_t u = 0; u < W; ++u)
            if (hashed_drop(key, u, (uint32_t)a->drop_threshold)) v[u] = 0.0f;
    } else if (a->dropped_bits) {
        for (int64_t u = 0; u < W; ++u) {
            const int64_t unit = slot * W + u;
            if ((a->dropped_bits[unit >> 3] >> (unit & 7)) & 1) v[u] = 0.0f;
        }
    }
}

/* h = relu(x W1[e] + b1[e]) (scalar version). */
INLINE void hidden_units(const Args *a, const float *xt, int64_t e, int C, int H, float *h) {
    const float *b1 = a->b1 + e * H;
    const float *w1 = a->w1 + e * C * H;
    for (int u = 0; u < H; ++u) h[u] = b1[u];
    for (int c = 0; c < C; ++c) {
        const float xc = xt[c];
        const float *row = w1 + c * H;
        for (int u = 0; u < H; ++u) h[u] += xc * row[u];
    }
    for (int u = 0; u < H; ++u) h[u] = h[u] > 0.0f ? h[u] : 0.0f;
}

INLINE void forward_range(const Args *a, int64_t t0, int64_t t1, const int C, const int H) {
    const int64_t k = a->k;
    const int hidden = a->position == 0;
    const int64_t W = hidden ? H : C;
    const float scale = (float)a->scale;
    float h[H], y[C];
    for (int64_t t = t0; t < t1; ++t) {
        const float *xt = a->x + t * C;
        float *out = a->out + t * C;
        for (int c = 0; c < C; ++c) out[c] = 0.0f;
        for (int64_t j = 0; j < k; ++j) {
            const int64_t slot = t * k + j, e = a->idx[slot];
            hidden_units(a, xt, e, C, H, h);
            if (hidden) zero_dropped(a, slot, W, h);
            const float *w2 = a->w2 + e * H * C, *b2 = a->b2 + e * C;
            for (int c = 0; c < C; ++c) y[c] = 0.0f;
            for (int u = 0; u < H; ++u) {
                const float hu = h[u];
                const float *row = w2 + u * C;
                for (int c = 0; c < C; ++c) y[c] += hu * row[c];
            }
            if (hidden) {
                for (int c = 0; c < C; ++c) y[c] = b2[c] + scale * y[c];
            } else {
                for (int c = 0; c < C; ++c) y[c] += b2[c];
                zero_dropped(a, slot, W, y);
                for (int c = 0; c < C; ++c) y[c] *= scale;
            }
            const float g = a->gates[slot];
            float *keep = a->y_rows ? a->y_rows + slot * C : NULL;
            for (int c = 0; c < C; ++c) {
                if (keep) keep[c] = y[c];
                out[c] += g * y[c];
            }
        }
    }
}

INLINE void backward_range(const Part *p, const int C, const int H) {
    const Args *a = p->a;
    const int64_t k = a->k;
    const int hidden = a->position == 0;
    const int64_t W = hidden ? H : C;
    const float scale = (float)a->scale;
    float h[H], dh[H], dz[C];
    for (int64_t t = p->t0; t < p->t1; ++t) {
        const float *xt = a->x + t * C, *go = a->grad_out + t * C;
        float *dx = a->dx + t * C;
        for (int c = 0; c < C; ++c) dx[c] = 0.0f;
        for (int64_t j = 0; j < k; ++j) {
            const int64_t slot = t * k + j, e = a->idx[slot];
            hidden_units(a, xt, e, C, H, h);
            if (hidden) zero_dropped(a, slot, W, h);
            const float g = a->gates[slot];
            const float *y = a->y_rows + slot * C;
            float dgate = 0.0f;
            for (int c = 0; c < C; ++c) {
                dgate += go[c] * y[c];
                dz[c] = g * go[c];
            }
            a->dgates[slot] = dgate;
            float *db2 = p->db2 + e * C;
            if (hidden) { /* y = s * (h W2) + b2 */
                for (int c = 0; c < C; ++c) {
                    db2[c] += dz[c];
                    dz[c] *= scale;
                }
            } else { /* y = s * m * (h W2 + b2) */
                for (int c = 0; c < C; ++c) dz[c] *= scale;
                zero_dropped(a, slot, W, dz);
                for (int c = 0; c < C; ++c) db2[c] += dz[c];
            }
            float *dw2 = p->dw2 + e * H * C;
            for (int u = 0; u < H; ++u) {
                const float hu = h[u];
                float *row = dw2 + u * C;
                for (int c = 0; c < C; ++c) row[c] += hu * dz[c];
            }
            const float *w2t = a->w2t + e * C * H;
            for (int u = 0; u < H; ++u) dh[u] = 0.0f;
            for (int c = 0; c < C; ++c) {
                const float dzc = dz[c];
                const float *row = w2t + c * H;
                for (int u = 0; u < H; ++u) dh[u] += dzc * row[u];
            }
            /* ReLU and hidden dropout: the gradient flows where h is non-zero */
            for (int u = 0; u < H; ++u) dh[u] = h[u] > 0.0f ? dh[u] : 0.0f;
            float *db1 = p->db1 + e * H, *dw1 = p->dw1 + e * C * H;
            for (int u = 0; u < H; ++u) db1[u] += dh[u];
            for (int c = 0; c < C; ++c) {
                const float xc = xt[c];
                float *row = dw1 + c * H;
                for (int u = 0; u < H; ++u) row[u] += xc * dh[u];
            }
            const float *w1t = a->w1t + e * H * C;
            for (int u = 0; u < H; ++u) {
                const float dhu = dh[u];
                const float *row = w1t + u * C;
                for (int c = 0; c < C; ++c) dx[c] += dhu * row[c];
            }
        }
    }
}

/* ---- Vector version: C a multiple of 8, H a multiple of HW ----
 * C-wide rows use 8-float vectors; H-wide rows use HW floats (16 with AVX-512). */

#if defined(__AVX512F__)
#define HW 16
#else
#define HW 8
#endif

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4))); /* unaligned memory */
typedef int32_t i8v __attribute__((vector_size(32)));
typedef float vh __attribute__((vector_size(4 * HW)));
typedef float vhu __attribute__((vector_size(4 * HW), aligned(4)));
typedef int32_t ihv __attribute__((vector_size(4 * HW)));

INLINE v8 ld(const float *p) { return *(const v8u *)p; }
INLINE void st(float *p, v8 v) { *(v8u *)p = v; }
INLINE v8 splat(float s) { v8 v = {0}; return v + s; }
INLINE vh ldh(const float *p) { return *(const vhu *)p; }
INLINE void sth(float *p, vh v) { *(vhu *)p = v; }
INLINE vh splath(float s) { vh v = {0}; return v + s; }
INLINE float hsum(v8 v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

typedef uint32_t u8v __attribute__((vector_size(32)));
typedef uint32_t uhv __attribute__((vector_size(4 * HW)));

/* The dropout of one assignment slot: none, counter-based or given bits. */
typedef struct {
    int mode; /* 0 none, 1 counter-based, 2 bits */
    uint32_t key, threshold;
    const uint8_t *bits;
    int64_t base; /* the slot's first unit */
} Drop;

INLINE Drop slot_drop(const Args *a, int64_t slot, int64_t W) {
    Drop d = {0, 0, 0, NULL, slot * W};
    if (a->seed) {
        d.mode = 1;
        d.key = slot_key(a->seed, slot);
        d.threshold = (uint32_t)a->drop_threshold;
    } else if (a->dropped_bits) {
        d.mode = 2;
        d.bits = a->dropped_bits;
    }
    return d;
}

#define MIX32_VEC(h)                                                        \
    do {                                                                    \
        h ^= h >> 16; h *= 0x85EBCA6Bu; h ^= h >> 13; h *= 0xC2B2AE35u;     \
        h ^= h >> 16;                                                       \
    } while (0)

/* NAME(d, n, v): v with its LANES units from unit n of the slot zeroed where dropped (n a
 * multiple of 8), for a float vector type VF with int and unsigned twins VI, VU; BITS_T
 * holds LANES bits. Defined for 8 lanes (C-wide rows) and HW lanes (H-wide rows). */
#define DEFINE_DROP(NAME, VF, VI, VU, LANES, BITS_T)                        \
    INLINE VF NAME(const Drop *d, int64_t n, VF v) {                        \
        VI lanes;                                                           \
        for (int l = 0; l < LANES; ++l) lanes[l] = l;                       \
        if (d->mode == 1) {                                                 \
            VU h = ((VU)lanes + (uint32_t)n) * 0x9E3779B9u;                 \
            h ^= (VU){0} + d->key;                                          \
            MIX32_VEC(h);                                                   \
            return (VF)((VI)v & (VI)(h >= d->threshold));                   \
        }                                                                   \
        if (d->mode == 2) {                                                 \
            BITS_T word; /* little-endian bit order */                      \
            memcpy(&word, d->bits + ((d->base + n) >> 3), sizeof word);     \
            const VI b = (VI){0} + (int32_t)word;                           \
            return (VF)((VI)v & (((b >> lanes) & 1) == 0));                 \
        }                                                                   \
        return v;                                                           \
    }

DEFINE_DROP(drop8, v8, i8v, u8v, 8, uint8_t)
#if HW == 16
DEFINE_DROP(droph, vh, ihv, uhv, 16, uint16_t)
#else
#define droph drop8
#endif

/* v where ref > 0, else 0 (ReLU and its gradient). */
INLINE vh where_positive(vh v, vh ref) { return (vh)((ihv)v & (ref > splath(0.0f))); }

/* Independent running sums for a product with few output vectors (C = 8: one), so that
 * the adds do not wait on each other. */
#define PARTIALS(NC) ((NC) >= 4 ? 1 : 4 / (NC))

/* h = relu(x W1[e] + b1[e]) with hidden dropout `drop` (or none) (NH * HW). */
INLINE void hidden_vec(const float *xt, const float *w1, const float *b1, int C, int NH,
                       const Drop *drop, float *h) {
    vh acc[NH];
    for (int i = 0; i < NH; ++i) acc[i] = ldh(b1 + HW * i);
    for (int c = 0; c < C; ++c) {
        const vh xc = splath(xt[c]);
        const float *row = w1 + c * HW * NH;
        for (int i = 0; i < NH; ++i) acc[i] += xc * ldh(row + HW * i);
    }
    for (int i = 0; i < NH; ++i) {
        vh v = where_positive(acc[i], acc[i]);
        if (drop) v = droph(drop, HW * i, v);
        sth(h + HW * i, v);
    }
}

/* out (8 * NC) = sum_u v[u] * rows[u] for rows (H, 8 * NC). */
INLINE void rows_product(const float *v, const float *rows, int H, int NC, float *out) {
    enum { MAXP = 4 };
    const int P = PARTIALS(NC);
    v8 acc[MAXP][NC];
    for (int q = 0; q < P; ++q)
        for (int i = 0; i < NC; ++i) acc[q][i] = splat(0.0f);
    for (int u = 0; u < H; u += P)
        for (int q = 0; q < P; ++q) {
            const v8 vu = splat(v[u + q]);
            const float *row = rows + (u + q) * 8 * NC;
            for (int i = 0; i < NC; ++i) acc[q][i] += vu * ld(row + 8 * i);
        }
    for (int i = 0; i < NC; ++i) {
        v8 sum = acc[0][i];
        for (int q = 1; q < P; ++q) sum += acc[q][i];
        st(out + 8 * i, sum);
    }
}

INLINE void forward_vec(const Args *a, int64_t t0, int64_t t1, const int C, const int H) {
    const int NC = C / 8, NH = H / HW;
    const int64_t k = a->k;
    const int hidden = a->position == 0;
    const int64_t W = hidden ? H : C;
    const v8 scale = splat((float)a->scale);
    float h[H] __attribute__((aligned(64))), y[C] __attribute__((aligned(32)));
    for (int64_t t = t0; t < t1; ++t) {
        const float *xt = a->x + t * C;
        v8 out[NC];
        for (int i = 0; i < NC; ++i) out[i] = splat(0.0f);
        for (int64_t j = 0; j < k; ++j) {
            const int64_t slot = t * k + j, e = a->idx[slot];
            const Drop drop = slot_drop(a, slot, W);
            hidden_vec(xt, a->w1 + e * C * H, a->b1 + e * H, C, NH, hidden ? &drop : NULL, h);
            rows_product(h, a->w2 + e * H * C, H, NC, y);
            const float *b2 = a->b2 + e * C;
            const v8 g = splat(a->gates[slot]);
            float *keep = a->y_rows ? a->y_rows + slot * C : NULL;
            for (int i = 0; i < NC; ++i) {
                v8 yi;
                if (hidden) {
                    yi = ld(b2 + 8 * i) + scale * ld(y + 8 * i);
                } else {
                    yi = ld(y + 8 * i) + ld(b2 + 8 * i);
                    yi = drop8(&drop, 8 * i, yi);
                    yi *= scale;
                }
                if (keep) st(keep + 8 * i, yi);
                out[i] += g * yi;
            }
        }
        for (int i = 0; i < NC; ++i) st(a->out + t * C + 8 * i, out[i]);
    }
}

INLINE void backward_vec(const Part *p, const int C, const int H) {
    const Args *a = p->a;
    const int NC = C / 8, NH = H / HW;
    const int64_t k = a->k;
    const int hidden = a->position == 0;
    const int64_t W = hidden ? H : C;
    const v8 scale = splat((float)a->scale);
    float h[H] __attribute__((aligned(64))), dh[H] __attribute__((aligned(64)));
    float dz[C] __attribute__((aligned(32))), dxt[C] __attribute__((aligned(32)));
    for (int64_t t = p->t0; t < p->t1; ++t) {
        const float *xt = a->x + t * C, *go = a->grad_out + t * C;
        v8 dx[NC];
        for (int i = 0; i < NC; ++i) dx[i] = splat(0.0f);
        for (int64_t j = 0; j < k; ++j) {
            const int64_t slot = t * k + j, e = a->idx[slot];
            const Drop drop = slot_drop(a, slot, W);
            hidden_vec(xt, a->w1 + e * C * H, a->b1 + e * H, C, NH, hidden ? &drop : NULL, h);
            const v8 g = splat(a->gates[slot]);
            const float *y = a->y_rows + slot * C;
            float *db2 = p->db2 + e * C;
            v8 dgate = splat(0.0f), dzv[NC];
            for (int i = 0; i < NC; ++i) {
                const v8 goi = ld(go + 8 * i);
                dgate += goi * ld(y + 8 * i);
                v8 dzi = g * goi;
                if (hidden) { /* y = s * (h W2) + b2 */
                    st(db2 + 8 * i, ld(db2 + 8 * i) + dzi);
                    dzi *= scale;
                } else { /* y = s * m * (h W2 + b2) */
                    dzi *= scale;
                    dzi = drop8(&drop, 8 * i, dzi);
                    st(db2 + 8 * i, ld(db2 + 8 * i) + dzi);
                }
                dzv[i] = dzi;
                st(dz + 8 * i, dzi);
            }
            a->dgates[slot] = hsum(dgate);
            float *dw2 = p->dw2 + e * H * C;
            for (int u = 0; u < H; ++u) {
                const v8 hu = splat(h[u]);
                float *row = dw2 + u * C;
                for (int i = 0; i < NC; ++i) st(row + 8 * i, ld(row + 8 * i) + hu * dzv[i]);
            }
            /* dh = W2[e] dz, then ReLU and hidden dropout: it flows where h is non-zero */
            const float *w2t = a->w2t + e * C * H;
            vh dhv[NH];
            for (int i = 0; i < NH; ++i) dhv[i] = splath(0.0f);
            for (int c = 0; c < C; ++c) {
                const vh dzc = splath(dz[c]);
                const float *row = w2t + c * H;
                for (int i = 0; i < NH; ++i) dhv[i] += dzc * ldh(row + HW * i);
            }
            float *db1 = p->db1 + e * H;
            for (int i = 0; i < NH; ++i) {
                dhv[i] = where_positive(dhv[i], ldh(h + HW * i));
                sth(dh + HW * i, dhv[i]);
                sth(db1 + HW * i, ldh(db1 + HW * i) + dhv[i]);
            }
            float *dw1 = p->dw1 + e * C * H;
            for (int c = 0; c < C; ++c) {
                const vh xc = splath(xt[c]);
                float *row = dw1 + c * H;
                for (int i = 0; i < NH; ++i) sth(row + HW * i, ldh(row + HW * i) + xc * dhv[i]);
            }
            rows_product(dh, a->w1t + e * H * C, H, NC, dxt);
            for (int i = 0; i < NC; ++i) dx[i] += ld(dxt + 8 * i);
        }
        for (int i = 0; i < NC; ++i) st(a->dx + t * C + 8 * i, dx[i]);
    }
}

/* The widths the 3D U-Net presets use get loops of constant length (unrolled and
 * vectorised); other widths that fit the vectors run the vector code with run-time
 * lengths, and any other width the scalar code. */
#define DISPATCH(VEC, SCALAR, C_, H_)                                       \
    do {                                                                    \
        const int64_t c_ = (C_), h_ = (H_);                                 \
        if (c_ % 8 || h_ % HW) SCALAR((int)c_, (int)h_);                    \
        else if (c_ == 8 && h_ == 32) VEC(8, 32);                           \
        else if (c_ == 16 && h_ == 64) VEC(16, 64);                         \
        else if (c_ == 32 && h_ == 128) VEC(32, 128);                       \
        else if (c_ == 48 && h_ == 192) VEC(48, 192);                       \
        else if (c_ == 64 && h_ == 256) VEC(64, 256);                       \
        else VEC((int)c_, (int)h_);                                         \
    } while (0)

static void *forward_part(void *arg) {
    const Part *p = arg;
#define FWD(C, H) forward_range(p->a, p->t0, p->t1, C, H)
#define FWD_VEC(C, H) forward_vec(p->a, p->t0, p->t1, C, H)
    DISPATCH(FWD_VEC, FWD, p->a->C, p->a->H);
#undef FWD
#undef FWD_VEC
    return NULL;
}

static void *backward_part(void *arg) {
    const Part *p = arg;
#define BWD(C, H) backward_range(p, C, H)
#define BWD_VEC(C, H) backward_vec(p, C, H)
    DISPATCH(BWD_VEC, BWD, p->a->C, p->a->H);
#undef BWD
#undef BWD_VEC
    return NULL;
}

/* Run fn on `threads` contiguous token ranges; part 0 on the calling thread. Returns 0, or
 * -1 when scratch memory for the weight gradients could not be allocated. */
static int run_parts(const Args *a, void *(*fn)(void *), int backward) {
    const int64_t n = part_count(a->threads, a->T);
    const int64_t E = a->E, C = a->C, H = a->H;
    const int64_t grad_size = E * (2 * C * H + H + C);
    Part parts[MAX_THREADS];
    float *scratch = NULL;
    if (backward) {
        memset(a->dw1, 0, sizeof(float) * E * C * H);
        memset(a->dw2, 0, sizeof(float) * E * H * C);
        memset(a->db1, 0, sizeof(float) * E * H);
        memset(a->db2, 0, sizeof(float) * E * C);
        if (n > 1) {
            scratch = calloc((size_t)((n - 1) * grad_size), sizeof(float));
            if (!scratch) return -1;
        }
    }
    for (int64_t i = 0; i < n; ++i) {
        Part *p = &parts[i];
        p->a = a;
        p->t0 = a->T * i / n;
        p->t1 = a->T * (i + 1) / n;
        if (i == 0 || !backward) {
            p->dw1 = a->dw1; p->db1 = a->db1; p->dw2 = a->dw2; p->db2 = a->db2;
        } else {
            float *s = scratch + (i - 1) * grad_size;
            p->dw1 = s; p->dw2 = s + E * C * H; p->db1 = s + 2 * E * C * H;
            p->db2 = s + 2 * E * C * H + E * H;
        }
    }
    run_parallel(fn, parts, sizeof(Part), n);
    if (backward && n > 1) {
        for (int64_t i = 1; i < n; ++i) { /* in thread order */
            const Part *p = &parts[i];
            for (int64_t q = 0; q < E * C * H; ++q) a->dw1[q] += p->dw1[q];
            for (int64_t q = 0; q < E * H * C; ++q) a->dw2[q] += p->dw2[q];
            for (int64_t q = 0; q < E * H; ++q) a->db1[q] += p->db1[q];
            for (int64_t q = 0; q < E * C; ++q) a->db2[q] += p->db2[q];
        }
        free(scratch);
    }
    return 0;
}

/* Fills out (T, C) and, unless NULL, y_rows (T, k, C). */
int dmoe_experts_forward(const Args *a) { return run_parts(a, forward_part, 0); }

/* Fills dx (T, C), dgates (T, k), dw1, db1, dw2, db2 from grad_out (T, C), y_rows. */
int dmoe_experts_backward(const Args *a) { return run_parts(a, backward_part, 1); }

/* Floats per vector of the H-wide code (16 with AVX-512, else 8). */
int64_t dmoe_experts_lanes(void) { return HW; }

/* The layout of Args this library was built with, checked by the loader. */
int64_t dmoe_experts_args_size(void) { return (int64_t)sizeof(Args); }
