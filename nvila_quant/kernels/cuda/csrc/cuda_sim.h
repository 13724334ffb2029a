// cuda_sim.h: runs the CUDA subset that w4a16_mma.cu uses on CPU threads, so its kernels are tested without a GPU.
//
// Each CUDA thread of a block is an std::thread (blocks run one after another); __syncthreads is a barrier of the
// block, and warp-collective instructions (mma.sync) exchange their operands through a per-warp buffer between
// two barriers of the warp. `__shared__` becomes `static` (one block at a time). The tensor-core fragment layouts
// are the PTX ISA's for mma.m16n8k16 (row.col): with g = lane / 4 and t = lane % 4,
//   A (16x16): a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1], a2 = A[g][2t+8, 2t+9], a3 = A[g+8][2t+8, 2t+9]
//   B (16x8):  b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g]
//   C (16x8):  c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]
// (lower index in the low 16 bits). Not a GPU model: no timing, no memory-ordering effects, full warps only.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct uint3 { unsigned x = 0, y = 0, z = 0; };
struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint4 { unsigned x, y, z, w; };
typedef void* cudaStream_t;

inline thread_local uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace nqsim {

struct Warp {
    std::barrier<> bar{32};
    uint32_t a[32][4];
    uint32_t b[32][2];
};

struct Block {
    explicit Block(int threads) : bar(threads), warps((threads + 31) / 32) {
        for (auto& w : warps) w = std::make_unique<Warp>();
    }
    std::barrier<> bar;
    std::vector<std::unique_ptr<Warp>> warps;
};

inline thread_local Block* current = nullptr;

inline void syncthreads() { current->bar.arrive_and_wait(); }

inline float half_bits_to_float(uint16_t h) {
    const uint32_t sign = (h >> 15) & 1u, exp = (h >> 10) & 31u, man = h & 1023u;
    float v;
    if (exp == 0) v = std::ldexp((float)man, -24);
    else if (exp == 31) v = man ? NAN : INFINITY;
    else v = std::ldexp((float)(man | 1024u), (int)exp - 25);
    return sign ? -v : v;
}

inline uint16_t float_to_half_bits(float f) {  // round to nearest even, like __float2half_rn
    uint32_t u;
    std::memcpy(&u, &f, 4);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    if (std::isnan(f)) return sign | 0x7E00u;
    const float a = std::fabs(f);
    if (a >= 65520.f) return sign | 0x7C00u;  // rounds to infinity
    if (a < 6.103515625e-05f) {  // subnormal (or zero): multiples of 2^-24
        const float scaled = a * 16777216.f;  // exact
        return sign | (uint16_t)std::nearbyint(scaled);  // default rounding mode: nearest even
    }
    int e;
    const float m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
    const float mant = std::nearbyint(m * 2048.f);  // 11 significant bits, nearest even
    uint32_t exp = (uint32_t)(e + 14), bits = (uint32_t)mant;
    if (bits == 2048u) { bits = 1024u; ++exp; }
    if (exp >= 31u) return sign | 0x7C00u;
    return sign | (uint16_t)((exp << 10) | (bits & 1023u));
}

inline float bf16_bits_to_float(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline uint16_t float_to_bf16_bits(float f) {  // round to nearest even, like __float2bfloat16_rn
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (std::isnan(f)) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

template <bool BF16> inline float to_f(uint16_t v) { return BF16 ? bf16_bits_to_float(v) : half_bits_to_float(v); }
template <bool BF16> inline uint16_t from_f(float v) { return BF16 ? float_to_bf16_bits(v) : float_to_half_bits(v); }

inline uint4 ld16(const void* p) {
    uint4 v;
    std::memcpy(&v, p, 16);
    return v;
}

template <bool BF16> inline uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t d = 0;
    for (int h = 0; h < 2; ++h) {
        const auto lane = [h](uint32_t r) { return to_f<BF16>((uint16_t)(r >> (16 * h))); };
        d |= (uint32_t)from_f<BF16>(std::fma(lane(a), lane(b), lane(c))) << (16 * h);
    }
    return d;
}

// cp.async: with mode 0 each copy lands when issued (shows reads of a stage that is being refilled), with mode 1
// only when a cp.async.wait_group retires its group (shows reads of data not yet waited for). Tests run both.
inline int cp_async_mode = 0;
struct PendingCopy { void* dst; const void* src; bool valid; };
inline thread_local std::vector<PendingCopy> open_group;
inline thread_local std::vector<std::vector<PendingCopy>> committed;

inline void do_copy(const PendingCopy& c) {
    if (c.valid) std::memcpy(c.dst, c.src, 16);
    else std::memset(c.dst, 0, 16);
}
inline void cp_async16(void* smem, const void* gmem, bool valid) {
    if (cp_async_mode == 0) do_copy({smem, gmem, valid});
    else open_group.push_back({smem, gmem, valid});
}
inline void cp_async_commit() {
    committed.push_back(std::move(open_group));
    open_group.clear();
}
template <int N> inline void cp_async_wait() {
    while (committed.size() > (size_t)N) {
        for (const auto& c : committed.front()) do_copy(c);
        committed.erase(committed.begin());
    }
}

// c (16x8 fp32) += A @ B for the whole warp (every lane must call it, as with mma.sync)
template <bool BF16> inline void mma16816(float c[4], const uint32_t a[4], const uint32_t b[2]) {
    const int tid = (int)threadIdx.x, lane = tid & 31;
    Warp& w = *current->warps[tid >> 5];
    std::memcpy(w.a[lane], a, sizeof w.a[lane]);
    std::memcpy(w.b[lane], b, sizeof w.b[lane]);
    w.bar.arrive_and_wait();
    const auto elem = [](uint32_t r, int hi) { return to_f<BF16>((uint16_t)(r >> (16 * hi))); };
    const auto A = [&](int row, int k) {  // owner lane (row % 8, k % 8 / 2), register row / 8 + 2 (k / 8)
        return elem(w.a[(row & 7) * 4 + ((k & 7) >> 1)][(row >> 3) + 2 * (k >> 3)], k & 1);
    };
    const auto B = [&](int k, int col) { return elem(w.b[col * 4 + ((k & 7) >> 1)][k >> 3], k & 1); };
    const int g = lane >> 2, t = lane & 3;
    float d[4];
    for (int r = 0; r < 4; ++r) {
        const int row = g + 8 * (r >> 1), col = 2 * t + (r & 1);
        float sum = 0.f;
        for (int k = 0; k < 16; ++k) sum += A(row, k) * B(k, col);
        d[r] = c[r] + sum;
    }
    w.bar.arrive_and_wait();  // nobody overwrites the buffer before every lane has read it
    std::memcpy(c, d, sizeof d);
}

// Run body() as grid x block CUDA threads: blocks in order, each block's threads concurrently.
inline void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
    const int threads = (int)(block.x * block.y * block.z);
    gridDim = grid;
    blockDim = block;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                Block blk(threads);
                std::vector<std::thread> pool;
                pool.reserve(threads);
                for (int i = 0; i < threads; ++i) {
                    pool.emplace_back([&, i] {
                        current = &blk;
                        threadIdx.x = (unsigned)i % block.x;
                        threadIdx.y = (unsigned)i / block.x % block.y;
                        threadIdx.z = (unsigned)i / (block.x * block.y);
                        blockIdx.x = bx, blockIdx.y = by, blockIdx.z = bz;
                        body();
                        open_group.clear();
                        committed.clear();  // (a kernel waits for its copies before it exits)
                        blk.warps[i >> 5]->bar.arrive_and_drop();
                        blk.bar.arrive_and_drop();
                    });
                }
                for (auto& th : pool) th.join();
            }
}

}  // namespace nqsim

#define __syncthreads() nqsim::syncthreads()

extern "C" void nq_sim_set_cp_async_mode(int mode) { nqsim::cp_async_mode = mode; }
