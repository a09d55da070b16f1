/* Decode attention over the fast decoder's bf16 key/value blocks, on CPUs with AVX512-BF16.

   One query token per row; a row's query heads are grouped by their key/value head (G of them) and each
   (row, key/value head) is one work item: its G queries against that row's keys, a softmax in float32, the
   probabilities times that row's values, written as bf16. Work items are shared among the OpenMP threads of
   the runtime torch itself loaded (libgomp.so.1: this library names the same soname, so the loader gives it
   torch's copy and no second thread pool competes for the cores).

   Layout (posttrain/generate/kv_blocks.py): keys and values are (blocks, capacity rows, kv heads, BLOCK, D)
   bf16, column c of a row in block c / BLOCK at c % BLOCK. Scores stay in float32 from the products to the
   softmax, and the probabilities are not rounded to bf16 before they weight the values: torch's path
   (kv_blocks.attend) rounds both, so the two agree to bf16 rounding, not bit for bit.

   Built by posttrain/generate/attention_kernel.py with the system's C compiler and -march=native. */

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
   head in block 0 (tiles of BLOCK columns, `block_stride` elements apart): keys as (D / 2, BLOCK, 2), features
   in pairs, so one 512-bit load holds 16 columns' pair of features and a dot product with a query's pair,
   broadcast, adds to 16 columns' scores at once; values as (BLOCK / 2, D, 2), columns in pairs, so a dot
   product with a query's two probabilities adds two columns to 16 features' sums. s: G x `stride` floats of
   scratch for the scores, p: G x `stride` bf16 for the probabilities. */
static inline __attribute__((always_inline)) void attend_item(const uint16_t *q, const uint16_t *k, const uint16_t *v,
                                                               long block_stride, const float *bias, int columns, int stride,
                                                               float *s, uint16_t *p, uint16_t *out, const int G, const int D) {
    const uint32_t *qp = (const uint32_t *)q; /* query i's feature pair j: qp[i * D / 2 + j] */
    const int WIDE = G <= 6 ? 4 : 2; /* chunks of 16 columns a pass: a tile's pair rows read whole, <= 24 accumulators */
    for (int c0 = 0; c0 < columns; c0 += 16 * WIDE) {
        __mmask16 open[4];
        __m512 b[4];
        int any = 0;
        for (int w = 0; w < WIDE; w++) {
            int c = c0 + 16 * w, n = columns - c < 0 ? 0 : columns - c < 16 ? columns - c : 16;
            __mmask16 in = (__mmask16)((1u << n) - 1);
            b[w] = _mm512_maskz_loadu_ps(in, bias + c);
            open[w] = _mm512_mask_cmp_ps_mask(in, b[w], _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
            any |= open[w];
        }
        if (!any) { /* columns nobody may see (left padding): not read */
            for (int i = 0; i < G; i++)
                for (int w = 0; w < WIDE; w++) _mm512_storeu_ps(s + i * stride + c0 + 16 * w, _mm512_set1_ps(-INFINITY));
            continue;
        }
        const uint16_t *kt = k + (c0 / BLOCK) * block_stride + (c0 % BLOCK) * 2;
        __m512 acc[8][4];
        for (int i = 0; i < G; i++)
            for (int w = 0; w < WIDE; w++) acc[i][w] = _mm512_setzero_ps();
        for (int j = 0; j < D / 2; j++) {
            for (int w = 0; w < WIDE; w++) {
                __m512i pair = _mm512_loadu_si512(kt + j * BLOCK * 2 + 32 * w);
                for (int i = 0; i < G; i++)
                    acc[i][w] = _mm512_dpbf16_ps(acc[i][w], (__m512bh)pair, (__m512bh)_mm512_set1_epi32((int)qp[i * D / 2 + j]));
            }
        }
        for (int i = 0; i < G; i++)
            for (int w = 0; w < WIDE; w++)
                _mm512_storeu_ps(s + i * stride + c0 + 16 * w, _mm512_mask_add_ps(_mm512_set1_ps(-INFINITY), open[w], acc[i][w], b[w]));
    }
    float inv[8];
    for (int i = 0; i < G; i++) {
        inv[i] = softmax_unnormalised(s + i * stride, columns);
        int c = 0;
        for (; c < columns; c += 16) /* past `columns`: zeros, so the last pair's second column adds nothing */
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
            int any = 0;
            for (int i = 0; i < G; i++) any |= *(const uint32_t *)(p + i * stride + c) != 0;
            if (!any) continue; /* both columns masked for every query: not read */
            if (c + 1 == columns) { /* the last column alone: its pair's second column is not ours to read */
                for (int f = 0; f < PASS; f++) {
                    __m512i pair = _mm512_and_si512(_mm512_loadu_si512(vt + f * 32), _mm512_set1_epi32(0xffff));
                    for (int i = 0; i < G; i++)
                        acc[i][f] = _mm512_dpbf16_ps(acc[i][f], (__m512bh)pair, (__m512bh)_mm512_set1_epi32((int)*(const uint32_t *)(p + i * stride + c)));
                }
                break;
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
