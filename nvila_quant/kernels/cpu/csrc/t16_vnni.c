// The integer (VNNI) kernels on the T16 layout for few tokens; see t16.c for the layout, nq_shared.h for the
// return codes.
#include "nq_shared.h"

#if NQ_HAVE_VNNI
// ------------------------------------------------------------------------------------------------ VNNI (few tokens)
// On CPUs where vdpbf16ps is slow (Sapphire / Emerald Rapids) the few-token bf16 kernel is bound by it, and the fp32
// one everywhere by its per-weight conversions and FMAs. These multiply integers instead: each 64-wide chunk of a
// token's x becomes integers with one fp32 scale, x ~ xs * xq, xq = round(x / xs), xs = max|x| / 32639 - block
// floating point with a 15-bit mantissa, exact for elements within 2^7 of the chunk's largest and the rest to within
// xs / 2, far below a bf16 output's rounding.
// - xq = 256 * xh + xl with int8 parts (|xq| <= 32639 keeps xh in [-127, 127], xl in [-128, 127]), and vpdpbusd sums
//   nibble (u8) x part (s8) products exactly in int32, 4 per dword: a 64-byte pair of T16 rows u, u + 1 permuted so
//   that dword r holds weight row r's four consecutive k (2u .. 2u + 3 in the low nibbles, + 32 in the high ones). Per
//   chunk acc = 256 * acc_h + acc_l, exact. Fewer vector instructions per weight byte than int16 parts with
//   vpdpwssd (no widening to words, one shift per 128 weights instead of per 64): the 1-token kernel overlaps its
//   arithmetic with the weight stream better.
// - fp32 x takes a second part for the residual, x ~ xs * (xq + xq2 * 2^-15) (to within max|x| * 2^-31), split the
//   same way.
// Per chunk tot += s * xs * acc; per group tot -= s * z * sum_chunks(xs * sum xq).
// - "int8" activations (nq_set_vnni_int8_max_tokens, NVILA_QUANT_CPU_ACTIVATIONS=int8; the peers' arithmetic:
//   llama.cpp's Q8_0 activations for Q4_0, ONNX Runtime's MatMulNBits at accuracy level 4): ONE int8 per element,
//   xq = round(x / xs), xs = max|x| / 127 per 64-wide chunk, one vpdpbusd per weight vector instead of two (bf16) or
//   four (fp32 x). Error per element up to xs / 2 = max|x| / 254 of its chunk: not within bf16 rounding, hence
//   opt-in. Chunks of 64, not Q8_0's 32 (ONNX Runtime's blocks are the weights', 32 to 128): one accumulator per
//   token and unit (32-wide blocks need one per half: the low and the high nibbles), so 4 tokens x 4 units fit the
//   registers in one pass; on Zen 4 that made 4 tokens 1.4-1.6x faster than 32-wide blocks in 2 passes of 2 tokens.
// The code is one kernel over (parts P, bytes per part H): exact bf16 x (1, 2), exact fp32 x (2, 2), int8 (1, 1).
static int64_t vnni_exact_max[2], vnni_int8_max[2];  // per f32: the thresholds as set (exact / int8 activations)
int64_t nq_vnni_max_tokens = 0, nq_vnni_f32_max_tokens = 0;  // the dispatchers' VNNI route: the larger of the two

static void vnni_route_update(void) {
    nq_vnni_max_tokens = vnni_exact_max[0] > vnni_int8_max[0] ? vnni_exact_max[0] : vnni_int8_max[0];
    nq_vnni_f32_max_tokens = vnni_exact_max[1] > vnni_int8_max[1] ? vnni_exact_max[1] : vnni_int8_max[1];
}

// Up to how many tokens nq_t16_bf16 (f32 = 0) or nq_t16_f32 (f32 = 1) take the VNNI kernel with exact activations
// (0: never). Returns the previous value.
int64_t nq_set_vnni_max_tokens(int64_t m, int f32) {
    int64_t* at = &vnni_exact_max[f32 ? 1 : 0];
    const int64_t old = *at;
    *at = m < 0 ? 0 : m;
    vnni_route_update();
    return old;
}

// Up to how many tokens they take it with int8 activations (one part, above; 0: never - the default), whatever the
// exact threshold. Returns the previous value.
int64_t nq_set_vnni_int8_max_tokens(int64_t m, int f32) {
    int64_t* at = &vnni_int8_max[f32 ? 1 : 0];
    const int64_t old = *at;
    *at = m < 0 ? 0 : m;
    vnni_route_update();
    return old;
}

// Whether the VNNI kernel runs a call of m_tokens rows with int8 activations (1) or exact ones (0) (the route itself:
// nq_t16_route).
int nq_vnni_int8(int64_t m_tokens, int f32) { return m_tokens <= vnni_int8_max[f32 ? 1 : 0]; }

#define NQ_VNNI_XMAX 32639.f  // largest |xq|: 127 * 256 + 127, so that bf16 x splits into two int8 parts
#define NQ_VNNI_XMAX8 127.f   // ... with one int8 part

// Part q (int32, |q| <= 32639) -> int8 pair at dst: xh = floor((q + 128) / 256) at dst, xl = q - 256 xh at dst + k.
static inline void vnni_split(int8_t* dst, int64_t k, __m512i q) {
    const __m512i h = _mm512_srai_epi32(_mm512_add_epi32(q, _mm512_set1_epi32(128)), 8);
    _mm_storeu_si128((__m128i*)dst, _mm512_cvtepi32_epi8(h));
    _mm_storeu_si128((__m128i*)(dst + k), _mm512_cvtepi32_epi8(_mm512_sub_epi32(q, _mm512_slli_epi32(h, 8))));
}

// x (M, K) bf16 or fp32 -> x8 (P, M, H, K) int8: part p of token m at x8 + (p M + m) H K, as [xh | xl] (H = 2; part
// 1 = xq, part 2 = xq2 with fp32 x) or as xq (H = 1, one part); xs (M, K/64) chunk scales (NaN where the chunk holds
// a NaN or an infinity, so the outputs that read it are NaN as the reference's are), xsum (M, K/G) = sum over the
// group's chunks of xs * sum(xq + xq2 * 2^-15).
static void vnni_quantize(const void* x, int f32, int parts, int bytes, int64_t m_tokens, int64_t k, int64_t group,
                          int8_t* x8, float* xs, float* xsum) {
    const int64_t nc = k / 64, cpg = group / 64, ng = k / group;
    const float xmax = bytes == 1 ? NQ_VNNI_XMAX8 : NQ_VNNI_XMAX;
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
                float scale = mx / xmax, inv = xmax / mx;
                if (bad) {
                    scale = __builtin_nanf("");
                    inv = 0.f;
                } else if (mx < 1e-33f) {  // zeros, or so small that xs would be subnormal: contribute nothing
                    scale = inv = 0.f;
                }
                __m512i sum = _mm512_setzero_si512(), sum2 = sum;
                for (int i = 0; i < 4; ++i) {
                    const int64_t at = 64 * c + 16 * i;  // within the token's row
                    const __m512 t = _mm512_mul_ps(v[i], _mm512_set1_ps(inv));
                    const __m512i q = _mm512_cvtps_epi32(t);  // to nearest even
                    sum = _mm512_add_epi32(sum, q);
                    if (bytes == 1) {
                        _mm_storeu_si128((__m128i*)(x8 + m * k + at), _mm512_cvtepi32_epi8(q));
                        continue;
                    }
                    vnni_split(x8 + 2 * m * k + at, k, q);
                    if (parts == 2) {  // the residual in units of xs * 2^-15 (|t - q| <= 1/2: exact in fp32)
                        const __m512i q2 = _mm512_cvtps_epi32(
                            _mm512_mul_ps(_mm512_sub_ps(t, _mm512_cvtepi32_ps(q)), _mm512_set1_ps(32768.f)));
                        sum2 = _mm512_add_epi32(sum2, q2);
                        vnni_split(x8 + 2 * (m_tokens + m) * k + at, k, q2);
                    }
                }
                xs[m * nc + c] = scale;
                gs += scale * ((float)_mm512_reduce_add_epi32(sum) + (float)_mm512_reduce_add_epi32(sum2) * (1.f / 32768.f));
            }
            xsum[m * ng + g] = gs;
        }
}

#define NQ_VNNI_MB 4  // tokens per pass at most
#define NQ_VNNI_NB 8  // units per block at most (8 for 1 token: more weight streams in flight, fewer blocks to share)

// tot -= s * z * xsum for group g (the zero points' share of the tile's sums).
static inline __attribute__((always_inline)) void t16_vnni_zero_points(
    __m512 tot[NQ_VNNI_MB][NQ_VNNI_NB], const nq_meta md, const float* xsum, int64_t n, int64_t ng, int64_t g,
    int64_t u0, const int MB, const int NB) {
    for (int j = 0; j < NB; ++j) {
        const int64_t at = g * n + (u0 + j) * 16;
        const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(md.z + at))));
        const __m512 sz = _mm512_mul_ps(z, t16_scales(md, at));
        for (int m = 0; m < MB; ++m) tot[m][j] = _mm512_fnmadd_ps(sz, _mm512_set1_ps(xsum[m * ng + g]), tot[m][j]);
    }
}

// out (MB, N) rows, columns of units u0 .. u0 + NB: tot + bias, bf16 (F32 = 0) or fp32.
static inline __attribute__((always_inline)) void t16_vnni_store(
    __m512 tot[NQ_VNNI_MB][NQ_VNNI_NB], const float* bias, void* out, int64_t n, int64_t u0, const int MB,
    const int NB, const int F32) {
    for (int j = 0; j < NB; ++j) {
        const __m512 b = bias ? _mm512_loadu_ps(bias + (u0 + j) * 16) : _mm512_setzero_ps();
        for (int m = 0; m < MB; ++m) {
            const __m512 v = _mm512_add_ps(tot[m][j], b);
            if (F32) {
                _mm512_storeu_ps((float*)out + m * n + (u0 + j) * 16, v);
            } else {
#if NQ_HAVE_BF16
                const __m256bh h = _mm512_cvtneps_pbh(v);
                _mm256_storeu_si256((__m256i*)((uint16_t*)out + m * n + (u0 + j) * 16), (__m256i)h);
#endif
            }
        }
    }
}

// MB tokens x NB units, whole K, P parts of x with H int8 bytes each (part p of token m at x8 + (p xpart + m) H K:
// vnni_quantize's layout); output bf16 (F32 = 0) or fp32.
static inline __attribute__((always_inline)) void t16_tile_vnni8(
    const int8_t* x8, int64_t xpart, const float* xs, const float* xsum, const uint8_t* t16, const nq_meta md,
    const float* bias, void* out, int64_t n, int64_t k, int64_t group, int64_t u0, const int MB, const int NB,
    const int P, const int H, const int F32) {
    const int64_t nc = k / 64, ng = k / group, cpg = group / 64;
    // words (byte pairs) of rows u, u + 1 -> dword r = (u: word r | u + 1: word r), weight row r's four k
#if defined(__AVX512VBMI__)  // the same as bytes (order8[i] = 2 order[i / 2] + i % 2): vpermb is faster than vpermw
    static const uint8_t order8[64] = {0, 1, 32, 33, 2, 3, 34, 35, 4, 5, 36, 37, 6, 7, 38, 39,
                                       8, 9, 40, 41, 10, 11, 42, 43, 12, 13, 44, 45, 14, 15, 46, 47,
                                       16, 17, 48, 49, 18, 19, 50, 51, 20, 21, 52, 53, 22, 23, 54, 55,
                                       24, 25, 56, 57, 26, 27, 58, 59, 28, 29, 60, 61, 30, 31, 62, 63};
    const __m512i perm = _mm512_loadu_si512(order8);
#define NQ_VNNI_PERMUTE(v) _mm512_permutexvar_epi8(perm, v)
#else
    static const uint16_t order[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i perm = _mm512_loadu_si512(order);
#define NQ_VNNI_PERMUTE(v) _mm512_permutexvar_epi16(perm, v)
#endif
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 tot[NQ_VNNI_MB][NQ_VNNI_NB];
    for (int m = 0; m < MB; ++m)
        for (int j = 0; j < NB; ++j) tot[m][j] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; ++g) {
        for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
            __m512i ah[2][NQ_VNNI_MB][NQ_VNNI_NB], al[2][NQ_VNNI_MB][NQ_VNNI_NB];
            for (int p = 0; p < 2; ++p)  // (both parts: unused ones compile away; GCC sees no gap)
                for (int m = 0; m < MB; ++m)
                    for (int j = 0; j < NB; ++j) ah[p][m][j] = al[p][m][j] = _mm512_setzero_si512();
            for (int u = 0; u < 16; u += 2) {
                // the parts' (low / high nibbles, h / l bytes) broadcasts of x's four k
                __m512i xlh[2][NQ_VNNI_MB], xll[2][NQ_VNNI_MB], xhh[2][NQ_VNNI_MB], xhl[2][NQ_VNNI_MB];
                for (int p = 0; p < P; ++p)
                    for (int m = 0; m < MB; ++m) {
                        const int8_t* xr = x8 + H * (p * xpart + m) * k + c * 64 + 2 * u;
                        int32_t t;
                        memcpy(&t, xr, 4);
                        xlh[p][m] = _mm512_set1_epi32(t);
                        memcpy(&t, xr + 32, 4);
                        xhh[p][m] = _mm512_set1_epi32(t);
                        if (H == 2) {
                            memcpy(&t, xr + k, 4);
                            xll[p][m] = _mm512_set1_epi32(t);
                            memcpy(&t, xr + 32 + k, 4);
                            xhl[p][m] = _mm512_set1_epi32(t);
                        } else {  // (unused: compiles away)
                            xll[p][m] = xhl[p][m] = xlh[p][m];
                        }
                    }
                for (int j = 0; j < NB; ++j) {
                    const uint8_t* w8 = t16 + (((u0 + j) * nc + c) * 16 + u) * 32;
                    if (MB <= 2) _mm_prefetch((const char*)w8 + 1024, _MM_HINT_T1);  // 2 chunks ahead
                    const __m512i v = NQ_VNNI_PERMUTE(_mm512_loadu_si512((const void*)w8));
                    const __m512i wl = _mm512_and_si512(v, low), wh = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                    for (int p = 0; p < P; ++p)
                        for (int m = 0; m < MB; ++m) {
                            if (H == 1) {  // one vpdpbusd per weight vector
                                ah[p][m][j] = _mm512_dpbusd_epi32(ah[p][m][j], wl, xlh[p][m]);
                                ah[p][m][j] = _mm512_dpbusd_epi32(ah[p][m][j], wh, xhh[p][m]);
                                continue;
                            }
                            ah[p][m][j] = _mm512_dpbusd_epi32(ah[p][m][j], wl, xlh[p][m]);
                            al[p][m][j] = _mm512_dpbusd_epi32(al[p][m][j], wl, xll[p][m]);
                            ah[p][m][j] = _mm512_dpbusd_epi32(ah[p][m][j], wh, xhh[p][m]);
                            al[p][m][j] = _mm512_dpbusd_epi32(al[p][m][j], wh, xhl[p][m]);
                        }
                }
            }
            for (int j = 0; j < NB; ++j) {
                const __m512 s = t16_scales(md, g * n + (u0 + j) * 16);
                for (int m = 0; m < MB; ++m) {
                    // exact in int32: sum q * xq (H = 1), 256 acc_h + acc_l (H = 2)
                    __m512 a = _mm512_cvtepi32_ps(
                        H == 1 ? ah[0][m][j] : _mm512_add_epi32(_mm512_slli_epi32(ah[0][m][j], 8), al[0][m][j]));
                    if (P == 2)
                        a = _mm512_fmadd_ps(
                            _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(ah[1][m][j], 8), al[1][m][j])),
                            _mm512_set1_ps(1.f / 32768.f), a);
                    tot[m][j] = _mm512_fmadd_ps(a, _mm512_mul_ps(s, _mm512_set1_ps(xs[m * nc + c])), tot[m][j]);
                }
            }
        }
        t16_vnni_zero_points(tot, md, xsum, n, ng, g, u0, MB, NB);
    }
    t16_vnni_store(tot, bias, out, n, u0, MB, NB, F32);
}
#undef NQ_VNNI_PERMUTE

#define NQ_VNNI_CASE(MM, NN, U)                                                                                     \
    t16_tile_vnni8(x8 + H * m0 * k, m_tokens, xs + m0 * nc, xsum + m0 * ng, t16, meta, bias,                        \
                   F32 ? (void*)((float*)out + m0 * n) : (void*)((uint16_t*)out + m0 * n), n, k, group, U, MM, NN, \
                   P, H, F32)

// The VNNI kernel's passes over x8 (vnni_quantize's; P parts of H bytes, output bf16 (F32 = 0) or fp32). One part:
// one token in blocks of 8 units, more in blocks of 4 units - exact bf16 x (2 accumulators per unit and token) 2
// tokens at a time, 4 as 2 + 2 (the second pass reads the block from L2), to stay within the 32 vector registers;
// int8 x (one accumulator) up to 4 tokens at a time. Two parts (4 accumulators per unit and token): blocks of 4
// units, one token at a time (the block's later tokens read it from L2). Single units at the tail.
static inline __attribute__((always_inline)) void vnni_passes(
    const int8_t* x8, const float* xs, const float* xsum, const uint8_t* t16, const nq_meta meta, const float* bias,
    void* out, int64_t m_tokens, int64_t n, int64_t k, int64_t group, int nthreads, const int P, const int H,
    const int F32) {
    const int64_t nc = k / 64, ng = k / group;
    const int64_t units_all = n / 16;  // blocks of 8 units for one token, 4 otherwise; 1 when that leaves threads idle
    const int64_t nb = m_tokens == 1 && P == 1 && units_all >= 32 * nthreads ? 8 : units_all >= 8 * nthreads ? 4 : 1;
    const int64_t units = units_all, full = nb > 1 ? units / nb : 0, blocks = full + (units - full * nb);
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t blk = 0; blk < blocks; ++blk) {  // full blocks of nb units, then single units
        const int64_t u0 = blk < full ? blk * nb : full * nb + (blk - full);
        for (int64_t m0 = 0; m0 < m_tokens;) {
            const int64_t left = m_tokens - m0;
            if (P == 2) {
                if (blk >= full) {
                    NQ_VNNI_CASE(1, 1, u0);
                } else {
                    NQ_VNNI_CASE(1, 4, u0);
                }
                m0 += 1;
            } else if (blk >= full) {  // one unit, up to 4 tokens
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
            } else if (H == 1) {  // up to 4 tokens x 4 units
                switch (left < 4 ? left : 4) {
                    case 1: NQ_VNNI_CASE(1, 4, u0); break;
                    case 2: NQ_VNNI_CASE(2, 4, u0); break;
                    case 3: NQ_VNNI_CASE(3, 4, u0); break;
                    default: NQ_VNNI_CASE(4, 4, u0); break;
                }
                m0 += left < 4 ? left : 4;
            } else if (left == 1) {
                NQ_VNNI_CASE(1, 4, u0);
                m0 += 1;
            } else {  // 2 tokens x 4 units
                NQ_VNNI_CASE(2, 4, u0);
                m0 += 2;
            }
        }
    }
}
#undef NQ_VNNI_CASE

// int8 = 0: exact activations (bf16 x: one part of two bytes; fp32 x: two parts); 1: one int8 byte per element.
static int t16_vnni(const void* x, int f32, int int8, const uint8_t* t16, const void* scale_t, const uint8_t* zero_t,
                    const float* bias, void* out, int64_t m_tokens, int64_t n, int64_t k, int64_t group, int nthreads,
                    int scale_kind) {
    if (bad_shape(n, k, group) || n % 16 || k % 64 || group % 64 || m_tokens < 0 || scale_kind < 0 || scale_kind > 2)
        return -1;
    if (m_tokens == 0 || n == 0) return 0;
    const nq_meta meta = {scale_t, zero_t, scale_kind};
    const int parts = f32 && !int8 ? 2 : 1, bytes = int8 ? 1 : 2;
    const int64_t nc = k / 64, ng = k / group;
    // (parts * bytes * k bytes per token: a multiple of 64, so the fp32 scales after them are aligned)
    int8_t* x8 = (int8_t*)malloc((size_t)(parts * bytes * m_tokens * k) + (size_t)(m_tokens * (nc + ng)) * sizeof(float));
    if (!x8) return -3;
    float* xs = (float*)(x8 + parts * bytes * m_tokens * k);
    float* xsum = xs + m_tokens * nc;
    vnni_quantize(x, f32, parts, bytes, m_tokens, k, group, x8, xs, xsum);
    if (f32 && int8)
        vnni_passes(x8, xs, xsum, t16, meta, bias, out, m_tokens, n, k, group, nthreads, 1, 1, 1);
    else if (f32)
        vnni_passes(x8, xs, xsum, t16, meta, bias, out, m_tokens, n, k, group, nthreads, 2, 2, 1);
#if NQ_HAVE_BF16
    else if (int8)
        vnni_passes(x8, xs, xsum, t16, meta, bias, out, m_tokens, n, k, group, nthreads, 1, 1, 0);
    else
        vnni_passes(x8, xs, xsum, t16, meta, bias, out, m_tokens, n, k, group, nthreads, 1, 2, 0);
#endif
    free(x8);
    return 0;
}

// y (M, N) = x (M, K) @ w^T + bias on the T16 layout with integer activations (above); same arguments as nq_t16_bf16
// (bf16 x and y) and nq_t16_f32 (fp32). nq_t16_*_vnni: the dispatchers' VNNI route - int8 activations up to
// nq_set_vnni_int8_max_tokens' count (nq_vnni_int8), exact ones above; nq_t16_*_vnni8: int8 activations always.
#if NQ_HAVE_BF16  // (AVX-512 VNNI without BF16 - Ice Lake, Cascade Lake - has the fp32 kernels only)
int nq_t16_bf16_vnni(const uint16_t* x, const uint8_t* t16, const void* scale_t, const uint8_t* zero_t, const float* bias,
                     uint16_t* out, int64_t m_tokens, int64_t n, int64_t k, int64_t group, int nthreads, int scale_kind) {
    return t16_vnni(x, 0, nq_vnni_int8(m_tokens, 0), t16, scale_t, zero_t, bias, out, m_tokens, n, k, group, nthreads,
                    scale_kind);
}

int nq_t16_bf16_vnni8(const uint16_t* x, const uint8_t* t16, const void* scale_t, const uint8_t* zero_t,
                      const float* bias, uint16_t* out, int64_t m_tokens, int64_t n, int64_t k, int64_t group,
                      int nthreads, int scale_kind) {
    return t16_vnni(x, 0, 1, t16, scale_t, zero_t, bias, out, m_tokens, n, k, group, nthreads, scale_kind);
}
#endif

int nq_t16_f32_vnni(const float* x, const uint8_t* t16, const void* scale_t, const uint8_t* zero_t, const float* bias,
                    float* out, int64_t m_tokens, int64_t n, int64_t k, int64_t group, int nthreads, int scale_kind) {
    return t16_vnni(x, 1, nq_vnni_int8(m_tokens, 1), t16, scale_t, zero_t, bias, out, m_tokens, n, k, group, nthreads,
                    scale_kind);
}

int nq_t16_f32_vnni8(const float* x, const uint8_t* t16, const void* scale_t, const uint8_t* zero_t, const float* bias,
                     float* out, int64_t m_tokens, int64_t n, int64_t k, int64_t group, int nthreads, int scale_kind) {
    return t16_vnni(x, 1, 1, t16, scale_t, zero_t, bias, out, m_tokens, n, k, group, nthreads, scale_kind);
}
#endif  // NQ_HAVE_VNNI

#if !NQ_HAVE_VNNI
int64_t nq_set_vnni_max_tokens(int64_t m, int f32) {
    (void)m;
    (void)f32;
    return 0;
}

int64_t nq_set_vnni_int8_max_tokens(int64_t m, int f32) {
    (void)m;
    (void)f32;
    return 0;
}

int nq_vnni_int8(int64_t m_tokens, int f32) {
    (void)m_tokens;
    (void)f32;
    return 0;
}
#endif

// Kernels not compiled in for this CPU: -2.
#define NQ_VNNI_MISSING(name, T)                                                                                     \
    int name(const T* x, const uint8_t* t16, const void* scale_t, const uint8_t* zero_t, const float* bias, T* out,  \
             int64_t m_tokens, int64_t n, int64_t k, int64_t group, int nthreads, int scale_kind) {                 \
        (void)x; (void)t16; (void)scale_t; (void)zero_t; (void)bias; (void)out; (void)m_tokens; (void)n; (void)k;   \
        (void)group; (void)nthreads; (void)scale_kind;                                                              \
        return -2;                                                                                                  \
    }
#if !NQ_HAVE_VNNI
NQ_VNNI_MISSING(nq_t16_f32_vnni, float)
NQ_VNNI_MISSING(nq_t16_f32_vnni8, float)
#endif
#if !(NQ_HAVE_VNNI && NQ_HAVE_BF16)
NQ_VNNI_MISSING(nq_t16_bf16_vnni, uint16_t)
NQ_VNNI_MISSING(nq_t16_bf16_vnni8, uint16_t)
#endif
