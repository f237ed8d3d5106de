/* Few-row matrix products for decoding on an x86-64 CPU with AVX2 + FMA (see rowmm.py).

   y[r, j] = sum_i x[r, i] * W[j, i] for r < m (m small: the 1..k+1 tokens of a decode or
   verification step), with W stored tile-major: P[t, i, l] = W[16 t + l, i], so that the
   weights stream from memory once, in order, whatever m is. Every output is accumulated the
   same way -- one fused multiply-add per i, i ascending, from zero -- whatever m and whichever
   other rows share the call, so a row's result does not depend on the rows around it: a
   verification's logits equal one-token decoding's bit for bit.

   int8: P holds int8 weights, per output channel scale[j]: y[r, j] = scale[j] * sum_i x[r, i]
   * q[j, i] (weight-only quantization; the activations stay fp32). */
#include <immintrin.h>
#include <stdint.h>

#define TILE 16
#define MAX_CHUNK 6

static inline __attribute__((always_inline)) void store_tile(float *y, int64_t out, int64_t col,
                                                             int R, __m256 acc[][2]) {
    for (int r = 0; r < R; ++r) {
        float *dst = y + r * out + col;
        if (col + TILE <= out) {
            _mm256_storeu_ps(dst, acc[r][0]);
            _mm256_storeu_ps(dst + 8, acc[r][1]);
        } else {
            float tmp[TILE];
            _mm256_storeu_ps(tmp, acc[r][0]);
            _mm256_storeu_ps(tmp + 8, acc[r][1]);
            for (int64_t l = 0; col + l < out; ++l) dst[l] = tmp[l];
        }
    }
}

static inline __attribute__((always_inline)) void tile_f32(const float *x, int64_t in,
                                                           const float *w, float *y, int64_t out,
                                                           int64_t col, int R) {
    __m256 acc[MAX_CHUNK][2];
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t i = 0; i < in; ++i) {
        const __m256 w0 = _mm256_loadu_ps(w + i * TILE), w1 = _mm256_loadu_ps(w + i * TILE + 8);
#pragma GCC unroll 6
        for (int r = 0; r < R; ++r) {
            const __m256 xv = _mm256_broadcast_ss(x + r * in + i);
            acc[r][0] = _mm256_fmadd_ps(xv, w0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(xv, w1, acc[r][1]);
        }
    }
    store_tile(y, out, col, R, acc);
}

static inline __attribute__((always_inline)) void tile_i8(const float *x, int64_t in,
                                                          const int8_t *w, const float *scale,
                                                          float *y, int64_t out, int64_t col,
                                                          int R) {
    __m256 acc[MAX_CHUNK][2];
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t i = 0; i < in; ++i) {
        const __m128i b = _mm_loadu_si128((const __m128i *)(w + i * TILE));
        const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
        const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
#pragma GCC unroll 6
        for (int r = 0; r < R; ++r) {
            const __m256 xv = _mm256_broadcast_ss(x + r * in + i);
            acc[r][0] = _mm256_fmadd_ps(xv, w0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(xv, w1, acc[r][1]);
        }
    }
    const __m256 s0 = _mm256_loadu_ps(scale + col), s1 = _mm256_loadu_ps(scale + col + 8);
    for (int r = 0; r < R; ++r) {
        acc[r][0] = _mm256_mul_ps(acc[r][0], s0);
        acc[r][1] = _mm256_mul_ps(acc[r][1], s1);
    }
    store_tile(y, out, col, R, acc);
}

/* Tiles [t0, t1) of y = x @ W^T; x [m, in] and y [m, out] row-major, P [tiles, in, 16]. */
void rowmm_f32(const float *x, int64_t m, int64_t in, const float *P, int64_t out, float *y,
               int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
        const float *w = P + t * in * TILE;
        for (int64_t r0 = 0; r0 < m; r0 += MAX_CHUNK) {
            const float *xr = x + r0 * in;
            float *yr = y + r0 * out;
            switch (m - r0 < MAX_CHUNK ? m - r0 : MAX_CHUNK) {
                case 1: tile_f32(xr, in, w, yr, out, t * TILE, 1); break;
                case 2: tile_f32(xr, in, w, yr, out, t * TILE, 2); break;
                case 3: tile_f32(xr, in, w, yr, out, t * TILE, 3); break;
                case 4: tile_f32(xr, in, w, yr, out, t * TILE, 4); break;
                case 5: tile_f32(xr, in, w, yr, out, t * TILE, 5); break;
                default: tile_f32(xr, in, w, yr, out, t * TILE, 6); break;
            }
        }
    }
}

/* The same with int8 weights P [tiles, in, 16] and scale [tiles * 16]. */
void rowmm_i8(const float *x, int64_t m, int64_t in, const int8_t *P, const float *scale,
              int64_t out, float *y, int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
        const int8_t *w = P + t * in * TILE;
        for (int64_t r0 = 0; r0 < m; r0 += MAX_CHUNK) {
            const float *xr = x + r0 * in;
            float *yr = y + r0 * out;
            switch (m - r0 < MAX_CHUNK ? m - r0 : MAX_CHUNK) {
                case 1: tile_i8(xr, in, w, scale, yr, out, t * TILE, 1); break;
                case 2: tile_i8(xr, in, w, scale, yr, out, t * TILE, 2); break;
                case 3: tile_i8(xr, in, w, scale, yr, out, t * TILE, 3); break;
                case 4: tile_i8(xr, in, w, scale, yr, out, t * TILE, 4); break;
                case 5: tile_i8(xr, in, w, scale, yr, out, t * TILE, 5); break;
                default: tile_i8(xr, in, w, scale, yr, out, t * TILE, 6); break;
            }
        }
    }
}
