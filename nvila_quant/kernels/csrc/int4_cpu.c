// Native CPU kernels for int4 weights: plain C + AVX-512 intrinsics, built with the system C compiler
// (-O3 -march=native -fopenmp) and loaded with ctypes. OpenMP resolves to the libgomp.so.1 torch has already
// loaded, so these kernels share torch's thread pool. Rows are handed out dynamically (a shared or busy core
// slows one thread, not the whole call).
//
// Weight layout ("nibble rows"): q (N, K/2) uint8, byte j of row n holds k = 2j (low nibble) and
// k = 2j + 1 (high nibble). scale (N, K/G) fp32, bf16 or fp16, zero (N, K/G) uint8.
// Every weight is w = (q - z) * s computed in fp32 and rounded once (to nearest even) to the compute dtype,
// bit-identical to nvila_quant.quant.primitives.dequantize(...).to(dtype): per (row, group) the 16 possible
// values are computed once into a register table and looked up with vpermw / vpermps (the T16 kernels apply
// (q - z) * s per group instead).
//
//   nq_dequant         (N, K) bf16 or fp32 weights (dense-matmul path for many tokens)
//   nq_linear          y (M, N) = x (M, K) @ w^T + bias, fused: bf16 x with vdpbf16ps (fp32 accumulation) or
//                      fp32 x with FMA. Tokens go in blocks of up to 8 per pass over a weight row.
//   nq_linear_bf16_64  the bf16 kernel for K and group multiples of 64: 4 weight rows at a time, tokens in passes
//                      of 6 (rows_bf16_64); nq_layer_bf16 is the same with the weights bound once in an nq_layer.
//   nq_t16_bf16 / nq_t16_f32  the kernels on the T16 layout (below), every token count; they hand calls to the int16
//                      VNNI kernels for few tokens (t16_vnni.c) and, for bf16, to the AMX ones (t16_amx.c, after
//                      nq_amx_init) by the nq_set_*_tokens thresholds.
// Return codes: 0 ok, -1 bad arguments, -2 not compiled for this CPU (no AVX-512 F/BW/BF16), -3 out of memory.
#include "int4_cpu.h"

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

// One layer's weights bound once (kernels/cpu_native.py NativeLayer), so a decode step's call passes 4 values.
// For nq_layer_t16_*: q is the T16 layout and scale / zero are transposed (K/G, N).
typedef struct {
    const uint8_t* q;
    const void* scale;
    const uint8_t* zero;
    const float* bias;
    int64_t n, k, group, scale_kind;
} nq_layer;

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

// ---------------------------------------------------------------------------------------------------------------
// "T16" layout: the weights of 16 consecutive output rows interleaved so that one 32-byte load, zero-extended to
// words, holds two VNNI tiles (16 rows x one k pair each; lane j = row j, 32 bits = its (k, k + 1) pair):
//   t16[N/16][K/64][u = 0..15][byte b = 0..31], row = 16 * block + b / 2, e = b % 2,
//   low nibble = q[row][64 c + 2 u + e], high nibble = q[row][64 c + 32 + 2 u + e].
// Built once per layer on load (nq_t16_pack); same size as nibble rows. The kernels accumulate 16 output rows per
// vector (broadcast activations, no horizontal sums), which is what makes many tokens as fast as a dense bf16
// GEMM. Needs N % 16 == 0, K % 64 == 0, group % 64 == 0. Scales and zero points are read transposed, (K/G, N).
// Per 16-row unit and 64-wide chunk: row r's 32 bytes B (B[j] = k 2j | k 2j+1 << 4) and the unit's 16 x 32 bytes
// T[u][2r + e] = k (2u + e) | k (32 + 2u + e) << 4 of row r, i.e. T[u][2r] = (B[u] & 15) | (B[16+u] & 15) << 4 and
// T[u][2r + 1] = B[u] >> 4 | (B[16+u] & 0xF0).
static int t16_convert(const uint8_t* rows_in, const uint8_t* t16_in, uint8_t* out, int64_t n, int64_t k) {
    if (n % 16 || k % 64 || n < 0 || k <= 0) return -1;
    const int64_t nc = k / 64;
#pragma omp parallel for schedule(static)
    for (int64_t nb = 0; nb < n / 16; ++nb)
        for (int64_t c = 0; c < nc; ++c)
            for (int r = 0; r < 16; ++r) {
                const int64_t rb = (nb * 16 + r) * (k / 2) + c * 32, tb = (nb * nc + c) * 512 + 2 * r;
                for (int u = 0; u < 16; ++u) {
                    if (rows_in) {  // pack
                        const uint8_t b0 = rows_in[rb + u], b1 = rows_in[rb + 16 + u];
                        out[tb + u * 32] = (uint8_t)((b0 & 15) | (b1 & 15) << 4);
                        out[tb + u * 32 + 1] = (uint8_t)(b0 >> 4 | (b1 & 0xF0));
                    } else {  // unpack
                        const uint8_t t0 = t16_in[tb + u * 32], t1 = t16_in[tb + u * 32 + 1];
                        out[rb + u] = (uint8_t)((t0 & 15) | (t1 & 15) << 4);
                        out[rb + 16 + u] = (uint8_t)(t0 >> 4 | (t1 & 0xF0));
                    }
                }
            }
    return 0;
}

int nq_t16_pack(const uint8_t* rows, uint8_t* t16, int64_t n, int64_t k) { return t16_convert(rows, 0, t16, n, k); }

int nq_t16_unpack(const uint8_t* t16, uint8_t* rows, int64_t n, int64_t k) { return t16_convert(0, t16, rows, n, k); }

// Which kernel nq_t16_bf16 (f32 = 0) / nq_t16_f32 (f32 = 1) runs for m_tokens rows, by the nq_set_*_tokens
// thresholds: NQ_ROUTE_VNNI, NQ_ROUTE_AMX_TILES, NQ_ROUTE_AMX_GEMM (bf16 only, once AMX state is granted) or
// NQ_ROUTE_PLAIN (vdpbf16ps / FMA). The dispatchers and Python's t16_route both read it.
int nq_t16_route(int64_t m_tokens, int f32) {
#if NQ_HAVE_VNNI
    if (m_tokens <= (f32 ? nq_vnni_f32_max_tokens : nq_vnni_max_tokens)) return NQ_ROUTE_VNNI;
#endif
#if NQ_HAVE_AMX
    if (!f32 && nq_amx_state == 1 && m_tokens >= nq_amx_gemm_min_tokens) return NQ_ROUTE_AMX_GEMM;
    if (!f32 && nq_amx_state == 1 && m_tokens >= nq_amx_min_tokens) return NQ_ROUTE_AMX_TILES;
#endif
    (void)m_tokens;
    (void)f32;
    return NQ_ROUTE_PLAIN;
}

// W^T for the dense path, straight from the T16 layout (no unpack to rows): out (K, 16 units) row-major, element
// (k, 16 j + r) = (q - z) * s of weight row 16 (u0 + j) + r, computed in fp32 and rounded once to fp32 (bf16 = 0) or
// bf16 (bf16 = 1, AVX-512 BF16) - bit-identical to nq_dequant's rows. A T16 row (16 weight rows x k pairs 2u, 2u + 1
// in its low nibbles, 32 + 2u, 33 + 2u in its high ones) is two 16-wide stretches of four rows of W^T.
int nq_t16_dequant_t(const uint8_t* t16, const void* scale_t, const uint8_t* zero_t, void* out, int64_t n, int64_t k,
                     int64_t group, int64_t u0, int64_t units, int bf16, int nthreads, int scale_kind) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    if (bad_shape(n, k, group) || n % 16 || k % 64 || group % 64 || u0 < 0 || units < 0 || u0 + units > n / 16 ||
        scale_kind < 0 || scale_kind > 2)
        return -1;
#if !NQ_HAVE_BF16
    if (bf16) return -2;
#endif
    const nq_meta md = {scale_t, zero_t, scale_kind};
    const int64_t nc = k / 64, ld = 16 * units;
    // words (r, e) of a widened T16 row -> [e = 0: r 0..15 | e = 1: r 0..15]
    static const uint16_t order[32] = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30,
                                       1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
    const __m512i split = _mm512_loadu_si512(order);
    const __m512i low = _mm512_set1_epi16(15);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t c = 0; c < nc; ++c)  // 64 rows of W^T per chunk, each written left to right (unit after unit)
        for (int u = 0; u < 16; ++u)
            for (int64_t j = 0; j < units; ++j) {
                const int64_t at = (c * 64 / group) * n + (u0 + j) * 16;
                const __m512 s = t16_scales(md, at);
                const __m512i z = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(md.z + at)));
                const __m512i w = _mm512_cvtepu8_epi16(
                    _mm256_loadu_si256((const __m256i*)(t16 + ((u0 + j) * nc + c) * 512 + 32 * u)));
                const __m512i halves[2] = {_mm512_permutexvar_epi16(split, _mm512_and_si512(w, low)),
                                           _mm512_permutexvar_epi16(split, _mm512_srli_epi16(w, 4))};
                for (int h = 0; h < 2; ++h)      // low nibbles: k in [64c, 64c + 32); high: the upper half
                    for (int e = 0; e < 2; ++e) {  // k = 64c + 32h + 2u + e
                        const __m256i q16 = e ? _mm512_extracti64x4_epi64(halves[h], 1) : _mm512_castsi512_si256(halves[h]);
                        const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu16_epi32(q16), z)), s);
                        const int64_t row = 64 * c + 32 * h + 2 * u + e;
#if NQ_HAVE_BF16
                        if (bf16) {
                            _mm256_storeu_si256((__m256i*)((uint16_t*)out + row * ld + 16 * j), (__m256i)_mm512_cvtneps_pbh(v));
                            continue;
                        }
#endif
                        _mm512_storeu_ps((float*)out + row * ld + 16 * j, v);
                    }
            }
    return 0;
#else
    (void)t16; (void)scale_t; (void)zero_t; (void)out; (void)n; (void)k; (void)group; (void)u0; (void)units; (void)bf16;
    (void)nthreads; (void)scale_kind;
    return -2;
#endif
}


#if defined(__AVX512F__) && defined(__AVX512BW__)
#define NQ_T16F_MB 4  // tokens per pass
#define NQ_T16F_NB 4  // 16-row units per block

// fp32 x: each 32-byte load gives 4 weight columns (k = 2u, 2u + 1, 32 + 2u, 32 + 2u + 1) of 16 rows; the weights
// are the exact fp32 (q - z) * s of the reference, multiplied into per-row accumulators with FMA.
static inline __attribute__((always_inline)) void t16_tile_f32(
    const float* x, const uint8_t* t16, const nq_meta md, const float* bias, float* out, int64_t n, int64_t k,
    int64_t group, int64_t u0, const int MB, const int NB) {
    const int64_t nc = k / 64, ng = k / group, cpg = group / 64;
    const __m512i low = _mm512_set1_epi32(15);
    __m512 acc[NQ_T16F_MB][NQ_T16F_NB];
    for (int m = 0; m < MB; ++m)
        for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; ++g) {
        __m512 s[NQ_T16F_NB], z[NQ_T16F_NB];
        for (int j = 0; j < NB; ++j) {
            const int64_t at = g * n + (u0 + j) * 16;
            s[j] = t16_scales(md, at);
            z[j] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(md.z + at))));
        }
        for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c)
            for (int u = 0; u < 16; ++u) {
                __m512 w[NQ_T16F_NB][4];
                for (int j = 0; j < NB; ++j) {
                    const uint8_t* p = t16 + (((u0 + j) * nc + c) * 16 + u) * 32;
                    if (MB <= 2) _mm_prefetch((const char*)p + 1024, _MM_HINT_T1);
                    // dword r = byte 2r | byte 2r+1 << 16: nibbles at bits 0, 16 (low k) and 4, 20 (high k)
                    const __m512i d = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)p));
                    const int shift[4] = {0, 16, 4, 20};
                    for (int col = 0; col < 4; ++col) {
                        const __m512 q = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(d, shift[col]), low));
                        w[j][col] = _mm512_mul_ps(_mm512_sub_ps(q, z[j]), s[j]);
                    }
                }
                for (int m = 0; m < MB; ++m) {
                    const float* xr = x + m * k + c * 64 + 2 * u;
                    const float xv[4] = {xr[0], xr[1], xr[32], xr[33]};
                    for (int col = 0; col < 4; ++col) {
                        const __m512 b = _mm512_set1_ps(xv[col]);
                        for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_fmadd_ps(w[j][col], b, acc[m][j]);
                    }
                }
            }
    }
    for (int j = 0; j < NB; ++j) {
        const __m512 b = bias ? _mm512_loadu_ps(bias + (u0 + j) * 16) : _mm512_setzero_ps();
        for (int m = 0; m < MB; ++m) _mm512_storeu_ps(out + m * n + (u0 + j) * 16, _mm512_add_ps(acc[m][j], b));
    }
}

#define NQ_T16F_CASE(MM, NN) t16_tile_f32(x + m0 * k, t16, meta, bias, out + m0 * n, n, k, group, u0, MM, NN)
#define NQ_T16F_SWITCH(NN)                    \
    switch (mb) {                             \
        case 1: NQ_T16F_CASE(1, NN); break;   \
        case 2: NQ_T16F_CASE(2, NN); break;   \
        case 3: NQ_T16F_CASE(3, NN); break;   \
        default: NQ_T16F_CASE(4, NN); break;  \
    }

// y (M, N) fp32 = x (M, K) fp32 @ w^T + bias, w in T16 layout; scale / zero transposed (K/G, N).
int nq_t16_f32(const float* x, const uint8_t* t16, const void* scale_t, const uint8_t* zero_t, const float* bias,
               float* out, int64_t m_tokens, int64_t n, int64_t k, int64_t group, int nthreads, int scale_kind) {
    if (bad_shape(n, k, group) || n % 16 || k % 64 || group % 64 || m_tokens < 0 || scale_kind < 0 || scale_kind > 2)
        return -1;
    if (nq_t16_route(m_tokens, 1) == NQ_ROUTE_VNNI)
        return nq_t16_f32_vnni(x, t16, scale_t, zero_t, bias, out, m_tokens, n, k, group, nthreads, scale_kind);
    if (m_tokens == 0 || n == 0) return 0;
    const nq_meta meta = {scale_t, zero_t, scale_kind};
    const int64_t units = n / 16, full = units / NQ_T16F_NB, blocks = full + (units - full * NQ_T16F_NB);
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t u0 = blk < full ? blk * NQ_T16F_NB : full * NQ_T16F_NB + (blk - full);
        for (int64_t m0 = 0; m0 < m_tokens; m0 += NQ_T16F_MB) {
            const int mb = (int)(m_tokens - m0 < NQ_T16F_MB ? m_tokens - m0 : NQ_T16F_MB);
            if (blk >= full) {
                NQ_T16F_SWITCH(1)
            } else {
                NQ_T16F_SWITCH(NQ_T16F_NB)
            }
        }
    }
    return 0;
}
#undef NQ_T16F_SWITCH
#undef NQ_T16F_CASE
#elif NQ_T16_AVX2
#define NQ_T16A_MB 6  // tokens per pass (12 accumulators of the 16 ymm registers)

// 8 scales of rows n0..n0+7 of group g (transposed (K/G, N) array), fp32
static inline __m256 t16_scales8(const void* s, int kind, int64_t at) {
    if (kind == 0) return _mm256_loadu_ps((const float*)s + at);
    const __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)s + at));
    return kind == 1 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) : _mm256_cvtph_ps(h);
}

// One 16-row unit, MB tokens, the whole K: as t16_tile_f32 with 8-lane vectors (rows 0-7 and 8-15 of the unit).
static inline __attribute__((always_inline)) void t16_tile_avx2(
    const float* x, const uint8_t* t16, const void* scale_t, const uint8_t* zero_t, int kind, const float* bias,
    float* out, int64_t n, int64_t k, int64_t group, int64_t u0, const int MB) {
    const int64_t nc = k / 64, ng = k / group, cpg = group / 64;
    const __m256i low = _mm256_set1_epi32(15);
    __m256 acc[NQ_T16A_MB][2];
    for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; ++g) {
        __m256 s[2], z[2];
        for (int h = 0; h < 2; ++h) {
            const int64_t at = g * n + u0 * 16 + 8 * h;
            s[h] = t16_scales8(scale_t, kind, at);
            z[h] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(zero_t + at))));
        }
        for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c)
            for (int u = 0; u < 16; ++u) {
                const uint8_t* p = t16 + ((u0 * nc + c) * 16 + u) * 32;
                if (MB <= 2) _mm_prefetch((const char*)p + 1024, _MM_HINT_T1);
                // per half: 16 bytes -> 8 dwords, dword r = byte 2r | byte 2r+1 << 16 (as in t16_tile_f32)
                const __m256i d[2] = {_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)p)),
                                      _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(p + 16)))};
                const int shift[4] = {0, 16, 4, 20}, kofs[4] = {0, 1, 32, 33};
                for (int col = 0; col < 4; ++col) {
                    __m256 w[2];
                    for (int h = 0; h < 2; ++h) {
                        const __m256 q = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(d[h], shift[col]), low));
                        w[h] = _mm256_mul_ps(_mm256_sub_ps(q, z[h]), s[h]);
                    }
                    for (int m = 0; m < MB; ++m) {
                        const __m256 b = _mm256_set1_ps(x[m * k + c * 64 + 2 * u + kofs[col]]);
                        acc[m][0] = _mm256_fmadd_ps(w[0], b, acc[m][0]);
                        acc[m][1] = _mm256_fmadd_ps(w[1], b, acc[m][1]);
                    }
                }
            }
    }
    for (int h = 0; h < 2; ++h) {
        const __m256 b = bias ? _mm256_loadu_ps(bias + u0 * 16 + 8 * h) : _mm256_setzero_ps();
        for (int m = 0; m < MB; ++m) _mm256_storeu_ps(out + m * n + u0 * 16 + 8 * h, _mm256_add_ps(acc[m][h], b));
    }
}

#define NQ_T16A_CASE(MM) t16_tile_avx2(x + m0 * k, t16, scale_t, zero_t, scale_kind, bias, out + m0 * n, n, k, group, u0, MM)

int nq_t16_f32(const float* x, const uint8_t* t16, const void* scale_t, const uint8_t* zero_t, const float* bias,
               float* out, int64_t m_tokens, int64_t n, int64_t k, int64_t group, int nthreads, int scale_kind) {
    if (bad_shape(n, k, group) || n % 16 || k % 64 || group % 64 || m_tokens < 0 || scale_kind < 0 || scale_kind > 2)
        return -1;
    if (m_tokens == 0 || n == 0) return 0;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 2)
    for (int64_t u0 = 0; u0 < n / 16; ++u0)
        for (int64_t m0 = 0; m0 < m_tokens; m0 += NQ_T16A_MB) {
            switch ((int)(m_tokens - m0 < NQ_T16A_MB ? m_tokens - m0 : NQ_T16A_MB)) {
                case 1: NQ_T16A_CASE(1); break;
                case 2: NQ_T16A_CASE(2); break;
                case 3: NQ_T16A_CASE(3); break;
                case 4: NQ_T16A_CASE(4); break;
                case 5: NQ_T16A_CASE(5); break;
                default: NQ_T16A_CASE(6); break;
            }
        }
    return 0;
}
#undef NQ_T16A_CASE
#else
int nq_t16_f32(const float* x, const uint8_t* t16, const void* scale_t, const uint8_t* zero_t, const float* bias,
               float* out, int64_t m_tokens, int64_t n, int64_t k, int64_t group, int nthreads, int scale_kind) {
    (void)x; (void)t16; (void)scale_t; (void)zero_t; (void)bias; (void)out; (void)m_tokens; (void)n; (void)k;
    (void)group; (void)nthreads; (void)scale_kind;
    return -2;
}
#endif

#if NQ_HAVE_BF16
#define NQ_T16_MB 6  // tokens per pass
#define NQ_T16_NB 4  // 16-row units per block (fewer at the tail)


// MB tokens x NB units of 16 rows, the whole K, without per-group tables: a nibble q becomes the bf16 number 128 + q
// by OR-ing its bits into 0x4300 (128.0; the ulp at 128 is 1), so per group acc = sum_k x (128 + q) with vdpbf16ps
// on the raw words and tot += acc * s - (128 + z) * s * sum_k x. The products are exact in fp32; the offset costs
// ~5 of fp32's 24 bits, far below the bf16 output's 8.
static inline __attribute__((always_inline)) void t16_tile_bf16(
    const uint16_t* x, const float* xsum, const uint8_t* t16, const nq_meta md, const float* bias, uint16_t* out,
    int64_t n, int64_t k, int64_t group, int64_t u0, const int MB, const int NB) {
    const int64_t nc = k / 64, ng = k / group, cpg = group / 64;
    const __m512i low = _mm512_set1_epi16(0x0F), one28 = _mm512_set1_epi16(0x4300);
    __m512 tot[NQ_T16_MB][NQ_T16_NB];
    for (int m = 0; m < MB; ++m)
        for (int j = 0; j < NB; ++j) tot[m][j] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; ++g) {
        __m512 acc[NQ_T16_MB][NQ_T16_NB];
        for (int m = 0; m < MB; ++m)
            for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_setzero_ps();
        for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
            for (int u = 0; u < 16; ++u) {
                __m512bh wl[NQ_T16_NB], wh[NQ_T16_NB];
                for (int j = 0; j < NB; ++j) {
                    const uint8_t* p = t16 + (((u0 + j) * nc + c) * 16 + u) * 32;
                    if (MB <= 2) _mm_prefetch((const char*)p + 1024, _MM_HINT_T1);  // 2 chunks ahead, into L2
                    const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)p));
                    const __m512i l = _mm512_ternarylogic_epi32(w, low, one28, 0xEA);  // (w & 15) | 0x4300
                    const __m512i h = _mm512_or_si512(_mm512_srli_epi16(w, 4), one28);
                    memcpy(&wl[j], &l, sizeof l);
                    memcpy(&wh[j], &h, sizeof h);
                }
                for (int m = 0; m < MB; ++m) {
                    int32_t pa, pb;  // the token's (k, k + 1) pairs of the two tiles
                    memcpy(&pa, x + m * k + c * 64 + 2 * u, 4);
                    memcpy(&pb, x + m * k + c * 64 + 32 + 2 * u, 4);
                    const __m512i a = _mm512_set1_epi32(pa), b = _mm512_set1_epi32(pb);
                    __m512bh xa, xb;
                    memcpy(&xa, &a, sizeof xa);
                    memcpy(&xb, &b, sizeof xb);
                    for (int j = 0; j < NB; ++j) {
                        acc[m][j] = _mm512_dpbf16_ps(acc[m][j], wl[j], xa);
                        acc[m][j] = _mm512_dpbf16_ps(acc[m][j], wh[j], xb);
                    }
                }
            }
        }
        for (int j = 0; j < NB; ++j) {
            const int64_t at = g * n + (u0 + j) * 16;
            const __m512 s = t16_scales(md, at);
            const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(md.z + at))));
            const __m512 cz = _mm512_mul_ps(_mm512_add_ps(z, _mm512_set1_ps(128.f)), s);
            for (int m = 0; m < MB; ++m) {
                tot[m][j] = _mm512_fmadd_ps(acc[m][j], s, tot[m][j]);
                tot[m][j] = _mm512_fnmadd_ps(cz, _mm512_set1_ps(xsum[m * ng + g]), tot[m][j]);
            }
        }
    }
    for (int j = 0; j < NB; ++j) {
        const __m512 b = bias ? _mm512_loadu_ps(bias + (u0 + j) * 16) : _mm512_setzero_ps();
        for (int m = 0; m < MB; ++m) {
            const __m256bh h = _mm512_cvtneps_pbh(_mm512_add_ps(tot[m][j], b));
            _mm256_storeu_si256((__m256i*)(out + m * n + (u0 + j) * 16), (__m256i)h);
        }
    }
}

#define NQ_T16_CASE(MM, NN, U) t16_tile_bf16(xb, xs, t16, meta, bias, ob, n, k, group, U, MM, NN)
#define NQ_T16_SWITCH(NN, U)                         \
    switch (mb) {                                    \
        case 1: NQ_T16_CASE(1, NN, U); break;        \
        case 2: NQ_T16_CASE(2, NN, U); break;        \
        case 3: NQ_T16_CASE(3, NN, U); break;        \
        case 4: NQ_T16_CASE(4, NN, U); break;        \
        case 5: NQ_T16_CASE(5, NN, U); break;        \
        default: NQ_T16_CASE(6, NN, U); break;       \
    }



// y (M, N) bf16 = x (M, K) bf16 @ w^T + bias, w in T16 layout; scale / zero transposed (K/G, N). On AMX (after
// nq_amx_init) calls with nq_set_amx_min_tokens' count of tokens or more go to nq_t16_bf16_amx, and from
// nq_set_amx_gemm_min_tokens' count to nq_t16_bf16_amx_gemm.
int nq_t16_bf16(const uint16_t* x, const uint8_t* t16, const void* scale_t, const uint8_t* zero_t, const float* bias,
                uint16_t* out, int64_t m_tokens, int64_t n, int64_t k, int64_t group, int nthreads, int scale_kind) {
    if (bad_shape(n, k, group) || n % 16 || k % 64 || group % 64 || m_tokens < 0 || scale_kind < 0 || scale_kind > 2)
        return -1;
    switch (nq_t16_route(m_tokens, 0)) {
        case NQ_ROUTE_VNNI:
            return nq_t16_bf16_vnni(x, t16, scale_t, zero_t, bias, out, m_tokens, n, k, group, nthreads, scale_kind);
        case NQ_ROUTE_AMX_GEMM:
            return nq_t16_bf16_amx_gemm(x, t16, scale_t, zero_t, bias, out, m_tokens, n, k, group, nthreads, scale_kind);
        case NQ_ROUTE_AMX_TILES:
            return nq_t16_bf16_amx(x, t16, scale_t, zero_t, bias, out, m_tokens, n, k, group, nthreads, scale_kind);
        default:
            break;
    }
    if (m_tokens == 0 || n == 0) return 0;
    const nq_meta meta = {scale_t, zero_t, scale_kind};
    const int64_t ng = k / group;
    float* xsum = group_sums(x, m_tokens, k, group);  // (M, K/G) per-group sums of x
    if (!xsum) return -3;
    const int64_t units = n / 16, full = units / NQ_T16_NB, blocks = full + (units - full * NQ_T16_NB);
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t blk = 0; blk < blocks; ++blk) {  // full blocks of NQ_T16_NB units, then single units
        const int64_t u0 = blk < full ? blk * NQ_T16_NB : full * NQ_T16_NB + (blk - full);
        for (int64_t m0 = 0; m0 < m_tokens; m0 += NQ_T16_MB) {
            const int mb = (int)(m_tokens - m0 < NQ_T16_MB ? m_tokens - m0 : NQ_T16_MB);
            const uint16_t* xb = x + m0 * k;
            const float* xs = xsum + m0 * ng;
            uint16_t* ob = out + m0 * n;
            if (blk >= full) {
                NQ_T16_SWITCH(1, u0)
            } else if (mb <= 2) {
                NQ_T16_SWITCH(4, u0)
            } else {  // 6 tokens x 4 units would need 48 accumulators: two halves of 2 units
                NQ_T16_SWITCH(2, u0)
                NQ_T16_SWITCH(2, u0 + 2)
            }
        }
    }
    free(xsum);
    return 0;
}
#undef NQ_T16_SWITCH
#undef NQ_T16_CASE
#else
int nq_t16_bf16(const uint16_t* x, const uint8_t* t16, const void* scale_t, const uint8_t* zero_t, const float* bias,
                uint16_t* out, int64_t m_tokens, int64_t n, int64_t k, int64_t group, int nthreads, int scale_kind) {
    (void)x; (void)t16; (void)scale_t; (void)zero_t; (void)bias; (void)out; (void)m_tokens; (void)n; (void)k;
    (void)group; (void)nthreads; (void)scale_kind;
    return -2;
}
#endif



int nq_layer_t16_bf16(const nq_layer* layer, const uint16_t* x, uint16_t* out, int64_t m_tokens, int nthreads) {
    return nq_t16_bf16(x, layer->q, layer->scale, layer->zero, layer->bias, out, m_tokens, layer->n, layer->k,
                       layer->group, nthreads, (int)layer->scale_kind);
}

int nq_layer_t16_f32(const nq_layer* layer, const float* x, float* out, int64_t m_tokens, int nthreads) {
    return nq_t16_f32(x, layer->q, layer->scale, layer->zero, layer->bias, out, m_tokens, layer->n, layer->k,
                      layer->group, nthreads, (int)layer->scale_kind);
}
