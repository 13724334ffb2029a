// The work between the linears of a batch-1 Qwen2 decode step, one call each (model/lean_decode.py): residual add +
// RMSNorm, rotary embedding of q and k with the KV-cache write, single-query GQA attention over the cache, SiLU * up.
// Activations are fp32 (dt = 0) or bf16 (dt = 1); the arithmetic is fp32 and every result is rounded where
// transformers' Qwen2 rounds it in that dtype (each bf16 op of the eager forward is one fp32 op plus one rounding), so
// the elementwise ops are bitwise the eager ones; the two reductions (RMSNorm's mean, attention's sums) add in
// another order, and exp is our own (nq_expf, within ~2 ulp of fp32): outputs may differ from the eager step by a
// rounding.
// Portable C (the compiler vectorizes the loops); no allocation; one thread (the ops are microseconds).
#include "nq_shared.h"
#include <math.h>

static inline float ld(const void* p, int64_t i, int dt) {
    return dt ? bf16_to_f32(((const uint16_t*)p)[i]) : ((const float*)p)[i];
}

static inline float rnd(float v, int dt) { return dt ? bf16_to_f32(f32_to_bf16(v)) : v; }

// exp(x) in fp32 within ~2 ulp (Cody-Waite reduction by ln 2, Cephes' degree-6 polynomial); branch-free, so the
// loops that call it vectorize (libm's expf does not). NaN stays NaN; the range is clamped to finite results.
static inline float nq_expf(float x) {
    x = x > 88.3762626647949f ? 88.3762626647949f : x;
    x = x < -87.3365447504f ? -87.3365447504f : x;
    const float fx = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - fx * 0.693359375f;
    r = r + fx * 2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * (r * r) + r + 1.0f;
    const int32_t bits = ((int32_t)fx + 127) << 23;
    float p;
    memcpy(&p, &bits, 4);
    return y * p;
}

#ifdef __AVX512F__
// nq_expf on 16 lanes (the same reduction and polynomial, with FMA); NaN lanes stay NaN (min / max return their
// second operand where either is NaN)
static inline __m512 nq_exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-87.3365447504f), _mm512_min_ps(_mm512_set1_ps(88.3762626647949f), x));
    const __m512 fx = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f),
                                                           _mm512_set1_ps(0.5f)), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fmadd_ps(fx, _mm512_set1_ps(2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_add_ps(_mm512_fmadd_ps(y, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

// 16 values of x (fp32 or bf16 at p + i) as fp32
static inline __m512 ld16(const void* p, int64_t i, int dt) {
    if (!dt) return _mm512_loadu_ps((const float*)p + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)((const uint16_t*)p + i))), 16));
}

// v rounded to bf16 (to nearest even, as f32_to_bf16), kept as fp32 bits
static inline __m512 rnd16(__m512 v, int dt) {
    if (!dt) return v;
    __m512i u = _mm512_castps_si512(v);
    u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                             _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xFFFF0000u)));
}

static inline void st16(void* p, int64_t i, __m512 v, int dt) {  // v: already rounded when dt = 1
    if (!dt)
        _mm512_storeu_ps((float*)p + i, v);
    else
        _mm256_storeu_si256((__m256i*)((uint16_t*)p + i),
                            _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));
}
#endif

#define NQ_LANES 16  // partial sums per dot product (a vector's worth: the compiler keeps them in one register)

// sum_i a[i] * b[i] over n, in NQ_LANES interleaved partial sums (vectorizable without reassociating the compiler's
// own sums), then those in order
static inline float dot(const float* a, const float* b, int64_t n) {
#ifdef __AVX512F__
    if (n % 16 == 0) {
        __m512 v = _mm512_setzero_ps();
        for (int64_t i = 0; i < n; i += 16) v = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), v);
        return _mm512_reduce_add_ps(v);
    }
#endif
    float part[NQ_LANES] = {0};
    int64_t i = 0;
    for (; i + NQ_LANES <= n; i += NQ_LANES)
        for (int l = 0; l < NQ_LANES; ++l) part[l] += a[i + l] * b[i + l];
    float s = 0.f;
    for (; i < n; ++i) s += a[i] * b[i];
    for (int l = 0; l < NQ_LANES; ++l) s += part[l];
    return s;
}

static inline void st(void* p, int64_t i, float v, int dt) {
    if (dt)
        ((uint16_t*)p)[i] = f32_to_bf16(v);
    else
        ((float*)p)[i] = v;
}

// x (n) += d (n) when d is given (the residual add, rounded), then h = w * round(x * rsqrt(mean(x^2) + eps)) (Qwen2's
// RMSNorm: fp32 statistics, normalised x rounded to the activations' dtype, times the weight, rounded). w is fp32
// (wdt = 0) or bf16 (wdt = 1); h is in the dtype of the product, hdt.
int nq_step_add_rmsnorm(void* x, const void* d, const void* w, void* h, int64_t n, float eps, int dt, int wdt,
                        int hdt) {
    if (n <= 0 || (dt != 0 && dt != 1) || (wdt != 0 && wdt != 1) || (hdt != 0 && hdt != 1)) return -1;
    double ss = 0.0;  // (double: n up to tens of thousands of fp32 squares)
    for (int64_t i = 0; i < n; ++i) {
        float v = ld(x, i, dt);
        if (d) {
            v = rnd(v + ld(d, i, dt), dt);
            st(x, i, v, dt);
        }
        ss += (double)(v * v);
    }
    const float r = 1.0f / sqrtf((float)(ss / (double)n) + eps);
    for (int64_t i = 0; i < n; ++i) st(h, i, ld(w, i, wdt) * rnd(ld(x, i, dt) * r, dt), hdt);
    return 0;
}

// Rotary embedding of one (heads, d) row block in place: x = round(round(x * cos) + round(rotate_half(x) * sin)),
// rotate_half(x) = (-x[d/2:], x[:d/2]); cos / sin (d) in the activations' dtype.
static void rope(void* x, int64_t heads, int64_t d, const void* cos, const void* sin, int dt) {
    const int64_t half = d / 2;
    float tmp[1024];
    for (int64_t hh = 0; hh < heads; ++hh) {
        const int64_t o = hh * d;
        for (int64_t i = 0; i < d; ++i) tmp[i] = ld(x, o + i, dt);
        for (int64_t i = 0; i < d; ++i) {
            const float rot = i < half ? -tmp[i + half] : tmp[i - half];
            st(x, o + i, rnd(rnd(tmp[i] * ld(cos, i, dt), dt) + rnd(rot * ld(sin, i, dt), dt), dt), dt);
        }
    }
}

// q (hq, d) and k (hkv, d) rotated in place; k and v (hkv, d) written to the fp32 caches at kc / vc, head hh at
// kc + hh * stride (the position's row of a (hkv, max_len, d) cache).
int nq_step_rope_kv(void* q, int64_t hq, void* k, const void* v, int64_t hkv, int64_t d, const void* cos,
                    const void* sin, float* kc, float* vc, int64_t stride, int dt) {
    if (hq <= 0 || hkv <= 0 || hq % hkv || d <= 0 || d % 2 || d > 1024 || (dt != 0 && dt != 1)) return -1;
    rope(q, hq, d, cos, sin, dt);
    rope(k, hkv, d, cos, sin, dt);
    for (int64_t hh = 0; hh < hkv; ++hh)
        for (int64_t i = 0; i < d; ++i) {
            kc[hh * stride + i] = ld(k, hh * d + i, dt);
            vc[hh * stride + i] = ld(v, hh * d + i, dt);
        }
    return 0;
}

// out (hq, d) = softmax(scale * q k^T) v for one query position over len cached positions: query head hh reads key /
// value head hh / (hq / hkv); keys / values fp32 (hkv, max_len, d) with head stride `stride`. fp32 scores, softmax and
// sums; out rounded once. scratch: len floats.
int nq_step_attend(const void* q, int64_t hq, int64_t hkv, int64_t d, const float* keys, const float* values,
                   int64_t len, int64_t stride, float scale, void* out, float* scratch, int dt) {
    if (hq <= 0 || hkv <= 0 || hq % hkv || d <= 0 || d > 1024 || len <= 0 || (dt != 0 && dt != 1)) return -1;
    const int64_t group = hq / hkv;
    float qv[1024], acc[1024];
    for (int64_t hh = 0; hh < hq; ++hh) {
        const float* kb = keys + (hh / group) * stride;
        const float* vb = values + (hh / group) * stride;
        for (int64_t i = 0; i < d; ++i) qv[i] = ld(q, hh * d + i, dt);
        float mx = -INFINITY;
        for (int64_t j = 0; j < len; ++j) {
            const float s = dot(qv, kb + j * d, d) * scale;
            scratch[j] = s;
            mx = s > mx ? s : mx;
        }
        int64_t j0 = 0;
#ifdef __AVX512F__
        for (; j0 + 16 <= len; j0 += 16)
            _mm512_storeu_ps(scratch + j0, nq_exp16(_mm512_sub_ps(_mm512_loadu_ps(scratch + j0), _mm512_set1_ps(mx))));
#endif
        for (; j0 < len; ++j0) scratch[j0] = nq_expf(scratch[j0] - mx);
        float sum = 0.f;
        for (int64_t i = 0; i < d; ++i) acc[i] = 0.f;
        for (int64_t j = 0; j < len; ++j) {
            const float p = scratch[j];
            sum += p;
            int64_t i = 0;
#ifdef __AVX512F__
            for (; i + 16 <= d; i += 16)
                _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(_mm512_set1_ps(p), _mm512_loadu_ps(vb + j * d + i),
                                                          _mm512_loadu_ps(acc + i)));
#endif
            for (; i < d; ++i) acc[i] += p * vb[j * d + i];
        }
        const float inv = 1.f / sum;
        for (int64_t i = 0; i < d; ++i) st(out, hh * d + i, acc[i] * inv, dt);
    }
    return 0;
}

static inline __attribute__((always_inline)) void silu_mul(const void* g, const void* u, void* out, int64_t n,
                                                            const int dt) {
    int64_t i = 0;
#ifdef __AVX512F__
    for (; i + 16 <= n; i += 16) {
        const __m512 x = ld16(g, i, dt);
        const __m512 sx = rnd16(_mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), nq_exp16(_mm512_sub_ps(
                                                      _mm512_setzero_ps(), x)))), dt);
        st16(out, i, rnd16(_mm512_mul_ps(sx, ld16(u, i, dt)), dt), dt);
    }
#endif
    for (; i < n; ++i) {
        const float x = ld(g, i, dt);
        st(out, i, rnd(x / (1.f + nq_expf(-x)), dt) * ld(u, i, dt), dt);
    }
}

// out (n) = round(round(silu(g)) * u), silu(g) = g / (1 + exp(-g)) (Qwen2's MLP: act_fn(gate) * up).
int nq_step_silu_mul(const void* g, const void* u, void* out, int64_t n, int dt) {
    if (n < 0 || (dt != 0 && dt != 1)) return -1;
    if (dt)  // (a constant dtype per loop: each vectorizes)
        silu_mul(g, u, out, n, 1);
    else
        silu_mul(g, u, out, n, 0);
    return 0;
}
