// Shared device helpers: memory ordering across GPUs, vector copies, bounded
// waits that report a timeout instead of hanging.
#pragma once

#include <cuda_bf16.h>

namespace cupyep {

constexpr int kWarpSize = 32;

// Phases named in timeout reports; keep in sync with cupyep/errors_device.py.
enum Phase : int {
    kPhaseBarrier = 1,
    kPhaseDispatchRecv = 2,
    kPhaseCombineRecv = 3,
    kPhaseLowLatencyDispatchRecv = 4,
    kPhaseLowLatencyCombineRecv = 5,
    kPhaseLowLatencySend = 6,
};

// ---- memory ordering ------------------------------------------------------
// Peers write into our memory over NVLink, so every flag that publishes data
// is a release at system scope and every poll of it an acquire at system
// scope: the acquire makes all stores the writer made before its release
// visible to the loads that follow in this thread.
__device__ __forceinline__ int ld_acquire_sys(const int* p) {
    int v;
    asm volatile("ld.acquire.sys.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void st_release_sys(int* p, int v) {
    asm volatile("st.release.sys.global.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ long long ld_acquire_sys(const long long* p) {
    long long v;
    asm volatile("ld.acquire.sys.global.s64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void st_release_sys(long long* p, long long v) {
    asm volatile("st.release.sys.global.s64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// GPU-scope counters for work done by several warps of one kernel: each warp
// adds with release after its stores; the waiter acquires before publishing.
__device__ __forceinline__ void red_add_release_gpu(int* p, int v) {
    asm volatile("red.release.gpu.global.add.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ int ld_acquire_gpu(const int* p) {
    int v;
    asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ unsigned long long global_timer_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// ---- vector copies --------------------------------------------------------
// Inputs are read-only for the kernel's lifetime: the non-coherent path is
// safe and keeps them out of L1.
__device__ __forceinline__ int4 ld_nc(const int4* p) {
    int4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// Streaming store that does not pollute L1 (the data is never read back here).
__device__ __forceinline__ void st_na(int4* p, const int4& v) {
    asm volatile("st.global.L1::no_allocate.v4.s32 [%0], {%1, %2, %3, %4};"
                 ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));
}

// A warp copies kNumInt4 16-byte words in batches: each lane issues up to
// kCopyBatch loads before its first store, so a warp keeps 32 * kCopyBatch *
// 16 bytes in flight and a row costs ceil(kNumInt4 / (32 * kCopyBatch)) load
// latencies (latency, not bandwidth, bounds one warp). The last batch is
// predicated rather than copied word by word, which would cost one latency
// per word. kReadOnlySrc: the source is an input that nothing writes during
// the kernel, so the non-coherent path is safe; otherwise (data another GPU
// wrote, after an acquire) plain coherent loads.
constexpr int kCopyBatch = 8;

// One batch: each lane loads kSteps words (first + lane, + 32, ...), then
// stores them. kChecked: skip words at or past `limit`.
template <int kSteps, bool kChecked, bool kReadOnlySrc>
__device__ __forceinline__ void warp_copy_batch(int4* dst, const int4* src, int first, int limit, int lane) {
    int4 v[kSteps];
#pragma unroll
    for (int j = 0; j < kSteps; ++j) {
        const int i = first + j * kWarpSize + lane;
        if (!kChecked || i < limit) v[j] = kReadOnlySrc ? ld_nc(src + i) : src[i];
    }
#pragma unroll
    for (int j = 0; j < kSteps; ++j) {
        const int i = first + j * kWarpSize + lane;
        if (!kChecked || i < limit) st_na(dst + i, v[j]);
    }
}

template <int kNumInt4, bool kReadOnlySrc>
__device__ __forceinline__ void warp_copy(int4* dst, const int4* src, int lane) {
    constexpr int kStride = kWarpSize * kCopyBatch;
    constexpr int kFull = kNumInt4 / kStride;  // whole batches
    constexpr int kRestSteps = (kNumInt4 % kStride + kWarpSize - 1) / kWarpSize;
    for (int b = 0; b < kFull; ++b)
        warp_copy_batch<kCopyBatch, false, kReadOnlySrc>(dst, src, b * kStride, kNumInt4, lane);
    if constexpr (kRestSteps > 0)
        warp_copy_batch<kRestSteps, kNumInt4 % kWarpSize != 0, kReadOnlySrc>(dst, src, kFull * kStride,
                                                                             kNumInt4, lane);
}

template <int kNumInt4>
__device__ __forceinline__ void warp_copy_nc(int4* dst, const int4* src, int lane) {
    warp_copy<kNumInt4, true>(dst, src, lane);
}

template <int kNumInt4>
__device__ __forceinline__ void warp_copy_coherent(int4* dst, const int4* src, int lane) {
    warp_copy<kNumInt4, false>(dst, src, lane);
}

// ---- bf16 rows ------------------------------------------------------------
__device__ __forceinline__ void accumulate_bf16x8(float (&acc)[8], const int4& v) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = __bfloat1622float2(h[i]);
        acc[2 * i] += f.x;
        acc[2 * i + 1] += f.y;
    }
}

__device__ __forceinline__ int4 pack_bf16x8(const float (&acc)[8]) {
    int4 v;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
    return v;
}

// ---- errors ---------------------------------------------------------------
// error word, in device memory: [0] set to 1 by the first failure, [1] phase,
// [2] peer rank, [3] channel / expert, [4] kind (1 timeout, 2 too many rows),
// [5] 1 + the item of a dropped bad input (report_bad_input),
// [6..7] address of a host-mapped mirror that receives the same six ints.
// Spinning threads poll the device copy (an L2 hit); only a failure touches
// host memory, so waits never put PCIe reads in front of NVLink traffic.
__device__ __forceinline__ void report_error(int* err, int kind, int phase, int peer, int channel) {
    if (atomicCAS(err, 0, 1) == 0) {
        err[1] = phase;
        err[2] = peer;
        err[3] = channel;
        err[4] = kind;
        volatile int* mirror = *reinterpret_cast<int* const*>(err + 6);
        if (mirror != nullptr) {
            mirror[1] = phase;
            mirror[2] = peer;
            mirror[3] = channel;
            mirror[4] = kind;
            __threadfence_system();  // fields before the flag the host reads
            mirror[0] = 1;
        }
        __threadfence_system();
    }
}

// Bad input seen inside a kernel that goes on without it (the entry is
// dropped): err[5] = 1 + item, mirrored to host memory. Unlike report_error
// it does not set err[0], so no wait gives up and the call completes.
__device__ __forceinline__ void report_bad_input(int* err, int item) {
    if (atomicCAS(err + 5, 0, item + 1) == 0) {
        volatile int* mirror = *reinterpret_cast<int* const*>(err + 6);
        if (mirror != nullptr) {
            mirror[5] = item + 1;
            __threadfence_system();
        }
    }
}

// Spin until *flag >= target (int or 64-bit flag). Returns the last value
// read, or -1 (after reporting) when timeout_ns passes or another thread
// already failed.
template <typename T>
__device__ __forceinline__ T wait_at_least(const T* flag, T target, long long timeout_ns,
                                           int* err, int phase, int peer, int channel) {
    T v = ld_acquire_sys(flag);
    if (v >= target) return v;
    const unsigned long long start = global_timer_ns();
    for (int spins = 0;; ++spins) {
        v = ld_acquire_sys(flag);
        if (v >= target) return v;
        if ((spins & 63) == 63 &&
            (global_timer_ns() - start > (unsigned long long)timeout_ns || *(volatile int*)err != 0)) {
            report_error(err, 1, phase, peer, channel);
            return -1;
        }
    }
}

// Barrier among num_threads threads (whole warps) of a block: named barrier
// id (1..15; 0 is __syncthreads), or __syncwarp for a single warp.
__device__ __forceinline__ void sync_warps(int id, int num_threads) {
    if (num_threads == kWarpSize)
        __syncwarp();
    else
        asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(num_threads) : "memory");
}

// Call counters of a buffer, kept on the device so that a CUDA graph
// replay advances them like a new call: counters[0] the barrier sequence,
// counters[1] the notify calls (parity of the count buffers). Kernels on one
// stream touch them one after another, and one block per kernel at a time.
__device__ __forceinline__ int next_barrier_seq(int* counters) {
    __shared__ int s_seq;
    __syncthreads();
    if (threadIdx.x == 0) {
        s_seq = counters[0] + 1;
        counters[0] = s_seq;
    }
    __syncthreads();
    return s_seq;
}

// Channel c of n tokens split into num_channels contiguous ranges.
__device__ __forceinline__ void channel_range(int num_tokens, int num_channels, int c,
                                              int& begin, int& end) {
    const int per = (num_tokens + num_channels - 1) / num_channels;
    begin = min(c * per, num_tokens);
    end = min(begin + per, num_tokens);
}

}  // namespace cupyep
