// The work between the linears of a batch-1 Qwen2 decode step, one call each (model/lean_decode.py): residual add +
// RMSNorm, rotary embedding of q and k with the KV-cache write, single-query GQA attention over the cache, SiLU * up.
// Activations are fp32 (dt = 0) or bf16 (dt = 1); the arithmetic is fp32 and every result is rounded where
// transformers' Qwen2 rounds it in that dtype (each bf16 op of the eager forward is one fp32 op plus one rounding), so
// the elementwise ops are bitwise the eager ones; the two reductions (RMSNorm's mean, attention's sums) add in
// another order, and SiLU uses libm's expf: outputs may differ from the eager step by one rounding at most.
// Portable C (the compiler vectorizes the loops); no allocation; one thread (the ops are microseconds).
#include "nq_shared.h"
#include <math.h>

static inline float ld(const void* p, int64_t i, int dt) {
    return dt ? bf16_to_f32(((const uint16_t*)p)[i]) : ((const float*)p)[i];
}

static inline float rnd(float v, int dt) { return dt ? bf16_to_f32(f32_to_bf16(v)) : v; }

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
            float s = 0.f;
            for (int64_t i = 0; i < d; ++i) s += qv[i] * kb[j * d + i];
            s *= scale;
            scratch[j] = s;
            mx = s > mx ? s : mx;
        }
        float sum = 0.f;
        for (int64_t i = 0; i < d; ++i) acc[i] = 0.f;
        for (int64_t j = 0; j < len; ++j) {
            const float p = expf(scratch[j] - mx);
            sum += p;
            for (int64_t i = 0; i < d; ++i) acc[i] += p * vb[j * d + i];
        }
        const float inv = 1.f / sum;
        for (int64_t i = 0; i < d; ++i) st(out, hh * d + i, acc[i] * inv, dt);
    }
    return 0;
}

// out (n) = round(round(silu(g)) * u), silu(g) = g / (1 + exp(-g)) (Qwen2's MLP: act_fn(gate) * up).
int nq_step_silu_mul(const void* g, const void* u, void* out, int64_t n, int dt) {
    if (n < 0 || (dt != 0 && dt != 1)) return -1;
    for (int64_t i = 0; i < n; ++i) {
        const float x = ld(g, i, dt);
        st(out, i, rnd(x / (1.f + expf(-x)), dt) * ld(u, i, dt), dt);
    }
    return 0;
}
