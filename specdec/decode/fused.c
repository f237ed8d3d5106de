/* A whole Llama decoder forward over a few new rows, in one call (see fused.py).

   For batch 1 and m <= 16 new tokens after a non-empty cache -- every decode step and every
   verification -- each layer is RMSNorm, q/k/v projections, rotary embedding, the new keys and
   values written into the layer's cache buffer, causal attention over the cache, o projection,
   residual, RMSNorm, SiLU-gated MLP, residual; then the final norm. The projections are
   rowmm.c's kernels (fp32 or int8 weights, tile-major), everything else is plain loops here, so
   a layer costs what streaming its weights costs instead of ~25 PyTorch calls. The projections
   split their tiles over OpenMP threads (the same libgomp PyTorch loads; q, k and v in one
   parallel region, gate and up in one), the attention its (row, head) pairs.

   Row-invariant, like the projections: row j's norms, rotary, attention (over exactly the
   past + j + 1 slots before and at it, in slot order, one accumulation order whatever m is)
   and MLP do not depend on the other rows, so a verification of k + 1 rows computes each row
   bit for bit as k + 1 one-row decode steps do. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>
#include <omp.h>

void rowmm_f32(const float *x, int64_t m, int64_t in, const float *P, int64_t out, float *y,
               int64_t t0, int64_t t1);
void rowmm_i8(const float *x, int64_t m, int64_t in, const int8_t *P, const float *scale,
              int64_t out, float *y, int64_t t0, int64_t t1);

/* One weight matrix [out, in], tile-major: fp32 tiles (scale NULL) or int8 tiles + scales. */
typedef struct {
    const void *tiles;
    const float *scale;
    int64_t in, out;
} mat_t;

enum { Q, K, V, O, GATE, UP, DOWN, MATS };

/* Tiles [t0, t1) of y = x @ W^T. */
static void rowmm_range(const mat_t *w, const float *x, int64_t m, float *y, int64_t t0,
                        int64_t t1) {
    if (w->scale)
        rowmm_i8(x, m, w->in, (const int8_t *)w->tiles, w->scale, w->out, y, t0, t1);
    else
        rowmm_f32(x, m, w->in, (const float *)w->tiles, w->out, y, t0, t1);
}

/* y[j] = x @ W[j]^T for `count` matrices of one input (q, k and v; gate and up) in one
   parallel region, each thread taking a contiguous range of each matrix's tiles: every output
   is computed exactly as on one thread, so the thread count never changes a result, and the
   threads are woken once instead of `count` times. */
static void rowmm_par_n(const mat_t *w, int count, const float *x, int64_t m, float *const *y,
                        int threads) {
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const int64_t n = omp_get_num_threads(), id = omp_get_thread_num();
        for (int j = 0; j < count; ++j) {
            const int64_t tiles = (w[j].out + 15) / 16;
            rowmm_range(&w[j], x, m, y[j], tiles * id / n, tiles * (id + 1) / n);
        }
    }
}

/* y = x @ W^T on `threads` threads: rowmm_par_n for one matrix. */
void rowmm_par(const mat_t *w, const float *x, int64_t m, float *y, int threads) {
    rowmm_par_n(w, 1, x, m, &y, threads);
}

#define matmul(w, x, m, y) rowmm_par(w, x, m, y, threads)

/* y = weight * (x / sqrt(mean(x^2) + eps)), row by row (LlamaRMSNorm). */
static void rmsnorm(const float *x, const float *weight, int64_t m, int64_t n, float eps,
                    float *y) {
    for (int64_t r = 0; r < m; ++r) {
        const float *xr = x + r * n;
        float ss = 0.0f;
        for (int64_t i = 0; i < n; ++i) ss += xr[i] * xr[i];
        const float inv = 1.0f / sqrtf(ss / (float)n + eps);
        for (int64_t i = 0; i < n; ++i) y[r * n + i] = weight[i] * (xr[i] * inv);
    }
}

/* Rotary embedding in place on `heads` heads of one row (rotate-half layout, as Hugging Face's
   apply_rotary_pos_emb: x * cos + rotate_half(x) * sin). */
static void rope(float *x, int64_t heads, int64_t d, const float *cos, const float *sin) {
    const int64_t half = d / 2;
    for (int64_t h = 0; h < heads; ++h) {
        float *xh = x + h * d;
        for (int64_t i = 0; i < half; ++i) {
            const float a = xh[i], b = xh[i + half];
            xh[i] = a * cos[i] - b * sin[i];
            xh[i + half] = b * cos[i + half] + a * sin[i + half];
        }
    }
}

/* dot(a, b) over d floats: eight lanes, then the lanes in a fixed order. */
static inline float dot(const float *a, const float *b, int64_t d) {
    int64_t i = 0;
    float s = 0.0f;
    if (d >= 8) {
        __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(b));
        for (i = 8; i + 8 <= d; i += 8)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
        float lanes[8];
        _mm256_storeu_ps(lanes, acc);
        s = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) +
            ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
    }
    for (; i < d; ++i) s += a[i] * b[i];
    return s;
}

/* e^x for x <= 0 (the scores less their maximum), eight lanes instead of one libm call per
   slot: Cephes' expf -- x = n ln 2 + r, a degree-7 polynomial in r, 2^n through the exponent
   bits -- within 1 ulp of glibc's expf on every float in [-87.3, 0] (checked once,
   exhaustively). x below -87.3 gives ~1e-38 instead of a smaller number or zero: nothing next
   to the maximum's 1. Lanes are independent, so a slot's weight does not depend on the slots
   computed beside it. */
static inline __m256 exp_nonpositive(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  /* ln 2 in two parts */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i two_n = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

/* Attention of one query head over slots [0, ctx) of its kv head's cache (kh, vh: [alloc, d]);
   out [d], scores [ctx rounded up to 8] scratch. Any d: plain loops. */
static void attend_head_any(const float *qh, const float *kh, const float *vh, int64_t ctx,
                            int64_t d, float scaling, float *scores, float *oh) {
    float mx = -INFINITY;
    for (int64_t t = 0; t < ctx; ++t) {
        scores[t] = dot(qh, kh + t * d, d) * scaling;
        if (scores[t] > mx) mx = scores[t];
    }
    const __m256 top = _mm256_set1_ps(mx);
    for (int64_t t = ctx; t % 8; ++t) scores[t] = 0.0f;  /* the scratch holds whole groups of 8 */
    for (int64_t t = 0; t < ctx; t += 8)
        _mm256_storeu_ps(scores + t, exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(scores + t),
                                                                   top)));
    float total = 0.0f;
    for (int64_t t = 0; t < ctx; ++t) total += scores[t];
    memset(oh, 0, (size_t)d * sizeof(float));
    for (int64_t t = 0; t < ctx; ++t) {
        const float p = scores[t];
        const float *vt = vh + t * d;
        for (int64_t i = 0; i < d; ++i) oh[i] += p * vt[i];
    }
    const float inv = 1.0f / total;
    for (int64_t i = 0; i < d; ++i) oh[i] *= inv;
}

/* The same for a head_dim D that is a multiple of 8 up to 128 (a compile-time constant: the
   query and the output's accumulators stay in registers). Scores 8 slots at a time: each
   slot's 8 lanes of products, then one horizontal sum for the 8 slots, every slot's lanes
   added as ((0 + 1) + (2 + 3)) + ((4 + 5) + (6 + 7)) wherever it falls in its group (a missing
   slot is a zero vector), so a slot's score does not depend on ctx. */
static inline __attribute__((always_inline)) void attend_head_vec(
        const float *qh, const float *kh, const float *vh, int64_t ctx, float scaling,
        float *scores, float *oh, const int D) {
    __m256 qv[16], acc[16];
#pragma GCC unroll 16
    for (int j = 0; j < D / 8; ++j) qv[j] = _mm256_loadu_ps(qh + 8 * j);
    const __m256 scale = _mm256_set1_ps(scaling);
    for (int64_t t0 = 0; t0 < ctx; t0 += 8) {
        __m256 part[8];
#pragma GCC unroll 8
        for (int s = 0; s < 8; ++s) {
            part[s] = _mm256_setzero_ps();
            if (t0 + s < ctx) {
                const float *k = kh + (t0 + s) * D;
                part[s] = _mm256_mul_ps(qv[0], _mm256_loadu_ps(k));
#pragma GCC unroll 16
                for (int j = 1; j < D / 8; ++j)
                    part[s] = _mm256_fmadd_ps(qv[j], _mm256_loadu_ps(k + 8 * j), part[s]);
            }
        }
        /* hadd(a, b) = a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7: twice gives
           slots 0-3's (0+1)+(2+3) in the low half and (4+5)+(6+7) in the high half */
        const __m256 g0 = _mm256_hadd_ps(_mm256_hadd_ps(part[0], part[1]),
                                         _mm256_hadd_ps(part[2], part[3]));
        const __m256 g1 = _mm256_hadd_ps(_mm256_hadd_ps(part[4], part[5]),
                                         _mm256_hadd_ps(part[6], part[7]));
        const __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(g0, g1, 0x20),
                                         _mm256_permute2f128_ps(g0, g1, 0x31));
        _mm256_storeu_ps(scores + t0, _mm256_mul_ps(sum, scale));
    }
    float mx = -INFINITY;
    for (int64_t t = 0; t < ctx; ++t) mx = scores[t] > mx ? scores[t] : mx;
    const __m256 top = _mm256_set1_ps(mx);
    for (int64_t t = 0; t < ctx; t += 8)
        _mm256_storeu_ps(scores + t, exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(scores + t),
                                                                   top)));
    float total = 0.0f;
    for (int64_t t = 0; t < ctx; ++t) total += scores[t];
#pragma GCC unroll 16
    for (int j = 0; j < D / 8; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t t = 0; t < ctx; ++t) {
        const __m256 p = _mm256_broadcast_ss(scores + t);
        const float *vt = vh + t * D;
#pragma GCC unroll 16
        for (int j = 0; j < D / 8; ++j) acc[j] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vt + 8 * j),
                                                                 acc[j]);
    }
    const __m256 inv = _mm256_set1_ps(1.0f / total);
#pragma GCC unroll 16
    for (int j = 0; j < D / 8; ++j) _mm256_storeu_ps(oh + 8 * j, _mm256_mul_ps(acc[j], inv));
}

static void attend_head(const float *qh, const float *kh, const float *vh, int64_t ctx,
                        int64_t d, float scaling, float *scores, float *oh) {
    switch (d) {
        case 16: attend_head_vec(qh, kh, vh, ctx, scaling, scores, oh, 16); break;
        case 32: attend_head_vec(qh, kh, vh, ctx, scaling, scores, oh, 32); break;
        case 64: attend_head_vec(qh, kh, vh, ctx, scaling, scores, oh, 64); break;
        case 128: attend_head_vec(qh, kh, vh, ctx, scaling, scores, oh, 128); break;
        default: attend_head_any(qh, kh, vh, ctx, d, scaling, scores, oh);
    }
}

/* Attention of m rows x nh query heads (grouped-query: head h reads kv head h / (nh / nkv)),
   row r over slots [0, past + r] of the caches [nkv, alloc, d]; out [m, nh * d]. The (row, head)
   pairs split over the threads, each computed whole by one of them, the same way whichever:
   the thread count never changes a result. scores: [threads, past + m + 8] scratch. */
static void attend(const float *q, const float *kc, const float *vc, int64_t alloc,
                   int64_t past, int64_t m, int64_t nh, int64_t nkv, int64_t d, float scaling,
                   float *scores, float *out, int threads) {
    const int64_t groups = nh / nkv, units = m * nh;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const int64_t n = omp_get_num_threads(), id = omp_get_thread_num();
        float *sc = scores + id * (past + m + 8);
        for (int64_t u = units * id / n; u < units * (id + 1) / n; ++u) {
            const int64_t r = u / nh, h = u % nh, g = h / groups;
            attend_head(q + r * nh * d + h * d, kc + g * alloc * d, vc + g * alloc * d,
                        past + r + 1, d, scaling, sc, out + r * nh * d + h * d);
        }
    }
}

/* The decoder over m new rows at positions past .. past + m - 1.

   x [m, hidden]: the embeddings in, the final-normed hidden states out. cos / sin [m, hd]:
   the rotary tables at those positions. mats [layers * 7] (q, k, v, o, gate, up, down),
   norms [layers * 2] (input, post-attention), kcache / vcache [layers]: each layer's buffer
   [nkv, alloc[l], hd] whose slots past .. past + m - 1 receive the new keys / values.
   threads: for the projections and the attention (the rest is small and runs on the caller's).
   Returns 0, or -1 when scratch memory could not be had. */
int fused_llama(int64_t m, int64_t past, float *x, const float *cos, const float *sin,
                int64_t layers, const mat_t *mats, const float *const *norms,
                float *const *kcache, float *const *vcache, const int64_t *alloc,
                const float *final_norm, float eps, int64_t hidden, int64_t nh, int64_t nkv,
                int64_t hd, int64_t inter, float scaling, int threads) {
    const int64_t qw = nh * hd, kvw = nkv * hd, ctx_max = past + m;
    const int64_t widest = inter > hidden ? inter : hidden;
    float *buf = malloc(sizeof(float) * (size_t)(m * (hidden + qw + 2 * kvw + qw + 2 * widest)
                                                 + (int64_t)threads * (ctx_max + 8)));
    if (!buf) return -1;
    float *xn = buf, *q = xn + m * hidden, *k = q + m * qw, *v = k + m * kvw,
          *att = v + m * kvw, *gate = att + m * qw, *up = gate + m * widest,
          *scores = up + m * widest;

    for (int64_t l = 0; l < layers; ++l) {
        const mat_t *w = mats + l * MATS;
        float *kc = kcache[l], *vc = vcache[l];
        rmsnorm(x, norms[2 * l], m, hidden, eps, xn);
        rowmm_par_n(&w[Q], 3, xn, m, (float *const[]){q, k, v}, threads);
        for (int64_t r = 0; r < m; ++r) {
            rope(q + r * qw, nh, hd, cos + r * hd, sin + r * hd);
            rope(k + r * kvw, nkv, hd, cos + r * hd, sin + r * hd);
            for (int64_t g = 0; g < nkv; ++g) {  /* the new slot past + r of kv head g */
                const int64_t slot = (g * alloc[l] + past + r) * hd;
                memcpy(kc + slot, k + r * kvw + g * hd, (size_t)hd * sizeof(float));
                memcpy(vc + slot, v + r * kvw + g * hd, (size_t)hd * sizeof(float));
            }
        }
        attend(q, kc, vc, alloc[l], past, m, nh, nkv, hd, scaling, scores, att, threads);
        matmul(&w[O], att, m, gate);
        for (int64_t i = 0; i < m * hidden; ++i) x[i] += gate[i];

        rmsnorm(x, norms[2 * l + 1], m, hidden, eps, xn);
        rowmm_par_n(&w[GATE], 2, xn, m, (float *const[]){gate, up}, threads);
        for (int64_t i = 0; i < m * inter; ++i) {
            const float g = gate[i];
            gate[i] = g / (1.0f + expf(-g)) * up[i];
        }
        matmul(&w[DOWN], gate, m, up);
        for (int64_t i = 0; i < m * hidden; ++i) x[i] += up[i];
    }
    rmsnorm(x, final_norm, m, hidden, eps, xn);
    memcpy(x, xn, sizeof(float) * (size_t)(m * hidden));
    free(buf);
    return 0;
}
