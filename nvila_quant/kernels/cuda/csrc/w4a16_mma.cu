// W4A16 skinny GEMM on tensor cores for decode and short prompts: y (M, N) = x (M, K) @ W^T + bias.
//
// The weights are repacked once at load time (nvila_quant/kernels/cuda/layout.py, "mma" layout) so that one
// 16-byte load per lane gives that lane its mma.sync m16n8k16 A fragments for 32 rows x 32 k, with no shuffles:
//   qweight  (N/32, K/32, 32 lanes, 4 words) int32. Word w = 2 * nt + j of lane l = 4 * g + t holds, in nibble
//            i = p + 4 * h (p = 2 * p1 + p0), q[32 b + 16 nt + 8 p0 + g][32 c + 8 t + 4 j + 2 p1 + h]
//   scales_t (K/G, N) fp32 and zeros_t (K/G, N) uint8: transposed, so a warp's 8 rows are one 32-byte sector
//   x (M, K), out (M, N) fp16 or bf16 (16-byte aligned rows); bias (N,) like x or NULL
// Tile j of chunk c takes the k order in which lane t's B fragments are x[tok][32 c + 8 t .. + 7]: one 16-byte
// load per lane and token row. The dot product does not care about the order of k, as long as A uses the same.
// Dequantization: lop3 puts a nibble pair into the mantissas of the half2 M + q (M = 1024 for fp16, 128 for bf16),
// one fma subtracts M + z: the exact integers q - z in the A fragment. Products and sums are fp32 (the MMA), and
// the per-group scale is applied in fp32 to per-group partial sums: no weight is ever rounded to 16 bits.
// Work split: a CTA takes 32 rows (N/32 along grid.x), 8 * TG tokens (grid.z) and 1/ksplit of K (grid.y); its W
// warps (8 or 16) split that K range and add their sums through shared memory. ksplit > 1 writes fp32 partial sums that a
// second kernel adds up (no atomics, no semaphores, no state to zero: every launch writes all it reads later).
// Needs N % 32 == 0, K % 32 == 0, G % 32 == 0, G | K, zero points < 128 (bf16 M + z stays exact), sm_80+.
//
// Built by nvcc for the GPU, and by a C++ compiler with NQ_SIM defined against cuda_sim.h, which runs the same
// kernels on CPU threads (tests, no GPU needed).
#ifdef NQ_SIM
#include "cuda_sim.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif
#include <stdint.h>
#include <stdio.h>

namespace {

constexpr int MAX_TG = 4;         // token groups of 8 per CTA (up to 32 tokens share one weight load)

// ------------------------------------------------------------------------------------------------ primitives
#ifndef NQ_SIM
__device__ __forceinline__ uint4 ld16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// d = a * b + c on two 16-bit lanes (fp16 or bf16), exact here (small integers)
template <bool BF16> __device__ __forceinline__ uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t d;
    if constexpr (BF16) asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    else asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// c (16x8 fp32) += A (16x16, row) @ B (16x8, col), A and B fp16 or bf16
template <bool BF16> __device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], const uint32_t b[2]) {
    if constexpr (BF16)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    else
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// 16-byte global -> shared copy, asynchronous; zero-fills (reads nothing) when !valid
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    const unsigned dst = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

template <bool BF16> __device__ __forceinline__ float to_f(uint16_t v) {
    if constexpr (BF16) return __bfloat162float(__ushort_as_bfloat16(v));
    else return __half2float(__ushort_as_half(v));
}
template <bool BF16> __device__ __forceinline__ uint16_t from_f(float v) {
    if constexpr (BF16) return __bfloat16_as_ushort(__float2bfloat16_rn(v));
    else return __half_as_ushort(__float2half_rn(v));
}
#else
using nqsim::ld16;
using nqsim::fma2;
using nqsim::mma16816;
using nqsim::to_f;
using nqsim::from_f;
using nqsim::cp_async16;
using nqsim::cp_async_commit;
using nqsim::cp_async_wait;
#endif

template <bool BF16> struct Magic {
    static constexpr uint32_t bias = BF16 ? 0x4300u : 0x6400u;  // 128.0 (bf16), 1024.0 (fp16): q fills the mantissa
    static constexpr uint32_t one2 = BF16 ? 0x3F803F80u : 0x3C003C00u;  // (1, 1)
    static constexpr uint32_t neg = 0x8000u;
};

// -(M + z) in both halves of a register (fma2(v, 1, it) subtracts M + z)
template <bool BF16> __device__ __forceinline__ uint32_t neg_zero2(uint32_t z) {
    const uint32_t h = Magic<BF16>::neg | Magic<BF16>::bias | z;
    return h | (h << 16);
}

// The four A registers of one 16x16 tile from one packed word: register p = nibbles (p, p + 4) as (M + q) halves,
// minus M + z of its row (rows g for p = 0, 2 and g + 8 for p = 1, 3).
template <bool BF16> __device__ __forceinline__ void dequant_word(uint32_t w, uint32_t nz_lo, uint32_t nz_hi, uint32_t a[4]) {
    const uint32_t magic2 = Magic<BF16>::bias | (Magic<BF16>::bias << 16);
#pragma unroll
    for (int p = 0; p < 4; ++p) {
        const uint32_t v = ((w >> (4 * p)) & 0x000F000Fu) | magic2;  // one lop3
        a[p] = fma2<BF16>(v, Magic<BF16>::one2, (p & 1) ? nz_hi : nz_lo);
    }
}

// ------------------------------------------------------------------------------------------------ skinny GEMM
template <bool BF16, int TG, int W>
__global__ void __launch_bounds__(W * 32) mma_linear_kernel(
    const uint16_t* __restrict__ x, const uint32_t* __restrict__ qweight, const float* __restrict__ scales_t,
    const uint8_t* __restrict__ zeros_t, const uint16_t* __restrict__ bias, uint16_t* __restrict__ out,
    float* __restrict__ partial, int M, int N, int K, int group, int ksplit) {
    static_assert(W * TG * 8 * 32 * sizeof(float) <= 48 * 1024, "per-warp sums must fit 48 KB of static shared memory");
    __shared__ float red[W][TG * 8][32];  // per-warp sums: [warp][tg, nt, c-register][lane]
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int b = blockIdx.x, ks = blockIdx.y, tok0 = blockIdx.z * TG * 8;
    const int chunks = K >> 5, gch = group >> 5;  // 32-wide chunks in K and per group
    // this CTA's and this warp's chunk ranges
    const int cta_beg = (int)((long long)chunks * ks / ksplit), cta_end = (int)((long long)chunks * (ks + 1) / ksplit);
    const int span = cta_end - cta_beg;
    const int cbeg = cta_beg + span * warp / W, cend = cta_beg + span * (warp + 1) / W;
    const int n_lo = 32 * b + g;  // rows n_lo + 16 nt (+ 8)

    float acc[TG][2][4], gacc[TG][2][4];
#pragma unroll
    for (int i = 0; i < TG; ++i)
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][nt][r] = gacc[i][nt][r] = 0.f;
    uint32_t nz[2][2] = {{0u, 0u}, {0u, 0u}};  // -(M + z) for rows (nt, lo/hi)
    const uint4 zero4 = {0u, 0u, 0u, 0u};
    const uint4* qv = reinterpret_cast<const uint4*>(qweight) + (long long)b * chunks * 32 + lane;
    constexpr int UNROLL = TG == 1 ? 8 : 4;  // 32-wide k chunks whose loads a warp issues before using them

    for (int c0 = cbeg; c0 < cend; c0 += UNROLL) {
        uint4 wq[UNROLL], xv[UNROLL][TG];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int c = c0 + u;
            wq[u] = zero4;
#pragma unroll
            for (int i = 0; i < TG; ++i) xv[u][i] = zero4;
            if (c < cend) {
                wq[u] = ld16(qv + (long long)c * 32);
#pragma unroll
                for (int i = 0; i < TG; ++i) {
                    const int tok = tok0 + 8 * i + g;
                    if (tok < M) xv[u][i] = ld16(x + (long long)tok * K + 32 * c + 8 * t);
                }
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int c = c0 + u;
            if (c >= cend) break;
            const int grp = c / gch;
            if (c == cbeg || c % gch == 0) {  // a new group: its zero points
                const uint8_t* zr = zeros_t + (long long)grp * N + n_lo;
#pragma unroll
                for (int nt = 0; nt < 2; ++nt) {
                    nz[nt][0] = neg_zero2<BF16>(zr[16 * nt]);
                    nz[nt][1] = neg_zero2<BF16>(zr[16 * nt + 8]);
                }
            }
            const uint32_t words[4] = {wq[u].x, wq[u].y, wq[u].z, wq[u].w};
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    uint32_t a[4];
                    dequant_word<BF16>(words[2 * nt + j], nz[nt][0], nz[nt][1], a);
#pragma unroll
                    for (int i = 0; i < TG; ++i) {
                        const uint32_t bfrag[2] = {j ? xv[u][i].z : xv[u][i].x, j ? xv[u][i].w : xv[u][i].y};
                        mma16816<BF16>(gacc[i][nt], a, bfrag);
                    }
                }
            }
            if ((c + 1) % gch == 0 || c + 1 == cend) {  // the group (or this warp's share of it) is done: scale it
                const float* sr = scales_t + (long long)grp * N + n_lo;
#pragma unroll
                for (int nt = 0; nt < 2; ++nt) {
                    const float s_lo = sr[16 * nt], s_hi = sr[16 * nt + 8];
#pragma unroll
                    for (int i = 0; i < TG; ++i) {
                        acc[i][nt][0] += s_lo * gacc[i][nt][0];
                        acc[i][nt][1] += s_lo * gacc[i][nt][1];
                        acc[i][nt][2] += s_hi * gacc[i][nt][2];
                        acc[i][nt][3] += s_hi * gacc[i][nt][3];
#pragma unroll
                        for (int r = 0; r < 4; ++r) gacc[i][nt][r] = 0.f;
                    }
                }
            }
        }
    }

#pragma unroll
    for (int i = 0; i < TG; ++i)
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int r = 0; r < 4; ++r) red[warp][(i * 2 + nt) * 4 + r][lane] = acc[i][nt][r];
    __syncthreads();
    // c-register r of lane (g, t): token 2 t + (r & 1), row g + 8 (r >> 1) of n-tile nt
    for (int e = threadIdx.x; e < TG * 8 * 32; e += W * 32) {
        const int v = e >> 5, l = e & 31;
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < W; ++w) sum += red[w][v][l];
        const int i = v >> 3, nt = (v >> 2) & 1, r = v & 3;
        const int tok = tok0 + 8 * i + 2 * (l & 3) + (r & 1);
        const int n = 32 * b + 16 * nt + (l >> 2) + 8 * (r >> 1);
        if (tok >= M) continue;
        if (ksplit > 1) {
            partial[((long long)ks * M + tok) * N + n] = sum;
        } else {
            const float bv = bias ? to_f<BF16>(bias[n]) : 0.f;
            out[(long long)tok * N + n] = from_f<BF16>(sum + bv);
        }
    }
}

// ------------------------------------------------------------------------------------------------ GEMM
// Many tokens: a CTA computes 128 rows (4 blocks of 32) x 128 tokens; 8 warps as 2 (rows) x 4 (tokens), each 64 rows
// x 32 tokens (4 n-tiles x 4 token groups: 32 mma per 32-wide k chunk). Weights and activations of a chunk go to
// shared memory through a 4-stage cp.async pipeline (2 KB + 8 KB per stage); A fragments come from the weight words
// as in the skinny kernel (exact q - z, scales applied per group in fp32), B fragments are one 16-byte shared load
// per token group (the same k order). ksplit > 1: fp32 partial sums and the reduce kernel, as above.
constexpr int G_ROWS = 128, G_TOKENS = 128, G_STAGES = 4, G_THREADS = 256;

struct GemmStage {
    uint4 w[G_ROWS / 32][32];  // [block][lane]: 16 bytes of packed weights per lane, as in global memory
    uint4 x[G_TOKENS][4];      // [token][k / 8]: 32 activations per token
};

template <bool BF16>
__global__ void __launch_bounds__(G_THREADS) mma_gemm_kernel(
    const uint16_t* __restrict__ x, const uint32_t* __restrict__ qweight, const float* __restrict__ scales_t,
    const uint8_t* __restrict__ zeros_t, const uint16_t* __restrict__ bias, uint16_t* __restrict__ out,
    float* __restrict__ partial, int M, int N, int K, int group, int ksplit) {
    __shared__ __align__(16) GemmStage st[G_STAGES];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int warp_n = warp >> 2, warp_m = warp & 3;  // rows 64 warp_n .. +63, tokens 32 warp_m .. +31 of the tile
    const int nblocks = N >> 5, chunks = K >> 5, gch = group >> 5;
    const int b0 = blockIdx.x * (G_ROWS / 32), m0 = blockIdx.y * G_TOKENS, ks = blockIdx.z;
    const int cbeg = (int)((long long)chunks * ks / ksplit), cend = (int)((long long)chunks * (ks + 1) / ksplit);
    const int nch = cend - cbeg;
    const uint4* qv = reinterpret_cast<const uint4*>(qweight);

    auto load_stage = [&](int stage, int c) {
#pragma unroll
        for (int r = 0; r < (G_TOKENS * 4) / G_THREADS; ++r) {  // activations: 512 copies of 16 bytes
            const int idx = tid + r * G_THREADS, row = idx >> 2, col = idx & 3;
            const int tok = m0 + row;
            const bool valid = tok < M;
            cp_async16(&st[stage].x[row][col], x + (long long)(valid ? tok : 0) * K + 32 * c + 8 * col, valid);
        }
        if (tid < (G_ROWS / 32) * 32) {  // weights: 128 copies of 16 bytes
            const int i = tid >> 5, l = tid & 31, b = b0 + i;
            const bool valid = b < nblocks;
            cp_async16(&st[stage].w[i][l], qv + ((long long)(valid ? b : 0) * chunks + c) * 32 + l, valid);
        }
    };

    float acc[4][4][4], gacc[4][4][4];  // [2 * block + nt][token group][c-register]
#pragma unroll
    for (int f = 0; f < 4; ++f)
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[f][i][r] = gacc[f][i][r] = 0.f;
    uint32_t nz[4][2];  // -(M + z) for rows (2 * block + nt, lo/hi)
    int rows[4][2];     // those rows (N when the block lies past the weights: nothing loaded or written there)
#pragma unroll
    for (int f = 0; f < 4; ++f) {
        const int b = b0 + 2 * warp_n + (f >> 1);
#pragma unroll
        for (int h = 0; h < 2; ++h) rows[f][h] = b < nblocks ? 32 * b + 16 * (f & 1) + g + 8 * h : N;
        nz[f][0] = nz[f][1] = 0u;
    }

#pragma unroll
    for (int s = 0; s < G_STAGES - 1; ++s) {
        if (s < nch) load_stage(s, cbeg + s);
        cp_async_commit();
    }
    for (int it = 0; it < nch; ++it) {
        cp_async_wait<G_STAGES - 2>();  // this thread's copies of chunk it have landed
        __syncthreads();                // everyone's have, and stage (it - 1) % S is no longer read
        if (it + G_STAGES - 1 < nch) load_stage((it + G_STAGES - 1) % G_STAGES, cbeg + it + G_STAGES - 1);
        cp_async_commit();
        const GemmStage& cur = st[it % G_STAGES];
        const int c = cbeg + it, grp = c / gch;
        if (it == 0 || c % gch == 0) {
#pragma unroll
            for (int f = 0; f < 4; ++f)
#pragma unroll
                for (int h = 0; h < 2; ++h)
                    nz[f][h] = rows[f][h] < N ? neg_zero2<BF16>(zeros_t[(long long)grp * N + rows[f][h]]) : 0u;
        }
        uint4 xv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) xv[i] = cur.x[32 * warp_m + 8 * i + g][t];
#pragma unroll
        for (int blk = 0; blk < 2; ++blk) {
            const uint4 wq = cur.w[2 * warp_n + blk][lane];
            const uint32_t words[4] = {wq.x, wq.y, wq.z, wq.w};
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
                const int f = 2 * blk + nt;
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    uint32_t a[4];
                    dequant_word<BF16>(words[2 * nt + j], nz[f][0], nz[f][1], a);
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        const uint32_t bfrag[2] = {j ? xv[i].z : xv[i].x, j ? xv[i].w : xv[i].y};
                        mma16816<BF16>(gacc[f][i], a, bfrag);
                    }
                }
            }
        }
        if ((c + 1) % gch == 0 || c + 1 == cend) {  // the group (or this CTA's share of it) is done: scale it
#pragma unroll
            for (int f = 0; f < 4; ++f) {
                const float s_lo = rows[f][0] < N ? scales_t[(long long)grp * N + rows[f][0]] : 0.f;
                const float s_hi = rows[f][1] < N ? scales_t[(long long)grp * N + rows[f][1]] : 0.f;
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    acc[f][i][0] += s_lo * gacc[f][i][0];
                    acc[f][i][1] += s_lo * gacc[f][i][1];
                    acc[f][i][2] += s_hi * gacc[f][i][2];
                    acc[f][i][3] += s_hi * gacc[f][i][3];
#pragma unroll
                    for (int r = 0; r < 4; ++r) gacc[f][i][r] = 0.f;
                }
            }
        }
    }
    cp_async_wait<0>();  // no copy may still target shared memory when the CTA exits

    // c-register r: token 2 t + (r & 1) of token group i, row rows[f][r >> 1]
#pragma unroll
    for (int f = 0; f < 4; ++f) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int tok = m0 + 32 * warp_m + 8 * i + 2 * t + (r & 1), n = rows[f][r >> 1];
                if (tok >= M || n >= N) continue;
                if (ksplit > 1) {
                    partial[((long long)ks * M + tok) * N + n] = acc[f][i][r];
                } else {
                    const float bv = bias ? to_f<BF16>(bias[n]) : 0.f;
                    out[(long long)tok * N + n] = from_f<BF16>(acc[f][i][r] + bv);
                }
            }
        }
    }
}

// out[m][n] = T(sum_s partial[s][m][n] + bias[n])
template <bool BF16>
__global__ void reduce_kernel(const float* __restrict__ partial, const uint16_t* __restrict__ bias,
                              uint16_t* __restrict__ out, int M, int N, int ksplit) {
    const long long total = (long long)M * N;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total; e += (long long)gridDim.x * blockDim.x) {
        float sum = 0.f;
        for (int s = 0; s < ksplit; ++s) sum += partial[s * total + e];
        const float bv = bias ? to_f<BF16>(bias[e % N]) : 0.f;
        out[e] = from_f<BF16>(sum + bv);
    }
}

// ------------------------------------------------------------------------------------------------ dequantize
// w (N, K) = T((q - z) * s) (fp32 product, one rounding: the reference's weight), for a cuBLAS GEMM on many tokens.
// One thread per 8 consecutive k of one row (one 16-byte store): words (nt, j = 0, 1) of lane (n % 8, k / 8 % 4).
template <bool BF16>
__global__ void mma_dequant_kernel(const uint32_t* __restrict__ qweight, const float* __restrict__ scales_t,
                                   const uint8_t* __restrict__ zeros_t, uint16_t* __restrict__ w, int N, int K, int group) {
    const int octs = K >> 3, chunks = K >> 5;
    const long long total = (long long)N * octs;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total; e += (long long)gridDim.x * blockDim.x) {
        const int n = (int)(e / octs), o = (int)(e - (long long)n * octs);
        const int k0 = o * 8, c = o >> 2, t = o & 3;
        const int b = n >> 5, nt = (n >> 4) & 1, p0 = (n >> 3) & 1, g = n & 7;
        const uint32_t* words = qweight + (((long long)b * chunks + c) * 32 + 4 * g + t) * 4 + 2 * nt;
        const uint32_t w0 = words[0], w1 = words[1];
        const int grp = k0 / group;
        const float s = scales_t[(long long)grp * N + n], z = (float)zeros_t[(long long)grp * N + n];
        uint16_t v[8];
#pragma unroll
        for (int kk = 0; kk < 8; ++kk) {  // k = k0 + kk = 32 c + 8 t + 4 j + 2 p1 + h
            const int j = kk >> 2, p1 = (kk >> 1) & 1, h = kk & 1;
            const int nib = p0 + 2 * p1 + 4 * h;
            const uint32_t q = ((j ? w1 : w0) >> (4 * nib)) & 15u;
            v[kk] = from_f<BF16>(((float)q - z) * s);
        }
        uint4 packed;
        packed.x = v[0] | ((uint32_t)v[1] << 16);
        packed.y = v[2] | ((uint32_t)v[3] << 16);
        packed.z = v[4] | ((uint32_t)v[5] << 16);
        packed.w = v[6] | ((uint32_t)v[7] << 16);
        *reinterpret_cast<uint4*>(w + (long long)n * K + k0) = packed;
    }
}

int fail(char* err, int errlen, const char* msg) {
    if (err && errlen > 0) snprintf(err, (size_t)errlen, "%s", msg);
    return 1;
}

int check_shape(long long N, long long K, long long group, int dtype, char* err, int errlen) {
    char msg[256];
    if (N <= 0 || K <= 0 || N % 32 || K % 32 || group <= 0 || group % 32 || K % group) {
        snprintf(msg, sizeof msg, "unsupported shape for the mma layout: need N %% 32 == 0, K %% 32 == 0 and a "
                 "group size that is a multiple of 32 dividing K, got N=%lld K=%lld group=%lld", N, K, group);
        return fail(err, errlen, msg);
    }
    if (N > INT32_MAX || K > INT32_MAX) return fail(err, errlen, "sizes exceed int32");
    if (dtype != 0 && dtype != 1) return fail(err, errlen, "dtype must be 0 (fp16) or 1 (bf16)");
    return 0;
}

int launch_error(char* err, int errlen) {
#ifdef NQ_SIM
    (void)err, (void)errlen;
    return 0;
#else
    const cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? 0 : fail(err, errlen, cudaGetErrorString(e));
#endif
}

template <bool BF16, int TG, int W>
void launch_linear(const uint16_t* x, const uint32_t* q, const float* s, const uint8_t* z, const uint16_t* bias,
                   uint16_t* out, float* partial, int M, int N, int K, int group, int ksplit, cudaStream_t stream) {
    const dim3 grid(N / 32, ksplit, (M + TG * 8 - 1) / (TG * 8)), block(W * 32);
#ifdef NQ_SIM
    (void)stream;
    nqsim::launch(grid, block, [&] { mma_linear_kernel<BF16, TG, W>(x, q, s, z, bias, out, partial, M, N, K, group, ksplit); });
#else
    mma_linear_kernel<BF16, TG, W><<<grid, block, 0, stream>>>(x, q, s, z, bias, out, partial, M, N, K, group, ksplit);
#endif
}

template <bool BF16>
int run_reduce(const float* partial, const uint16_t* bias, uint16_t* out, int M, int N, int ksplit, cudaStream_t stream,
               char* err, int errlen) {
    const long long total = (long long)M * N;
    const unsigned blocks = (unsigned)((total + 255) / 256 < 4096 ? (total + 255) / 256 : 4096);
#ifdef NQ_SIM
    (void)stream;
    nqsim::launch(dim3(blocks), dim3(256), [&] { reduce_kernel<BF16>(partial, bias, out, M, N, ksplit); });
#else
    reduce_kernel<BF16><<<blocks, 256, 0, stream>>>(partial, bias, out, M, N, ksplit);
#endif
    return launch_error(err, errlen);
}

template <bool BF16>
int run_linear(const uint16_t* x, const uint32_t* q, const float* s, const uint8_t* z, const uint16_t* bias,
               uint16_t* out, float* partial, int M, int N, int K, int group, int ksplit, int warps,
               cudaStream_t stream, char* err, int errlen) {
    if (M <= 8 && warps == 16) launch_linear<BF16, 1, 16>(x, q, s, z, bias, out, partial, M, N, K, group, ksplit, stream);
    else if (M <= 8) launch_linear<BF16, 1, 8>(x, q, s, z, bias, out, partial, M, N, K, group, ksplit, stream);
    else if (M <= 16 && warps == 16) launch_linear<BF16, 2, 16>(x, q, s, z, bias, out, partial, M, N, K, group, ksplit, stream);
    else if (M <= 16) launch_linear<BF16, 2, 8>(x, q, s, z, bias, out, partial, M, N, K, group, ksplit, stream);
    else launch_linear<BF16, MAX_TG, 8>(x, q, s, z, bias, out, partial, M, N, K, group, ksplit, stream);
    if (launch_error(err, errlen)) return 1;
    return ksplit > 1 ? run_reduce<BF16>(partial, bias, out, M, N, ksplit, stream, err, errlen) : 0;
}

template <bool BF16>
int run_gemm(const uint16_t* x, const uint32_t* q, const float* s, const uint8_t* z, const uint16_t* bias,
             uint16_t* out, float* partial, int M, int N, int K, int group, int ksplit, cudaStream_t stream,
             char* err, int errlen) {
    const dim3 grid((N / 32 + G_ROWS / 32 - 1) / (G_ROWS / 32), (M + G_TOKENS - 1) / G_TOKENS, ksplit);
#ifdef NQ_SIM
    (void)stream;
    nqsim::launch(grid, dim3(G_THREADS), [&] { mma_gemm_kernel<BF16>(x, q, s, z, bias, out, partial, M, N, K, group, ksplit); });
#else
    mma_gemm_kernel<BF16><<<grid, G_THREADS, 0, stream>>>(x, q, s, z, bias, out, partial, M, N, K, group, ksplit);
#endif
    if (launch_error(err, errlen)) return 1;
    return ksplit > 1 ? run_reduce<BF16>(partial, bias, out, M, N, ksplit, stream, err, errlen) : 0;
}

// The checks and dispatch shared by nq_mma_linear (warps 8 / 16: the skinny kernel) and nq_mma_gemm (warps 0: tiled).
int mma_entry(const void* x, const int32_t* qweight, const float* scales_t, const uint8_t* zeros_t, const void* bias,
              void* out, float* partial, int64_t M, int64_t N, int64_t K, int64_t group, int64_t ksplit, int warps,
              int dtype, void* stream, char* err, int errlen) {
    char msg[256];
    if (check_shape(N, K, group, dtype, err, errlen)) return 1;
    if (M < 0 || M > INT32_MAX) return fail(err, errlen, "bad token count");
    if (ksplit < 1 || ksplit > K / 32 || ksplit > 65535) {
        snprintf(msg, sizeof msg, "ksplit must lie in [1, K / 32], got %lld (K=%lld)", (long long)ksplit, (long long)K);
        return fail(err, errlen, msg);
    }
    const int64_t per_cta = warps ? 8 * MAX_TG : G_TOKENS;  // tokens per CTA along grid.y / grid.z
    if ((M + per_cta - 1) / per_cta > 65535) return fail(err, errlen, "too many tokens for one launch");
    if (!x || !qweight || !scales_t || !zeros_t || !out || (ksplit > 1 && !partial)) return fail(err, errlen, "null pointer");
    if (((uintptr_t)x | (uintptr_t)qweight) & 15) return fail(err, errlen, "x and qweight must be 16-byte aligned");
    if (M == 0) return 0;
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    const uint16_t* xt = static_cast<const uint16_t*>(x);
    const uint16_t* bt = static_cast<const uint16_t*>(bias);
    uint16_t* ot = static_cast<uint16_t*>(out);
    const uint32_t* qt = reinterpret_cast<const uint32_t*>(qweight);
    const int m = (int)M, n = (int)N, k = (int)K, g = (int)group, ks = (int)ksplit;
    if (!warps)
        return dtype == 1 ? run_gemm<true>(xt, qt, scales_t, zeros_t, bt, ot, partial, m, n, k, g, ks, s, err, errlen)
                          : run_gemm<false>(xt, qt, scales_t, zeros_t, bt, ot, partial, m, n, k, g, ks, s, err, errlen);
    return dtype == 1 ? run_linear<true>(xt, qt, scales_t, zeros_t, bt, ot, partial, m, n, k, g, ks, warps, s, err, errlen)
                      : run_linear<false>(xt, qt, scales_t, zeros_t, bt, ot, partial, m, n, k, g, ks, warps, s, err, errlen);
}

}  // namespace

extern "C" {

// x (M, K), out (M, N), bias (N,) or NULL: fp16 (dtype 0) or bf16 (1). partial: fp32 (ksplit, M, N) scratch, used
// (and fully written) only when ksplit > 1. warps: per CTA, 8 or 16 (16 only for M <= 16; more tokens take 8).
// Returns 0, or 1 with a message in err (nothing launched on bad input).
int nq_mma_linear(const void* x, const int32_t* qweight, const float* scales_t, const uint8_t* zeros_t,
                  const void* bias, void* out, float* partial, int64_t M, int64_t N, int64_t K, int64_t group,
                  int64_t ksplit, int warps, int dtype, void* stream, char* err, int errlen) {
    if (warps != 8 && warps != 16) return fail(err, errlen, "warps must be 8 or 16");
    return mma_entry(x, qweight, scales_t, zeros_t, bias, out, partial, M, N, K, group, ksplit, warps, dtype, stream,
                     err, errlen);
}

// The tiled GEMM for many tokens; arguments as nq_mma_linear (no warps: 8 per CTA).
int nq_mma_gemm(const void* x, const int32_t* qweight, const float* scales_t, const uint8_t* zeros_t,
                const void* bias, void* out, float* partial, int64_t M, int64_t N, int64_t K, int64_t group,
                int64_t ksplit, int dtype, void* stream, char* err, int errlen) {
    return mma_entry(x, qweight, scales_t, zeros_t, bias, out, partial, M, N, K, group, ksplit, 0, dtype, stream, err,
                     errlen);
}

// w (N, K) fp16 (dtype 0) or bf16 (1), 16-byte aligned: the reference's dequantized weight.
int nq_mma_dequant(const int32_t* qweight, const float* scales_t, const uint8_t* zeros_t, void* w, int64_t N,
                   int64_t K, int64_t group, int dtype, void* stream, char* err, int errlen) {
    if (check_shape(N, K, group, dtype, err, errlen)) return 1;
    if (!qweight || !scales_t || !zeros_t || !w) return fail(err, errlen, "null pointer");
    if (((uintptr_t)w | (uintptr_t)qweight) & 15) return fail(err, errlen, "w and qweight must be 16-byte aligned");
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    const long long total = N * (K / 8);
    const unsigned blocks = (unsigned)((total + 255) / 256 < 65535LL * 16 ? (total + 255) / 256 : 65535LL * 16);
    const uint32_t* qt = reinterpret_cast<const uint32_t*>(qweight);
    uint16_t* wt = static_cast<uint16_t*>(w);
#ifdef NQ_SIM
    (void)s;
    if (dtype == 1) nqsim::launch(dim3(blocks), dim3(256), [&] { mma_dequant_kernel<true>(qt, scales_t, zeros_t, wt, (int)N, (int)K, (int)group); });
    else nqsim::launch(dim3(blocks), dim3(256), [&] { mma_dequant_kernel<false>(qt, scales_t, zeros_t, wt, (int)N, (int)K, (int)group); });
#else
    if (dtype == 1) mma_dequant_kernel<true><<<blocks, 256, 0, s>>>(qt, scales_t, zeros_t, wt, (int)N, (int)K, (int)group);
    else mma_dequant_kernel<false><<<blocks, 256, 0, s>>>(qt, scales_t, zeros_t, wt, (int)N, (int)K, (int)group);
#endif
    return launch_error(err, errlen);
}

int nq_mma_abi_version(void) { return 3; }

}  // extern "C"
