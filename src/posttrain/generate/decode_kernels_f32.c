/* The fast decoder's float32 step on x86-64 CPUs: the same four kernels as decode_kernels.c (attention over the
   key/value buffers, RMS norm, rotary embedding with the buffers' writes, silu(gate) * up), for float32; and
   sampling.py's kernels over bf16 or float32 logits (greedy argmax, temperature-only draws, log-probabilities).

   Written with GCC's vector extensions (16 floats a vector) rather than one instruction set's intrinsics, so the
   one source compiles with -march=native to AVX-512 where the CPU has it and to pairs of AVX2 registers where it
   does not (float32 is what CPUs without native bf16 decode in).

   Attention: each (row, key/value head) is one work item, its G queries against that row's keys, a softmax in
   float32 and the probabilities times that row's values; columns nobody may see (a short prompt's left padding) are
   not read. Layouts (posttrain/generate/kv_blocks.py, "keys" and "values" with float32 elements): (rows, kv heads,
   blocks, tile), keys' tile (BLOCK / 16, D, 16): 16 columns side by side for each feature, so a query's feature,
   broadcast, times one vector adds to 16 columns' scores; values' tile (BLOCK, D): a column's features side by side.

   Threads: OpenMP, torch's own runtime (see decode_kernels.c). */

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 64 /* columns a block holds: posttrain/generate/kv_blocks.py's BLOCK */

typedef float vf __attribute__((vector_size(64))); /* 16 floats */
typedef int32_t vi __attribute__((vector_size(64)));

#ifdef __AVX512F__
#define ACCUMULATORS 24 /* vectors of sums kept in registers: 32 zmm */
#else
#define ACCUMULATORS 6 /* a vector is two ymm registers of 16 */
#endif

static inline vf load(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }

static inline vf splat(float x) { return (vf){0} + x; }

static inline vf select_(vi mask, vf yes, vf no) { return (vf)(((vi)yes & mask) | ((vi)no & ~mask)); }

/* e^x for 16 floats: x = n ln2 + r, |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial (relative error about
   1e-7), times 2^n built in the exponent bits. Below -87 (and -inf) gives exactly 0. */
static inline vf vexp(vf x) {
    vi dead = x < -87.0f;
    x = select_(dead, splat(-87.0f), x);
    x = select_(x > 88.0f, splat(88.0f), x);
    vf t = x * 1.44269504f + 12582912.0f; /* 1.5 x 2^23: rounds to the nearest integer in the low bits */
    vf n = t - 12582912.0f;
    vi ni = (vi)t - 0x4B400000;
    vf r = x - n * 0.693145752f;
    r = r - n * 1.42860677e-6f;
    vf p = splat(1.0f / 720);
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return select_(dead, splat(0.0f), p * (vf)((ni + 127) << 23));
}

/* Softmax of the scores s[0, columns) in place, unnormalised: e^(s - max); returns 1 / their sum, or 0 when
   every score is -inf (then all are 0). s is padded with -inf to whole vectors. */
static inline float softmax_unnormalised(float *s, int columns) {
    int whole = (columns + 15) / 16 * 16;
    vf m16 = splat(-INFINITY);
    for (int c = 0; c < whole; c += 16) {
        vf x = load(s + c);
        m16 = select_(x > m16, x, m16);
    }
    float m = -INFINITY;
    for (int j = 0; j < 16; j++) m = m16[j] > m ? m16[j] : m;
    if (m == -INFINITY) {
        memset(s, 0, sizeof(float) * whole);
        return 0.0f;
    }
    vf sum16 = splat(0.0f);
    for (int c = 0; c < whole; c += 16) {
        vf e = vexp(load(s + c) - m);
        store(s + c, e);
        sum16 += e;
    }
    float sum = 0.0f;
    for (int j = 0; j < 16; j++) sum += sum16[j];
    return 1.0f / sum;
}

/* One (row, key/value head): G queries of D features over `columns` columns; k and v point at the row's head in
   block 0 (tiles `block_stride` floats apart). s: G x `stride` floats of scratch. */
static inline __attribute__((always_inline)) void attend_item(const float *q, const float *k, const float *v, long block_stride,
                                                               const float *bias, int columns, int stride, float *s, float *out,
                                                               const int G, const int D) {
    for (int c0 = 0; c0 < columns; c0 += 16) {
        float b[16];
        int any = 0;
        for (int j = 0; j < 16; j++) {
            b[j] = c0 + j < columns ? bias[c0 + j] : -INFINITY;
            any |= b[j] != -INFINITY;
        }
        if (!any) { /* columns nobody may see: not read */
            for (int i = 0; i < G; i++) store(s + i * stride + c0, splat(-INFINITY));
            continue;
        }
        const float *kt = k + (c0 / BLOCK) * block_stride + (c0 % BLOCK) / 16 * D * 16; /* 16 columns' chunk */
        vf acc[8];
        for (int i = 0; i < G; i++) acc[i] = splat(0.0f);
        for (int f = 0; f < D; f++) {
            vf keys = load(kt + f * 16);
            for (int i = 0; i < G; i++) acc[i] += q[i * D + f] * keys;
        }
        vf bv = load(b);
        vi open = bv != -INFINITY;
        for (int i = 0; i < G; i++) store(s + i * stride + c0, select_(open, acc[i] + bv, splat(-INFINITY)));
    }
    float inv[8];
    for (int i = 0; i < G; i++) inv[i] = softmax_unnormalised(s + i * stride, columns);
    /* values: 16 x PASS features at a time, each query's sums in registers */
    const int CHUNKS = D / 16, FIT = ACCUMULATORS / G > 0 ? ACCUMULATORS / G : 1, PASS = CHUNKS < FIT ? CHUNKS : FIT;
    for (int f0 = 0; f0 < CHUNKS; f0 += PASS) {
        const int width = CHUNKS - f0 < PASS ? CHUNKS - f0 : PASS;
        vf acc[8][8];
        for (int i = 0; i < G; i++)
            for (int f = 0; f < width; f++) acc[i][f] = splat(0.0f);
        for (int c = 0; c < columns; c++) {
            float p[8];
            int any = 0;
            for (int i = 0; i < G; i++) {
                p[i] = s[i * stride + c];
                any |= p[i] != 0.0f;
            }
            if (!any) continue; /* masked for every query: not read */
            const float *vt = v + (c / BLOCK) * block_stride + (c % BLOCK) * D + f0 * 16;
            for (int f = 0; f < width; f++) {
                vf values = load(vt + f * 16);
                for (int i = 0; i < G; i++) acc[i][f] += p[i] * values;
            }
        }
        for (int i = 0; i < G; i++)
            for (int f = 0; f < width; f++) store(out + i * D + (f0 + f) * 16, acc[i][f] * inv[i]);
    }
}

#define ITEMS(G, D)                                                                                                      \
    static void attend_##G##_##D(const float *q, const float *keys, const float *values, const float *bias, float *out,  \
                                 int rows, int kv, int columns, long row_stride, long head_stride, long block_stride,  \
                                 long bias_stride, int threads) {                                                      \
        int stride = (columns + BLOCK - 1) / BLOCK * BLOCK;                                                              \
        _Pragma("omp parallel num_threads(threads)") {                                                                   \
            float *s = malloc(sizeof(float) * G * stride);                                                              \
            _Pragma("omp for schedule(dynamic, 4)") for (long item = 0; item < (long)rows * kv; item++) {               \
                long r = item / kv, offset = r * row_stride + (item % kv) * head_stride;                                \
                attend_item(q + item * G * D, keys + offset, values + offset, block_stride, bias + r * bias_stride,      \
                            columns, stride, s, out + item * G * D, G, D);                                              \
            }                                                                                                            \
            free(s);                                                                                                     \
        }                                                                                                                \
    }

#define SIZES(G) ITEMS(G, 64) ITEMS(G, 128)
SIZES(1) SIZES(2) SIZES(3) SIZES(4) SIZES(5) SIZES(6) SIZES(7) SIZES(8)

typedef void (*kernel)(const float *, const float *, const float *, const float *, float *, int, int, int, long, long, long,
                       long, int);
#define PAIR(G) {attend_##G##_64, attend_##G##_128}
static const kernel KERNELS[8][2] = {PAIR(1), PAIR(2), PAIR(3), PAIR(4), PAIR(5), PAIR(6), PAIR(7), PAIR(8)};

/* Returns 0 on success, -1 for sizes this file does not take (the caller uses torch's path). */
int posttrain_attend_f32(const float *q, const float *keys, const float *values, const float *bias, float *out, int rows,
                         int kv, int group, int head_dim, int block, int columns, long row_stride, long head_stride,
                         long block_stride, long bias_stride, int threads) {
    if (group < 1 || group > 8 || (head_dim != 64 && head_dim != 128) || block != BLOCK) return -1;
    KERNELS[group - 1][head_dim == 128](q, keys, values, bias, out, rows, kv, columns, row_stride, head_stride, block_stride,
                                        bias_stride, threads);
    return 0;
}

/* ---- The rest of a layer's step, each one pass over its data ---- */

/* RMS normalisation without a weight of x (features, rows), down each column: x / sqrt(mean of squares + eps). Each
   thread takes 16 columns at a time and reads x a feature (a row of memory) at a time, front to back. */
void posttrain_rms_norm_f32(const float *x, float *out, int features, int rows, float eps, int threads) {
    int chunks = (rows + 15) / 16;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int chunk = 0; chunk < chunks; chunk++) {
        int r = chunk * 16, n = rows - r < 16 ? rows - r : 16;
        float sum[16] = {0}, scale[16];
        for (int f = 0; f < features; f++) {
            const float *xf = x + (long)f * rows + r;
            for (int j = 0; j < n; j++) sum[j] += xf[j] * xf[j];
        }
        for (int j = 0; j < n; j++) scale[j] = 1.0f / sqrtf(sum[j] / (float)features + eps);
        for (int f = 0; f < features; f++) {
            const float *xf = x + (long)f * rows + r;
            float *of = out + (long)f * rows + r;
            for (int j = 0; j < n; j++) of[j] = xf[j] * scale[j];
        }
    }
}

/* silu(gate) * up for gate_up (2 x n values): gate the first n, up the rest; out n values. */
void posttrain_silu_mul_f32(const float *gate_up, float *out, long n, int threads) {
    long vectors = (n + 15) / 16;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long i = 0; i < vectors; i++) {
        long at = i * 16, m = n - at < 16 ? n - at : 16;
        float g16[16] = {0}, u16[16] = {0}, o16[16];
        memcpy(g16, gate_up + at, sizeof(float) * m);
        memcpy(u16, gate_up + n + at, sizeof(float) * m);
        vf g = load(g16);
        store(o16, g / (1.0f + vexp(-g)) * load(u16));
        memcpy(out + at, o16, sizeof(float) * m);
    }
}

/* Rotary embedding of q and k and the step's writes, for qkv (features, rows) as the projection gives it: q heads,
   then k heads, then v heads, D features each; cos and sin (rows, D). q goes to q_out as (rows, heads, D); k and v
   to column t of the key and value buffers (the layouts above, strides in floats). x cos + rotate_half(x) sin,
   rotate_half(x) = (-x2, x1). */
void posttrain_rotary_write_f32(const float *qkv, const float *cos, const float *sin, float *q_out, float *keys, float *values,
                                int rows, int heads, int kv, int head_dim, int t, long row_stride, long head_stride,
                                long block_stride, int threads) {
    const int D = head_dim, half = head_dim / 2, c = t % BLOCK;
    const long key_at = (t / BLOCK) * block_stride + (c / 16) * D * 16 + c % 16; /* feature e: 16 floats apart */
    const long value_at = (t / BLOCK) * block_stride + (long)c * D;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int r = 0; r < rows; r++) {
        const float *cr = cos + (long)r * D, *sr = sin + (long)r * D;
        for (int u = 0; u < heads + kv; u++) {
            const float *x = qkv + (long)u * D * rows + r; /* feature e of this head: x[e * rows] */
            float out[128];
            for (int e = 0; e < half; e++) {
                float x1 = x[(long)e * rows], x2 = x[(long)(e + half) * rows];
                out[e] = x1 * cr[e] - x2 * sr[e];
                out[e + half] = x2 * cr[e + half] + x1 * sr[e + half];
            }
            if (u < heads) {
                memcpy(q_out + ((long)r * heads + u) * D, out, sizeof(float) * D);
            } else {
                float *dst = keys + r * row_stride + (u - heads) * head_stride + key_at;
                for (int e = 0; e < D; e++) dst[e * 16] = out[e];
            }
        }
        for (int g = 0; g < kv; g++) {
            const float *x = qkv + (long)(heads + kv + g) * D * rows + r;
            float *dst = values + r * row_stride + g * head_stride + value_at;
            for (int e = 0; e < D; e++) dst[e] = x[(long)e * rows];
        }
    }
}

/* Columns [start, start + width) of rows' keys and values set from a prefilled cache's k and v (rows, kv heads,
   width, D): posttrain_put_columns in decode_kernels.c, in float32's layouts. */
void posttrain_put_columns_f32(const float *k, const float *v, float *keys, float *values, const int64_t *index, int rows,
                               int kv, int width, int head_dim, int start, long row_stride, long head_stride, long block_stride,
                               int threads) {
    const int D = head_dim, end = start + width;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long item = 0; item < (long)rows * kv; item++) {
        long r = item / kv, h = item % kv, at = (index ? index[r] : r) * row_stride + h * head_stride;
        const float *ks = k + item * width * D, *vs = v + item * width * D;
        for (int c = start; c < end; c++) { /* keys: (BLOCK / 16, D, 16) a block */
            float *dst = keys + at + (c / BLOCK) * block_stride + (c % BLOCK) / 16 * D * 16 + c % 16;
            const float *src = ks + (long)(c - start) * D;
            for (int e = 0; e < D; e++) dst[e * 16] = src[e];
        }
        for (int c = start; c < end; c++) /* values: (BLOCK, D) a block */
            memcpy(values + at + (c / BLOCK) * block_stride + (long)(c % BLOCK) * D, vs + (long)(c - start) * D, sizeof(float) * D);
    }
}

/* ---- sampling.py's kernels, for bf16 and float32 logits alike (every x86-64 build has them) ---- */

typedef uint16_t vh __attribute__((vector_size(32))); /* 16 bf16 */
typedef uint32_t vu __attribute__((vector_size(64)));

static inline vf load_f32(const float *p) { return load(p); }

static inline vf load_bf16(const uint16_t *p) { /* 16 bf16 as float32: their bits in the high halves */
    vh raw;
    memcpy(&raw, p, sizeof raw);
    return (vf)(__builtin_convertvector(raw, vu) << 16);
}

/* The first `have` (< 16) values from p, -inf past them (weight 0, never the largest). */
static inline vf tail_load_f32(const float *p, long have) {
    float part[16];
    memcpy(part, p, sizeof(float) * have);
    for (long j = have; j < 16; j++) part[j] = -INFINITY;
    return load(part);
}

static inline vf tail_load_bf16(const uint16_t *p, long have) {
    uint16_t part[16];
    memcpy(part, p, sizeof(uint16_t) * have);
    for (long j = have; j < 16; j++) part[j] = 0xff80; /* -inf in bf16 */
    return load_bf16(part);
}

/* Values c * 16 .. c * 16 + 15 of a row of n, -inf past n. */
#define CHUNK(LOAD, row, c, n) ((c) * 16 + 16 <= (n) ? LOAD((row) + (c) * 16) : tail_##LOAD((row) + (c) * 16, (n) - (c) * 16))

/* Greedy decoding's pick: the index of each row's largest logit in x (rows, n), the first where several tie, as
   torch's argmax gives it (whose CPU kernel took 2.6 ms for 64 rows of SmolLM2's 49k float32 logits, and needs a
   float32 copy of bf16 ones; a pass here about a tenth). Each lane of a vector keeps its own largest value and where
   it was (strictly larger replaces, so a lane keeps its first); the lanes holding the row's maximum then give the
   smallest index. Returns 0, or -1 when a row holds a NaN (torch's argmax takes NaN as the largest: the caller asks
   torch). */
#define ARGMAX(NAME, T, LOAD)                                                                                            \
    int NAME(const T *x, int64_t *out, int rows, long n, int threads) {                                                \
        int nan = 0;                                                                                                     \
        _Pragma("omp parallel for num_threads(threads) schedule(static) reduction(| : nan)")                             \
        for (int r = 0; r < rows; r++) {                                                                                 \
            const T *row = x + (long)r * n;                                                                              \
            vf best = splat(-INFINITY);                                                                                  \
            vi where = (vi){0}, lane = (vi){0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, odd = (vi){0};        \
            for (long c = 0; c < (n + 15) / 16; c++) {                                                                   \
                vf v = CHUNK(LOAD, row, c, n);                                                                           \
                vi larger = v > best;                                                                                    \
                best = select_(larger, v, best);                                                                         \
                where = (where & ~larger) | ((lane + (int32_t)(c * 16)) & larger);                                       \
                odd |= v != v;                                                                                           \
            }                                                                                                            \
            float m = -INFINITY;                                                                                         \
            long at = 0; /* every logit -inf: the first */                                                               \
            for (int j = 0; j < 16; j++)                                                                                 \
                if (best[j] > m || (best[j] == m && where[j] < at)) m = best[j], at = where[j];                          \
            for (int j = 0; j < 16; j++) nan |= odd[j] != 0;                                                             \
            out[r] = at;                                                                                                 \
        }                                                                                                                \
        return nan ? -1 : 0;                                                                                             \
    }

ARGMAX(posttrain_argmax_f32, float, load_f32)
ARGMAX(posttrain_argmax_bf16, uint16_t, load_bf16)

/* The same over logits laid out (n, rows), a row's logits `rows` apart: the vocabulary projection as W @ h gives it,
   with no transpose. Each thread takes a stretch of the vocabulary for every row (one running maximum and index per
   row, 16 rows a vector, up to 128 rows a pass), and the stretches are merged in order (strictly larger replaces,
   so the first maximum stays). */
#define ARGMAX_COLUMNS(NAME, T, LOAD)                                                                                    \
    int NAME(const T *x, int64_t *out, int rows, long n, int threads) {                                                \
        float *best = malloc(sizeof(float) * (size_t)threads * rows);                                                   \
        int32_t *where = malloc(sizeof(int32_t) * (size_t)threads * rows);                                              \
        int nan = 0, used = 1;                                                                                           \
        _Pragma("omp parallel num_threads(threads) reduction(| : nan)") {                                               \
            int t = omp_get_thread_num(), T_ = omp_get_num_threads();                                                    \
            _Pragma("omp single") used = T_;                                                                             \
            long lo = n * t / T_, hi = n * (t + 1) / T_;                                                                 \
            for (int r0 = 0; r0 < rows; r0 += 128) {                                                                     \
                int chunks = (rows - r0 + 15) / 16 < 8 ? (rows - r0 + 15) / 16 : 8;                                      \
                vf m[8];                                                                                                 \
                vi w[8], odd = (vi){0};                                                                                  \
                for (int j = 0; j < chunks; j++) m[j] = splat(-INFINITY), w[j] = (vi){0} + (int32_t)lo;                  \
                for (long i = lo; i < hi; i++) {                                                                         \
                    const T *at = x + i * rows + r0;                                                                     \
                    for (int j = 0; j < chunks; j++) {                                                                   \
                        vf v = CHUNK(LOAD, at, j, rows - r0); /* the last rows: -inf past them, never larger */          \
                        vi larger = v > m[j];                                                                            \
                        m[j] = select_(larger, v, m[j]);                                                                 \
                        w[j] = (w[j] & ~larger) | (((vi){0} + (int32_t)i) & larger);                                     \
                        odd |= v != v;                                                                                   \
                    }                                                                                                    \
                }                                                                                                        \
                for (int j = 0; j < chunks; j++)                                                                         \
                    for (int e = 0; e < 16 && 16 * j + e < rows - r0; e++) {                                             \
                        best[(long)t * rows + r0 + 16 * j + e] = m[j][e];                                                \
                        where[(long)t * rows + r0 + 16 * j + e] = w[j][e];                                               \
                    }                                                                                                    \
                for (int e = 0; e < 16; e++) nan |= odd[e] != 0;                                                         \
            }                                                                                                            \
        }                                                                                                                \
        for (int r = 0; r < rows; r++) {                                                                                 \
            float m = -INFINITY;                                                                                         \
            int64_t at = 0; /* every logit -inf: the first */                                                            \
            for (int t = 0; t < used; t++)                                                                               \
                if (best[(long)t * rows + r] > m) m = best[(long)t * rows + r], at = where[(long)t * rows + r];          \
            out[r] = at;                                                                                                 \
        }                                                                                                                \
        free(best);                                                                                                      \
        free(where);                                                                                                     \
        return nan ? -1 : 0;                                                                                             \
    }

ARGMAX_COLUMNS(posttrain_argmax_columns_f32, float, load_f32)
ARGMAX_COLUMNS(posttrain_argmax_columns_bf16, uint16_t, load_bf16)

/* The largest of a row's n values divided by t (as torch divides logits by a temperature: x / t, not x * (1 / t)),
   writing the quotients to `scaled` unless it is NULL; NaN when a value is NaN. */
#define ROW_MAX(T, LOAD)                                                                                                 \
    static inline float row_max_##LOAD(const T *row, long n, float t, float *scaled) {                                  \
        vf top = splat(-INFINITY);                                                                                       \
        vi odd = (vi){0};                                                                                                \
        for (long c = 0; c < (n + 15) / 16; c++) {                                                                       \
            vf v = CHUNK(LOAD, row, c, n) / t;                                                                           \
            if (scaled) store(scaled + c * 16, v);                                                                       \
            top = select_(v > top, v, top);                                                                              \
            odd |= v != v;                                                                                               \
        }                                                                                                                \
        float m = -INFINITY;                                                                                             \
        for (int j = 0; j < 16; j++) m = top[j] > m ? top[j] : m;                                                        \
        for (int j = 0; j < 16; j++)                                                                                     \
            if (odd[j]) return NAN;                                                                                      \
        return m;                                                                                                        \
    }

ROW_MAX(float, load_f32)
ROW_MAX(uint16_t, load_bf16)

/* For each k < count, row which[k] of x (·, n): the token drawn at temperature t[k] by the uniform u[k] in [0, 1),
   by inverse CDF over e^(x_i / t - max), as sampling.choose draws it (there over the softmax's float32
   probabilities in float64; here over the exponentials, in float64 sums of 16 at a time, the same order for the
   total and the search, so the search always ends inside the row). A token of weight 0 is never drawn. Returns 0,
   or -1 when a row holds a NaN or +inf or nothing but -inf (the caller asks torch). */
#define SAMPLER(NAME, T, LOAD)                                                                                           \
    int NAME(const T *x, const int64_t *which, int count, long n, const float *t, const double *u, int64_t *out,      \
             int threads) {                                                                                            \
        int bad = 0;                                                                                                     \
        long chunks = (n + 15) / 16;                                                                                     \
        _Pragma("omp parallel num_threads(threads) reduction(| : bad)") {                                               \
            float *e = malloc(sizeof(float) * chunks * 16);                                                             \
            double *sums = malloc(sizeof(double) * chunks);                                                             \
            _Pragma("omp for schedule(dynamic, 1)") for (int k = 0; k < count; k++) {                                   \
                float m = row_max_##LOAD(x + which[k] * n, n, t[k], e);                                                  \
                if (!(m > -INFINITY && m < INFINITY)) { /* NaN, +inf or every weight 0 */                               \
                    bad = 1;                                                                                             \
                    continue;                                                                                            \
                }                                                                                                        \
                double total = 0.0;                                                                                      \
                long last = -1; /* the last token of weight > 0 */                                                       \
                for (long c = 0; c < chunks; c++) {                                                                      \
                    vf w = vexp(load(e + c * 16) - m);                                                                   \
                    store(e + c * 16, w);                                                                                \
                    double sum = 0.0;                                                                                    \
                    for (int j = 0; j < 16; j++) sum += (double)w[j];                                                    \
                    sums[c] = sum;                                                                                       \
                    total += sum;                                                                                        \
                    for (int j = 15; j >= 0 && sum > 0.0; j--)                                                           \
                        if (w[j] > 0.0f) {                                                                               \
                            last = c * 16 + j;                                                                           \
                            break;                                                                                       \
                        }                                                                                                \
                }                                                                                                        \
                double target = u[k] * total, below = 0.0;                                                               \
                long pick = last;                                                                                        \
                for (long c = 0; c < chunks; c++) {                                                                      \
                    if (below + sums[c] <= target) {                                                                     \
                        below += sums[c];                                                                                \
                        continue;                                                                                        \
                    }                                                                                                    \
                    double run = below; /* the first token whose running sum passes the target, within this chunk */     \
                    for (int j = 0; j < 16; j++) {                                                                       \
                        if (e[c * 16 + j] <= 0.0f) continue;                                                             \
                        pick = c * 16 + j;                                                                               \
                        run += (double)e[c * 16 + j];                                                                    \
                        if (run > target) break;                                                                         \
                    }                                                                                                    \
                    break;                                                                                               \
                }                                                                                                        \
                out[k] = pick;                                                                                           \
            }                                                                                                            \
            free(e);                                                                                                     \
            free(sums);                                                                                                  \
        }                                                                                                                \
        return bad ? -1 : 0;                                                                                             \
    }

SAMPLER(posttrain_sample_f32, float, load_f32)
SAMPLER(posttrain_sample_bf16, uint16_t, load_bf16)

/* For each k < count, row which[k] of x (·, n): the log-probability of token tokens[k] under the row's softmax at
   temperature 1 (what sampling.pick reports, whatever the token was drawn at): x_token - max - log(sum e^(x - max)),
   the exponentials summed in float64 (torch's logsumexp sums them in float32). Returns 0, or -1 when a row holds a
   NaN or +inf or nothing but -inf (the caller asks torch). */
#define LOGPROB(NAME, T, LOAD)                                                                                           \
    int NAME(const T *x, const int64_t *which, int count, long n, const int64_t *tokens, float *out, int threads) {   \
        int bad = 0;                                                                                                     \
        _Pragma("omp parallel for num_threads(threads) schedule(dynamic, 1) reduction(| : bad)")                         \
        for (int k = 0; k < count; k++) {                                                                                \
            const T *row = x + which[k] * n;                                                                             \
            float m = row_max_##LOAD(row, n, 1.0f, NULL);                                                                \
            if (!(m > -INFINITY && m < INFINITY)) {                                                                      \
                bad = 1;                                                                                                 \
                continue;                                                                                                \
            }                                                                                                            \
            double total = 0.0;                                                                                          \
            for (long c = 0; c < (n + 15) / 16; c++) {                                                                   \
                vf w = vexp(CHUNK(LOAD, row, c, n) - m);                                                                 \
                for (int j = 0; j < 16; j++) total += (double)w[j];                                                      \
            }                                                                                                            \
            vf one = tail_##LOAD(row + tokens[k], 1);                                                                    \
            out[k] = (float)((double)one[0] - (double)m - log(total));                                                   \
        }                                                                                                                \
        return bad ? -1 : 0;                                                                                             \
    }

LOGPROB(posttrain_logprob_f32, float, load_f32)
LOGPROB(posttrain_logprob_bf16, uint16_t, load_bf16)
