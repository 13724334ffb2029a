// What the native CPU kernel files (rows.c, t16.c, t16_vnni.c, t16_amx.c; one library) share: the feature macros
// (NQ_HAVE_*, NQ_T16_AVX2), the bf16 <-> fp32 conversions, the per-group metadata (nq_meta) and its readers, the bound
// layer (nq_layer), the dispatchers' thresholds and route codes, and the kernels one file calls in another.
//
// The library: plain C + AVX-512 / AVX2 / AMX intrinsics, built with the system C compiler (-O3 -march=... -fopenmp)
// and loaded with ctypes. OpenMP resolves to the libgomp.so.1 torch has already loaded, so these kernels share torch's
// thread pool. Rows are handed out dynamically (a shared or busy core slows one thread, not the whole call).
// Return codes: 0 ok, -1 bad arguments, -2 not compiled for this CPU (no AVX-512 F/BW/BF16), -3 out of memory.
#ifndef NQ_SHARED_H
#define NQ_SHARED_H
#define _GNU_SOURCE  // syscall() (AMX permission)
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if !defined(__AVX512BW__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define NQ_T16_AVX2 1  // the fp32 T16 kernel in AVX2 (CPUs without AVX-512)
#else
#define NQ_T16_AVX2 0
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512BF16__)
#define NQ_HAVE_BF16 1
#else
#define NQ_HAVE_BF16 0
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define NQ_HAVE_VNNI 1  // the integer T16 kernels for few tokens (vpdpbusd; the bf16 one also needs NQ_HAVE_BF16)
extern int64_t nq_vnni_max_tokens, nq_vnni_f32_max_tokens;  // t16_vnni.c: the dispatchers' thresholds
#else
#define NQ_HAVE_VNNI 0
#endif
#if NQ_HAVE_BF16 && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define NQ_HAVE_AMX 1  // the T16 kernel on AMX tiles (Sapphire Rapids and later)
#include <sys/syscall.h>
#include <unistd.h>
extern int nq_amx_state;  // t16_amx.c: 0 not asked yet, 1 granted, -1 refused
extern int64_t nq_amx_min_tokens, nq_amx_gemm_min_tokens;  // t16_amx.c: the dispatcher's thresholds
#else
#define NQ_HAVE_AMX 0
#endif

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline int bad_shape(int64_t n, int64_t k, int64_t group) {
    return n < 0 || k <= 0 || group <= 0 || k % group || group % 32 || k % 32;
}

// Per-group metadata as QuantLinear stores it: scales in the checkpoint's dtype (kind 0 fp32, 1 bf16, 2 fp16),
// zero points uint8; both (N, K/G) row-major. Read as stored: no fp32 copies in memory.
typedef struct {
    const void* s;
    const uint8_t* z;
    int kind;
} nq_meta;

#ifdef __AVX512F__
static inline float scale_at(const nq_meta m, int64_t i) {
    if (m.kind == 0) return ((const float*)m.s)[i];
    const uint16_t h = ((const uint16_t*)m.s)[i];
    return m.kind == 1 ? bf16_to_f32(h) : _cvtsh_ss(h);
}

static inline float zero_at(const nq_meta m, int64_t i) { return (float)m.z[i]; }
#endif

#ifdef __AVX512F__
// 16 scales of group g for rows n0..n0+15 from the transposed (K/G, N) array, as fp32
static inline __m512 t16_scales(const nq_meta md, int64_t at) {
    if (md.kind == 0) return _mm512_loadu_ps((const float*)md.s + at);
    const __m256i h = _mm256_loadu_si256((const __m256i*)((const uint16_t*)md.s + at));
    return md.kind == 1 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)) : _mm512_cvtph_ps(h);
}
#endif

#if NQ_HAVE_BF16
// (M, K/G) fp32 per-group sums of bf16 x (M, K); NULL when out of memory. The caller frees it.
static inline float* group_sums(const uint16_t* x, int64_t m_tokens, int64_t k, int64_t group) {
    const int64_t stride = k / group;
    float* xsum = (float*)malloc((size_t)(m_tokens * stride) * sizeof(float));
    for (int64_t m = 0; xsum && m < m_tokens; ++m)
        for (int64_t g = 0; g < k / group; ++g) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t kk = g * group; kk < (g + 1) * group; kk += 16)
                acc = _mm512_add_ps(acc, _mm512_castsi512_ps(_mm512_slli_epi32(
                    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(x + m * k + kk))), 16)));
            xsum[m * stride + g] = _mm512_reduce_add_ps(acc);
        }
    return xsum;
}
#endif

enum { NQ_ROUTE_PLAIN = 0, NQ_ROUTE_VNNI = 1, NQ_ROUTE_AMX_TILES = 2, NQ_ROUTE_AMX_GEMM = 3 };  // nq_t16_route
int nq_t16_route(int64_t m_tokens, int f32);

// Kernels one file calls in another (same arguments as nq_t16_bf16 / nq_t16_f32; -2 where not compiled in).
int nq_t16_bf16_amx(const uint16_t* x, const uint8_t* t16, const void* scale_t, const uint8_t* zero_t, const float* bias,
                    uint16_t* out, int64_t m_tokens, int64_t n, int64_t k, int64_t group, int nthreads, int scale_kind);
int nq_t16_bf16_amx_gemm(const uint16_t* x, const uint8_t* t16, const void* scale_t, const uint8_t* zero_t,
                         const float* bias, uint16_t* out, int64_t m_tokens, int64_t n, int64_t k, int64_t group,
                         int nthreads, int scale_kind);
int nq_t16_bf16_vnni(const uint16_t* x, const uint8_t* t16, const void* scale_t, const uint8_t* zero_t, const float* bias,
                     uint16_t* out, int64_t m_tokens, int64_t n, int64_t k, int64_t group, int nthreads, int scale_kind);
int nq_t16_f32_vnni(const float* x, const uint8_t* t16, const void* scale_t, const uint8_t* zero_t, const float* bias,
                    float* out, int64_t m_tokens, int64_t n, int64_t k, int64_t group, int nthreads, int scale_kind);

// One layer's weights bound once (kernels/cpu/native.py NativeLayer), so a decode step's call passes 4 values.
// For nq_layer_t16_*: q is the T16 layout and scale / zero are transposed (K/G, N).
typedef struct {
    const uint8_t* q;
    const void* scale;
    const uint8_t* zero;
    const float* bias;
    int64_t n, k, group, scale_kind;
} nq_layer;

#endif  // NQ_SHARED_H
