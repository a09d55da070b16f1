/* The fast decoder's projections, out = W @ x: W (n, k) row-major as the model holds it, x (k, rows) with any
   strides, out (n, rows); in bf16 on CPUs with AVX512-BF16 (float32 sums, rounded once) and in float32 on any x86-64.

   Why our own: at a decode step's shapes (64 rows against SmolLM2's 576-wide weights) torch's bf16 product ran at
   about 0.8 of the machine's measured matmul peak, and at 16-32 rows at 0.4-0.6 (docs/PERFORMANCE.md); the weights
   stream from memory once a step and the rows are few, which a general GEMM is not tuned for.

   How: x is first packed rows-along: bf16 as (k / 2, rows rounded up to 16, 2), a pair of features side by side
   for each row, 16 rows a vector of 32 bf16, which is what AVX512-BF16's pairwise dot product takes; float32 as
   (k, rows rounded up to a vector). A tile of TILE_N outputs by up to 4 vectors of rows keeps its TILE_N x 4
   vectors of sums in registers; for each pair of features (bf16) or feature (float32) it loads the rows' vectors
   and, for each output, broadcasts that output's weights (4 bytes, read from W where it lies) into a product with
   each. So each weight is read once per 4 vectors of rows, x's packed copy (72-144 KiB at k = 576) stays in the
   core's cache, and nothing is packed on the weights' side. The weights of the next tile are prefetched while this
   one runs, a cache line every other step: without it the bf16 loop ran at 0.9 of this speed (the next tile's rows
   are TILE_N streams the hardware prefetcher follows late).

   Every output's sum runs over k in the same order whatever the number of rows (one lane of a vector per row),
   so a row's result does not depend on which other rows share the call: a row decoded in a batch gets the same
   projections, bit for bit, as decoded alone, in bf16 and float32 (torch's BLAS chooses its blocking by shape).

   Threads: OpenMP, torch's own runtime (see decode_kernels.c); one parallel region packs x, then splits the tiles.
   The float32 half is written with GCC's vector extensions, as decode_kernels_f32.c, so it becomes AVX-512 or AVX2
   code, whichever the CPU has.

   Built with decode_kernels.c into one library by posttrain/generate/decode_kernels.py. */

#include <stdint.h>
#include <string.h>

/* the next tile's weights, a cache line every other step of a tile's loop over k */
#define PREFETCH(step, next, ahead, bytes)                                                                               \
    if (((step) & 1) == 0 && (ahead) < (bytes)) {                                                                        \
        __builtin_prefetch((next) + (ahead), 0, 3);                                                                      \
        (ahead) += 64;                                                                                                  \
    }

/* The entry point NAME over element type T: tile kernels of 1 to 4 vectors of rows made from TILE (an always-inline
   function taking V), and one parallel region that packs x with PACK, then runs the tiles of TILE_N outputs, each
   over groups of 4 vectors of LANES rows, prefetching the next tile's weights during its first group. */
#define TILE_OF(NAME, T, TILE, V)                                                                                          \
    static void NAME##_##V(const T *w, long k, const T *xp, int padded, int r0, T *out, long os, int rows, int n0,        \
                           int tile_n, const char *next, long next_bytes) {                                               \
        TILE(w, k, xp, padded, r0, V, out, os, rows, n0, tile_n, next, next_bytes);                                     \
    }
#define MATMUL(NAME, T, TILE, PACK, LANES_, TILE_N_, REFUSE)                                                               \
    TILE_OF(NAME, T, TILE, 1)                                                                                            \
    TILE_OF(NAME, T, TILE, 2)                                                                                            \
    TILE_OF(NAME, T, TILE, 3)                                                                                            \
    TILE_OF(NAME, T, TILE, 4)                                                                                            \
    int NAME(const T *w, const T *x, long fs, long rs, T *xp, T *out, long os, int n, int k, int rows, int threads) {   \
        if ((REFUSE) || k <= 0 || n <= 0 || rows <= 0) return -1;                                                        \
        void (*const tiles_v[5])(const T *, long, const T *, int, int, T *, long, int, int, int, const char *, long) = {  \
            0, NAME##_1, NAME##_2, NAME##_3, NAME##_4};                                                                  \
        int padded = (rows + LANES_ - 1) / LANES_ * LANES_, tiles = (n + TILE_N_ - 1) / TILE_N_;                         \
        _Pragma("omp parallel num_threads(threads)") {                                                                   \
            PACK(x, fs, rs, xp, k, rows, padded); /* ends in its omp for's barrier */                                    \
            _Pragma("omp for schedule(static)") for (int t = 0; t < tiles; t++) {                                        \
                int n0 = t * TILE_N_, tile_n = n - n0 < TILE_N_ ? n - n0 : TILE_N_, left = n - n0 - TILE_N_;             \
                const char *next = (const char *)(w + (long)(n0 + TILE_N_) * k);                                         \
                long next_bytes = t + 1 < tiles ? (long)sizeof(T) * k * (left < TILE_N_ ? left : TILE_N_) : 0;           \
                for (int r0 = 0; r0 < padded; r0 += 4 * LANES_) {                                                        \
                    int vectors = (padded - r0) / LANES_;                                                                \
                    tiles_v[vectors > 4 ? 4 : vectors](w, k, xp, padded, r0, out, os, rows, n0, tile_n, next,           \
                                                       r0 ? 0 : next_bytes);                                              \
                }                                                                                                        \
            }                                                                                                            \
        }                                                                                                                \
        return 0;                                                                                                        \
    }

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

#define TILE_N 6   /* outputs a tile: 6 x 4 vectors of sums, 4 of x and one broadcast fit in 32 registers */
#define LANES 16   /* rows a vector */

/* Rows [0, rows) of x, feature f at x[f * fs + r * rs], into xp (k / 2, padded, 2), rows past `rows` zero. */
static void pack(const uint16_t *x, long fs, long rs, uint16_t *xp, int k, int rows, int padded) {
#pragma omp for schedule(static)
    for (int p = 0; p < k / 2; p++) {
        const uint16_t *a = x + 2L * p * fs, *b = a + fs;
        uint32_t *o = (uint32_t *)xp + (long)p * padded;
        int r = 0;
        if (rs == 1)  /* features down, rows along: interleave two feature rows */
            for (; r + LANES <= rows; r += LANES) {
                __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(a + r)));
                __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(b + r)));
                _mm512_storeu_si512(o + r, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
            }
        else if (fs == 1 && rs % 2 == 0 && ((uintptr_t)x & 3) == 0)  /* rows of features: a pair is one 32-bit word */
            for (__m512i at = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                   _mm512_set1_epi32((int)(rs / 2)));
                 r + LANES <= rows; r += LANES)
                _mm512_storeu_si512(o + r, _mm512_i32gather_epi32(at, (const int *)(a + r * rs), 4));
        for (; r < rows; r++) o[r] = (uint32_t)a[r * rs] | (uint32_t)b[r * rs] << 16;
        for (; r < padded; r++) o[r] = 0;
    }
}

/* Outputs [n0, n0 + tile_n) for rows [r0, r0 + 16 * V) (V vectors, 1 to 4), of which those below `rows` are stored. */
static inline __attribute__((always_inline)) void tile(const uint16_t *w, long k, const uint16_t *xp, int padded, int r0,
                                                       const int V, uint16_t *out, long os, int rows, int n0, int tile_n,
                                                       const char *next, long next_bytes) {
    __m512 sum[TILE_N][4];
    const int32_t *wr[TILE_N];
    for (int i = 0; i < TILE_N; i++) {
        wr[i] = (const int32_t *)(w + (long)(n0 + (i < tile_n ? i : 0)) * k);
        for (int j = 0; j < V; j++) sum[i][j] = _mm512_setzero_ps();
    }
    const int32_t *xk = (const int32_t *)xp + r0;
    long ahead = 0;
    for (long p = 0; p < k / 2; p++, xk += padded) {
        PREFETCH(p, next, ahead, next_bytes)
        __m512bh xv[4];
#pragma GCC unroll 4
        for (int j = 0; j < V; j++) xv[j] = (__m512bh)_mm512_loadu_si512(xk + LANES * j);
#pragma GCC unroll 6
        for (int i = 0; i < TILE_N; i++) {
            __m512bh wv = (__m512bh)_mm512_set1_epi32(wr[i][p]);
#pragma GCC unroll 4
            for (int j = 0; j < V; j++) sum[i][j] = _mm512_dpbf16_ps(sum[i][j], wv, xv[j]);
        }
    }
    for (int i = 0; i < tile_n; i++)
        for (int j = 0; j < V; j++) {
            int r = r0 + LANES * j, left = rows - r;
            if (left <= 0) break;
            __mmask16 keep = left >= LANES ? 0xFFFF : (__mmask16)((1u << left) - 1);
            _mm256_mask_storeu_epi16(out + (long)(n0 + i) * os + r, keep, (__m256i)_mm512_cvtneps_pbh(sum[i][j]));
        }
}

/* out (n, rows) with row stride os = w (n, k) @ x (k, rows), x's feature f of row r at x[f * fs + r * rs]; k even;
   xp: scratch of k * (rows rounded up to 16) bf16. Returns 0, or -1 where it does not take the shapes. */
MATMUL(posttrain_matmul, uint16_t, tile, pack, LANES, TILE_N, k % 2)

#else

int posttrain_matmul(const uint16_t *w, const uint16_t *x, long fs, long rs, uint16_t *xp, uint16_t *out, long os, int n,
                     int k, int rows, int threads) {
    (void)w, (void)x, (void)fs, (void)rs, (void)xp, (void)out, (void)os, (void)n, (void)k, (void)rows, (void)threads;
    return -1;  /* no AVX512-BF16 here: decode_kernels.py never calls it (posttrain_attention_available() is 0) */
}

#endif

/* float32, in GCC's vector code: 16 lanes and 6 outputs a tile with AVX-512's 32 registers, 8 and 3 with AVX2's 16 */
#ifdef __AVX512F__
#define F_LANES 16
#define F_TILE_N 6
#else
#define F_LANES 8
#define F_TILE_N 3
#endif
typedef float fv __attribute__((vector_size(F_LANES * 4), aligned(4)));

/* Rows [0, rows) of x, feature f at x[f * fs + r * rs], into xp (k, padded), rows past `rows` zero. */
static void pack_f32(const float *x, long fs, long rs, float *xp, int k, int rows, int padded) {
#pragma omp for schedule(static)
    for (int f = 0; f < k; f++) {
        const float *a = x + (long)f * fs;
        float *o = xp + (long)f * padded;
        if (rs == 1)
            memcpy(o, a, sizeof(float) * rows);
        else
            for (int r = 0; r < rows; r++) o[r] = a[r * rs];
        for (int r = rows; r < padded; r++) o[r] = 0;
    }
}

static inline __attribute__((always_inline)) void tile_f32(const float *w, long k, const float *xp, int padded, int r0,
                                                           const int V, float *out, long os, int rows, int n0, int tile_n,
                                                           const char *next, long next_bytes) {
    fv sum[F_TILE_N][4];
    const float *wr[F_TILE_N];
    for (int i = 0; i < F_TILE_N; i++) {
        wr[i] = w + (long)(n0 + (i < tile_n ? i : 0)) * k;
        for (int j = 0; j < V; j++) sum[i][j] = (fv){0};
    }
    const float *xk = xp + r0;
    long ahead = 0;
    for (long f = 0; f < k; f++, xk += padded) {
        PREFETCH(f, next, ahead, next_bytes)
        fv xv[4];
#pragma GCC unroll 4
        for (int j = 0; j < V; j++) xv[j] = *(const fv *)(xk + F_LANES * j);
#pragma GCC unroll 6
        for (int i = 0; i < F_TILE_N; i++) {
            float wv = wr[i][f];  /* a scalar times a vector: broadcast */
#pragma GCC unroll 4
            for (int j = 0; j < V; j++) sum[i][j] += wv * xv[j];
        }
    }
    for (int i = 0; i < tile_n; i++)
        for (int j = 0; j < V; j++) {
            int r = r0 + F_LANES * j, left = rows - r;
            if (left <= 0) break;
            float *o = out + (long)(n0 + i) * os + r, lanes[F_LANES];
            if (left >= F_LANES) {
                *(fv *)o = sum[i][j];
            } else {
                memcpy(lanes, &sum[i][j], sizeof lanes);
                memcpy(o, lanes, sizeof(float) * left);
            }
        }
}

/* posttrain_matmul in float32; xp: scratch of k * (rows rounded up to F_LANES) floats. */
MATMUL(posttrain_matmul_f32, float, tile_f32, pack_f32, F_LANES, F_TILE_N, 0)
