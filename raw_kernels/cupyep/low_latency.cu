// Low-latency dispatch and combine for decoding: fixed shapes, no host
// synchronisation, capturable in CUDA graphs.
//
// Every rank owns one symmetric buffer with two halves; call n uses half n % 2
// (layout in cupyep/low_latency.py). Per half:
//   dispatch flags [L][R] i64  count + 1 of rows that source r sent to local expert l
//                              (flags sit at fixed offsets whatever the shapes)
//   combine flags  [E] i64     1 once global expert e's owner sent us all its rows
//   dispatch area  [L][R][M]   messages: 16-byte header {token, k} + payload
//   combine area   [M][16][H]  bf16 expert outputs, slot [token][k]
//   send area                  staging for NVSHMEM puts (and zero-copy combine)
//
// Dispatch: one message per distinct (token, expert), into slot = number of
// earlier tokens of this rank that chose that expert, so rows keep
// source-token order without atomics. A block per token loads its row once
// (FP8: casts it) and stores it into each of the token's messages. A warp per
// expert then waits until every message for it is written (a local counter)
// and publishes the count.
// The receive half, a warp group per (local expert, source), waits for the
// expert's counts and packs rows in source-rank order. Combine: a warp group per (local expert, destination)
// writes rows into [token][k] slots of the destination and sets the flag; the
// receive half waits for every flag and reduces in top-k order in fp32.
//
// Flags are zeroed once every reader has read them: an expert's dispatch flags
// (read by one warp group per source) by its last group to finish reading,
// the combine flags (read by every block) by the last block. Peers write a half again only two calls later,
// after seeing flags this rank sets in the call in between, which runs after
// this call's receive half: so up to two calls may be in flight (one with its
// receive hook pending), never three.
#include "cupyep/common.cuh"
#include "cupyep/fp8.cuh"

namespace cupyep {

constexpr int kLLWarps = 16;
constexpr int kLLThreads = kLLWarps * kWarpSize;
constexpr int kLLMaxTopk = 16;  // slot stride of the combine area
constexpr int kLLMaxRanks = 64;

#ifdef CUPYEP_NVSHMEM
constexpr bool kHasNvshmem = true;
#else
constexpr bool kHasNvshmem = false;
#endif

__host__ __device__ constexpr int ll_message_bytes(int hidden, bool fp8) {
    return (16 + (fp8 ? hidden + hidden / 32 : 2 * hidden) + 15) / 16 * 16;
}

// A peer is written with plain stores through its NVLink mapping, or with
// NVSHMEM puts where it has none (or when puts are forced).
__device__ __forceinline__ bool use_put(char* const* peers, int peer, int force_put) {
    return kHasNvshmem && (force_put || peers[peer] == nullptr);
}

__device__ __forceinline__ void warp_put(char* local_base, long long dst_off, const void* src,
                                         int bytes, int peer) {
#ifdef CUPYEP_NVSHMEM
    // Symmetric address: our own copy's address names the peer's copy.
    nvshmemx_putmem_nbi_warp(local_base + dst_off, src, bytes, peer);
#endif
}

// After a warp's stores or puts of one message: lane 0 may then publish them.
// __syncwarp orders the other lanes' stores before lane 0's release; quiet
// completes NVSHMEM puts.
__device__ __forceinline__ void warp_complete(bool put, int lane) {
    __syncwarp();
#ifdef CUPYEP_NVSHMEM
    if (put && lane == 0) nvshmem_quiet();
#endif
}

// Publish a flag in a peer's half. The release (or fence before the signal)
// orders every write this thread has observed before the peer sees the flag.
__device__ __forceinline__ void set_peer_flag(char* const* peers, char* local_base, long long off,
                                              int peer, long long value, bool put) {
    if (put) {
#ifdef CUPYEP_NVSHMEM
        nvshmem_fence();
        nvshmemx_signal_op(reinterpret_cast<uint64_t*>(local_base + off),
                           static_cast<uint64_t>(value), NVSHMEM_SIGNAL_SET, peer);
#endif
    } else {
        st_release_sys(reinterpret_cast<long long*>(peers[peer] + off), value);
    }
}

// Rank masking: mask [R] int32 in device memory, 1 = left out. A rank whose
// own entry is set is out of the exchange altogether: it sends nothing and
// waits for nothing. Each block takes a snapshot at its start, so one call
// sees one mask (a timeout in shrink mode masks a peer for later calls, and
// for the rest of the call in the block that saw it).
__device__ __forceinline__ void load_mask(const int* mask, int rank, int num_ranks, int* s_mask) {
    __syncthreads();
    const volatile int* m = mask;  // other blocks may set entries during the call
    // Both loads are issued before either is used: one latency, not two.
    for (int r = threadIdx.x; r < num_ranks; r += blockDim.x) {
        const int self = m[rank], peer = m[r];
        s_mask[r] = (self | peer) != 0;
    }
    __syncthreads();
}

// Spin until a 64-bit flag is non-zero; 0 on timeout, after reporting it,
// or with shrink (mask != nullptr) after masking the peer instead.
__device__ __forceinline__ long long wait_nonzero(const long long* flag, long long timeout_ns, int* err,
                                                  int phase, int peer, int channel, int* shrink_mask = nullptr) {
    long long v = ld_acquire_sys(flag);
    if (v != 0) return v;
    const unsigned long long start = global_timer_ns();
    for (int spins = 0;; ++spins) {
        v = ld_acquire_sys(flag);
        if (v != 0) return v;
        if ((spins & 63) == 63 &&
            (global_timer_ns() - start > (unsigned long long)timeout_ns || *(volatile int*)err != 0)) {
            if (shrink_mask != nullptr && *(volatile int*)err == 0)
                atomicExch(shrink_mask + peer, 1);
            else
                report_error(err, 1, phase, peer, channel);
            return 0;
        }
    }
}

// Top-k entries of the dispatch, flattened [T*K]: the expert of entry i, or
// -1 where it is dropped, out of range (reported separately) or repeats an
// expert earlier in its token's row (a repeated expert gets one message,
// under its first k).
template <typename IdxT>
__device__ __forceinline__ int entry_expert(const IdxT* idx, int i, int num_topk, int num_experts) {
    const IdxT* row = idx + (i / num_topk) * (long long)num_topk;
    const long long id = static_cast<long long>(row[i % num_topk]);
    if (id < 0 || id >= num_experts) return -1;
    const int k = i % num_topk, e = static_cast<int>(id);
    for (int j = 0; j < k; ++j)
        if (static_cast<long long>(row[j]) == id) return -1;
    return e;
}

// The entries, staged once per block in shared memory when they fit: the
// slot of every message counts earlier entries, and global loads there made
// a chain of dependent latencies per message.
constexpr int kLLStagedEntries = 8192;

template <typename IdxT>
struct TopkEntries {
    const IdxT* idx;
    const int* staged;  // nullptr: read idx
    int num_topk;
    int num_experts;
    __device__ __forceinline__ int operator[](int i) const {
        return staged != nullptr ? staged[i] : entry_expert(idx, i, num_topk, num_experts);
    }
    // Entries before `end` naming expert e: tokens before end / K that chose e.
    __device__ __forceinline__ int count(int end, int e, int lane) const {
        unsigned n = 0;
        for (int i = lane; i < end; i += kWarpSize) n += (*this)[i] == e;
        return static_cast<int>(__reduce_add_sync(0xffffffffu, n));
    }
};


// A warp copies a received row in one batch of loads where it fits in
// registers (16 words per lane: FP8 rows up to 8192 channels), else in
// warp_copy's batches: a batch costs a load latency.
template <int kNumInt4>
__device__ __forceinline__ void warp_copy_row_coherent(int4* dst, const int4* src, int lane) {
    constexpr int kSteps = (kNumInt4 + kWarpSize - 1) / kWarpSize;
    if constexpr (kSteps <= 16)
        warp_copy_batch<kSteps, kNumInt4 % kWarpSize != 0, false>(dst, src, 0, kNumInt4, lane);
    else
        warp_copy_coherent<kNumInt4>(dst, src, lane);
}

// ----------------------------------------------------------------------------
// Dispatch. phases: 1 send, 2 receive, 3 both (the receive half waits for
// flags only, so send-then-receive in one launch cannot deadlock as long as
// every block is resident: the grid is at most one block per SM).
//
// Outputs (receive half), L = E / R local experts:
//   recv_x [L][R*M][H] e4m3 or bf16; recv_scales [L][R*M][H/128] f32, or with
//   kUe8m0 [L][R*M][H/512] i32; recv_count [L]; src_info [L][R*M] (-1 past the
//   count); layout_range [L][R] (begin << 32 | count); recv_k [L][R*M] (the
//   source's top-k slot, for combine).
// finish_count [E]: zero between calls (the flag warp resets it). recv_done
// [L]: zero between calls (the expert's last receiving group resets it), one
// array per buffer half.
template <int kHidden, bool kFp8, bool kRoundScale, bool kUe8m0, typename IdxT>
__global__ void __launch_bounds__(kLLThreads, 1)
low_latency_dispatch(const __nv_bfloat16* __restrict__ x, const IdxT* __restrict__ topk_idx,
                     int num_tokens, int num_topk, int max_tokens, int num_experts, int rank,
                     int num_ranks, char* local_base, char* const* peers, int force_put,
                     long long off_flags, long long off_area, long long off_send, int* finish_count,
                     int* recv_done, void* recv_x, void* recv_scales, int* recv_count, int* src_info,
                     long long* layout_range, int* recv_k, int* cumulative_expert_stats,
                     long long* wait_stats, int* mask, int shrink, int phases, int* err,
                     long long timeout_ns) {
    constexpr int kMsg = ll_message_bytes(kHidden, kFp8);
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    // Consecutive tasks go to different SMs.
    const int spread_warp = warp * gridDim.x + blockIdx.x, num_warps = gridDim.x * kLLWarps;
    const int num_local = num_experts / num_ranks;
    // Send half, a block per token: each thread loads its units of the row
    // once (one load round for hidden up to 8192 with FP8, 4096 in BF16),
    // casts them, and stores them into every message of the token.
    constexpr int kChannels = kFp8 ? 16 : 8;  // per unit: one int4 stored
    constexpr int kLoads = kFp8 ? 2 : 1;      // int4 of bf16 loaded per unit
    constexpr int kUnits = kHidden / kChannels;
    constexpr int kSteps = (kUnits + kLLThreads - 1) / kLLThreads;
    static_assert(kHidden % kChannels == 0, "hidden must be a multiple of 8 (16 with FP8)");
    int4 raw[kSteps][kLoads];
    auto load_row = [&](int t) {
        const int4* src = reinterpret_cast<const int4*>(x + (long long)t * kHidden);
#pragma unroll
        for (int j = 0; j < kSteps; ++j) {
            const int u = threadIdx.x + j * kLLThreads;
#pragma unroll
            for (int q = 0; q < kLoads; ++q)
                raw[j][q] = u < kUnits ? ld_nc(src + kLoads * u + q) : make_int4(0, 0, 0, 0);
        }
    };
    // The block's first row is in flight during the mask, the top-k staging
    // and the counts below: these were serial latencies before any store.
    if ((phases & 1) && blockIdx.x < num_tokens) load_row(blockIdx.x);
    __shared__ int s_mask[kLLMaxRanks];
    load_mask(mask, rank, num_ranks, s_mask);

    if (phases & 1) {
        __shared__ char* s_peers[kLLMaxRanks];
        for (int r = threadIdx.x; r < num_ranks; r += blockDim.x) s_peers[r] = peers[r];
        // Messages per expert, for the flags below: warp w publishes expert
        // w * gridDim.x + blockIdx.x first, and the block counts those
        // experts' entries together while the row loads are in flight.
        __shared__ int s_first_count[kLLWarps];
        if (threadIdx.x < kLLWarps) s_first_count[threadIdx.x] = 0;
        __shared__ int s_entries[kLLStagedEntries];
        const int num_entries = num_tokens * num_topk;
        const bool staged = num_entries <= kLLStagedEntries;
        if (staged) {
            // Raw ids first (one coalesced load per entry), then each entry
            // is compared with the earlier ones of its token in shared
            // memory: loading them from global memory made a chain of
            // dependent latencies. Bit q of `repeated`: entry threadIdx.x +
            // q * blockDim.x names an expert its token chose before.
            static_assert(kLLStagedEntries / kLLThreads <= 32, "one bit per staged entry of a thread");
            for (int i = threadIdx.x; i < num_entries; i += blockDim.x) {
                const long long id = static_cast<long long>(topk_idx[i]);
                s_entries[i] = id < 0 || id >= num_experts ? -1 : static_cast<int>(id);
            }
            __syncthreads();
            unsigned repeated = 0;
            for (int i = threadIdx.x, q = 0; i < num_entries; i += blockDim.x, ++q) {
                const int e = s_entries[i];
                for (int j = i - i % num_topk; j < i && e >= 0; ++j)
                    if (s_entries[j] == e) {
                        repeated |= 1u << q;
                        break;
                    }
            }
            __syncthreads();
            for (int i = threadIdx.x, q = 0; i < num_entries; i += blockDim.x, ++q)
                if ((repeated >> q) & 1u) s_entries[i] = -1;
        }
        __syncthreads();
        const TopkEntries<IdxT> entries{topk_idx, staged ? s_entries : nullptr, num_topk, num_experts};
        for (int i = threadIdx.x; i < num_entries; i += blockDim.x) {
            const int e = entries[i];
            if (e >= 0 && e % gridDim.x == blockIdx.x && e / gridDim.x < kLLWarps)
                atomicAdd(s_first_count + e / gridDim.x, 1);
        }
        // Messages: one per distinct (token, expert), into slot = the number
        // of earlier tokens that chose the expert.
        __shared__ int s_expert[kLLMaxTopk];      // -1: no message for this k
        __shared__ int s_slot[kLLMaxTopk];
        __shared__ long long s_msg_off[kLLMaxTopk];
        __shared__ char* s_msg[kLLMaxTopk];       // where message k is written
        for (int t = blockIdx.x; t < num_tokens; t += gridDim.x) {
            if (t != blockIdx.x) load_row(t);
            __syncthreads();  // the previous token's s_* are read no more
            if (threadIdx.x < num_topk) {
                const int e = entries[t * num_topk + threadIdx.x];
                // dropped, repeated (sent with an earlier k) or masked: no message
                s_expert[threadIdx.x] = e < 0 || s_mask[e / num_local] ? -1 : e;
                s_slot[threadIdx.x] = 0;
            }
            __syncthreads();
            {
                int mine[kLLMaxTopk];
#pragma unroll
                for (int k = 0; k < kLLMaxTopk; ++k) mine[k] = k < num_topk ? s_expert[k] : -1;
                for (int i = threadIdx.x; i < t * num_topk; i += kLLThreads) {
                    const int e = entries[i];
#pragma unroll
                    for (int k = 0; k < kLLMaxTopk; ++k)
                        if (e >= 0 && e == mine[k]) atomicAdd(s_slot + k, 1);
                }
            }
            __syncthreads();
            if (threadIdx.x < num_topk && s_expert[threadIdx.x] >= 0) {
                const int k = threadIdx.x, e = s_expert[k], dst = e / num_local;
                const long long off =
                    off_area + (((long long)(e % num_local) * num_ranks + rank) * max_tokens + s_slot[k]) * kMsg;
                char* msg = use_put(s_peers, dst, force_put)
                                ? local_base + off_send + ((long long)t * num_topk + k) * kMsg
                                : s_peers[dst] + off;
                *reinterpret_cast<int4*>(msg) = make_int4(t, k, 0, 0);
                s_msg_off[k] = off;
                s_msg[k] = msg;
            }
            __syncthreads();
            int4 out[kSteps];
            float scale[kSteps];
#pragma unroll
            for (int j = 0; j < kSteps; ++j) {
                if constexpr (kFp8) {
                    // whole 8-thread groups (128 channels) are inside the row or outside it
                    float f[16];
                    bf16x8_to_float(raw[j][0], f);
                    bf16x8_to_float(raw[j][1], f + 8);
                    float amax = 0.f;
#pragma unroll
                    for (int c = 0; c < 16; ++c) amax = fmaxf(amax, fabsf(f[c]));
                    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 4));
                    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
                    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
                    scale[j] = fp8_scale(amax, kRoundScale);
                    const float inv = __frcp_rn(scale[j]);
                    out[j].x = (int)fp8x4(f[0], f[1], f[2], f[3], inv);
                    out[j].y = (int)fp8x4(f[4], f[5], f[6], f[7], inv);
                    out[j].z = (int)fp8x4(f[8], f[9], f[10], f[11], inv);
                    out[j].w = (int)fp8x4(f[12], f[13], f[14], f[15], inv);
                } else {
                    out[j] = raw[j][0];
                    scale[j] = 0.f;
                }
            }
            for (int k = 0; k < num_topk; ++k) {
                if (s_expert[k] < 0) continue;
                char* payload = s_msg[k] + 16;
#pragma unroll
                for (int j = 0; j < kSteps; ++j) {
                    const int u = threadIdx.x + j * kLLThreads;
                    if (u >= kUnits) break;
                    st_na(reinterpret_cast<int4*>(payload) + u, out[j]);
                    if (kFp8 && u % 8 == 0) reinterpret_cast<float*>(payload + kHidden)[u / 8] = scale[j];
                }
            }
            // The barrier orders every thread's stores before warp k's
            // release add (cumulative: it covers what the barrier ordered).
            __syncthreads();
            if (warp < num_topk && s_expert[warp] >= 0) {
                const int e = s_expert[warp], dst = e / num_local;
                const bool put = use_put(s_peers, dst, force_put);
                if (put) warp_put(local_base, s_msg_off[warp], s_msg[warp], kMsg, dst);
                warp_complete(put, lane);
                if (lane == 0) red_add_release_gpu(finish_count + e, 1);
            }
        }
        __syncthreads();  // s_first_count is complete
        // Counts: after every message for expert e is written, tell its owner.
        for (int e = spread_warp; e < num_experts; e += num_warps) {
            const int count = e == spread_warp ? s_first_count[warp] : entries.count(num_entries, e, lane);
            const int dst = e / num_local, local_expert = e % num_local;
            if (lane == 0 && s_mask[dst]) {
                finish_count[e] = 0;  // nothing was sent to a masked rank
            } else if (lane == 0) {
                const unsigned long long start = global_timer_ns();
                bool ok = true;
                while (ld_acquire_gpu(finish_count + e) < count) {
                    if (global_timer_ns() - start > (unsigned long long)timeout_ns) {
                        report_error(err, 1, kPhaseLowLatencySend, rank, e);
                        ok = false;
                        break;
                    }
                }
                finish_count[e] = 0;  // every add for this call has landed
                if (ok)
                    set_peer_flag(s_peers, local_base, off_flags + 8ll * (local_expert * num_ranks + rank),
                                  dst, count + 1ll, use_put(s_peers, dst, force_put));
            }
            __syncwarp();
        }
        // Ids outside [-1, E) were dropped; block 0 reports them, raised by
        // the next call on this rank (the exchange itself completes).
        if (blockIdx.x == 0)
            for (int i = threadIdx.x; i < num_entries; i += blockDim.x) {
                const long long id = static_cast<long long>(topk_idx[i]);
                if (id < -1 || id >= num_experts) report_bad_input(err, i / num_topk);
            }
    }

    if (phases & 2) {
        // A group of four warps per (local expert, source rank). Each group
        // of an expert reads the expert's counts from every source (where its
        // source's rows begin); the last of them to have read zeroes the
        // flags. A group per expert left most SMs idle: at 4 ranks the 72
        // local experts kept 36 of 132 blocks busy.
        constexpr int kGroups = 4, kGroupWarps = kLLWarps / kGroups, kGroupThreads = kGroupWarps * kWarpSize;
        __shared__ int s_count_all[kGroups][kLLMaxRanks];
        const int group = warp / kGroupWarps, gwarp = warp % kGroupWarps;
        const int gtid = gwarp * kWarpSize + lane;
        int* s_count = s_count_all[group];
        auto group_sync = [group]() {
            sync_warps(group + 1, kGroupThreads);
        };
        long long* flags = reinterpret_cast<long long*>(local_base + off_flags);
        const int rows_per_expert = num_ranks * max_tokens;
        const unsigned long long start = global_timer_ns();
        for (int unit = group * gridDim.x + blockIdx.x; unit < num_local * num_ranks; unit += kGroups * gridDim.x) {
            const int le = unit / num_ranks, src = unit % num_ranks;
            // Known limit of shrink mode: a flag that lands just as the
            // expert's groups time out on it may be seen by some of them
            // only, and their row offsets then disagree for that call.
            for (int s = gtid; s < num_ranks; s += kGroupThreads) {
                long long v = 0;
                if (!s_mask[s])
                    v = wait_nonzero(flags + le * num_ranks + s, timeout_ns, err, kPhaseLowLatencyDispatchRecv, s, le,
                                     shrink ? mask : nullptr);
                s_count[s] = v > 0 ? static_cast<int>(v - 1) : 0;
                if (wait_stats != nullptr && s == src)
                    atomicAdd(reinterpret_cast<unsigned long long*>(wait_stats + s), global_timer_ns() - start);
            }
            group_sync();
            // The group's flag reads happen-before its ticket (bar.sync, then
            // the fence); the ticket is read after the rows are copied.
            int ticket = 0;
            if (gtid == 0) {
                __threadfence();
                ticket = atomicAdd(recv_done + le, 1);
            }
            // Where this source's rows begin, and the expert's total.
            int before = 0, total = 0;
            for (int s = lane; s < num_ranks; s += kWarpSize) {
                const int c = s_count[s];
                total += c;
                if (s < src) before += c;
            }
            total = static_cast<int>(__reduce_add_sync(0xffffffffu, static_cast<unsigned>(total)));
            const int begin = static_cast<int>(__reduce_add_sync(0xffffffffu, static_cast<unsigned>(before)));
            const int count = s_count[src];
            const long long out_base = (long long)le * rows_per_expert;
            if (gtid == 0) {
                layout_range[le * num_ranks + src] = ((long long)begin << 32) | count;
                if (src == 0) {
                    recv_count[le] = total;
                    if (cumulative_expert_stats != nullptr) atomicAdd(cumulative_expert_stats + le, total);
                }
            }
            for (int i = gwarp; i < count; i += kGroupWarps) {
                const int row = begin + i, s = src;
                const char* msg = local_base + off_area + (((long long)le * num_ranks + s) * max_tokens + i) * kMsg;
                // Header and scales are loaded before the payload is copied and
                // stored after it, so that every load of the row is in flight
                // before the first store (stores could alias later loads).
                const int2 head = lane == 0 ? *reinterpret_cast<const int2*>(msg) : make_int2(0, 0);
                constexpr int kScales = kFp8 ? kHidden / kFp8Group : 0;
                constexpr int kScaleSteps = (kScales + kWarpSize - 1) / kWarpSize;
                float scale[kScaleSteps > 0 ? kScaleSteps : 1];
                const float* scales = reinterpret_cast<const float*>(msg + 16 + kHidden);
#pragma unroll
                for (int j = 0; j < kScaleSteps; ++j)
                    scale[j] = lane + j * kWarpSize < kScales ? scales[lane + j * kWarpSize] : 0.f;
                const int4* payload = reinterpret_cast<const int4*>(msg + 16);
                if constexpr (kFp8) {
                    warp_copy_row_coherent<kHidden / 16>(
                        reinterpret_cast<int4*>(static_cast<char*>(recv_x) + (out_base + row) * kHidden), payload, lane);
                    if constexpr (kUe8m0) {
                        constexpr int kWords = kHidden / 512;
                        int* out = static_cast<int*>(recv_scales) + (out_base + row) * kWords;
                        if constexpr (kWords <= kWarpSize) {
                            // Lane w packs scales 4w .. 4w + 3 from the lanes holding them.
                            unsigned word = 0;
#pragma unroll
                            for (int q = 0; q < 4; ++q) {
                                const int idx = 4 * lane + q;
#pragma unroll
                                for (int j = 0; j < kScaleSteps; ++j) {
                                    const float v = __shfl_sync(0xffffffffu, scale[j], idx % kWarpSize);
                                    if (idx / kWarpSize == j) word |= ue8m0_byte(v) << (8 * q);
                                }
                            }
                            if (lane < kWords) out[lane] = (int)word;
                        } else {
                            for (int j = lane; j < kWords; j += kWarpSize)
                                out[j] = (int)(ue8m0_byte(scales[4 * j]) | (ue8m0_byte(scales[4 * j + 1]) << 8) |
                                               (ue8m0_byte(scales[4 * j + 2]) << 16) |
                                               (ue8m0_byte(scales[4 * j + 3]) << 24));
                        }
                    } else {
                        float* out = static_cast<float*>(recv_scales) + (out_base + row) * kScales;
#pragma unroll
                        for (int j = 0; j < kScaleSteps; ++j)
                            if (lane + j * kWarpSize < kScales) out[lane + j * kWarpSize] = scale[j];
                    }
                } else {
                    warp_copy_coherent<kHidden * 2 / 16>(
                        reinterpret_cast<int4*>(static_cast<char*>(recv_x) + (out_base + row) * kHidden * 2),
                        payload, lane);
                }
                if (lane == 0) {
                    src_info[out_base + row] = head.x;
                    recv_k[out_base + row] = head.y;
                }
            }
            // Rows past the total, shared by the expert's groups.
            for (int row = total + src + gtid * num_ranks; row < rows_per_expert; row += kGroupThreads * num_ranks)
                src_info[out_base + row] = -1;
            if (gtid == 0 && ticket == num_ranks - 1) {
                __threadfence();  // every group's reads (their tickets) before the zeroes
                for (int s = 0; s < num_ranks; ++s)
                    if (!s_mask[s]) flags[le * num_ranks + s] = 0;
                recv_done[le] = 0;
            }
            group_sync();  // s_count is reused by the group's next unit
        }
    }
}


// ----------------------------------------------------------------------------
// LogFMT-10 (defined in cupyep/logfmt.py): per 64 channels, fp32 log2 of the
// largest and of the smallest non-zero magnitude (clipped to 32 octaves
// below), then per 8 channels 10 bytes: 8 sign bits and eight 9-bit codes.
// The fp32 steps use _rn intrinsics so that no FMA contraction moves them
// away from the NumPy definition.
constexpr int kLogFmtGroupBytes = 88;
constexpr int kLogFmtStepBytes = 4 * kLogFmtGroupBytes;  // 256 channels: one int4 of bf16 per lane
constexpr float kLogFmtRange = 32.f;
constexpr float kLogFmtSteps = 510.f;  // codes 1..511

__host__ __device__ constexpr int logfmt_row_bytes(int hidden) { return hidden / 64 * kLogFmtGroupBytes; }

// A warp encodes a bf16 row into dst (16-byte aligned), a 256-channel step at
// a time through buf (kLogFmtStepBytes of shared memory, 16-byte aligned).
// Loads are coherent: in zero-copy mode dst is the row itself, and a step
// writes only bytes that earlier steps have read.
template <int kHidden>
__device__ __forceinline__ void logfmt_encode_row(char* dst, const int4* src, char* buf, int lane) {
    static_assert(kHidden % 256 == 0, "LogFMT needs a hidden size divisible by 256");
    constexpr int kSteps = kHidden / 256, kBatch = 4;  // a batch's loads are in flight together
    for (int s0 = 0; s0 < kSteps; s0 += kBatch) {
        int4 raw[kBatch];
#pragma unroll
        for (int b = 0; b < kBatch; ++b)
            if (s0 + b < kSteps) raw[b] = src[(s0 + b) * kWarpSize + lane];
#pragma unroll
        for (int b = 0; b < kBatch; ++b) {
            const int step_idx = s0 + b;
            if (step_idx >= kSteps) break;
            float f[8];
            bf16x8_to_float(raw[b], f);
            float amax = 0.f, amin = __int_as_float(0x7f800000);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const float m = fabsf(f[j]);
                amax = fmaxf(amax, m);
                if (m > 0.f) amin = fminf(amin, m);
            }
#pragma unroll
            for (int o = 1; o < 8; o <<= 1) {  // the 8 lanes of one 64-channel group
                amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
                amin = fminf(amin, __shfl_xor_sync(0xffffffffu, amin, o));
            }
            const float log_amax = log2f(amax);
            const float log_amin = fmaxf(log2f(amin), __fsub_rn(log_amax, kLogFmtRange));
            const float step = __fdiv_rn(__fsub_rn(log_amax, log_amin), kLogFmtSteps);
            unsigned long long lo = 0;  // bits 0-7 signs, then codes at 8 + 9j (code 6 straddles)
            unsigned hi = 0;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const float m = fabsf(f[j]);
                unsigned code = 0;
                if (m > 0.f) {
                    const float pos = step > 0.f ? __fdiv_rn(__fsub_rn(log2f(m), log_amin), step) : 0.f;
                    code = static_cast<unsigned>(fminf(fmaxf(rintf(pos), 0.f), kLogFmtSteps)) + 1;
                }
                lo |= static_cast<unsigned long long>(f[j] < 0.f) << j;
                if (j < 6) lo |= static_cast<unsigned long long>(code) << (8 + 9 * j);
                else if (j == 6) { lo |= static_cast<unsigned long long>(code & 3) << 62; hi |= code >> 2; }
                else hi |= code << 7;
            }
            char* group = buf + (lane / 8) * kLogFmtGroupBytes;
            if (lane % 8 == 0) *reinterpret_cast<float2*>(group) = make_float2(log_amax, log_amin);
            unsigned short* payload = reinterpret_cast<unsigned short*>(group + 8 + (lane % 8) * 10);
#pragma unroll
            for (int w = 0; w < 4; ++w) payload[w] = static_cast<unsigned short>(lo >> (16 * w));
            payload[4] = static_cast<unsigned short>(hi);
            __syncwarp();
            if (lane < kLogFmtStepBytes / 16)
                st_na(reinterpret_cast<int4*>(dst + step_idx * kLogFmtStepBytes) + lane,
                      reinterpret_cast<const int4*>(buf)[lane]);
            __syncwarp();
        }
    }
}

// Channels 8u .. 8u+7 of an encoded row: the group's logs and 10 bytes.
struct LogFmt8 {
    float2 logs;
    unsigned short payload[5];
    __device__ __forceinline__ void load(const char* row, int u) {
        const char* group = row + (u / 8) * kLogFmtGroupBytes;
        logs = *reinterpret_cast<const float2*>(group);
        const unsigned short* p = reinterpret_cast<const unsigned short*>(group + 8 + (u % 8) * 10);
#pragma unroll
        for (int w = 0; w < 5; ++w) payload[w] = p[w];
    }
};

// ... decoded to fp32.
__device__ __forceinline__ void logfmt_decode8(const LogFmt8& in, float* f) {
    const float2 logs = in.logs;
    unsigned long long lo = 0;
#pragma unroll
    for (int w = 0; w < 4; ++w) lo |= static_cast<unsigned long long>(in.payload[w]) << (16 * w);
    const unsigned hi = in.payload[4];
    const float step = __fdiv_rn(__fsub_rn(logs.x, logs.y), kLogFmtSteps);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        unsigned code;
        if (j < 6) code = static_cast<unsigned>(lo >> (8 + 9 * j)) & 511u;
        else if (j == 6) code = static_cast<unsigned>(lo >> 62) | ((hi & 127u) << 2);
        else code = (hi >> 7) & 511u;
        const float v = code == 0 ? 0.f : exp2f(__fadd_rn(logs.y, __fmul_rn(static_cast<float>(code - 1), step)));
        f[j] = (lo >> j) & 1 ? -v : v;
    }
}

// ----------------------------------------------------------------------------
// Combine. x [L][R*M][H] bf16 expert outputs in the dispatched layout (it may
// be the send area itself: zero_copy); src_info, recv_k, layout_range from the
// dispatch; topk_idx/topk_weights [T][K] of this rank's tokens; out [T][H].
// num_groups warp groups per block each own one (local expert, destination).
template <int kHidden, bool kLogFmt, typename IdxT>
__global__ void __launch_bounds__(kLLThreads, 1)
low_latency_combine(const __nv_bfloat16* __restrict__ x, const int* __restrict__ src_info,
                    const int* __restrict__ recv_k, const long long* __restrict__ layout_range,
                    const IdxT* __restrict__ topk_idx, const float* __restrict__ topk_weights,
                    int num_tokens, int num_topk, int max_tokens, int num_experts, int rank,
                    int num_ranks, char* local_base, char* const* peers, int force_put,
                    int zero_copy, long long off_flags, long long off_area, long long off_send,
                    int num_groups, int* blocks_done, __nv_bfloat16* out, long long* wait_stats,
                    int* mask, int shrink, int phases, int* err, long long timeout_ns) {
    constexpr int kRowBytes = kHidden * 2;
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int num_local = num_experts / num_ranks;
    const int rows_per_expert = num_ranks * max_tokens;
    __shared__ int s_mask[kLLMaxRanks];
    load_mask(mask, rank, num_ranks, s_mask);

    if (phases & 1) {
        // Rows travel encoded (kLogFmt) or as they are.
        constexpr int kSendBytes = kLogFmt ? logfmt_row_bytes(kHidden) : kRowBytes;
        __shared__ __align__(16) char s_logfmt[kLogFmt ? kLLWarps * kLogFmtStepBytes : 16];
        const int warps_per_group = kLLWarps / num_groups;
        const int group = warp / warps_per_group, wig = warp % warps_per_group;
        if (group < num_groups) {
            for (int p = blockIdx.x * num_groups + group; p < num_experts; p += gridDim.x * num_groups) {
                const int le = p / num_ranks, dst = p % num_ranks;
                if (s_mask[dst]) continue;  // uniform across the group: no barrier skipped by part of it
                const long long range = layout_range[le * num_ranks + dst];
                const int begin = static_cast<int>(range >> 32), count = static_cast<int>(range & 0xffffffff);
                const bool put = use_put(peers, dst, force_put);
                for (int i = wig; i < count; i += warps_per_group) {
                    const long long row = (long long)le * rows_per_expert + begin + i;
                    const long long off =
                        off_area + ((long long)src_info[row] * kLLMaxTopk + recv_k[row]) * kRowBytes;
                    const int4* src = reinterpret_cast<const int4*>(x + row * kHidden);
                    if constexpr (kLogFmt) {
                        char* staged = local_base + off_send + row * kRowBytes;
                        logfmt_encode_row<kHidden>(put ? staged : peers[dst] + off, src,
                                                   s_logfmt + warp * kLogFmtStepBytes, lane);
                        if (put) warp_put(local_base, off, staged, kSendBytes, dst);
                    } else if (put) {
                        char* staged = local_base + off_send + row * kRowBytes;
                        if (!zero_copy) warp_copy_nc<kRowBytes / 16>(reinterpret_cast<int4*>(staged), src, lane);
                        __syncwarp();
                        warp_put(local_base, off, staged, kRowBytes, dst);
                    } else {
                        warp_copy_nc<kRowBytes / 16>(reinterpret_cast<int4*>(peers[dst] + off), src, lane);
                    }
                }
                warp_complete(put, lane);
                // Every warp of the group is done with (le, dst).
                sync_warps(group + 1, warps_per_group * kWarpSize);
                if (wig == 0 && lane == 0) {
                    set_peer_flag(peers, local_base, off_flags + 8ll * (rank * num_local + le), dst, 1, put);
                }
            }
        }
    }

    if (phases & 2) {
        // The block's first token's ids and weights load while the flags are awaited.
        long long first_id = -1;
        float first_weight = 0.f;
        if (threadIdx.x < num_topk && blockIdx.x < num_tokens) {
            first_id = static_cast<long long>(topk_idx[(long long)blockIdx.x * num_topk + threadIdx.x]);
            first_weight = topk_weights[(long long)blockIdx.x * num_topk + threadIdx.x];
        }
        long long* flags = reinterpret_cast<long long*>(local_base + off_flags);
        const unsigned long long start = global_timer_ns();
        for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
            if (s_mask[e / num_local]) continue;
            wait_nonzero(flags + e, timeout_ns, err, kPhaseLowLatencyCombineRecv, e / num_local,
                         e % num_local, shrink ? mask : nullptr);
            // Every block waits for every flag; block 0 alone adds its waits
            // (per owner rank, summed over its experts).
            if (wait_stats != nullptr && blockIdx.x == 0)
                atomicAdd(reinterpret_cast<unsigned long long*>(wait_stats + e / num_local),
                          global_timer_ns() - start);
        }
        // Ranks masked by a timeout just now are left out of this block's sums.
        if (shrink) load_mask(mask, rank, num_ranks, s_mask);
        __syncthreads();
        // The last block to have read every flag zeroes them (blocks_done [1],
        // zero between calls), after its sums: the ticket is taken now and
        // read then, so its round trip overlaps them. The fence orders this
        // block's flag reads before the ticket.
        int ticket = 0;
        if (threadIdx.x == 0) {
            __threadfence();
            ticket = atomicAdd(blocks_done, 1);
        }
        // A block per token: its slots and weights go to shared memory once,
        // then each thread sums 8 channels over every k with all the rows'
        // loads in flight, in top-k order.
        constexpr int kUnits = kHidden / 8;
        const char* area = local_base + off_area;
        __shared__ int s_slot[kLLMaxTopk];
        __shared__ float s_weight[kLLMaxTopk];
        for (int t = blockIdx.x; t < num_tokens; t += gridDim.x) {
            if (threadIdx.x < num_topk) {
                const int k = threadIdx.x;
                const IdxT* idx = topk_idx + (long long)t * num_topk;
                const long long id = t == blockIdx.x ? first_id : static_cast<long long>(idx[k]);
                const int e = static_cast<int>(id);
                // Out of range: dropped by the dispatch. A repeated expert sent its row once, in its first slot.
                int first = id < 0 || id >= num_experts || s_mask[e / num_local] ? -1 : k;
                for (int j = 0; j < k && first >= 0; ++j)
                    if (static_cast<int>(idx[j]) == e) { first = j; break; }
                s_slot[k] = first;
                s_weight[k] = t == blockIdx.x ? first_weight : topk_weights[(long long)t * num_topk + k];
            }
            __syncthreads();
            const char* token_rows = area + (long long)t * kLLMaxTopk * kRowBytes;
            for (int c = threadIdx.x; c < kUnits && kLogFmt; c += blockDim.x) {
                float acc[8];
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[j] = 0.f;
                constexpr int kBatch = 4;  // rows whose loads are in flight together
                for (int k0 = 0; k0 < num_topk; k0 += kBatch) {
                    LogFmt8 in[kBatch];
#pragma unroll
                    for (int b = 0; b < kBatch; ++b)
                        if (k0 + b < num_topk && s_slot[k0 + b] >= 0)
                            in[b].load(token_rows + s_slot[k0 + b] * kRowBytes, c);
#pragma unroll
                    for (int b = 0; b < kBatch; ++b) {
                        if (k0 + b >= num_topk || s_slot[k0 + b] < 0) continue;
                        float f[8];
                        logfmt_decode8(in[b], f);
#pragma unroll
                        for (int j = 0; j < 8; ++j) acc[j] = __fadd_rn(acc[j], __fmul_rn(s_weight[k0 + b], f[j]));
                    }
                }
                reinterpret_cast<int4*>(out + (long long)t * kHidden)[c] = pack_bf16x8(acc);
            }
            for (int c = threadIdx.x; c < kUnits && !kLogFmt; c += blockDim.x) {
                int4 v[kLLMaxTopk];
#pragma unroll
                for (int k = 0; k < kLLMaxTopk; ++k)
                    if (k < num_topk && s_slot[k] >= 0)
                        v[k] = *reinterpret_cast<const int4*>(token_rows + s_slot[k] * kRowBytes + c * 16);
                float acc[8];
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[j] = 0.f;
#pragma unroll
                for (int k = 0; k < kLLMaxTopk; ++k) {
                    if (k < num_topk && s_slot[k] >= 0) {
                        float f[8];
                        bf16x8_to_float(v[k], f);
#pragma unroll
                        for (int j = 0; j < 8; ++j) acc[j] = __fadd_rn(acc[j], __fmul_rn(s_weight[k], f[j]));
                    }
                }
                reinterpret_cast<int4*>(out + (long long)t * kHidden)[c] = pack_bf16x8(acc);
            }
            __syncthreads();  // s_slot is rewritten for the block's next token
        }
        __shared__ int s_last;
        if (threadIdx.x == 0) s_last = ticket == static_cast<int>(gridDim.x) - 1;
        __syncthreads();
        if (s_last) {
            __threadfence();
            for (int e = threadIdx.x; e < num_experts; e += blockDim.x) flags[e] = 0;
            if (threadIdx.x == 0) *blocks_done = 0;
        }
    }
}

}  // namespace cupyep
