// W4A16 linear layer kernels: y (M, N) = x (M, K) @ W^T + bias, W int4 group-quantized.
//
// Built with nvcc alone (no torch headers) into a shared library and called through a C ABI
// (nvila_quant/kernels/cuda/__init__.py). Layouts (N = out_features, K = in_features, G = group):
//   x       (M, K)    fp16 or bf16, row-major, 16-byte aligned
//   qweight (N, K/8)  int32: word j of row n holds k = 8j + i in bits 4i..4i+3 (the runtime's nibble rows)
//   scales  (N, K/G)  fp32
//   zeros   (N, K/G)  uint8
//   bias    (N,)      fp16/bf16 like x, or NULL
//   out     (M, N)    like x; every element with m < M, n < N is written, nothing else is touched
// w[n, k] = T((q - z) * s) with the product in fp32 and one rounding to T, i.e. exactly the weight the
// reference backend builds; products and sums accumulate in fp32 (no fp16 accumulation).
// Supported: M >= 0, N >= 1, K % 32 == 0, G % 32 == 0 (so a 32-wide K chunk never straddles two groups),
// sm_80+. Anything else returns an error code with a message; nothing is launched. No split-K, no
// semaphores, no workspace: every launch writes its whole output.
//   M <= 8: GEMV (one warp per output row, 128-bit weight loads, warp-shuffle reduction)
//   M  > 8: GEMM (128x128x32 CTA tile, cp.async double buffering, dequantization into shared memory,
//           tensor cores through WMMA 16x16x16 with fp32 accumulators, bounds-checked epilogue)
//   nq_w4a16_dequant: the dense weight, for a cuBLAS GEMM (the runtime's choice above 4 tokens: measured faster
//           than both kernels above there on H100)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#include <stdint.h>
#include <stdio.h>

namespace {

using namespace nvcuda;

template <typename T> struct Num;
template <> struct Num<half> {
    static __device__ __forceinline__ float to_f(half v) { return __half2float(v); }
    static __device__ __forceinline__ half from_f(float v) { return __float2half_rn(v); }
};
template <> struct Num<__nv_bfloat16> {
    static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
    static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
};

// Round a dequantized fp32 weight to T and back, so the kernel multiplies the same weight as the reference.
template <typename T> __device__ __forceinline__ float as_weight(float w) { return Num<T>::to_f(Num<T>::from_f(w)); }

// ------------------------------------------------------------------------------------------------ GEMV
constexpr int GEMV_WARPS = 8;

template <typename T, int M>
__global__ void __launch_bounds__(GEMV_WARPS * 32) gemv_kernel(
    const T* __restrict__ x, const int32_t* __restrict__ qweight, const float* __restrict__ scales,
    const uint8_t* __restrict__ zeros, const T* __restrict__ bias, T* __restrict__ out, int N, int K, int group) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n = blockIdx.x * GEMV_WARPS + warp;
    if (n >= N) return;  // n depends on the warp only: whole warps leave together (shuffles stay full)
    const int chunks = K >> 5;  // 32 weights (one int4 load) per chunk
    const int ngroups = K / group;
    const int4* row = reinterpret_cast<const int4*>(qweight + (int64_t)n * (K >> 3));
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0.f;

#pragma unroll 2
    for (int c = lane; c < chunks; c += 32) {
        const int4 packed = __ldg(row + c);
        const int k0 = c << 5;
        const int g = k0 / group;
        const float s = __ldg(scales + (int64_t)n * ngroups + g);
        const float z = (float)__ldg(zeros + (int64_t)n * ngroups + g);
        const uint32_t words[4] = {(uint32_t)packed.x, (uint32_t)packed.y, (uint32_t)packed.z, (uint32_t)packed.w};
        float w[32];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
            for (int j = 0; j < 8; ++j) w[i * 8 + j] = as_weight<T>(((float)((words[i] >> (4 * j)) & 15u) - z) * s);
        }
#pragma unroll
        for (int m = 0; m < M; ++m) {
            const int4* xv = reinterpret_cast<const int4*>(x + (int64_t)m * K + k0);
#pragma unroll
            for (int v = 0; v < 4; ++v) {
                const int4 raw = __ldg(xv + v);
                const T* xs = reinterpret_cast<const T*>(&raw);
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[m] = fmaf(w[v * 8 + e], Num<T>::to_f(xs[e]), acc[m]);
            }
        }
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], off);
    }
    if (lane == 0) {
        const float b = bias ? Num<T>::to_f(bias[n]) : 0.f;
#pragma unroll
        for (int m = 0; m < M; ++m) out[(int64_t)m * N + n] = Num<T>::from_f(acc[m] + b);
    }
}

// ------------------------------------------------------------------------------------------------ GEMM
constexpr int BM = 128, BN = 128, BK = 32, GEMM_THREADS = 256;
constexpr int A_LD = BK + 8;  // padded leading dims (multiples of 8 elements, as WMMA requires)
constexpr int B_LD = BK + 8;
constexpr int WARP_M = 64, WARP_N = 32;  // 2 x 4 warps
constexpr int FRAG_M = WARP_M / 16, FRAG_N = WARP_N / 16;

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    const unsigned dst = (unsigned)__cvta_generic_to_shared(smem);
    const int src_size = valid ? 16 : 0;  // 0: zero-fill the 16 bytes, read nothing
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_size));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

template <typename T>
struct GemmSmem {
    T a[2][BM][A_LD];           // activations, double buffered
    int32_t q[2][BN][BK / 8];   // raw packed weights, double buffered
    T b[BN][B_LD];              // dequantized weights of the current tile
    float c[GEMM_THREADS / 32][16 * 16];  // per-warp epilogue staging
};

template <typename T>
__device__ __forceinline__ void gemm_load_tile(GemmSmem<T>& sm, int buf, const T* __restrict__ x,
                                               const int32_t* __restrict__ qweight, int M, int N, int K,
                                               int m0, int n0, int k0) {
    const int tid = threadIdx.x;
    // A: BM rows x BK cols = BM * 4 chunks of 8 elements (16 bytes); 2 per thread
#pragma unroll
    for (int r = 0; r < (BM * BK / 8) / GEMM_THREADS; ++r) {
        const int idx = tid + r * GEMM_THREADS;
        const int row = idx >> 2, col = (idx & 3) * 8;
        const int m = m0 + row;
        const bool valid = m < M;
        const T* src = x + (int64_t)(valid ? m : 0) * K + k0 + col;
        cp_async16(&sm.a[buf][row][col], src, valid);
    }
    // Q: BN rows x 4 words (16 bytes) per row; threads 0..BN-1
    if (tid < BN) {
        const int n = n0 + tid;
        const bool valid = n < N;
        const int32_t* src = qweight + (int64_t)(valid ? n : 0) * (K >> 3) + (k0 >> 3);
        cp_async16(&sm.q[buf][tid][0], src, valid);
    }
}

template <typename T>
__global__ void __launch_bounds__(GEMM_THREADS) gemm_kernel(
    const T* __restrict__ x, const int32_t* __restrict__ qweight, const float* __restrict__ scales,
    const uint8_t* __restrict__ zeros, const T* __restrict__ bias, T* __restrict__ out, int M, int N, int K, int group) {
    extern __shared__ __align__(128) unsigned char smem_raw[];
    GemmSmem<T>& sm = *reinterpret_cast<GemmSmem<T>*>(smem_raw);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int warp_m = (warp >> 2) * WARP_M, warp_n = (warp & 3) * WARP_N;
    const int ngroups = K / group;
    const int tiles = K / BK;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FRAG_M][FRAG_N];
#pragma unroll
    for (int i = 0; i < FRAG_M; ++i)
#pragma unroll
        for (int j = 0; j < FRAG_N; ++j) wmma::fill_fragment(acc[i][j], 0.f);

    gemm_load_tile(sm, 0, x, qweight, M, N, K, m0, n0, 0);
    cp_async_commit();

    // Dequantization work per thread: row tid/2 of the tile, 16 weights (2 words)
    const int dq_row = tid >> 1, dq_half = tid & 1;
    const int dq_n = n0 + dq_row;

    for (int t = 0; t < tiles; ++t) {
        const int buf = t & 1;
        if (t + 1 < tiles) {
            gemm_load_tile(sm, buf ^ 1, x, qweight, M, N, K, m0, n0, (t + 1) * BK);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        {
            const int k0 = t * BK;
            float s = 0.f, z = 0.f;
            if (dq_n < N) {
                const int g = k0 / group;
                s = __ldg(scales + (int64_t)dq_n * ngroups + g);
                z = (float)__ldg(zeros + (int64_t)dq_n * ngroups + g);
            }
#pragma unroll
            for (int wi = 0; wi < 2; ++wi) {
                const uint32_t word = (uint32_t)sm.q[buf][dq_row][dq_half * 2 + wi];
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    const float w = ((float)((word >> (4 * j)) & 15u) - z) * s;
                    sm.b[dq_row][dq_half * 16 + wi * 8 + j] = Num<T>::from_f(w);
                }
            }
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[FRAG_M];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[FRAG_N];
#pragma unroll
            for (int i = 0; i < FRAG_M; ++i) wmma::load_matrix_sync(fa[i], &sm.a[buf][warp_m + i * 16][kk], A_LD);
#pragma unroll
            for (int j = 0; j < FRAG_N; ++j) wmma::load_matrix_sync(fb[j], &sm.b[warp_n + j * 16][kk], B_LD);
#pragma unroll
            for (int i = 0; i < FRAG_M; ++i)
#pragma unroll
                for (int j = 0; j < FRAG_N; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
        __syncthreads();  // the next iteration overwrites sm.b and refills buffer buf
    }

    float* stage = sm.c[warp];
#pragma unroll
    for (int i = 0; i < FRAG_M; ++i) {
#pragma unroll
        for (int j = 0; j < FRAG_N; ++j) {
            wmma::store_matrix_sync(stage, acc[i][j], 16, wmma::mem_row_major);
            __syncwarp();
#pragma unroll
            for (int e = lane; e < 256; e += 32) {
                const int m = m0 + warp_m + i * 16 + (e >> 4);
                const int n = n0 + warp_n + j * 16 + (e & 15);
                if (m < M && n < N) {
                    const float b = bias ? Num<T>::to_f(bias[n]) : 0.f;
                    out[(int64_t)m * N + n] = Num<T>::from_f(stage[e] + b);
                }
            }
            __syncwarp();
        }
    }
}

// ------------------------------------------------------------------------------------------------ dequantize
// w (N, K) = T((q - z) * s), the reference's weight; one thread per int32 word (8 weights, one 16-byte store).
// For many tokens a dense tensor-core GEMM (cuBLAS) on these weights beats the fused GEMM above.
template <typename T>
__global__ void dequant_kernel(const int32_t* __restrict__ qweight, const float* __restrict__ scales,
                               const uint8_t* __restrict__ zeros, T* __restrict__ w, int N, int K, int group) {
    const int words_per_row = K >> 3, ngroups = K / group;
    const int64_t words = (int64_t)N * words_per_row;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < words; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t n = i / words_per_row;
        const int k0 = (int)(i - n * words_per_row) * 8;
        const int64_t gi = n * ngroups + k0 / group;
        const float s = __ldg(scales + gi), z = (float)__ldg(zeros + gi);
        const uint32_t word = (uint32_t)__ldg(qweight + i);
        __align__(16) T v[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = Num<T>::from_f(((float)((word >> (4 * j)) & 15u) - z) * s);
        *reinterpret_cast<uint4*>(w + n * K + k0) = *reinterpret_cast<const uint4*>(v);
    }
}

int fail(char* err, int errlen, const char* msg) {
    if (err && errlen > 0) snprintf(err, (size_t)errlen, "%s", msg);
    return 1;
}

template <typename T>
int launch(const void* x, const int32_t* qweight, const float* scales, const uint8_t* zeros, const void* bias,
           void* out, int M, int N, int K, int group, cudaStream_t stream, char* err, int errlen) {
    const T* xt = static_cast<const T*>(x);
    const T* bt = static_cast<const T*>(bias);
    T* ot = static_cast<T*>(out);
    if (M <= 8) {
        const dim3 grid((N + GEMV_WARPS - 1) / GEMV_WARPS), block(GEMV_WARPS * 32);
        switch (M) {
#define NQ_GEMV_CASE(MM) \
    case MM: gemv_kernel<T, MM><<<grid, block, 0, stream>>>(xt, qweight, scales, zeros, bt, ot, N, K, group); break;
            NQ_GEMV_CASE(1) NQ_GEMV_CASE(2) NQ_GEMV_CASE(3) NQ_GEMV_CASE(4)
            NQ_GEMV_CASE(5) NQ_GEMV_CASE(6) NQ_GEMV_CASE(7) NQ_GEMV_CASE(8)
#undef NQ_GEMV_CASE
            default: return fail(err, errlen, "internal: bad GEMV token count");
        }
    } else {
        // under the 48 KB default: no cudaFuncSetAttribute (per device) before launches or graph captures
        static_assert(sizeof(GemmSmem<T>) <= 48 * 1024, "GEMM shared memory must fit the 48 KB default");
        const size_t smem = sizeof(GemmSmem<T>);
        const long long grid_y = ((long long)M + BM - 1) / BM;
        if (grid_y > 65535) return fail(err, errlen, "too many tokens for one launch (M > 65535 * 128)");
        const dim3 grid((N + BN - 1) / BN, (unsigned)grid_y), block(GEMM_THREADS);
        gemm_kernel<T><<<grid, block, smem, stream>>>(xt, qweight, scales, zeros, bt, ot, M, N, K, group);
    }
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return fail(err, errlen, cudaGetErrorString(e));
    return 0;
}

}  // namespace

extern "C" {

// dtype: 0 = fp16, 1 = bf16. Returns 0 on success; otherwise writes a message into err.
int nq_w4a16_linear(const void* x, const int32_t* qweight, const float* scales, const uint8_t* zeros,
                    const void* bias, void* out, int64_t M, int64_t N, int64_t K, int64_t group, int dtype,
                    void* stream, char* err, int errlen) {
    char msg[256];
    if (M < 0 || N <= 0 || K <= 0) {
        snprintf(msg, sizeof msg, "bad sizes M=%lld N=%lld K=%lld", (long long)M, (long long)N, (long long)K);
        return fail(err, errlen, msg);
    }
    if (K % 32 || group <= 0 || group % 32 || K % group) {
        snprintf(msg, sizeof msg, "unsupported shape: need K %% 32 == 0 and a group size that is a multiple of 32 "
                 "dividing K, got K=%lld group=%lld", (long long)K, (long long)group);
        return fail(err, errlen, msg);
    }
    if (M > INT32_MAX || N > INT32_MAX || K > INT32_MAX) return fail(err, errlen, "sizes exceed int32");
    if (dtype != 0 && dtype != 1) return fail(err, errlen, "dtype must be 0 (fp16) or 1 (bf16)");
    if (((uintptr_t)x | (uintptr_t)qweight) & 15) return fail(err, errlen, "x and qweight must be 16-byte aligned");
    if (!x || !qweight || !scales || !zeros || !out) return fail(err, errlen, "null pointer");
    if (M == 0) return 0;
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    if (dtype == 0)
        return launch<half>(x, qweight, scales, zeros, bias, out, (int)M, (int)N, (int)K, (int)group, s, err, errlen);
    return launch<__nv_bfloat16>(x, qweight, scales, zeros, bias, out, (int)M, (int)N, (int)K, (int)group, s, err, errlen);
}

// w (N, K) fp16 (dtype 0) or bf16 (1), 16-byte aligned; same shape rules as nq_w4a16_linear.
int nq_w4a16_dequant(const int32_t* qweight, const float* scales, const uint8_t* zeros, void* w, int64_t N,
                     int64_t K, int64_t group, int dtype, void* stream, char* err, int errlen) {
    char msg[256];
    if (N <= 0 || K <= 0 || K % 32 || group <= 0 || group % 32 || K % group) {
        snprintf(msg, sizeof msg, "unsupported shape N=%lld K=%lld group=%lld", (long long)N, (long long)K,
                 (long long)group);
        return fail(err, errlen, msg);
    }
    if (N > INT32_MAX || K > INT32_MAX) return fail(err, errlen, "sizes exceed int32");
    if (dtype != 0 && dtype != 1) return fail(err, errlen, "dtype must be 0 (fp16) or 1 (bf16)");
    if (!qweight || !scales || !zeros || !w) return fail(err, errlen, "null pointer");
    if (((uintptr_t)w | (uintptr_t)qweight) & 15) return fail(err, errlen, "w and qweight must be 16-byte aligned");
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    const long long words = (long long)N * (K / 8);
    const int block = 256;
    const unsigned grid = (unsigned)((words + block - 1) / block < 65535LL * 16 ? (words + block - 1) / block : 65535LL * 16);
    if (dtype == 0)
        dequant_kernel<half><<<grid, block, 0, s>>>(qweight, scales, zeros, static_cast<half*>(w), (int)N, (int)K, (int)group);
    else
        dequant_kernel<__nv_bfloat16><<<grid, block, 0, s>>>(qweight, scales, zeros, static_cast<__nv_bfloat16*>(w),
                                                             (int)N, (int)K, (int)group);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return fail(err, errlen, cudaGetErrorString(e));
    return 0;
}

int nq_abi_version(void) { return 2; }

}  // extern "C"
