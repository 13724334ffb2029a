// The int16 (VNNI) kernels on the T16 layout for few tokens; see int4_cpu.c for the layout and return codes.
#include "int4_cpu.h"

#if NQ_HAVE_VNNI
// ------------------------------------------------------------------------------------------------ VNNI (few tokens)
// On CPUs where vdpbf16ps is slow (Sapphire / Emerald Rapids: ~1.7 cycles per instruction, vs 0.5 for vpdpwssd) the
// few-token bf16 kernel is bound by it, and the fp32 one everywhere by its per-weight conversions and FMAs. These
// multiply integers instead: each 64-wide chunk of a token's x becomes int16 with one fp32 scale, x ~ xs * xq,
// xq = round(x / xs), xs = max|x| / 32767 - block floating point with a 15-bit mantissa, exact for elements within
// 2^7 of the chunk's largest and the rest to within xs / 2, far below a bf16 output's rounding. fp32 activations
// take a second part for the residual, x ~ xs * (xq + xq2 * 2^-15) (to within max|x| * 2^-31). vpdpwssd sums
// q * xq exactly in int32: a T16 row's bytes widened to words are (k, k + 1) pairs of one weight row per dword, low
// nibbles k in [64c, 64c + 32), high nibbles (>> 4) the upper half. Per chunk tot += s * xs * acc; per group
// tot -= s * z * sum_chunks(xs * sum xq).
int64_t nq_vnni_max_tokens = 0, nq_vnni_f32_max_tokens = 0;  // nq_t16_bf16 / nq_t16_f32 hand calls this small here

// Up to how many tokens nq_t16_bf16 (f32 = 0) or nq_t16_f32 (f32 = 1) take the VNNI kernel (0: never). Returns the
// previous value.
int64_t nq_set_vnni_max_tokens(int64_t m, int f32) {
    int64_t* at = f32 ? &nq_vnni_f32_max_tokens : &nq_vnni_max_tokens;
    const int64_t old = *at;
    *at = m < 0 ? 0 : m;
    return old;
}

// x (M, K) bf16 or fp32 -> xq (P, M, K) int16 (P parts), xs (M, K/64) chunk scales (NaN where the chunk holds a NaN
// or an infinity, so the outputs that read it are NaN as the reference's are), xsum (M, K/G) = sum over the group's
// chunks of xs * sum(xq + xq2 * 2^-15).
static void vnni_quantize(const void* x, int f32, int parts, int64_t m_tokens, int64_t k, int64_t group, int16_t* xq,
                          float* xs, float* xsum) {
    const int64_t nc = k / 64, cpg = group / 64, ng = k / group;
    const __m512 inf = _mm512_set1_ps(__builtin_inff());
    for (int64_t m = 0; m < m_tokens; ++m)
        for (int64_t g = 0; g < ng; ++g) {
            float gs = 0.f;
            for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
                __m512 v[4], amax = _mm512_setzero_ps();
                __mmask16 bad = 0;
                for (int i = 0; i < 4; ++i) {
                    const int64_t at = m * k + 64 * c + 16 * i;
                    v[i] = f32 ? _mm512_loadu_ps((const float*)x + at)
                               : _mm512_castsi512_ps(_mm512_slli_epi32(
                                     _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)((const uint16_t*)x + at))), 16));
                    const __m512 a = _mm512_abs_ps(v[i]);
                    bad |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(a, inf, _CMP_EQ_OQ);
                    amax = _mm512_max_ps(amax, a);
                }
                const float mx = _mm512_reduce_max_ps(amax);
                float scale = mx / 32767.f, inv = 32767.f / mx;
                if (bad) {
                    scale = __builtin_nanf("");
                    inv = 0.f;
                } else if (mx < 1e-33f) {  // zeros, or so small that xs would be subnormal: contribute nothing
                    scale = inv = 0.f;
                }
                __m512i sum = _mm512_setzero_si512(), sum2 = sum;
                for (int i = 0; i < 4; ++i) {
                    const __m512 t = _mm512_mul_ps(v[i], _mm512_set1_ps(inv));
                    const __m512i q = _mm512_cvtps_epi32(t);  // to nearest even
                    sum = _mm512_add_epi32(sum, q);
                    _mm256_storeu_si256((__m256i*)(xq + m * k + 64 * c + 16 * i), _mm512_cvtsepi32_epi16(q));
                    if (parts == 2) {  // the residual in units of xs * 2^-15 (|t - q| <= 1/2: exact in fp32)
                        const __m512i q2 = _mm512_cvtps_epi32(
                            _mm512_mul_ps(_mm512_sub_ps(t, _mm512_cvtepi32_ps(q)), _mm512_set1_ps(32768.f)));
                        sum2 = _mm512_add_epi32(sum2, q2);
                        _mm256_storeu_si256((__m256i*)(xq + (m_tokens + m) * k + 64 * c + 16 * i), _mm512_cvtsepi32_epi16(q2));
                    }
                }
                xs[m * nc + c] = scale;
                gs += scale * ((float)_mm512_reduce_add_epi32(sum) + (float)_mm512_reduce_add_epi32(sum2) * (1.f / 32768.f));
            }
            xsum[m * ng + g] = gs;
        }
}

#define NQ_VNNI_MB 4  // tokens per pass at most
#define NQ_VNNI_NB 8  // 16-row units per block at most (8 for one token: more weight streams in flight, ~10% faster)

// MB tokens x NB units, whole K, P int16 parts of x (part p of token m at xq + (p * xpart + m) * k); output bf16
// (F32 = 0) or fp32.
static inline __attribute__((always_inline)) void t16_tile_vnni(
    const int16_t* xq, int64_t xpart, const float* xs, const float* xsum, const uint8_t* t16, const nq_meta md,
    const float* bias, void* out, int64_t n, int64_t k, int64_t group, int64_t u0, const int MB, const int NB,
    const int P, const int F32) {
    const int64_t nc = k / 64, ng = k / group, cpg = group / 64;
    const __m512i low = _mm512_set1_epi16(0x0F);
    __m512 tot[NQ_VNNI_MB][NQ_VNNI_NB];
    for (int m = 0; m < MB; ++m)
        for (int j = 0; j < NB; ++j) tot[m][j] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; ++g) {
        for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
            __m512i acc[2][NQ_VNNI_MB][NQ_VNNI_NB];
            for (int p = 0; p < P; ++p)
                for (int m = 0; m < MB; ++m)
                    for (int j = 0; j < NB; ++j) acc[p][m][j] = _mm512_setzero_si512();
            for (int u = 0; u < 16; ++u) {
                __m512i xa[2][NQ_VNNI_MB], xb[2][NQ_VNNI_MB];  // the tokens' (k, k + 1) pairs, low and high halves
                for (int p = 0; p < P; ++p)
                    for (int m = 0; m < MB; ++m) {
                        const int16_t* xr = xq + (p * xpart + m) * k + c * 64 + 2 * u;
                        int32_t pa, pb;
                        memcpy(&pa, xr, 4);
                        memcpy(&pb, xr + 32, 4);
                        xa[p][m] = _mm512_set1_epi32(pa);
                        xb[p][m] = _mm512_set1_epi32(pb);
                    }
                for (int j = 0; j < NB; ++j) {
                    const uint8_t* w8 = t16 + (((u0 + j) * nc + c) * 16 + u) * 32;
                    if (MB <= 2 && !(u & 1)) _mm_prefetch((const char*)w8 + 1024, _MM_HINT_T1);  // 2 chunks ahead
                    const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)w8));
                    const __m512i wl = _mm512_and_si512(w, low), wh = _mm512_srli_epi16(w, 4);
                    for (int p = 0; p < P; ++p)
                        for (int m = 0; m < MB; ++m) {
                            acc[p][m][j] = _mm512_dpwssd_epi32(acc[p][m][j], wl, xa[p][m]);
                            acc[p][m][j] = _mm512_dpwssd_epi32(acc[p][m][j], wh, xb[p][m]);
                        }
                }
            }
            for (int j = 0; j < NB; ++j) {
                const __m512 s = t16_scales(md, g * n + (u0 + j) * 16);
                for (int m = 0; m < MB; ++m) {
                    __m512 a = _mm512_cvtepi32_ps(acc[0][m][j]);
                    if (P == 2) a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[1][m][j]), _mm512_set1_ps(1.f / 32768.f), a);
                    tot[m][j] = _mm512_fmadd_ps(a, _mm512_mul_ps(s, _mm512_set1_ps(xs[m * nc + c])), tot[m][j]);
                }
            }
        }
        for (int j = 0; j < NB; ++j) {
            const int64_t at = g * n + (u0 + j) * 16;
            const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(md.z + at))));
            const __m512 sz = _mm512_mul_ps(z, t16_scales(md, at));
            for (int m = 0; m < MB; ++m) tot[m][j] = _mm512_fnmadd_ps(sz, _mm512_set1_ps(xsum[m * ng + g]), tot[m][j]);
        }
    }
    for (int j = 0; j < NB; ++j) {
        const __m512 b = bias ? _mm512_loadu_ps(bias + (u0 + j) * 16) : _mm512_setzero_ps();
        for (int m = 0; m < MB; ++m) {
            const __m512 v = _mm512_add_ps(tot[m][j], b);
            if (F32) {
                _mm512_storeu_ps((float*)out + m * n + (u0 + j) * 16, v);
            } else {
                const __m256bh h = _mm512_cvtneps_pbh(v);
                _mm256_storeu_si256((__m256i*)((uint16_t*)out + m * n + (u0 + j) * 16), (__m256i)h);
            }
        }
    }
}

#define NQ_VNNI_CASE(MM, NN, U)                                                                                      \
    t16_tile_vnni(xq + m0 * k, m_tokens, xs + m0 * nc, xsum + m0 * ng, t16, meta, bias,                               \
                  f32 ? (void*)((float*)out + m0 * n) : (void*)((uint16_t*)out + m0 * n), n, k, group, U, MM, NN, P, \
                  f32)

// The VNNI kernel's passes for P parts (P = 2 with fp32 x and output, 1 with bf16): one token in blocks of 8 units
// (4 with 2 parts), more in blocks of 4 (of 2 for more than one token with 2 parts, to stay within the 32 vector
// registers), single units at the tail.
static inline __attribute__((always_inline)) void vnni_passes(
    const int16_t* xq, const float* xs, const float* xsum, const uint8_t* t16, const nq_meta meta, const float* bias,
    void* out, int64_t m_tokens, int64_t n, int64_t k, int64_t group, int nthreads, const int P, const int f32) {
    const int64_t nc = k / 64, ng = k / group;
    const int64_t units_all = n / 16;  // blocks of 8 units for one token, 4 otherwise; 1 when that leaves threads idle
    const int64_t nb = m_tokens == 1 && P == 1 && units_all >= 32 * nthreads ? 8 : units_all >= 8 * nthreads ? 4 : 1;
    const int64_t units = units_all, full = nb > 1 ? units / nb : 0, blocks = full + (units - full * nb);
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t blk = 0; blk < blocks; ++blk) {  // full blocks of nb units, then single units
        const int64_t u0 = blk < full ? blk * nb : full * nb + (blk - full);
        for (int64_t m0 = 0; m0 < m_tokens;) {
            const int64_t left = m_tokens - m0;
            if (blk >= full) {  // one unit, up to 4 tokens
                switch (left < 4 ? left : 4) {
                    case 1: NQ_VNNI_CASE(1, 1, u0); break;
                    case 2: NQ_VNNI_CASE(2, 1, u0); break;
                    case 3: NQ_VNNI_CASE(3, 1, u0); break;
                    default: NQ_VNNI_CASE(4, 1, u0); break;
                }
                m0 += left < 4 ? left : 4;
            } else if (nb == 8) {
                NQ_VNNI_CASE(1, 8, u0);
                m0 += 1;
            } else if (left == 1) {
                NQ_VNNI_CASE(1, 4, u0);
                m0 += 1;
            } else if (left < 4) {  // 2 tokens x 4 units, or x 2 units twice with 2 parts
                if (P == 1) {
                    NQ_VNNI_CASE(2, 4, u0);
                } else {
                    NQ_VNNI_CASE(2, 2, u0);
                    NQ_VNNI_CASE(2, 2, u0 + 2);
                }
                m0 += 2;
            } else {  // 4 tokens x 2 units twice (x 1 unit four times with 2 parts)
                if (P == 1) {
                    NQ_VNNI_CASE(4, 2, u0);
                    NQ_VNNI_CASE(4, 2, u0 + 2);
                } else {
                    for (int j = 0; j < 4; ++j) NQ_VNNI_CASE(4, 1, u0 + j);
                }
                m0 += 4;
            }
        }
    }
}
#undef NQ_VNNI_CASE

static int t16_vnni(const void* x, int f32, const uint8_t* t16, const void* scale_t, const uint8_t* zero_t,
                    const float* bias, void* out, int64_t m_tokens, int64_t n, int64_t k, int64_t group, int nthreads,
                    int scale_kind) {
    if (bad_shape(n, k, group) || n % 16 || k % 64 || group % 64 || m_tokens < 0 || scale_kind < 0 || scale_kind > 2)
        return -1;
    if (m_tokens == 0 || n == 0) return 0;
    const nq_meta meta = {scale_t, zero_t, scale_kind};
    const int parts = f32 ? 2 : 1;
    const int64_t nc = k / 64, ng = k / group;
    int16_t* xq = (int16_t*)malloc((size_t)(parts * m_tokens * k) * sizeof(int16_t) +
                                   (size_t)(m_tokens * (nc + ng)) * sizeof(float));
    if (!xq) return -3;
    float* xs = (float*)(xq + parts * m_tokens * k);
    float* xsum = xs + m_tokens * nc;
    vnni_quantize(x, f32, parts, m_tokens, k, group, xq, xs, xsum);
    if (f32)
        vnni_passes(xq, xs, xsum, t16, meta, bias, out, m_tokens, n, k, group, nthreads, 2, 1);
    else
        vnni_passes(xq, xs, xsum, t16, meta, bias, out, m_tokens, n, k, group, nthreads, 1, 0);
    free(xq);
    return 0;
}

// y (M, N) = x (M, K) @ w^T + bias on the T16 layout with int16 activations (above); same arguments as nq_t16_bf16
// (bf16 x and y) and nq_t16_f32 (fp32).
int nq_t16_bf16_vnni(const uint16_t* x, const uint8_t* t16, const void* scale_t, const uint8_t* zero_t, const float* bias,
                     uint16_t* out, int64_t m_tokens, int64_t n, int64_t k, int64_t group, int nthreads, int scale_kind) {
    return t16_vnni(x, 0, t16, scale_t, zero_t, bias, out, m_tokens, n, k, group, nthreads, scale_kind);
}

int nq_t16_f32_vnni(const float* x, const uint8_t* t16, const void* scale_t, const uint8_t* zero_t, const float* bias,
                    float* out, int64_t m_tokens, int64_t n, int64_t k, int64_t group, int nthreads, int scale_kind) {
    return t16_vnni(x, 1, t16, scale_t, zero_t, bias, out, m_tokens, n, k, group, nthreads, scale_kind);
}
#endif  // NQ_HAVE_VNNI

#if !NQ_HAVE_VNNI
int64_t nq_set_vnni_max_tokens(int64_t m, int f32) {
    (void)m;
    (void)f32;
    return 0;
}

int nq_t16_bf16_vnni(const uint16_t* x, const uint8_t* t16, const void* scale_t, const uint8_t* zero_t, const float* bias,
                     uint16_t* out, int64_t m_tokens, int64_t n, int64_t k, int64_t group, int nthreads, int scale_kind) {
    (void)x; (void)t16; (void)scale_t; (void)zero_t; (void)bias; (void)out; (void)m_tokens; (void)n; (void)k;
    (void)group; (void)nthreads; (void)scale_kind;
    return -2;
}

int nq_t16_f32_vnni(const float* x, const uint8_t* t16, const void* scale_t, const uint8_t* zero_t, const float* bias,
                    float* out, int64_t m_tokens, int64_t n, int64_t k, int64_t group, int nthreads, int scale_kind) {
    (void)x; (void)t16; (void)scale_t; (void)zero_t; (void)bias; (void)out; (void)m_tokens; (void)n; (void)k;
    (void)group; (void)nthreads; (void)scale_kind;
    return -2;
}
#endif
