// The nibble-row family of the native CPU int4 kernels: nq_caps, nq_dequant, nq_linear, nq_linear_bf16_64 /
// nq_layer_bf16 and nq_bf16_roundtrip (the T16-layout kernels are in t16.c; return codes in nq_shared.h).
// Layout ("nibble rows"): q (N, K/2) uint8, byte j of row n holds k = 2j (low nibble) and k = 2j + 1 (high nibble);
// scale (N, K/G) fp32, bf16 or fp16, zero (N, K/G) uint8.
//
// Every weight is w = (q - z) * s computed in fp32 and rounded once (to nearest even) to the compute dtype,
// bit-identical to nvila_quant.numerics.quantizer.dequantize(...).to(dtype): per (row, group) the 16 possible
// values are computed once into a register table and looked up with vpermw / vpermps (the T16 kernels apply
// (q - z) * s per group instead).
//
//   nq_dequant         (N, K) bf16 or fp32 weights (dense-matmul path for many tokens)
//   nq_linear          y (M, N) = x (M, K) @ w^T + bias, fused: bf16 x with vdpbf16ps (fp32 accumulation) or
//                      fp32 x with FMA. Tokens go in blocks of up to 8 per pass over a weight row.
//   nq_linear_bf16_64  the bf16 kernel for K and group multiples of 64: 4 weight rows at a time, tokens in passes
//                      of 6 (rows_bf16_64); nq_layer_bf16 is the same with the weights bound once in an nq_layer.
#include "nq_shared.h"

int nq_caps(void) {
    int caps = 0;
#ifdef __AVX512F__
    caps |= 1;
#endif
#if NQ_HAVE_BF16
    caps |= 2;
#endif
#if (defined(__AVX512F__) && defined(__AVX512BW__)) || NQ_T16_AVX2
    caps |= 4;  // the fp32 T16 kernel
#endif
#if NQ_HAVE_AMX
    caps |= 8;  // the AMX T16 kernel is compiled in (usable after nq_amx_init)
#endif
#if NQ_HAVE_VNNI
    caps |= 16;  // the integer (VNNI) T16 kernels: fp32 activations, and bf16 ones with caps & 2
#endif
    return caps;
}

#ifdef __AVX512F__
// 16 bytes of nibbles -> 32 int16 lanes [lo0, hi0, lo1, hi1, ...] = table indices in k order
static inline __m512i nibble_idx32(const uint8_t* p) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
    const __m512i lo = _mm512_and_si512(b, _mm512_set1_epi32(15));
    const __m512i hi = _mm512_slli_epi32(_mm512_srli_epi32(b, 4), 16);
    return _mm512_or_si512(lo, hi);
}

// 8 bytes of nibbles -> 16 int32 lanes [lo0, hi0, ..., lo7, hi7]
static inline __m512i nibble_idx16(const uint8_t* p) {
    const __m512i b = _mm512_cvtepu8_epi64(_mm_loadl_epi64((const __m128i*)p));
    const __m512i lo = _mm512_and_si512(b, _mm512_set1_epi64(15));
    const __m512i hi = _mm512_slli_epi64(_mm512_srli_epi64(b, 4), 32);
    return _mm512_or_si512(lo, hi);
}

// the 16 dequantized values (q - z) * s, q = 0..15, in fp32
static inline __m512 table_f32(float s, float z) {
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(z)), _mm512_set1_ps(s));
}
#endif

#if NQ_HAVE_BF16
static inline __m512i table_bf16(float s, float z) {
    const __m256bh h = _mm512_cvtneps_pbh(table_f32(s, z));  // round to nearest even
    __m256i hi;
    memcpy(&hi, &h, sizeof hi);
    return _mm512_zextsi256_si512(hi);
}
#endif

#if NQ_HAVE_BF16
// The 16 values duplicated into both 256-bit halves: vpermw reads index bits [4:0], so a raw byte
// (lo nibble + bit 4) indexes the low nibble's value without masking.
static inline __m512i table2_bf16(float s, float z) {
    const __m256bh h = _mm512_cvtneps_pbh(table_f32(s, z));
    __m256i v;
    memcpy(&v, &h, sizeof v);
    return _mm512_broadcast_i64x4(v);
}
#endif

int nq_dequant(const uint8_t* q, const void* scale, const uint8_t* zero, void* out, int64_t n, int64_t k,
               int64_t group, int bf16, int nthreads, int scale_kind) {
#ifndef __AVX512F__
    (void)q; (void)scale; (void)zero; (void)out; (void)n; (void)k; (void)group; (void)bf16; (void)nthreads; (void)scale_kind;
    return -2;
#else
    if (bad_shape(n, k, group) || scale_kind < 0 || scale_kind > 2) return -1;
#if !NQ_HAVE_BF16
    if (bf16) return -2;
#endif
    const nq_meta meta = {scale, zero, scale_kind};
    const int64_t ng = k / group;
#if NQ_HAVE_BF16
    uint16_t il[64];  // interleave even (0..31) and odd (32..63) lanes: e0 o0 e1 o1 ...
    for (int j = 0; j < 32; ++j) {
        il[2 * j] = (uint16_t)j;
        il[2 * j + 1] = (uint16_t)(32 + j);
    }
    const __m512i il_lo = _mm512_loadu_si512(il), il_hi = _mm512_loadu_si512(il + 32);
#endif
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 16)
    for (int64_t r = 0; r < n; ++r) {
        const uint8_t* qr = q + r * (k / 2);
        for (int64_t g = 0; g < ng; ++g) {
            const float s = scale_at(meta, r * ng + g), z = zero_at(meta, r * ng + g);
            if (bf16) {
#if NQ_HAVE_BF16
                uint16_t* o = (uint16_t*)out + r * k;
                if (group % 64 == 0) {  // 64 weights per step: even / odd k looked up, then interleaved
                    const __m512i t = table2_bf16(s, z);
                    for (int64_t kk = g * group; kk < (g + 1) * group; kk += 64) {
                        const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(qr + kk / 2)));
                        const __m512i e = _mm512_permutexvar_epi16(b, t);
                        const __m512i od = _mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), t);
                        _mm512_storeu_si512(o + kk, _mm512_permutex2var_epi16(e, il_lo, od));
                        _mm512_storeu_si512(o + kk + 32, _mm512_permutex2var_epi16(e, il_hi, od));
                    }
                } else {
                    const __m512i t = table_bf16(s, z);
                    for (int64_t kk = g * group; kk < (g + 1) * group; kk += 32)
                        _mm512_storeu_si512(o + kk, _mm512_permutexvar_epi16(nibble_idx32(qr + kk / 2), t));
                }
#endif
            } else {
                const __m512 t = table_f32(s, z);
                float* o = (float*)out + r * k;
                for (int64_t kk = g * group; kk < (g + 1) * group; kk += 16)
                    _mm512_storeu_ps(o + kk, _mm512_permutexvar_ps(nibble_idx16(qr + kk / 2), t));
            }
        }
    }
    return 0;
#endif
}

#if NQ_HAVE_BF16
// one weight row against MB tokens (MB a compile-time constant after inlining)
static inline __attribute__((always_inline)) void row_bf16(
    const uint16_t* x, const uint8_t* qr, const nq_meta md, const int64_t base, int64_t k, int64_t group,
    const int mb, float* acc_out) {
    __m512 acc[8];
    for (int m = 0; m < mb; ++m) acc[m] = _mm512_setzero_ps();
    const int64_t ng = k / group;
    for (int64_t g = 0; g < ng; ++g) {
        const __m512i t = table_bf16(scale_at(md, base + g), zero_at(md, base + g));
        for (int64_t kk = g * group; kk < (g + 1) * group; kk += 32) {
            const __m512i w = _mm512_permutexvar_epi16(nibble_idx32(qr + kk / 2), t);
            __m512bh wb;
            memcpy(&wb, &w, sizeof wb);
            for (int m = 0; m < mb; ++m) {
                const __m512i xv = _mm512_loadu_si512(x + m * k + kk);
                __m512bh xb;
                memcpy(&xb, &xv, sizeof xb);
                acc[m] = _mm512_dpbf16_ps(acc[m], wb, xb);
            }
        }
    }
    for (int m = 0; m < mb; ++m) acc_out[m] = _mm512_reduce_add_ps(acc[m]);
}
#endif

#if NQ_HAVE_BF16
#define NQ_MB 6  // tokens per pass over a block of 4 weight rows (4 x 6 accumulators)
// Passes after a row block's first reuse its dequantized rows: the first pass stores them (bf16, 4 x K) into a
// per-thread buffer that stays in L1/L2, later passes load them instead of unpacking the nibbles again.
#define NQ_ON_THE_FLY 0
#define NQ_TO_BUF 1
#define NQ_FROM_BUF 2

// One 64-wide chunk: R dequantized rows (even k, odd k) against MB tokens of de-interleaved x (xc = the chunk of
// token 0, tokens k apart); each token's x loaded once, used by all R rows. E = 2: separate even / odd accumulators.
static inline __attribute__((always_inline)) void chunk_dots(
    const uint16_t* xc, int64_t k, const __m512bh* we, const __m512bh* wo, const int R, const int MB, const int E,
    __m512 acc[4][NQ_MB][2]) {
    for (int m = 0; m < MB; ++m) {
        const __m512i a = _mm512_loadu_si512(xc + m * k);
        const __m512i b = _mm512_loadu_si512(xc + m * k + 32);
        __m512bh xe, xo;
        memcpy(&xe, &a, sizeof xe);
        memcpy(&xo, &b, sizeof xo);
        for (int r = 0; r < R; ++r) {
            acc[r][m][0] = _mm512_dpbf16_ps(acc[r][m][0], we[r], xe);
            acc[r][m][E - 1] = _mm512_dpbf16_ps(acc[r][m][E - 1], wo[r], xo);
        }
    }
}

// R weight rows x MB tokens over 64-wide K chunks. x is pre-permuted per chunk: positions 0..31 hold the even
// k of the chunk, 32..63 the odd k (matching the low / high nibbles of its 32 bytes). E = 2 keeps separate
// even/odd accumulators (more independent chains when R * MB is small).
static inline __attribute__((always_inline)) void rows_bf16_64(
    const uint16_t* xp, const uint8_t* q, int64_t qstride, const nq_meta md, const int64_t base, int64_t ng,
    int64_t k, int64_t group, const int R, const int MB, float* acc_out, uint16_t* wbuf, const int mode) {
    const int E = R * MB <= 8 ? 2 : 1;
    __m512 acc[4][NQ_MB][2];
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < MB; ++m)
            for (int e = 0; e < E; ++e) acc[r][m][e] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; ++g) {
        __m512i t[4];
        for (int r = 0; mode != NQ_FROM_BUF && r < R; ++r)  // later passes read dequantized rows: no tables
            t[r] = table2_bf16(scale_at(md, base + r * ng + g), zero_at(md, base + r * ng + g));
        for (int64_t kk = g * group; kk < (g + 1) * group; kk += 64) {
            __m512bh we[4], wo[4];  // the chunk's R rows dequantized once (even k, odd k)
            uint16_t* wb = wbuf ? wbuf + (kk / 64) * R * 64 : 0;  // this chunk's rows in the block's buffer
            for (int r = 0; r < R; ++r) {
                __m512i e, o;
                if (mode == NQ_FROM_BUF) {  // dequantized by the block's first token pass
                    e = _mm512_load_si512(wb + r * 64);
                    o = _mm512_load_si512(wb + r * 64 + 32);
                } else {
                    // prefetch the same columns of the next row block (never faults, even past the end)
                    _mm_prefetch((const char*)(q + (r + R) * qstride + kk / 2), _MM_HINT_T0);
                    const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(q + r * qstride + kk / 2)));
                    e = _mm512_permutexvar_epi16(bytes, t[r]);
                    o = _mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), t[r]);
                    if (mode == NQ_TO_BUF) {
                        _mm512_store_si512(wb + r * 64, e);
                        _mm512_store_si512(wb + r * 64 + 32, o);
                    }
                }
                memcpy(&we[r], &e, sizeof e);
                memcpy(&wo[r], &o, sizeof o);
            }
            chunk_dots(xp + kk, k, we, wo, R, MB, E, acc);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < MB; ++m)
            acc_out[r * NQ_MB + m] = _mm512_reduce_add_ps(E == 2 ? _mm512_add_ps(acc[r][m][0], acc[r][m][1]) : acc[r][m][0]);
}

#define NQ_ROWS_CASE(RR, MM) rows_bf16_64(xb, qr, k / 2, meta, (r0 + r1) * ng, ng, k, group, RR, MM, acc, wb, mode)

// x (M, K) bf16 in natural order; needs k % 64 == 0 and group % 64 == 0. Each 64-wide chunk of x is first
// de-interleaved (even k, then odd k: the order rows_bf16_64 unpacks nibbles in) into a scratch copy.
int nq_linear_bf16_64(const uint16_t* x, const uint8_t* q, const void* scale, const uint8_t* zero,
                      const float* bias, uint16_t* out, int64_t m_tokens, int64_t n, int64_t k, int64_t group,
                      int nthreads, int scale_kind) {
    if (bad_shape(n, k, group) || m_tokens < 0 || k % 64 || group % 64 || scale_kind < 0 || scale_kind > 2) return -1;
    if (m_tokens == 0) return 0;
    const nq_meta meta = {scale, zero, scale_kind};
    uint16_t* xp = (uint16_t*)aligned_alloc(64, (size_t)(m_tokens * k) * sizeof(uint16_t));  // m*k*2 % 64 == 0
    if (!xp) return -3;
    uint16_t idx[32];
    for (int j = 0; j < 32; ++j) idx[j] = (uint16_t)(2 * j);
    const __m512i even = _mm512_loadu_si512(idx);  // 0, 2, ..., 62 over the pair (a, b)
    const __m512i odd = _mm512_add_epi16(even, _mm512_set1_epi16(1));
    for (int64_t i = 0; i < m_tokens * k; i += 64) {
        const __m512i a = _mm512_loadu_si512(x + i), b = _mm512_loadu_si512(x + i + 32);
        _mm512_store_si512(xp + i, _mm512_permutex2var_epi16(a, even, b));
        _mm512_store_si512(xp + i + 32, _mm512_permutex2var_epi16(a, odd, b));
    }
    const int64_t ng = k / group;
    const int64_t blocks = (n + 3) / 4;
    const int passes = (int)((m_tokens + NQ_MB - 1) / NQ_MB);
#pragma omp parallel num_threads(nthreads)
    {
    uint16_t* buf = passes > 1 ? (uint16_t*)aligned_alloc(64, (size_t)(4 * k) * sizeof(uint16_t)) : 0;
#pragma omp for schedule(dynamic, 16)
    for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t r0 = blk * 4;
        const int rows = (int)(n - r0 < 4 ? n - r0 : 4);
        for (int64_t m0 = 0; m0 < m_tokens; m0 += NQ_MB) {
            const int mb = (int)(m_tokens - m0 < NQ_MB ? m_tokens - m0 : NQ_MB);
            const uint16_t* xb = xp + m0 * k;
            float acc[4 * NQ_MB] = {0};
            const int rr = rows == 4 ? 4 : 1;
            uint16_t* wb = rr == 4 ? buf : 0;  // a no-buffer thread (allocation failed) unpacks every pass
            const int mode = !wb ? NQ_ON_THE_FLY : m0 == 0 ? NQ_TO_BUF : NQ_FROM_BUF;
            for (int r1 = 0; r1 < rows; r1 += rr) {
                const uint8_t* qr = q + (r0 + r1) * (k / 2);
                if (rr == 4) {
                    switch (mb) {
                        case 1: NQ_ROWS_CASE(4, 1); break;
                        case 2: NQ_ROWS_CASE(4, 2); break;
                        case 3: NQ_ROWS_CASE(4, 3); break;
                        case 4: NQ_ROWS_CASE(4, 4); break;
                        case 5: NQ_ROWS_CASE(4, 5); break;
                        default: NQ_ROWS_CASE(4, 6); break;
                    }
                } else {
                    switch (mb) {
                        case 1: NQ_ROWS_CASE(1, 1); break;
                        case 2: NQ_ROWS_CASE(1, 2); break;
                        case 3: NQ_ROWS_CASE(1, 3); break;
                        case 4: NQ_ROWS_CASE(1, 4); break;
                        case 5: NQ_ROWS_CASE(1, 5); break;
                        default: NQ_ROWS_CASE(1, 6); break;
                    }
                }
                for (int r = 0; r < rr; ++r)
                    for (int m = 0; m < mb; ++m)
                        out[(m0 + m) * n + r0 + r1 + r] =
                            f32_to_bf16(acc[r * NQ_MB + m] + (bias ? bias[r0 + r1 + r] : 0.f));
            }
        }
    }
    free(buf);
    }
    free(xp);
    return 0;
}
#undef NQ_ROWS_CASE
#endif

int nq_linear_bf16_64(const uint16_t* x, const uint8_t* q, const void* scale, const uint8_t* zero,
                      const float* bias, uint16_t* out, int64_t m_tokens, int64_t n, int64_t k, int64_t group,
                      int nthreads, int scale_kind);

// the bf16 kernel on an nq_layer (nq_shared.h) bound to nibble rows
int nq_layer_bf16(const nq_layer* layer, const uint16_t* x, uint16_t* out, int64_t m_tokens, int nthreads) {
    return nq_linear_bf16_64(x, layer->q, layer->scale, layer->zero, layer->bias, out, m_tokens, layer->n, layer->k,
                             layer->group, nthreads, (int)layer->scale_kind);
}
#if !NQ_HAVE_BF16
int nq_linear_bf16_64(const uint16_t* x, const uint8_t* q, const void* scale, const uint8_t* zero,
                      const float* bias, uint16_t* out, int64_t m_tokens, int64_t n, int64_t k, int64_t group,
                      int nthreads, int scale_kind) {
    (void)x; (void)q; (void)scale; (void)zero; (void)bias; (void)out; (void)m_tokens; (void)n; (void)k;
    (void)group; (void)nthreads; (void)scale_kind;
    return -2;
}
#endif

#ifdef __AVX512F__
static inline __attribute__((always_inline)) void row_f32(
    const float* x, const uint8_t* qr, const nq_meta md, const int64_t base, int64_t k, int64_t group,
    const int mb, float* acc_out) {
    __m512 acc[8];
    for (int m = 0; m < mb; ++m) acc[m] = _mm512_setzero_ps();
    const int64_t ng = k / group;
    for (int64_t g = 0; g < ng; ++g) {
        const __m512 t = table_f32(scale_at(md, base + g), zero_at(md, base + g));
        for (int64_t kk = g * group; kk < (g + 1) * group; kk += 16) {
            const __m512 w = _mm512_permutexvar_ps(nibble_idx16(qr + kk / 2), t);
            for (int m = 0; m < mb; ++m) acc[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * k + kk), acc[m]);
        }
    }
    for (int m = 0; m < mb; ++m) acc_out[m] = _mm512_reduce_add_ps(acc[m]);
}
#endif

// x (M, K) bf16 (bf16 != 0) or fp32; bias (N,) fp32 or NULL; out (M, N) in x's dtype.
int nq_linear(const void* x, const uint8_t* q, const void* scale, const uint8_t* zero, const float* bias,
              void* out, int64_t m_tokens, int64_t n, int64_t k, int64_t group, int bf16, int nthreads,
              int scale_kind) {
#ifndef __AVX512F__
    (void)x; (void)q; (void)scale; (void)zero; (void)bias; (void)out; (void)m_tokens; (void)n; (void)k;
    (void)group; (void)bf16; (void)nthreads; (void)scale_kind;
    return -2;
#else
    if (bad_shape(n, k, group) || m_tokens < 0 || scale_kind < 0 || scale_kind > 2) return -1;
#if !NQ_HAVE_BF16
    if (bf16) return -2;
#endif
    const nq_meta meta = {scale, zero, scale_kind};
    const int64_t ng = k / group;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 16)
    for (int64_t r = 0; r < n; ++r) {
        const uint8_t* qr = q + r * (k / 2);
        const int64_t base = r * ng;
        const float b = bias ? bias[r] : 0.f;
        for (int64_t m0 = 0; m0 < m_tokens; m0 += 8) {
            const int mb = (int)(m_tokens - m0 < 8 ? m_tokens - m0 : 8);
            float acc[8];
            if (bf16) {
#if NQ_HAVE_BF16
                const uint16_t* xb = (const uint16_t*)x + m0 * k;
                switch (mb) {
                    case 1: row_bf16(xb, qr, meta, base, k, group, 1, acc); break;
                    case 2: row_bf16(xb, qr, meta, base, k, group, 2, acc); break;
                    case 3: row_bf16(xb, qr, meta, base, k, group, 3, acc); break;
                    case 4: row_bf16(xb, qr, meta, base, k, group, 4, acc); break;
                    case 5: row_bf16(xb, qr, meta, base, k, group, 5, acc); break;
                    case 6: row_bf16(xb, qr, meta, base, k, group, 6, acc); break;
                    case 7: row_bf16(xb, qr, meta, base, k, group, 7, acc); break;
                    default: row_bf16(xb, qr, meta, base, k, group, 8, acc); break;
                }
                for (int m = 0; m < mb; ++m) ((uint16_t*)out)[(m0 + m) * n + r] = f32_to_bf16(acc[m] + b);
#endif
            } else {
                const float* xf = (const float*)x + m0 * k;
                switch (mb) {
                    case 1: row_f32(xf, qr, meta, base, k, group, 1, acc); break;
                    case 2: row_f32(xf, qr, meta, base, k, group, 2, acc); break;
                    case 3: row_f32(xf, qr, meta, base, k, group, 3, acc); break;
                    case 4: row_f32(xf, qr, meta, base, k, group, 4, acc); break;
                    case 5: row_f32(xf, qr, meta, base, k, group, 5, acc); break;
                    case 6: row_f32(xf, qr, meta, base, k, group, 6, acc); break;
                    case 7: row_f32(xf, qr, meta, base, k, group, 7, acc); break;
                    default: row_f32(xf, qr, meta, base, k, group, 8, acc); break;
                }
                for (int m = 0; m < mb; ++m) ((float*)out)[(m0 + m) * n + r] = acc[m] + b;
            }
        }
    }
    return 0;
#endif
}

// keep the scalar helper referenced for non-AVX-512 builds (documentation of the rounding rule)
float nq_bf16_roundtrip(float f) { return bf16_to_f32(f32_to_bf16(f)); }
