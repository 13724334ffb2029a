// The bf16 kernels on the T16 layout on AMX tiles; see t16.c for the layout, nq_shared.h for the
// return codes.
#include "nq_shared.h"

#if NQ_HAVE_AMX
// ------------------------------------------------------------------------------------------------ AMX
// The T16 kernel on AMX tiles for bf16 x. One T16 row of 32 bytes (16 weight rows, k pair 2u and 32 + 2u of a
// 64-wide chunk) widened to words and OR-ed into 0x4300 is exactly row u of two VNNI B tiles (16 columns = weight
// rows, pairs of k): B_lo for k in [64c, 64c + 32) from the low nibbles and B_hi for [64c + 32, 64c + 64) from the
// high ones. Activations are A tiles straight from x (16 tokens x 32 k, stride K). Per group, C tiles (16 tokens x
// 16 rows, fp32) hold sum_k x (128 + q) exactly as the AVX-512 T16 kernel's accumulators do, and are folded into
// the output sums with the same per-group correction: tot += acc * s - (128 + z) * s * sum_k x.
// Tiles: 0..3 C (4 blocks of 16 tokens per pass), 4 A, 5 B_lo, 6 B_hi, 7 A of a partial last token block.
#define NQ_AMX_PASS 64  // tokens per pass over a weight unit

typedef struct {
    uint8_t palette, start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} nq_amx_cfg;

int nq_amx_state = 0;  // 0 not asked yet, 1 granted, -1 refused
int64_t nq_amx_min_tokens = INT64_MAX;  // nq_t16_bf16 hands calls with this many tokens or more to the AMX kernel
int64_t nq_amx_gemm_min_tokens = INT64_MAX;  // ... and from this many to the AMX GEMM

// Linux hands AMX tile state to a process only on request; 0 when granted (once per process).
int nq_amx_init(void) {
    if (nq_amx_state == 0) nq_amx_state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0 ? 1 : -1;
    return nq_amx_state == 1 ? 0 : -2;
}

// From how many tokens nq_t16_bf16 runs on AMX (after nq_amx_init; < 1: never). Returns the previous value.
int64_t nq_set_amx_min_tokens(int64_t m) {
    const int64_t old = nq_amx_min_tokens;
    nq_amx_min_tokens = m < 1 ? INT64_MAX : m;
    return old < INT64_MAX ? old : 0;
}

// From how many tokens nq_t16_bf16 runs the AMX GEMM (bf16-rounded weights; < 1: never). Returns the previous value.
int64_t nq_set_amx_gemm_min_tokens(int64_t m) {
    const int64_t old = nq_amx_gemm_min_tokens;
    nq_amx_gemm_min_tokens = m < 1 ? INT64_MAX : m;
    return old < INT64_MAX ? old : 0;
}

static void amx_configure(int nmb, int last_rows) {
    nq_amx_cfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < nmb; ++t) {
        c.rows[t] = (uint8_t)(t == nmb - 1 ? last_rows : 16);
        c.colsb[t] = 64;
    }
    for (int t = 4; t < 7; ++t) {
        c.rows[t] = 16;
        c.colsb[t] = 64;
    }
    c.rows[7] = (uint8_t)last_rows;
    c.colsb[7] = 64;
    _tile_loadconfig(&c);
}

#define NQ_AMX_DP(T)                                                          \
    do {                                                                      \
        if (full) {                                                           \
            _tile_loadd(4, a, stride);                                        \
            _tile_dpbf16ps(T, 4, 5);                                          \
            _tile_loadd(4, a + 32, stride);                                   \
            _tile_dpbf16ps(T, 4, 6);                                          \
        } else {                                                              \
            _tile_loadd(7, a, stride);                                        \
            _tile_dpbf16ps(T, 7, 5);                                          \
            _tile_loadd(7, a + 32, stride);                                   \
            _tile_dpbf16ps(T, 7, 6);                                          \
        }                                                                     \
    } while (0)

// Tokens [m0, m0 + mt) (mt <= NQ_AMX_PASS, tiles configured for it) x the 16 rows of T16 unit `unit`, whole K.
static void amx_unit_pass(const uint16_t* x, const float* xsum, const uint8_t* t16, const nq_meta md, const float* bias,
                          uint16_t* out, int64_t n, int64_t k, int64_t group, int64_t unit, int64_t m0, int mt,
                          uint8_t* bbuf, float* cbuf, float* tot) {
    const int64_t nc = k / 64, ng = k / group, cpg = group / 64, stride = k * 2;
    const int nmb = (mt + 15) / 16, last = mt - 16 * (nmb - 1);
    const __m512i low = _mm512_set1_epi16(0x0F), one28 = _mm512_set1_epi16(0x4300);
    for (int i = 0; i < mt; ++i) _mm512_storeu_ps(tot + 16 * i, _mm512_setzero_ps());
    for (int64_t g = 0; g < ng; ++g) {
        _tile_zero(0);
        if (nmb > 1) _tile_zero(1);
        if (nmb > 2) _tile_zero(2);
        if (nmb > 3) _tile_zero(3);
        for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
            const uint8_t* p = t16 + (unit * nc + c) * 512;  // 16 rows of 32 bytes
            _mm_prefetch((const char*)p + 2048, _MM_HINT_T0);
            _mm_prefetch((const char*)p + 2048 + 64 * 4, _MM_HINT_T0);
            for (int u = 0; u < 16; ++u) {
                const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(p + 32 * u)));
                _mm512_store_si512((__m512i*)(bbuf + 64 * u), _mm512_ternarylogic_epi32(w, low, one28, 0xEA));
                _mm512_store_si512((__m512i*)(bbuf + 1024 + 64 * u), _mm512_or_si512(_mm512_srli_epi16(w, 4), one28));
            }
            _tile_loadd(5, bbuf, 64);
            _tile_loadd(6, bbuf + 1024, 64);
            for (int mb = 0; mb < nmb; ++mb) {
                const uint16_t* a = x + (m0 + 16 * mb) * k + 64 * c;
                const int full = mb < nmb - 1 || last == 16;
                switch (mb) {
                    case 0: NQ_AMX_DP(0); break;
                    case 1: NQ_AMX_DP(1); break;
                    case 2: NQ_AMX_DP(2); break;
                    default: NQ_AMX_DP(3); break;
                }
            }
        }
        const int64_t at = g * n + unit * 16;
        const __m512 s = t16_scales(md, at);
        const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(md.z + at))));
        const __m512 cz = _mm512_mul_ps(_mm512_add_ps(z, _mm512_set1_ps(128.f)), s);
        for (int mb = 0; mb < nmb; ++mb) {
            switch (mb) {
                case 0: _tile_stored(0, cbuf, 64); break;
                case 1: _tile_stored(1, cbuf, 64); break;
                case 2: _tile_stored(2, cbuf, 64); break;
                default: _tile_stored(3, cbuf, 64); break;
            }
            const int rows = mb == nmb - 1 ? last : 16;
            for (int r = 0; r < rows; ++r) {
                const int m = 16 * mb + r;
                __m512 t = _mm512_loadu_ps(tot + 16 * m);
                t = _mm512_fmadd_ps(_mm512_load_ps(cbuf + 16 * r), s, t);
                t = _mm512_fnmadd_ps(cz, _mm512_set1_ps(xsum[(m0 + m) * ng + g]), t);
                _mm512_storeu_ps(tot + 16 * m, t);
            }
        }
    }
    const __m512 b = bias ? _mm512_loadu_ps(bias + unit * 16) : _mm512_setzero_ps();
    for (int m = 0; m < mt; ++m) {
        const __m256bh h = _mm512_cvtneps_pbh(_mm512_add_ps(_mm512_loadu_ps(tot + 16 * m), b));
        _mm256_storeu_si256((__m256i*)(out + (m0 + m) * n + unit * 16), (__m256i)h);
    }
}
#undef NQ_AMX_DP

// y (M, N) bf16 = x (M, K) bf16 @ w^T + bias on AMX, w in T16 layout; same arguments and results as nq_t16_bf16
// (-2 when the process was not granted AMX state: call nq_amx_init first).
int nq_t16_bf16_amx(const uint16_t* x, const uint8_t* t16, const void* scale_t, const uint8_t* zero_t, const float* bias,
                    uint16_t* out, int64_t m_tokens, int64_t n, int64_t k, int64_t group, int nthreads, int scale_kind) {
    if (bad_shape(n, k, group) || n % 16 || k % 64 || group % 64 || m_tokens < 0 || scale_kind < 0 || scale_kind > 2)
        return -1;
    if (nq_amx_state != 1) return -2;
    if (m_tokens == 0 || n == 0) return 0;
    const nq_meta meta = {scale_t, zero_t, scale_kind};
    float* xsum = group_sums(x, m_tokens, k, group);  // (M, K/G) per-group sums of x
    if (!xsum) return -3;
    const int64_t units = n / 16;
#pragma omp parallel num_threads(nthreads)
    {
        uint8_t bbuf[2048] __attribute__((aligned(64)));  // B_lo, B_hi
        float cbuf[256] __attribute__((aligned(64)));     // one C tile
        float tot[NQ_AMX_PASS * 16] __attribute__((aligned(64)));
        int configured = -1;  // tokens of the pass the tiles are configured for
        // passes outside, units inside: a pass's activations (64 tokens x K) stay in L2 while every unit streams by
        for (int64_t m0 = 0; m0 < m_tokens; m0 += NQ_AMX_PASS) {
            const int mt = (int)(m_tokens - m0 < NQ_AMX_PASS ? m_tokens - m0 : NQ_AMX_PASS);
#pragma omp for schedule(dynamic, 1) nowait
            for (int64_t unit = 0; unit < units; ++unit) {
                if (mt != configured) {
                    amx_configure((mt + 15) / 16, mt - 16 * ((mt + 15) / 16 - 1));
                    configured = mt;
                }
                amx_unit_pass(x, xsum, t16, meta, bias, out, n, k, group, unit, m0, mt, bbuf, cbuf, tot);
            }
        }
        if (configured != -1) _tile_release();
    }
    free(xsum);
    return 0;
}


// ------------------------------------------------------------------------------------------------ AMX GEMM
// Many tokens: the per-group correction above costs as much as the tile products, so instead each weight is
// dequantized once per call into bf16 B tiles - the reference's (q - z) * s in fp32, rounded once (to nearest even),
// the very weights the dense path would multiply - and the GEMM runs on tiles without any per-group step:
// - x is packed once into 16-token x 32-k tiles (1 KB each, contiguous along k; a tile load straight from x with a
//   K-long stride would put its 16 rows in one cache set), token count padded to 16 with zero rows;
// - a work item is NQ_AMXG_MC tokens x NQ_AMXG_NC weight rows; per K block of NQ_AMXG_KC the thread dequantizes the
//   item's weights into B tiles (stay in L2) and runs 2 x 2 tile blocks (32 tokens x 32 rows: 4 C, 2 A, 2 B tiles,
//   A reused across the item's rows from L1), C tiles spilled to an fp32 block (L2) between K blocks.
#define NQ_AMXG_MC 512  // tokens per work item
#define NQ_AMXG_NC 256  // weight rows per work item (16 units)
#define NQ_AMXG_KC 512  // k per block

static void amxg_configure(void) {
    nq_amx_cfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; ++t) {
        c.rows[t] = 16;
        c.colsb[t] = 64;
    }
    _tile_loadconfig(&c);
}

// B tiles of `units` T16 units from unit u0, 64-wide chunks [c0, c0 + nck): tile (j, 2 (c - c0) + h) at
// bb + (j * 2 nck + 2 (c - c0) + h) * 512 holds k in [64 c + 32 h, + 32) of rows 16 (u0 + j) .. + 15, VNNI order
// (row u: k pair 2u, 2u + 1; element 2r + e: weight row r). T16 row u byte 2r + e has k 64c + 2u + e in its low
// nibble and k 64c + 32 + 2u + e in its high one, so element order carries over as is.
static void amxg_dequant(const uint8_t* t16, const nq_meta md, int64_t n, int64_t k, int64_t group, int64_t u0,
                         int units, int64_t c0, int nck, uint16_t* bb) {
    const int64_t nc = k / 64;
    const __m512i pair_lo = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    const __m512i pair_hi = _mm512_add_epi32(pair_lo, _mm512_set1_epi32(8)), low = _mm512_set1_epi32(15);
    for (int j = 0; j < units; ++j) {
        int64_t g_at = -1;
        __m512 s0 = _mm512_setzero_ps(), s1 = s0;
        __m512i z0 = _mm512_setzero_si512(), z1 = z0;
        for (int cc = 0; cc < nck; ++cc) {
            const int64_t c = c0 + cc, g = c * 64 / group;
            if (g != g_at) {  // weight rows 0-7 and 8-15 of the unit, each scale / zero twice (k pairs)
                const int64_t at = g * n + (u0 + j) * 16;
                const __m512 s = t16_scales(md, at);
                const __m512i z = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(md.z + at)));
                s0 = _mm512_permutexvar_ps(pair_lo, s);
                s1 = _mm512_permutexvar_ps(pair_hi, s);
                z0 = _mm512_permutexvar_epi32(pair_lo, z);
                z1 = _mm512_permutexvar_epi32(pair_hi, z);
                g_at = g;
            }
            const uint8_t* p = t16 + ((u0 + j) * nc + c) * 512;
            uint16_t* lo = bb + ((int64_t)j * 2 * nck + 2 * cc) * 512;
            for (int u = 0; u < 16; ++u) {
                const __m512i d0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p + 32 * u)));
                const __m512i d1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p + 32 * u + 16)));
                const __m512 l0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(d0, low), z0)), s0);
                const __m512 l1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(d1, low), z1)), s1);
                const __m512 h0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(d0, 4), z0)), s0);
                const __m512 h1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(d1, 4), z1)), s1);
                _mm512_store_si512((__m512i*)(lo + 32 * u), (__m512i)_mm512_cvtne2ps_pbh(l1, l0));
                _mm512_store_si512((__m512i*)(lo + 512 + 32 * u), (__m512i)_mm512_cvtne2ps_pbh(h1, h0));
            }
        }
    }
}

// C tiles (TM token blocks x TN units) += A (a0, a1: `steps` consecutive tiles) x B (b0, b1: same); C tiles at
// c[i][j] (fp32 16 x 16, 1 KB), zero instead of loaded when `first`.
static inline __attribute__((always_inline)) void amxg_block(const uint16_t* a0, const uint16_t* a1, const uint16_t* b0,
                                                             const uint16_t* b1, float* c00, float* c01, float* c10,
                                                             float* c11, int steps, int first, const int TM, const int TN) {
    if (first) {
        _tile_zero(0);
        if (TN > 1) _tile_zero(1);
        if (TM > 1) _tile_zero(2);
        if (TM > 1 && TN > 1) _tile_zero(3);
    } else {
        _tile_loadd(0, c00, 64);
        if (TN > 1) _tile_loadd(1, c01, 64);
        if (TM > 1) _tile_loadd(2, c10, 64);
        if (TM > 1 && TN > 1) _tile_loadd(3, c11, 64);
    }
    for (int s = 0; s < steps; ++s) {
        _tile_loadd(4, a0 + 512 * s, 64);
        _tile_loadd(6, b0 + 512 * s, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (TN > 1) {
            _tile_loadd(7, b1 + 512 * s, 64);
            _tile_dpbf16ps(1, 4, 7);
        }
        if (TM > 1) {
            _tile_loadd(5, a1 + 512 * s, 64);
            _tile_dpbf16ps(2, 5, 6);
            if (TN > 1) _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, c00, 64);
    if (TN > 1) _tile_stored(1, c01, 64);
    if (TM > 1) _tile_stored(2, c10, 64);
    if (TM > 1 && TN > 1) _tile_stored(3, c11, 64);
}

#define NQ_AMXG_BLOCK(TM, TN)                                                                                    \
    amxg_block(at + (i * k32 + pc / 32) * 512, at + ((i + 1) * k32 + pc / 32) * 512, bb + j * 2 * nck * 512,     \
               bb + (j + 1) * 2 * nck * 512, cb + (i * units + j) * 256, cb + (i * units + j + 1) * 256,         \
               cb + ((i + 1) * units + j) * 256, cb + ((i + 1) * units + j + 1) * 256, 2 * nck, pc == 0, TM, TN)

// One work item: token blocks [i0, i0 + mblocks) of the packed x `at` x units [u0, u0 + units), whole K.
static void amxg_item(const uint16_t* at, const uint8_t* t16, const nq_meta md, const float* bias, uint16_t* out,
                      int64_t m_tokens, int64_t n, int64_t k, int64_t group, int64_t i0, int mblocks, int64_t u0,
                      int units, uint16_t* bb, float* cb) {
    const int64_t k32 = k / 32;
    at += i0 * k32 * 512;
    for (int64_t pc = 0; pc < k; pc += NQ_AMXG_KC) {
        const int nck = (int)((k - pc < NQ_AMXG_KC ? k - pc : NQ_AMXG_KC) / 64);
        amxg_dequant(t16, md, n, k, group, u0, units, pc / 64, nck, bb);
        for (int i = 0; i < mblocks; i += 2) {
            int j = 0;
            if (i + 1 < mblocks) {
                for (; j + 1 < units; j += 2) NQ_AMXG_BLOCK(2, 2);
                if (j < units) NQ_AMXG_BLOCK(2, 1);
            } else {
                for (; j + 1 < units; j += 2) NQ_AMXG_BLOCK(1, 2);
                if (j < units) NQ_AMXG_BLOCK(1, 1);
            }
        }
    }
    for (int i = 0; i < mblocks; ++i)
        for (int r = 0; r < 16 && (i0 + i) * 16 + r < m_tokens; ++r) {
            uint16_t* o = out + ((i0 + i) * 16 + r) * n + u0 * 16;
            for (int j = 0; j < units; ++j) {
                __m512 v = _mm512_load_ps(cb + (i * units + j) * 256 + 16 * r);
                if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + (u0 + j) * 16));
                _mm256_storeu_si256((__m256i*)(o + 16 * j), (__m256i)_mm512_cvtneps_pbh(v));
            }
        }
}
#undef NQ_AMXG_BLOCK

// y (M, N) bf16 = x (M, K) bf16 @ w^T + bias on AMX with bf16-rounded weights (the dense path's numerics); same
// arguments as nq_t16_bf16; -2 without AMX state, -3 out of memory.
int nq_t16_bf16_amx_gemm(const uint16_t* x, const uint8_t* t16, const void* scale_t, const uint8_t* zero_t,
                         const float* bias, uint16_t* out, int64_t m_tokens, int64_t n, int64_t k, int64_t group,
                         int nthreads, int scale_kind) {
    if (bad_shape(n, k, group) || n % 16 || k % 64 || group % 64 || m_tokens < 0 || scale_kind < 0 || scale_kind > 2)
        return -1;
    if (nq_amx_state != 1) return -2;
    if (m_tokens == 0 || n == 0) return 0;
    const nq_meta meta = {scale_t, zero_t, scale_kind};
    const int64_t k32 = k / 32, mblocks = (m_tokens + 15) / 16, units = n / 16;
    // work items of up to NQ_AMXG_MC tokens x NQ_AMXG_NC rows, smaller while there are fewer than 4 per thread (narrow
    // layers such as GQA k / v projections, many cores)
    int64_t ub = NQ_AMXG_NC / 16, mb = NQ_AMXG_MC / 16;
    while (ub > 2 && (units + ub - 1) / ub * ((mblocks + mb - 1) / mb) < 4 * nthreads) ub /= 2;
    while (mb > 2 && (units + ub - 1) / ub * ((mblocks + mb - 1) / mb) < 4 * nthreads) mb /= 2;
    const int64_t items_n = (units + ub - 1) / ub, items = items_n * ((mblocks + mb - 1) / mb);
    uint16_t* at = (uint16_t*)aligned_alloc(64, (size_t)(mblocks * k32) * 1024);  // (M/16, K/32) tiles of 16 x 32
    if (!at) return -3;
    int oom = 0;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < mblocks; ++i)
            for (int r = 0; r < 16; ++r) {
                const int64_t m = i * 16 + r;
                uint16_t* dst = at + i * k32 * 512 + 32 * r;
                if (m < m_tokens)
                    for (int64_t kk = 0; kk < k32; ++kk)
                        _mm512_store_si512((__m512i*)(dst + kk * 512), _mm512_loadu_si512(x + m * k + 32 * kk));
                else
                    for (int64_t kk = 0; kk < k32; ++kk) _mm512_store_si512((__m512i*)(dst + kk * 512), _mm512_setzero_si512());
            }
        // B tiles of one K block (L2) and the item's fp32 C tiles
        uint16_t* bb = (uint16_t*)aligned_alloc(64, (size_t)ub * (NQ_AMXG_KC / 32) * 1024);
        float* cb = (float*)aligned_alloc(64, (size_t)ub * mb * 1024);
        if (!bb || !cb) {
#pragma omp atomic write
            oom = 1;
        }
        int configured = 0;
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; ++it) {
            if (!bb || !cb) continue;
            if (!configured) {
                amxg_configure();
                configured = 1;
            }
            const int64_t i0 = (it / items_n) * mb, u0 = (it % items_n) * ub;
            amxg_item(at, t16, meta, bias, out, m_tokens, n, k, group, i0, (int)(mblocks - i0 < mb ? mblocks - i0 : mb),
                      u0, (int)(units - u0 < ub ? units - u0 : ub), bb, cb);
        }
        if (configured) _tile_release();
        free(bb);
        free(cb);
    }
    free(at);
    return oom ? -3 : 0;
}

#else
int nq_amx_init(void) { return -2; }

int64_t nq_set_amx_min_tokens(int64_t m) {
    (void)m;
    return 0;
}

int64_t nq_set_amx_gemm_min_tokens(int64_t m) {
    (void)m;
    return 0;
}

int nq_t16_bf16_amx(const uint16_t* x, const uint8_t* t16, const void* scale_t, const uint8_t* zero_t, const float* bias,
                    uint16_t* out, int64_t m_tokens, int64_t n, int64_t k, int64_t group, int nthreads, int scale_kind) {
    (void)x; (void)t16; (void)scale_t; (void)zero_t; (void)bias; (void)out; (void)m_tokens; (void)n; (void)k;
    (void)group; (void)nthreads; (void)scale_kind;
    return -2;
}
int nq_t16_bf16_amx_gemm(const uint16_t* x, const uint8_t* t16, const void* scale_t, const uint8_t* zero_t,
                         const float* bias, uint16_t* out, int64_t m_tokens, int64_t n, int64_t k, int64_t group,
                         int nthreads, int scale_kind) {
    return nq_t16_bf16_amx(x, t16, scale_t, zero_t, bias, out, m_tokens, n, k, group, nthreads, scale_kind);
}
#endif
