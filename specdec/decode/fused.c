/* A whole Llama decoder forward over a few new rows, in one call (see fused.py).

   For batch 1 and m <= 16 new tokens after a non-empty cache -- every decode step and every
   verification -- each layer is RMSNorm, q/k/v projections, rotary embedding, the new keys and
   values written into the layer's cache buffer, causal attention over the cache, o projection,
   residual, RMSNorm, SiLU-gated MLP, residual; then the final norm. The projections are
   rowmm.c's kernels (fp32 or int8 weights, tile-major), everything else is plain loops here, so
   a layer costs what streaming its weights costs instead of ~25 PyTorch calls. The projections
   split their tiles over OpenMP threads (the same libgomp PyTorch loads).

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

/* y = x @ W^T on `threads` threads, each taking a contiguous range of tiles: every output is
   computed exactly as on one thread, so the thread count never changes a result. */
void rowmm_par(const mat_t *w, const float *x, int64_t m, float *y, int threads) {
    const int64_t tiles = (w->out + 15) / 16;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const int64_t n = omp_get_num_threads(), id = omp_get_thread_num();
        const int64_t t0 = tiles * id / n, t1 = tiles * (id + 1) / n;
        if (w->scale)
            rowmm_i8(x, m, w->in, (const int8_t *)w->tiles, w->scale, w->out, y, t0, t1);
        else
            rowmm_f32(x, m, w->in, (const float *)w->tiles, w->out, y, t0, t1);
    }
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

/* Attention of one row's `nh` query heads over slots [0, ctx) of its kv heads' caches
   (grouped-query: head h reads kv head h / (nh / nkv)); out [nh * d]. */
static void attend(const float *q, const float *kc, const float *vc, int64_t alloc,
                   int64_t ctx, int64_t nh, int64_t nkv, int64_t d, float scaling,
                   float *scores, float *out) {
    const int64_t groups = nh / nkv;
    for (int64_t h = 0; h < nh; ++h) {
        const float *qh = q + h * d;
        const float *kh = kc + (h / groups) * alloc * d;
        const float *vh = vc + (h / groups) * alloc * d;
        float mx = -INFINITY;
        for (int64_t t = 0; t < ctx; ++t) {
            scores[t] = dot(qh, kh + t * d, d) * scaling;
            if (scores[t] > mx) mx = scores[t];
        }
        float total = 0.0f;
        for (int64_t t = 0; t < ctx; ++t) {
            scores[t] = expf(scores[t] - mx);
            total += scores[t];
        }
        float *oh = out + h * d;
        memset(oh, 0, (size_t)d * sizeof(float));
        for (int64_t t = 0; t < ctx; ++t) {
            const float p = scores[t];
            const float *vt = vh + t * d;
            for (int64_t i = 0; i < d; ++i) oh[i] += p * vt[i];
        }
        const float inv = 1.0f / total;
        for (int64_t i = 0; i < d; ++i) oh[i] *= inv;
    }
}

/* The decoder over m new rows at positions past .. past + m - 1.

   x [m, hidden]: the embeddings in, the final-normed hidden states out. cos / sin [m, hd]:
   the rotary tables at those positions. mats [layers * 7] (q, k, v, o, gate, up, down),
   norms [layers * 2] (input, post-attention), kcache / vcache [layers]: each layer's buffer
   [nkv, alloc[l], hd] whose slots past .. past + m - 1 receive the new keys / values.
   threads: for the projections (the rest is small and runs on the caller's). Returns 0, or -1 when scratch memory could not be had. */
int fused_llama(int64_t m, int64_t past, float *x, const float *cos, const float *sin,
                int64_t layers, const mat_t *mats, const float *const *norms,
                float *const *kcache, float *const *vcache, const int64_t *alloc,
                const float *final_norm, float eps, int64_t hidden, int64_t nh, int64_t nkv,
                int64_t hd, int64_t inter, float scaling, int threads) {
    const int64_t qw = nh * hd, kvw = nkv * hd, ctx_max = past + m;
    const int64_t widest = inter > hidden ? inter : hidden;
    float *buf = malloc(sizeof(float) * (size_t)(m * (hidden + qw + 2 * kvw + qw + 2 * widest)
                                                 + ctx_max));
    if (!buf) return -1;
    float *xn = buf, *q = xn + m * hidden, *k = q + m * qw, *v = k + m * kvw,
          *att = v + m * kvw, *gate = att + m * qw, *up = gate + m * widest,
          *scores = up + m * widest;

    for (int64_t l = 0; l < layers; ++l) {
        const mat_t *w = mats + l * MATS;
        float *kc = kcache[l], *vc = vcache[l];
        rmsnorm(x, norms[2 * l], m, hidden, eps, xn);
        matmul(&w[Q], xn, m, q);
        matmul(&w[K], xn, m, k);
        matmul(&w[V], xn, m, v);
        for (int64_t r = 0; r < m; ++r) {
            rope(q + r * qw, nh, hd, cos + r * hd, sin + r * hd);
            rope(k + r * kvw, nkv, hd, cos + r * hd, sin + r * hd);
            for (int64_t g = 0; g < nkv; ++g) {  /* the new slot past + r of kv head g */
                const int64_t slot = (g * alloc[l] + past + r) * hd;
                memcpy(kc + slot, k + r * kvw + g * hd, (size_t)hd * sizeof(float));
                memcpy(vc + slot, v + r * kvw + g * hd, (size_t)hd * sizeof(float));
            }
        }
        for (int64_t r = 0; r < m; ++r)
            attend(q + r * qw, kc, vc, alloc[l], past + r + 1, nh, nkv, hd, scaling, scores,
                   att + r * qw);
        matmul(&w[O], att, m, gate);
        for (int64_t i = 0; i < m * hidden; ++i) x[i] += gate[i];

        rmsnorm(x, norms[2 * l + 1], m, hidden, eps, xn);
        matmul(&w[GATE], xn, m, gate);
        matmul(&w[UP], xn, m, up);
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
