/* Few-row matrix products for decoding on an x86-64 CPU with AVX2 + FMA, and AVX-512 kernels
   chosen at run time where the CPU has it (see rowmm.py).

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
/* Bytes ahead of the weight stream to prefetch: the hardware prefetcher alone streamed the
   int8 weights at ~6 GB/s on a Zen 3 core, ~10 with this (fp32: 10 -> 11; measured). */
#define PREFETCH 1024

/* One row's 16 outputs at y (fewer at the right edge: `left` outputs remain). Takes the
   accumulators by value: passing the accumulator array would make gcc keep it in memory and
   store it on every iteration of the product loop. */
static inline __attribute__((always_inline)) void store_row(float *y, int64_t left, __m256 a,
                                                            __m256 b) {
    if (left >= TILE) {
        _mm256_storeu_ps(y, a);
        _mm256_storeu_ps(y + 8, b);
    } else {
        float tmp[TILE];
        _mm256_storeu_ps(tmp, a);
        _mm256_storeu_ps(tmp + 8, b);
        for (int64_t l = 0; l < left; ++l) y[l] = tmp[l];
    }
}

static inline __attribute__((always_inline)) void tile_f32(const float *x, int64_t in,
                                                           const float *w, float *y, int64_t out,
                                                           int64_t col, int R) {
    __m256 acc[MAX_CHUNK][2];
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t i = 0; i < in; ++i) {
        _mm_prefetch((const char *)(w + i * TILE) + PREFETCH, _MM_HINT_T0);
        const __m256 w0 = _mm256_loadu_ps(w + i * TILE), w1 = _mm256_loadu_ps(w + i * TILE + 8);
#pragma GCC unroll 6
        for (int r = 0; r < R; ++r) {
            const __m256 xv = _mm256_broadcast_ss(x + r * in + i);
            acc[r][0] = _mm256_fmadd_ps(xv, w0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(xv, w1, acc[r][1]);
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) store_row(y + r * out + col, out - col, acc[r][0], acc[r][1]);
}

/* int8 tiles hold inputs in pairs: P[t, p, 4 d + e] for d < 8 is W[16 t + d + 8 (e & 1),
   2 p + (e >> 1)], so one 32-byte load has both inputs' 16 outputs and byte e of every 32-bit
   lane is one 8-output vector, sign-extended with two shifts (no cross-lane shuffles, which
   would bound the loop at one per cycle). The even and odd inputs accumulate in separate
   partial sums, added at the end -- the same order for every row count. Chunks of at most 3
   rows keep the 4 x 3 accumulators in registers. */
#define MAX_CHUNK_I8 3

static inline __attribute__((always_inline)) __m256 byte_lane(__m256i v, int e) {
    switch (e) {
        case 0: return _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 24), 24));
        case 1: return _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 16), 24));
        case 2: return _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 8), 24));
        default: return _mm256_cvtepi32_ps(_mm256_srai_epi32(v, 24));
    }
}

static inline __attribute__((always_inline)) void tile_i8(const float *x, int64_t in,
                                                          const int8_t *w, const float *scale,
                                                          float *y, int64_t out, int64_t col,
                                                          int R) {
    __m256 acc[MAX_CHUNK_I8][2], odd[MAX_CHUNK_I8][2];
#pragma GCC unroll 3
    for (int r = 0; r < R; ++r)
        acc[r][0] = acc[r][1] = odd[r][0] = odd[r][1] = _mm256_setzero_ps();
    for (int64_t i = 0; i < in; i += 2) {
        _mm_prefetch((const char *)(w + i * TILE) + PREFETCH, _MM_HINT_T0);
        const __m256i b = _mm256_loadu_si256((const __m256i *)(w + i * TILE));
        const __m256 w0 = byte_lane(b, 0), w1 = byte_lane(b, 1);
        const __m256 w2 = byte_lane(b, 2), w3 = byte_lane(b, 3);
#pragma GCC unroll 3
        for (int r = 0; r < R; ++r) {
            const __m256 xe = _mm256_broadcast_ss(x + r * in + i);
            /* an odd `in` pads the last pair with zero weights; do not read past the row */
            const __m256 xo = i + 1 < in ? _mm256_broadcast_ss(x + r * in + i + 1)
                                         : _mm256_setzero_ps();
            acc[r][0] = _mm256_fmadd_ps(xe, w0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(xe, w1, acc[r][1]);
            odd[r][0] = _mm256_fmadd_ps(xo, w2, odd[r][0]);
            odd[r][1] = _mm256_fmadd_ps(xo, w3, odd[r][1]);
        }
    }
    const __m256 s0 = _mm256_loadu_ps(scale + col), s1 = _mm256_loadu_ps(scale + col + 8);
    for (int r = 0; r < R; ++r) {
        acc[r][0] = _mm256_mul_ps(_mm256_add_ps(acc[r][0], odd[r][0]), s0);
        acc[r][1] = _mm256_mul_ps(_mm256_add_ps(acc[r][1], odd[r][1]), s1);
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) store_row(y + r * out + col, out - col, acc[r][0], acc[r][1]);
}

/* Tiles [t0, t1) of y = x @ W^T; x [m, in] and y [m, out] row-major, P [tiles, in, 16]. */
static void rowmm_f32_avx2(const float *x, int64_t m, int64_t in, const float *P, int64_t out,
                           float *y, int64_t t0, int64_t t1) {
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

/* The same with int8 weights P [tiles, ceil(in / 2), 32] (input pairs, above) and scale
   [tiles * 16]. */
static void rowmm_i8_avx2(const float *x, int64_t m, int64_t in, const int8_t *P,
                          const float *scale, int64_t out, float *y, int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
        const int8_t *w = P + t * ((in + 1) / 2) * 2 * TILE;
        for (int64_t r0 = 0; r0 < m; r0 += MAX_CHUNK_I8) {
            const float *xr = x + r0 * in;
            float *yr = y + r0 * out;
            switch (m - r0 < MAX_CHUNK_I8 ? m - r0 : MAX_CHUNK_I8) {
                case 1: tile_i8(xr, in, w, scale, yr, out, t * TILE, 1); break;
                case 2: tile_i8(xr, in, w, scale, yr, out, t * TILE, 2); break;
                default: tile_i8(xr, in, w, scale, yr, out, t * TILE, 3); break;
            }
        }
    }
}

/* AVX-512 fp32: four tiles at a time, one register of 16 outputs each, so that a row has four
   independent chains of fused multiply-adds instead of the AVX2 kernel's two, whose latency
   bounds it (with the weights in cache, a one-off probe on a Zen 5 EPYC core: 2.4x faster; from
   memory the stream sets the pace for one row, and 3 rows cost what 1 does, bench/rowmm.py). Each output is still one fused
   multiply-add per input, in order, from zero: the AVX2 kernel's results bit for bit (tested). */
#define AVX512 __attribute__((target("avx512f,avx512bw"), always_inline)) static inline
#define GROUP_F32 4

AVX512 void store_row16(float *y, int64_t left, __m512 a) {
    if (left >= TILE)
        _mm512_storeu_ps(y, a);
    else
        _mm512_mask_storeu_ps(y, (__mmask16)((1u << left) - 1), a);
}

AVX512 void tiles4_f32(const float *x, int64_t in, const float *w, float *y, int64_t out,
                       int64_t col, int R) {
    __m512 acc[MAX_CHUNK][GROUP_F32];
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < GROUP_F32; ++j) acc[r][j] = _mm512_setzero_ps();
    for (int64_t i = 0; i < in; ++i) {
        __m512 wv[GROUP_F32];
#pragma GCC unroll 4
        for (int j = 0; j < GROUP_F32; ++j) {
            const float *wj = w + (j * in + i) * TILE;  /* tile j of the group, input i */
            _mm_prefetch((const char *)wj + PREFETCH, _MM_HINT_T0);
            wv[j] = _mm512_loadu_ps(wj);
        }
#pragma GCC unroll 6
        for (int r = 0; r < R; ++r) {
            const __m512 xv = _mm512_set1_ps(x[r * in + i]);
#pragma GCC unroll 4
            for (int j = 0; j < GROUP_F32; ++j) acc[r][j] = _mm512_fmadd_ps(xv, wv[j], acc[r][j]);
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int j = 0; j < GROUP_F32; ++j)
            store_row16(y + r * out + col + j * TILE, out - col - j * TILE, acc[r][j]);
}

/* Tiles [t0, t1) in groups of four, the rest (fewer than four) on the AVX2 kernel. */
__attribute__((target("avx512f,avx512bw"))) static void rowmm_f32_avx512(
        const float *x, int64_t m, int64_t in, const float *P, int64_t out, float *y,
        int64_t t0, int64_t t1) {
    int64_t t = t0;
    for (; t + GROUP_F32 <= t1; t += GROUP_F32) {
        const float *w = P + t * in * TILE;
        for (int64_t r0 = 0; r0 < m; r0 += MAX_CHUNK) {
            const float *xr = x + r0 * in;
            float *yr = y + r0 * out;
            switch (m - r0 < MAX_CHUNK ? m - r0 : MAX_CHUNK) {
                case 1: tiles4_f32(xr, in, w, yr, out, t * TILE, 1); break;
                case 2: tiles4_f32(xr, in, w, yr, out, t * TILE, 2); break;
                case 3: tiles4_f32(xr, in, w, yr, out, t * TILE, 3); break;
                case 4: tiles4_f32(xr, in, w, yr, out, t * TILE, 4); break;
                case 5: tiles4_f32(xr, in, w, yr, out, t * TILE, 5); break;
                default: tiles4_f32(xr, in, w, yr, out, t * TILE, 6); break;
            }
        }
    }
    if (t < t1) rowmm_f32_avx2(x, m, in, P, out, y, t, t1);
}

/* AVX-512 int8 (like the fp32 kernel above, compiled for AVX-512 alone; the rest of this file
   stays AVX2 code whatever the CPU). One register holds a tile's 16 outputs, and the tiles hold
   inputs in quads: P[t, q, 4 d + e] = W[16 t + d, 4 q + e], so one 64-byte load has four
   inputs' 16 outputs and byte e of every 32-bit lane is input 4 q + e's, sign-extended with two
   shifts. Each input of a quad accumulates in its own partial
   sum (four independent chains of fused multiply-adds), added at the end in one order -- the
   same for every row count. Equal to the AVX2 kernel to rounding; on a Zen 5 EPYC, SmolLM2's
   weights from memory on two threads (bench/rowmm.py), 1.1x / 1.6x / 2.0x faster for 1 / 3 / 4
   rows. */
#define MAX_CHUNK_Q 4
/* The int8 quads are one sequential stream (a tile's quads, then the next tile's), at a quarter
   of fp32's bytes per multiply-add: prefetched 1 KB ahead it streamed SmolLM2's int8 weights at
   ~28 GB/s on one Zen 5 core, 8 KB ahead at ~34 (16 KB no better; the fp32 kernel's four tile
   streams are fastest at 1 KB each and slower at 4 KB). */
#define PREFETCH_Q8 8192

AVX512 __m512 byte_lane16(__m512i v, int e) {
    switch (e) {
        case 0: return _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24), 24));
        case 1: return _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 16), 24));
        case 2: return _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 8), 24));
        default: return _mm512_cvtepi32_ps(_mm512_srai_epi32(v, 24));
    }
}

/* Quad i of a tile into the R rows' accumulators. n < 4 only for the last quad of an `in` that
   is not a multiple of 4: its missing inputs have zero weights, and x is not read past a row. */
AVX512 void quad_i8(const float *x, int64_t in, const int8_t *w, int64_t i, int R, int n,
                    __m512 acc[][4]) {
    const __m512i b = _mm512_loadu_si512((const void *)(w + i * TILE));
    const __m512 w0 = byte_lane16(b, 0), w1 = byte_lane16(b, 1);
    const __m512 w2 = byte_lane16(b, 2), w3 = byte_lane16(b, 3);
    const __m512 zero = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
        const float *xr = x + r * in + i;
        acc[r][0] = _mm512_fmadd_ps(_mm512_set1_ps(xr[0]), w0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(n > 1 ? _mm512_set1_ps(xr[1]) : zero, w1, acc[r][1]);
        acc[r][2] = _mm512_fmadd_ps(n > 2 ? _mm512_set1_ps(xr[2]) : zero, w2, acc[r][2]);
        acc[r][3] = _mm512_fmadd_ps(n > 3 ? _mm512_set1_ps(xr[3]) : zero, w3, acc[r][3]);
    }
}

AVX512 void tile_q8(const float *x, int64_t in, const int8_t *w, const float *scale, float *y,
                    int64_t out, int64_t col, int R) {
    __m512 acc[MAX_CHUNK_Q][4];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
        acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = _mm512_setzero_ps();
    const int64_t whole = in & ~(int64_t)3;
    for (int64_t i = 0; i < whole; i += 4) {
        _mm_prefetch((const char *)(w + i * TILE) + PREFETCH_Q8, _MM_HINT_T0);
        quad_i8(x, in, w, i, R, 4, acc);
    }
    if (whole < in) quad_i8(x, in, w, whole, R, (int)(in - whole), acc);
    const __m512 s = _mm512_loadu_ps(scale + col);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
        const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]),
                                         _mm512_add_ps(acc[r][2], acc[r][3]));
        store_row16(y + r * out + col, out - col, _mm512_mul_ps(sum, s));
    }
}

__attribute__((target("avx512f,avx512bw"))) static void rowmm_i8_avx512(
        const float *x, int64_t m, int64_t in, const int8_t *P, const float *scale, int64_t out,
        float *y, int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
        const int8_t *w = P + t * ((in + 3) / 4) * 4 * TILE;
        for (int64_t r0 = 0; r0 < m; r0 += MAX_CHUNK_Q) {
            const float *xr = x + r0 * in;
            float *yr = y + r0 * out;
            switch (m - r0 < MAX_CHUNK_Q ? m - r0 : MAX_CHUNK_Q) {
                case 1: tile_q8(xr, in, w, scale, yr, out, t * TILE, 1); break;
                case 2: tile_q8(xr, in, w, scale, yr, out, t * TILE, 2); break;
                case 3: tile_q8(xr, in, w, scale, yr, out, t * TILE, 3); break;
                default: tile_q8(xr, in, w, scale, yr, out, t * TILE, 4); break;
            }
        }
    }
}

/* The kernels in use: 0 the AVX2 ones (int8 tiles of input pairs), 1 the AVX-512 ones (quads). */
static int use_avx512 = 0;

/* Select the AVX-512 kernels (on = 1, where the CPU has AVX-512 F + BW) or the AVX2 ones;
   returns the inputs per group of the int8 tiles the selected kernel takes (4 or 2). */
int rowmm_select(int on) {
    __builtin_cpu_init();
    use_avx512 = on && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
    return use_avx512 ? 4 : 2;
}

void rowmm_f32(const float *x, int64_t m, int64_t in, const float *P, int64_t out, float *y,
               int64_t t0, int64_t t1) {
    if (use_avx512)
        rowmm_f32_avx512(x, m, in, P, out, y, t0, t1);
    else
        rowmm_f32_avx2(x, m, in, P, out, y, t0, t1);
}

void rowmm_i8(const float *x, int64_t m, int64_t in, const int8_t *P, const float *scale,
              int64_t out, float *y, int64_t t0, int64_t t1) {
    if (use_avx512)
        rowmm_i8_avx512(x, m, in, P, scale, out, y, t0, t1);
    else
        rowmm_i8_avx2(x, m, in, P, scale, out, y, t0, t1);
}
