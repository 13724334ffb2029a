// The T16-layout family of the native CPU int4 kernels and its dispatch: nq_t16_pack / nq_t16_unpack, nq_t16_route,
// nq_t16_dequant_t, nq_t16_bf16 / nq_t16_f32 (vdpbf16ps, AVX-512 FMA or AVX2 FMA kernels, every token count; they hand
// calls to the VNNI kernels for few tokens (t16_vnni.c) and, for bf16, to the AMX ones (t16_amx.c, after nq_amx_init)
// by the nq_set_*_tokens thresholds) and nq_layer_t16_bf16 / nq_layer_t16_f32. Return codes in nq_shared.h.
// Layout: 16 weight rows interleaved per 64-wide K chunk, same size as nibble rows; scale / zero transposed (K/G, N).
//
// "T16" layout: the weights of 16 consecutive output rows interleaved so that one 32-byte load, zero-extended to
// words, holds two VNNI tiles (16 rows x one k pair each; lane j = row j, 32 bits = its (k, k + 1) pair):
//   t16[N/16][K/64][u = 0..15][byte b = 0..31], row = 16 * block + b / 2, e = b % 2,
//   low nibble = q[row][64 c + 2 u + e], high nibble = q[row][64 c + 32 + 2 u + e].
// Built once per layer on load (nq_t16_pack); same size as nibble rows. The kernels accumulate 16 output rows per
// vector (broadcast activations, no horizontal sums), which is what makes many tokens as fast as a dense bf16
// GEMM. Needs N % 16 == 0, K % 64 == 0, group % 64 == 0. Scales and zero points are read transposed, (K/G, N).
#include "nq_shared.h"
#include <omp.h>

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
                    // into L2, once per line: a short K's same spot in the next block (a thread's blocks are
                    // contiguous for few tokens), so a block starts warm; a long K's stream 8 chunks ahead
                    if (MB <= 2 && !(u & 1))
                        _mm_prefetch((const char*)p + (nc <= 64 ? NB * nc * 512 : 4096), _MM_HINT_T1);
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
    // few tokens: one contiguous run of blocks per thread (what the tile's next-block prefetch assumes)
    const int64_t chunk = m_tokens <= 2 ? (blocks + nthreads - 1) / (nthreads > 0 ? nthreads : 1) : 1;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, chunk)
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

#define NQ_GROUP_MAX 8  // layers per nq_layers_t16_bf16 call
// Several T16 layers that read the same bf16 x (M, K) (a decoder layer's q / k / v, or gate / up): outs[i] (M, N_i) =
// x @ w_i^T + b_i, exactly what nq_layer_t16_bf16 gives each. On the plain (vdpbf16ps) route the layers' blocks share
// one parallel loop (one fork / join, one pass over x's group sums; a small layer does not leave a thread idle at its
// tail); on the others each layer is its own call. The layers must share K and the group size.
int nq_layers_t16_bf16(const nq_layer* const* layers, int count, const uint16_t* x, uint16_t* const* outs,
                       int64_t m_tokens, int nthreads) {
    if (count <= 0 || count > NQ_GROUP_MAX || m_tokens < 0) return -1;
    const int64_t k = layers[0]->k, group = layers[0]->group;
    for (int i = 0; i < count; ++i)
        if (layers[i]->k != k || layers[i]->group != group || bad_shape(layers[i]->n, k, group) || layers[i]->n % 16 ||
            k % 64 || group % 64 || layers[i]->scale_kind < 0 || layers[i]->scale_kind > 2)
            return -1;
#if NQ_HAVE_BF16
    if (nq_t16_route(m_tokens, 0) == NQ_ROUTE_PLAIN && m_tokens > 0 && m_tokens <= NQ_T16_MB) {
        int64_t first[NQ_GROUP_MAX + 1];  // first block of each layer in the shared numbering
        first[0] = 0;
        for (int i = 0; i < count; ++i) {
            const int64_t units = layers[i]->n / 16, full = units / NQ_T16_NB;
            first[i + 1] = first[i] + full + (units - full * NQ_T16_NB);
        }
        float* xsum = group_sums(x, m_tokens, k, group);  // (M, K/G), shared by the layers
        if (!xsum) return -3;
        const int mb = (int)m_tokens;
        const int64_t chunk = mb <= 2 ? (first[count] + nthreads - 1) / (nthreads > 0 ? nthreads : 1) : 1;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, chunk)
        for (int64_t b = 0; b < first[count]; ++b) {
            int i = 0;
            while (b >= first[i + 1]) ++i;
            const nq_layer* ly = layers[i];
            const nq_meta meta = {ly->scale, ly->zero, (int)ly->scale_kind};
            const uint8_t* t16 = ly->q;
            const float* bias = ly->bias;
            const float* xs = xsum;
            const uint16_t* xb = x;
            uint16_t* ob = outs[i];
            const int64_t n = ly->n, blk = b - first[i], full = n / 16 / NQ_T16_NB;
            const int64_t u0 = blk < full ? blk * NQ_T16_NB : full * NQ_T16_NB + (blk - full);
            if (blk >= full) {
                NQ_T16_SWITCH(1, u0)
            } else if (mb <= 2) {
                NQ_T16_SWITCH(4, u0)
            } else {
                NQ_T16_SWITCH(2, u0)
                NQ_T16_SWITCH(2, u0 + 2)
            }
        }
        free(xsum);
        return 0;
    }
#endif
    for (int i = 0; i < count; ++i) {
        const int rc = nq_layer_t16_bf16(layers[i], x, outs[i], m_tokens, nthreads);
        if (rc) return rc;
    }
    return 0;
}

int nq_layer_t16_f32(const nq_layer* layer, const float* x, float* out, int64_t m_tokens, int nthreads) {
    return nq_t16_f32(x, layer->q, layer->scale, layer->zero, layer->bias, out, m_tokens, layer->n, layer->k,
                      layer->group, nthreads, (int)layer->scale_kind);
}
#if NQ_HAVE_BF16
#undef NQ_T16_SWITCH
#undef NQ_T16_CASE
#endif

// The yardstick of the few-token kernels (benchmarks/kernels.py, "bare read"): stream nbytes at p (a multiple of 64)
// with nthreads threads, one contiguous share each (as the kernels split few-token calls), every byte loaded and
// xor-ed into a vector and nothing else; returns the xor (so the loads stay).
uint64_t nq_read_bytes(const uint8_t* p, int64_t nbytes, int nthreads) {
    uint64_t acc = 0;
    const int64_t lines = nbytes / 64;
#pragma omp parallel num_threads(nthreads) reduction(^ : acc)
    {
        const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t l0 = lines * t / nt, l1 = lines * (t + 1) / nt;
#ifdef __AVX512F__
        __m512i v[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
        int64_t i = l0;
        for (; i + 4 <= l1; i += 4)
            for (int j = 0; j < 4; ++j) v[j] = _mm512_xor_si512(v[j], _mm512_loadu_si512(p + 64 * (i + j)));
        for (; i < l1; ++i) v[0] = _mm512_xor_si512(v[0], _mm512_loadu_si512(p + 64 * i));
        uint64_t lane[8];
        _mm512_storeu_si512(lane, _mm512_xor_si512(_mm512_xor_si512(v[0], v[1]), _mm512_xor_si512(v[2], v[3])));
        for (int j = 0; j < 8; ++j) acc ^= lane[j];
#else
        for (int64_t i = l0 * 8; i < l1 * 8; ++i) {
            uint64_t w;
            memcpy(&w, p + 8 * i, 8);
            acc ^= w;
        }
#endif
    }
    return acc;
}
