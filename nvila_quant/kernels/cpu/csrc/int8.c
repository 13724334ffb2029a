// The elementwise halves of a W8A8 linear (kernels/int8.py), one pass each instead of torch's five: the dynamic
// per-token int8 quantization of the activations, and the rescale of torch._int_mm's int32 sums. The arithmetic is
// numerics/int8.py's, op for op in fp32 (x / s rounded half to even; (acc * s_x) * s_w + b, then bf16 by
// round-to-nearest-even), so the outputs are bitwise torch's. x / out are fp32 (dt = 0) or bf16 (dt = 1).
// Portable C over rows (the compiler vectorizes the loops), OpenMP over rows.
#include "nq_shared.h"
#include <math.h>

static inline float ld8(const void* p, int64_t i, int dt) {
    return dt ? bf16_to_f32(((const uint16_t*)p)[i]) : ((const float*)p)[i];
}

// q (T, K) int8, scale (T) fp32 = max(max_k |x|, 1e-8 * 127) / 127 per row, as quantize_tokens.
int nq_i8_quantize_rows(const void* x, int dt, int64_t t, int64_t k, int8_t* q, float* scale, int nthreads) {
    if (t < 0 || k <= 0 || (dt != 0 && dt != 1)) return -1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < t; ++r) {
        float m = 0.f;
        for (int64_t i = 0; i < k; ++i) {
            const float v = fabsf(ld8(x, r * k + i, dt));
            m = v > m ? v : m;
        }
        float s = m / 127.f;
        s = s < 1e-8f ? 1e-8f : s;
        scale[r] = s;
        for (int64_t i = 0; i < k; ++i) {
            float v = nearbyintf(ld8(x, r * k + i, dt) / s);
            v = v > 127.f ? 127.f : (v < -127.f ? -127.f : v);
            q[r * k + i] = (int8_t)v;
        }
    }
    return 0;
}

// out (T, N) = (acc * xs[t]) * ws[n] + bias[n] (bias fp32, may be NULL), stored fp32 or bf16.
int nq_i8_rescale(const int32_t* acc, const float* xs, const float* ws, const float* bias, void* out, int dt,
                  int64_t t, int64_t n, int nthreads) {
    if (t < 0 || n <= 0 || (dt != 0 && dt != 1)) return -1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < t; ++r) {
        const float sx = xs[r];
        const int32_t* a = acc + r * n;
        if (dt) {
            uint16_t* o = (uint16_t*)out + r * n;
            for (int64_t j = 0; j < n; ++j) {
                float v = ((float)a[j] * sx) * ws[j];
                if (bias) v = v + bias[j];
                o[j] = f32_to_bf16(v);
            }
        } else {
            float* o = (float*)out + r * n;
            for (int64_t j = 0; j < n; ++j) {
                float v = ((float)a[j] * sx) * ws[j];
                if (bias) v = v + bias[j];
                o[j] = v;
            }
        }
    }
    return 0;
}
