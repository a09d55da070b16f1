/* The fast decoder's bf16 step on CPUs with AVX512-BF16: attention over the key/value buffers, and the rest of a
   layer between its projections (RMS norm; rotary embedding with the buffers' writes; silu(gate) * up). Sampling's
   kernels over bf16 logits are in decode_kernels_f32.c, which every x86-64 build has.

   Attention: one query token per row; a row's query heads are grouped by their key/value head (G of them) and
   each (row, key/value head) is one work item: its G queries against that row's keys, a softmax in float32, the
   probabilities times that row's values, written as bf16. Scores stay in float32 from the products to the
   softmax; the probabilities are rounded to bf16 for the pairwise products with the values (as torch's path,
   kv_blocks.attend, rounds them), the sums are float32. The two agree to bf16 rounding, not bit for bit.

   Layouts (posttrain/generate/kv_blocks.py, "keys" and "values"): (rows, kv heads, blocks, tile), a tile per
   BLOCK columns; the tiles' shapes are described at attend_item below.

   Threads: every kernel shares its work among the OpenMP threads of the runtime torch itself loaded
   (libgomp.so.1: this library names the same soname, so the loader gives it torch's copy and no second thread
   pool competes for the cores).

   Built by posttrain/generate/decode_kernels.py with the system's C compiler and -march=native. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define BLOCK 64 /* columns a block holds: posttrain/generate/kv_blocks.py's BLOCK */

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define HAVE_BF16 1
#else
#define HAVE_BF16 0
#endif

int posttrain_attention_available(void) { return HAVE_BF16; }

#if HAVE_BF16

/* e^x for 16 floats: x = n ln2 + r, |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial (relative error
   about 1e-7), times 2^n by scalef. Inputs below -104 (and -inf) give 0. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    x = _mm512_min_ps(x, _mm512_set1_ps(88.7f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* 16 bf16 values as float32 (bf16 is float32's upper half). */
static inline __m512 bf16x16(__m256i raw) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16)); }

/* Softmax of n scores in place (float32); returns 1 / their sum of exponentials, or 0 when every score is
   -inf (a row with nothing to attend to: its scores become zeros, and so does its output). The scores are
   left as unnormalised e^(s - max). */
static inline float softmax_unnormalised(float *s, int n) {
    __m512 m16 = _mm512_set1_ps(-INFINITY);
    int c = 0;
    for (; c + 16 <= n; c += 16) m16 = _mm512_max_ps(m16, _mm512_loadu_ps(s + c));
    float m = _mm512_reduce_max_ps(m16);
    for (; c < n; c++) m = s[c] > m ? s[c] : m;
    if (m == -INFINITY) {
        for (c = 0; c < n; c++) s[c] = 0.0f;
        return 0.0f;
    }
    __m512 mv = _mm512_set1_ps(m), sum16 = _mm512_setzero_ps();
    for (c = 0; c + 16 <= n; c += 16) {
        __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + c), mv));
        _mm512_storeu_ps(s + c, e);
        sum16 = _mm512_add_ps(sum16, e);
    }
    if (c < n) {
        __mmask16 tail = (__mmask16)((1u << (n - c)) - 1);
        __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + c), mv));
        e = _mm512_maskz_mov_ps(tail, e);
        _mm512_mask_storeu_ps(s + c, tail, e);
        sum16 = _mm512_add_ps(sum16, e);
    }
    return 1.0f / _mm512_reduce_add_ps(sum16);
}

/* One (row, key/value head): G queries of D features (q, bf16) over `columns` columns. k and v point at the row's
   head in block 0 (tiles of BLOCK columns, `block_stride` elements apart): keys as (BLOCK / 16, D / 2, 16, 2),
   features in pairs for 16 columns at a time, so one 512-bit load holds 16 columns' pair of features and a dot
   product with a query's pair, broadcast, adds to 16 columns' scores at once; values as (BLOCK / 2, D, 2), columns in pairs, so a dot
   product with a query's two probabilities adds two columns to 16 features' sums. s: G x `stride` floats of
   scratch for the scores, p: G x `stride` bf16 for the probabilities. */
static inline __attribute__((always_inline)) void attend_item(const uint16_t *q, const uint16_t *k, const uint16_t *v,
                                                               long block_stride, const float *bias, int columns, int stride,
                                                               float *s, uint16_t *p, uint16_t *out, const int G, const int D) {
    const uint32_t *qp = (const uint32_t *)q; /* query i's feature pair j: qp[i * D / 2 + j] */
    for (int c0 = 0; c0 < columns; c0 += 16) { /* 16 columns at a time: a chunk's pair rows read front to back */
        int n = columns - c0 < 16 ? columns - c0 : 16;
        __mmask16 in = (__mmask16)((1u << n) - 1);
        __m512 b = _mm512_maskz_loadu_ps(in, bias + c0);
        __mmask16 open = _mm512_mask_cmp_ps_mask(in, b, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
        if (!open) { /* columns nobody may see (left padding): not read */
            for (int i = 0; i < G; i++) _mm512_storeu_ps(s + i * stride + c0, _mm512_set1_ps(-INFINITY));
            continue;
        }
        const uint16_t *kt = k + (c0 / BLOCK) * block_stride + (c0 % BLOCK) / 16 * (D / 2) * 32; /* 16 columns' chunk */
        __m512 acc[8];
        for (int i = 0; i < G; i++) acc[i] = _mm512_setzero_ps();
        for (int j = 0; j < D / 2; j++) {
            __m512i pair = _mm512_loadu_si512(kt + j * 32);
            for (int i = 0; i < G; i++) acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)pair, (__m512bh)_mm512_set1_epi32((int)qp[i * D / 2 + j]));
        }
        for (int i = 0; i < G; i++) _mm512_storeu_ps(s + i * stride + c0, _mm512_mask_add_ps(_mm512_set1_ps(-INFINITY), open, acc[i], b));
    }
    float inv[8];
    for (int i = 0; i < G; i++) {
        inv[i] = softmax_unnormalised(s + i * stride, columns);
        int c = 0;
        for (; c < columns; c += 16) /* past `columns`: zeros, so the last pair's second column is not read */
            _mm256_storeu_si256((__m256i *)(p + i * stride + c),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps((__mmask16)(columns - c < 16 ? (1u << (columns - c)) - 1 : 0xffff),
                                                                                 s + i * stride + c)));
    }
    /* values: 16 x PASS features at a time, each query's accumulators in registers */
    const int CHUNKS = D / 16, PASS = G <= 3 ? CHUNKS : G <= 6 ? 4 : 2; /* at most 24 accumulators */
    for (int f0 = 0; f0 < CHUNKS; f0 += PASS) {
        __m512 acc[8][8];
        for (int i = 0; i < G; i++)
            for (int f = 0; f < PASS; f++) acc[i][f] = _mm512_setzero_ps();
        for (int c = 0; c < columns; c += 2) {
            const uint16_t *vt = v + (c / BLOCK) * block_stride + (c % BLOCK) * D + f0 * 32;
            uint32_t seen = 0; /* which of the pair's two columns some query gives a probability */
            for (int i = 0; i < G; i++) seen |= *(const uint32_t *)(p + i * stride + c);
            if (!seen) continue; /* both columns masked for every query: not read */
            if (!(seen & 0xffff) || !(seen >> 16)) { /* one column alone (the last, or beside a masked one): the other's
                                                        value is not read, it may never have been written */
                __m512i keep = _mm512_set1_epi32((int)((seen & 0xffff ? 0xffffu : 0u) | (seen >> 16 ? 0xffff0000u : 0u)));
                for (int f = 0; f < PASS; f++) {
                    __m512i pair = _mm512_and_si512(_mm512_loadu_si512(vt + f * 32), keep);
                    for (int i = 0; i < G; i++)
                        acc[i][f] = _mm512_dpbf16_ps(acc[i][f], (__m512bh)pair, (__m512bh)_mm512_set1_epi32((int)*(const uint32_t *)(p + i * stride + c)));
                }
                continue;
            }
            for (int f = 0; f < PASS; f++) {
                __m512i pair = _mm512_loadu_si512(vt + f * 32);
                for (int i = 0; i < G; i++)
                    acc[i][f] = _mm512_dpbf16_ps(acc[i][f], (__m512bh)pair, (__m512bh)_mm512_set1_epi32((int)*(const uint32_t *)(p + i * stride + c)));
            }
        }
        for (int i = 0; i < G; i++)
            for (int f = 0; f < PASS; f++) {
                __m256bh r = _mm512_cvtneps_pbh(_mm512_mul_ps(acc[i][f], _mm512_set1_ps(inv[i])));
                _mm256_storeu_si256((__m256i *)(out + i * D + (f0 + f) * 16), (__m256i)r);
            }
    }
}

/* ---- The rest of a layer's step, each one pass over its data (bf16 in and out, float32 inside) ---- */

/* RMS normalisation without a weight (the fast decoder folds it into the next projection) of x (features, rows),
   down each column: out = x / sqrt(mean of squares + eps), rounded once to bf16. Each thread takes a stretch of
   the columns and reads x a feature (a row of memory) at a time, front to back: x has just been written by a
   product and is read from memory or L3, where a walk down the columns waits on every line. */
void posttrain_rms_norm(const uint16_t *x, uint16_t *out, int features, int rows, float eps, int threads) {
    int chunks = (rows + 15) / 16;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int chunk = 0; chunk < chunks; chunk++) {
        int r = chunk * 16, n = rows - r < 16 ? rows - r : 16;
        __mmask16 in = (__mmask16)((1u << n) - 1);
        __m512 sum = _mm512_setzero_ps();
        for (int f = 0; f < features; f++) {
            __m512 v = bf16x16(_mm256_maskz_loadu_epi16(in, x + (long)f * rows + r));
            sum = _mm512_fmadd_ps(v, v, sum);
        }
        __m512 mean = _mm512_add_ps(_mm512_div_ps(sum, _mm512_set1_ps((float)features)), _mm512_set1_ps(eps));
        __m512 scale = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_sqrt_ps(mean));
        for (int f = 0; f < features; f++) {
            __m512 v = bf16x16(_mm256_maskz_loadu_epi16(in, x + (long)f * rows + r));
            _mm256_mask_storeu_epi16(out + (long)f * rows + r, in, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(v, scale)));
        }
    }
}

/* silu(gate) * up for gate_up (2 x n, rows): gate the first n x rows values, up the rest; out n x rows. */
void posttrain_silu_mul(const uint16_t *gate_up, uint16_t *out, long n, int threads) {
    long vectors = (n + 15) / 16;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long i = 0; i < vectors; i++) {
        long at = i * 16;
        __mmask16 in = (__mmask16)(n - at < 16 ? (1u << (n - at)) - 1 : 0xffff);
        __m512 g = bf16x16(_mm256_maskz_loadu_epi16(in, gate_up + at));
        __m512 u = bf16x16(_mm256_maskz_loadu_epi16(in, gate_up + n + at));
        __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        _mm256_mask_storeu_epi16(out + at, in, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(silu, u)));
    }
}

/* 32 float32 values (lo: the first 16) as 32 bf16, rounded to nearest even, in order. */
static inline __m512i bf16x32(__m512 lo, __m512 hi) { return (__m512i)_mm512_cvtne2ps_pbh(hi, lo); }

/* Features f .. f + 15 of row r of x (features, rows) bf16, as float32. Consecutive rows of a feature sit side
   by side, so a 32-bit gather of feature e's (row r, row r + 1) takes row r from the low halves (or, for the last
   row, (r - 1, r) and the high halves): one gather for 16 features, no copy of x into rows first. */
static inline __m512 row_features(const uint16_t *x, int rows, int f, int r) {
    if (rows == 1) return bf16x16(_mm256_loadu_si256((const __m256i *)(x + f)));
    __m512i index = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(rows));
    if (r + 1 < rows) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_i32gather_epi32(index, x + (long)f * rows + r, 2), 16));
    __m512i pairs = _mm512_i32gather_epi32(index, x + (long)f * rows + r - 1, 2);
    return _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32((int)0xffff0000u)));
}

/* Rotary embedding of q and k and the step's writes, for qkv (features, rows) as the projection gives it: q
   heads, then k heads, then v heads, D features each; cos and sin (rows, D) float32. q goes to q_out as (rows,
   heads, D); k and v to column t of the key and value buffers (the layouts above, strides in elements). Rotation:
   x cos + rotate_half(x) sin, rotate_half(x) = (-x2, x1), in float32, rounded once. */
void posttrain_rotary_write(const uint16_t *qkv, const float *cos, const float *sin, uint16_t *q_out, uint16_t *keys,
                            uint16_t *values, int rows, int heads, int kv, int head_dim, int t, long row_stride,
                            long head_stride, long block_stride, int threads) {
    const int D = head_dim, half = head_dim / 2;
    const int c = t % BLOCK;
    /* a key's feature pair j: pair j of its 16 columns' chunk (tile (BLOCK / 16, D / 2, 16, 2)), 16 pairs apart; a
       value's features: every other bf16 of its column pair's row (tile (BLOCK / 2, D, 2)), odd ones for odd columns */
    const long key_at = (t / BLOCK) * block_stride + (c / 16) * (D / 2) * 32 + (c % 16) * 2;
    const long value_at = (t / BLOCK) * block_stride + (c / 2) * D * 2;
    const __m512i pair_step = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(16));
    const __mmask32 parity = c % 2 ? 0xaaaaaaaau : 0x55555555u;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int r = 0; r < rows; r++) {
        const float *cr = cos + (long)r * D, *sr = sin + (long)r * D;
        for (int u = 0; u < heads + kv; u++) {
            float out[128]; /* this head's rotated features, D <= 128 */
            for (int e = 0; e < half; e += 16) {
                __m512 x1 = row_features(qkv, rows, u * D + e, r), x2 = row_features(qkv, rows, u * D + half + e, r);
                _mm512_storeu_ps(out + e, _mm512_fnmadd_ps(x2, _mm512_loadu_ps(sr + e), _mm512_mul_ps(x1, _mm512_loadu_ps(cr + e))));
                _mm512_storeu_ps(out + half + e,
                                 _mm512_fmadd_ps(x1, _mm512_loadu_ps(sr + half + e), _mm512_mul_ps(x2, _mm512_loadu_ps(cr + half + e))));
            }
            if (u < heads) {
                for (int e = 0; e < D; e += 32)
                    _mm512_storeu_si512(q_out + ((long)r * heads + u) * D + e, bf16x32(_mm512_loadu_ps(out + e), _mm512_loadu_ps(out + e + 16)));
            } else { /* 32 features = 16 pairs a scatter */
                uint16_t *dst = keys + r * row_stride + (u - heads) * head_stride + key_at;
                for (int e = 0; e < D; e += 32)
                    _mm512_i32scatter_epi32(dst + e / 2 * 32, pair_step, bf16x32(_mm512_loadu_ps(out + e), _mm512_loadu_ps(out + e + 16)), 4);
            }
        }
        for (int g = 0; g < kv; g++) {
            uint16_t *dst = values + r * row_stride + g * head_stride + value_at;
            for (int e = 0; e < D; e += 16) { /* 16 features into the 32 bf16 of 16 (even, odd) column pairs */
                __m512i spread = _mm512_srli_epi32(_mm512_castps_si512(row_features(qkv, rows, (heads + kv + g) * D + e, r)), c % 2 ? 0 : 16);
                _mm512_mask_storeu_epi16(dst + e * 2, parity, spread);
            }
        }
    }
}

#define ITEMS(G, D)                                                                                                      \
    static void attend_##G##_##D(const uint16_t *q, const uint16_t *keys, const uint16_t *values, const float *bias,      \
                                 uint16_t *out, int rows, int kv, int columns, long row_stride, long head_stride,      \
                                 long block_stride, long bias_stride, int threads) {                                   \
        int stride = (columns + BLOCK - 1) / BLOCK * BLOCK;                                                              \
        _Pragma("omp parallel num_threads(threads)") {                                                                   \
            float *s = malloc(sizeof(float) * G * stride);                                                              \
            uint16_t *p = malloc(sizeof(uint16_t) * G * stride);                                                        \
            _Pragma("omp for schedule(dynamic, 4)") for (long item = 0; item < (long)rows * kv; item++) {               \
                long r = item / kv, offset = r * row_stride + (item % kv) * head_stride;                                \
                attend_item(q + item * G * D, keys + offset, values + offset, block_stride, bias + r * bias_stride,      \
                            columns, stride, s, p, out + item * G * D, G, D);                                           \
            }                                                                                                            \
            free(s);                                                                                                     \
            free(p);                                                                                                     \
        }                                                                                                                \
    }

#define SIZES(G) ITEMS(G, 64) ITEMS(G, 128)
SIZES(1) SIZES(2) SIZES(3) SIZES(4) SIZES(5) SIZES(6) SIZES(7) SIZES(8)

/* Columns [start, start + width) of rows' keys and values set from a prefilled cache's k and v (rows, kv heads,
   width, D), contiguous; row r goes to buffer row index[r] (index NULL: row r). Only these columns' slots are
   written: a pair's or a chunk's other columns keep what they hold. The layouts as at attend_item; strides in
   elements, the same for keys and values. torch's strided copies into these layouts took longer than the rest
   of a decoder's start. */
void posttrain_put_columns(const uint16_t *k, const uint16_t *v, uint16_t *keys, uint16_t *values, const int64_t *index,
                           int rows, int kv, int width, int head_dim, int start, long row_stride, long head_stride,
                           long block_stride, int threads) {
    const int D = head_dim, end = start + width;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long item = 0; item < (long)rows * kv; item++) {
        long r = item / kv, h = item % kv, at = (index ? index[r] : r) * row_stride + h * head_stride;
        const uint32_t *kp = (const uint32_t *)(k + item * width * D); /* column c's feature pair j: kp[(c - start) * D / 2 + j] */
        const uint16_t *vs = v + item * width * D;
        for (int c = start; c < end; c++) { /* keys: (BLOCK / 16, D / 2, 16, 2) a block */
            uint32_t *dst = (uint32_t *)(keys + at + (c / BLOCK) * block_stride + (c % BLOCK) / 16 * (D / 2) * 32) + c % 16;
            for (int j = 0; j < D / 2; j++) dst[j * 16] = kp[(long)(c - start) * (D / 2) + j];
        }
        for (int c = start; c < end; c++) { /* values: (BLOCK / 2, D, 2) a block */
            uint16_t *dst = values + at + (c / BLOCK) * block_stride + (c % BLOCK) / 2 * D * 2 + c % 2;
            const uint16_t *src = vs + (long)(c - start) * D;
            for (int e = 0; e < D; e++) dst[e * 2] = src[e];
        }
    }
}

typedef void (*kernel)(const uint16_t *, const uint16_t *, const uint16_t *, const float *, uint16_t *, int, int, int, long,
                       long, long, long, int);
#define PAIR(G) {attend_##G##_64, attend_##G##_128}
static const kernel KERNELS[8][2] = {PAIR(1), PAIR(2), PAIR(3), PAIR(4), PAIR(5), PAIR(6), PAIR(7), PAIR(8)};

#endif

/* Returns 0 on success, -1 when this build or these sizes are not supported (the caller uses torch's path). */
int posttrain_attend(const uint16_t *q, const uint16_t *keys, const uint16_t *values, const float *bias, uint16_t *out,
                     int rows, int kv, int group, int head_dim, int block, int columns, long row_stride, long head_stride,
                     long block_stride, long bias_stride,
                     int threads) {
#if HAVE_BF16
    if (group < 1 || group > 8 || (head_dim != 64 && head_dim != 128) || block != BLOCK) return -1;
    KERNELS[group - 1][head_dim == 128](q, keys, values, bias, out, rows, kv, columns, row_stride, head_stride, block_stride,
                                        bias_stride, threads);
    return 0;
#else
    (void)q, (void)keys, (void)values, (void)bias, (void)out, (void)rows, (void)kv, (void)group, (void)head_dim, (void)block;
    (void)columns, (void)row_stride, (void)head_stride, (void)block_stride, (void)bias_stride, (void)threads;
    return -1;
#endif
}
