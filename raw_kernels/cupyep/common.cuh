// Shared device helpers: memory ordering across GPUs, vector copies, bounded
// waits that report a timeout instead of hanging.
#pragma once

#include <cuda_bf16.h>

namespace cupyep {

constexpr int kWarpSize = 32;

// Phases named in timeout reports (PHASES in cupyep/backends/gpu/backend.py; tests/test_shared_constants.py
// checks the two agree).
enum Phase : int {
    kPhaseBarrier = 1,
    kPhaseDispatchRecv = 2,
    kPhaseCombineRecv = 3,
    kPhaseLowLatencyDispatchRecv = 4,
    kPhaseLowLatencyCombineRecv = 5,
    kPhaseLowLatencySend = 6,
    kPhaseLowLatencyClean = 7,
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

// The same where one warp's add must also see the others' (the last one publishes).
__device__ __forceinline__ int atom_add_acq_rel_gpu(int* p, int v) {
    int old;
    asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
    return old;
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

// One thread asks for [p, p + bytes) to be brought into L2 (a bulk
// prefetch: it holds no registers and nothing waits for it). Measured on
// H200, it pays only where loads are not the bound: ahead of a combine
// sender's next row (stores to NVLink bound it) it saved ~2.5%; ahead of a
// warp's batched loads of rows in DRAM it cost ~20% (a row-sum
// microbenchmark; the cause is not established). Prefetching memory that a
// peer is still writing is harmless: NVLink stores land in this L2.
// p 16-byte aligned, bytes a multiple of 16.
__device__ __forceinline__ void prefetch_l2(const void* p, unsigned bytes) {
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
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
// Eight bf16 values (one 16-byte word) to fp32, exactly (bf16 is the high
// half of an fp32).
__device__ __forceinline__ void bf16x8_to_float(const int4& v, float* f) {
    const unsigned w[4] = {(unsigned)v.x, (unsigned)v.y, (unsigned)v.z, (unsigned)v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

__device__ __forceinline__ void accumulate_bf16x8(float (&acc)[8], const int4& v) {
    float f[8];
    bf16x8_to_float(v, f);
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] += f[i];
}

// Eight fp32 values to bf16, rounded to nearest even.
__device__ __forceinline__ int4 pack_bf16x8(const float (&acc)[8]) {
    int4 v;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
    return v;
}

// A warp sums kNumRows bf16 rows of kNumInt4 words in fp32, in row order
// (rows[j] null: absent), then bias0 and bias1 (null: none), and stores the
// bf16 result into dst. Each lane loads kBatch words of every row before it
// sums them, so about 4 loads per lane are in flight (more spill registers
// at 1024 threads); one word at a time made every word a full latency.
// The rows are plain (coherent) loads: peers wrote them, after an acquire.
template <int kNumInt4, int kNumRows>
__device__ __forceinline__ void warp_sum_rows(int4* dst, const int4* const (&rows)[kNumRows],
                                              const int4* bias0, const int4* bias1, int lane) {
    constexpr int kBatch = kNumRows >= 4 ? 1 : 4 / kNumRows;
    constexpr bool kExact = kNumInt4 % (kWarpSize * kBatch) == 0;  // no word past the row
    for (int i0 = lane; i0 < kNumInt4; i0 += kWarpSize * kBatch) {
        int4 words[kBatch][kNumRows];
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
            const int i = i0 + b * kWarpSize;
#pragma unroll
            for (int j = 0; j < kNumRows; ++j)
                if (rows[j] != nullptr && (kExact || i < kNumInt4)) words[b][j] = rows[j][i];
        }
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
            const int i = i0 + b * kWarpSize;
            if (!kExact && i >= kNumInt4) continue;
            float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int j = 0; j < kNumRows; ++j)
                if (rows[j] != nullptr) accumulate_bf16x8(acc, words[b][j]);
            if (bias0 != nullptr) accumulate_bf16x8(acc, ld_nc(bias0 + i));
            if (bias1 != nullptr) accumulate_bf16x8(acc, ld_nc(bias1 + i));
            st_na(dst + i, pack_bf16x8(acc));
        }
    }
}

// ---- numbering tokens --------------------------------------------------
__device__ __forceinline__ unsigned lanemask_lt(int lane) { return (1u << lane) - 1u; }

// A warp numbers the tokens of [begin, end) for which in(t) holds, in token
// order from 0, 32 tokens per step (lane i takes t0 + i): store(t, pos) gets
// each token's number, -1 where in(t) is false. Returns how many were in.
// The loads of kBatch steps are issued before their ballots, so the steps
// do not pay one load latency each.
template <typename In, typename Store>
__device__ __forceinline__ int warp_number_tokens(int begin, int end, int lane, In in, Store store) {
    constexpr int kBatch = 4;
    int n = 0;
    for (int t0 = begin; t0 < end; t0 += kBatch * kWarpSize) {
        bool is_in[kBatch];
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
            const int t = t0 + b * kWarpSize + lane;
            is_in[b] = t < end && in(t);
        }
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
            const int t = t0 + b * kWarpSize + lane;
            const unsigned mask = __ballot_sync(0xffffffffu, is_in[b]);
            if (t < end) store(t, is_in[b] ? n + __popc(mask & lanemask_lt(lane)) : -1);
            n += __popc(mask);
        }
    }
    return n;
}

// Inclusive prefix sum of v over the lanes of a warp.
__device__ __forceinline__ int warp_inclusive_sum(int v, int lane) {
#pragma unroll
    for (int offset = 1; offset < kWarpSize; offset <<= 1) {
        const int below = __shfl_up_sync(0xffffffffu, v, offset);
        if (lane >= offset) v += below;
    }
    return v;
}

// A warp turns the rows each (source, channel) sends us, counts[s * stride
// + c], into receive offsets: offsets [num_sources * num_channels + 1], the
// exclusive prefix in (source, channel) order, 32 counts per step.
// host_info[0] = the total; host_info[1 + L] = 1 + the first source whose
// word counts[s * stride + stride - 1] is non-zero (0: none), [2 + L] = that
// word (the source's layout error).
template <typename Count>
__device__ __forceinline__ void warp_receive_offsets(const Count* counts, int num_sources, int num_channels,
                                                     int stride, int* offsets, int* host_info,
                                                     int num_local_experts, int lane) {
    const int num = num_sources * num_channels;
    int total = 0;
    for (int i0 = 0; i0 < num; i0 += kWarpSize) {
        const int i = i0 + lane;
        const int v = i < num ? static_cast<int>(counts[(i / num_channels) * stride + i % num_channels]) : 0;
        const int inclusive = warp_inclusive_sum(v, lane);
        if (i < num) offsets[i] = total + inclusive - v;
        total += __shfl_sync(0xffffffffu, inclusive, kWarpSize - 1);
    }
    if (lane == 0) {
        offsets[num] = total;
        host_info[0] = total;
        int bad_rank = 0, bad_code = 0;
        for (int s = num_sources - 1; s >= 0; --s) {
            const int code = static_cast<int>(counts[s * stride + stride - 1]);
            if (code != 0) {
                bad_rank = s + 1;
                bad_code = code;
            }
        }
        host_info[1 + num_local_experts] = bad_rank;
        host_info[2 + num_local_experts] = bad_code;
    }
}

// The notify's end, in its last block once every source's counts are
// visible: per local expert l, the rows all sources send it (experts[s *
// stride + l]), rounded up to expert_alignment, into recv_expert_counts[l]
// and host_info[1 + l]; then a system fence, since the host reads host_info.
template <typename Count>
__device__ __forceinline__ void finish_expert_counts(const Count* experts, int num_sources, int stride,
                                                     int num_local_experts, int expert_alignment,
                                                     int* recv_expert_counts, int* host_info) {
    if (experts != nullptr)
        for (int l = threadIdx.x; l < num_local_experts; l += blockDim.x) {
            long long sum = 0;
            for (int s = 0; s < num_sources; ++s) sum += experts[s * stride + l];
            const int padded = static_cast<int>((sum + expert_alignment - 1) / expert_alignment * expert_alignment);
            recv_expert_counts[l] = padded;
            host_info[1 + l] = padded;
        }
    __threadfence_system();
}

// ---- warp groups ----------------------------------------------------------
// num_warps warps split into equal groups over num_items items: several
// warps per item when there are more warps than items, else one warp per
// group and several items per group. Group g takes items g, g + num_groups,
// ...; warp `sub` of a group takes every size-th unit of an item's work.
// Warps past the last whole group (group >= num_groups) have no item.
struct WarpGroups {
    int size, num_groups, group, sub;
    __device__ __forceinline__ WarpGroups(int warp, int num_warps, int num_items) {
        size = max(1, num_warps / num_items);
        num_groups = num_warps / size;
        group = warp / size;
        sub = warp % size;
    }
};

// ---- errors ---------------------------------------------------------------
// Error record, in device memory, by int index (Python reads its host mirror
// by the same indices: ERR_* in cupyep/backends/gpu/backend.py, checked by
// tests/test_shared_constants.py). 64-bit fields take two ints.
enum ErrorWord : int {
    kErrFlag = 0,       // set to 1 by the first failure
    kErrPhase = 1,
    kErrPeer = 2,
    kErrChannel = 3,    // channel, expert or slot of the failed wait
    kErrKind = 4,       // ErrorKind
    kErrBadItem = 5,    // 1 + the item of a dropped bad input (report_bad_input)
    kErrMirror = 6,     // [6..7] address of a host-mapped mirror of the record
    kErrPeerTag = 8,    // [8..9] the peer's call tag (kErrCallMismatch)
    kErrCallTag = 10,   // [10..11] the reporting call's tag (low-latency calls; else 0)
    kErrBadValue = 12,  // [12..13] the dropped bad input's value
    kErrRunningTag = 14,  // [14..15] tag of the normal call whose barrier ran last (set_running_call)
    kErrWords = 16,
};
enum ErrorKind : int { kErrTimeout = 1, kErrTooManyRows = 2, kErrCallMismatch = 3 };

// The first failure fills the record and its host mirror. Spinning threads
// poll the device copy (an L2 hit); only a failure touches host memory, so
// waits never put PCIe reads in front of NVLink traffic.
__device__ __forceinline__ void report_error(int* err, int kind, int phase, int peer, int channel,
                                             long long call_tag = 0, long long peer_tag = 0) {
    if (atomicCAS(err + kErrFlag, 0, 1) == 0) {
        volatile int* mirror = *reinterpret_cast<int* const*>(err + kErrMirror);
        volatile int* const records[2] = {err, mirror};
        for (int i = 0; i < 2; ++i) {
            volatile int* r = records[i];
            if (r == nullptr) continue;
            r[kErrPhase] = phase;
            r[kErrPeer] = peer;
            r[kErrChannel] = channel;
            r[kErrKind] = kind;
            *reinterpret_cast<volatile long long*>(r + kErrCallTag) = call_tag;
            *reinterpret_cast<volatile long long*>(r + kErrPeerTag) = peer_tag;
        }
        if (mirror != nullptr) {
            __threadfence_system();  // fields before the flag the host reads
            mirror[kErrFlag] = 1;
        }
        __threadfence_system();
    }
}

// Normal calls' kernels name their call in reports through this word: each
// call's barrier sets it first (calls are ordered, so the kernels that follow
// are that call's).
__device__ __forceinline__ void set_running_call(int* err, long long call_tag) {
    *reinterpret_cast<volatile long long*>(err + kErrRunningTag) = call_tag;
}

__device__ __forceinline__ long long running_call(const int* err) {
    return *reinterpret_cast<const volatile long long*>(err + kErrRunningTag);
}

// Bad input seen inside a kernel that goes on without it (the entry is
// dropped): item, value and call into the record and its mirror. Unlike
// report_error it does not set the flag, so no wait gives up and the call
// completes; the host raises it at the next call.
__device__ __forceinline__ void report_bad_input(int* err, int item, long long value = 0,
                                                 long long call_tag = 0) {
    if (atomicCAS(err + kErrBadItem, 0, item + 1) == 0) {
        volatile int* mirror = *reinterpret_cast<int* const*>(err + kErrMirror);
        if (mirror != nullptr) {
            *reinterpret_cast<volatile long long*>(mirror + kErrBadValue) = value;
            *reinterpret_cast<volatile long long*>(mirror + kErrCallTag) = call_tag;
            __threadfence_system();  // fields before the item the host reads
            mirror[kErrBadItem] = item + 1;
        }
    }
}

// The one timed spin: v = load() until ready(v). True with the value in v;
// false once timeout_ns has passed or, where err is given, another thread has
// already failed (*err set). The clock and err are read every 64 loads, so a
// wait that ends quickly costs one clock read. Every spin-wait in the kernels
// is this function with its own load (the ordering it needs) and report.
template <typename T, typename Load, typename Ready>
__device__ __forceinline__ bool spin_until(T& v, Load load, Ready ready, long long timeout_ns,
                                           const int* err = nullptr) {
    v = load();
    if (ready(v)) return true;
    const unsigned long long start = global_timer_ns();
    for (int spins = 0;; ++spins) {
        v = load();
        if (ready(v)) return true;
        if ((spins & 63) == 63 && (global_timer_ns() - start > (unsigned long long)timeout_ns ||
                                   (err != nullptr && *(const volatile int*)err != 0)))
            return false;
    }
}

// Spin until *flag >= target (int or 64-bit flag, acquired at system scope).
// Returns the last value read, or -1 (after reporting, with the running
// normal call) when timeout_ns passes or another thread already failed.
template <typename T>
__device__ __forceinline__ T wait_at_least(const T* flag, T target, long long timeout_ns,
                                           int* err, int phase, int peer, int channel) {
    T v;
    if (spin_until(v, [&] { return ld_acquire_sys(flag); }, [&](T x) { return x >= target; }, timeout_ns, err))
        return v;
    report_error(err, kErrTimeout, phase, peer, channel, running_call(err));
    return -1;
}

// A sender's row-count tail for one receiver: published (by `store`, a
// release) only when the count changed since this thread's last store. The
// receiver resets the tail once it has seen the final count, and a repeated
// store of that count would revive it.
template <typename T>
struct PublishedTail {
    T published = 0;
    template <typename Store>
    __device__ __forceinline__ void publish(T done, Store store) {
        if (done != published) {
            store(done);
            published = done;
        }
    }
};

// "Last block done" by a ticket from `done` ([1] i32, zero between launches).
// What orders a block's earlier writes before its ticket:
enum class Arrival { kReadsOnly, kGpuWrites, kSystemWrites };

// Block-wide: true in the last block of the grid to get here. That block
// acquires every block's arrival (a fence after its ticket) and zeroes `done`
// for the next launch. kGpuWrites / kSystemWrites: a fence (GPU / system
// scope) orders this block's earlier stores before its ticket, for readers on
// this GPU / on peers after the last block.
template <Arrival kOrder>
__device__ __forceinline__ bool last_block_to_arrive(int* done) {
    __shared__ bool s_last;
    __syncthreads();
    if (threadIdx.x == 0) {
        if constexpr (kOrder == Arrival::kSystemWrites) __threadfence_system();
        if constexpr (kOrder == Arrival::kGpuWrites) __threadfence();
        s_last = atomicAdd(done, 1) == static_cast<int>(gridDim.x) - 1;
        if (s_last) {
            __threadfence();
            *done = 0;
        }
    }
    __syncthreads();
    return s_last;
}

// The same in two steps, for a block whose ticket's round trip should overlap
// its work: take() once the block's reads to be covered are done (a fence
// orders them before the ticket; thread 0), last() later (block-wide). The
// caller then fences and zeroes `done` itself, with whatever it resets.
struct ArrivalTicket {
    int ticket = 0;
    __device__ __forceinline__ void take(int* done) {
        if (threadIdx.x == 0) {
            __threadfence();
            ticket = atomicAdd(done, 1);
        }
    }
    __device__ __forceinline__ bool last() const {
        __shared__ int s_last;
        if (threadIdx.x == 0) s_last = ticket == static_cast<int>(gridDim.x) - 1;
        __syncthreads();
        return s_last;
    }
};

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
// counters[1] the notify calls (parity of the count buffers). Kernels touch
// them one after another (calls are ordered), and one block per kernel
// writes them (a KernelBarrier's blocks all read counters[0] first).
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
