// Low-latency dispatch and combine for decoding: fixed shapes, no host
// synchronisation, capturable in CUDA graphs.
//
// Every rank owns one symmetric buffer with two halves; call n uses half n % 2
// (layout in cupyep/layouts/low_latency.py). Per half:
//   dispatch flags [R] i64     messages + 1 that source r sent here, then
//                 [R][L] i32   rows of each local expert from source r
//                              (flags sit at fixed offsets whatever the shapes)
//   combine flags  [E] i64     1 once global expert e's owner sent us all its rows
//   dispatch area  [R][M]      messages: header {token, n, n entries} + payload
//   combine area   [M][16][H]  bf16 expert outputs, slot [token][k]
//   send area                  staging for NVSHMEM puts (and zero-copy combine)
//
// Dispatch: one message per (token, destination rank), whatever the number
// of the token's experts there: the row crosses NVLink once per rank, and
// the receiver copies it into each of its experts' rows. A block per token
// loads its row once (FP8: casts it) and stores it into each of its
// messages; message slots and row slots count earlier tokens, so rows keep
// source-token order without atomics. A warp per expert writes its count to
// the owner; a warp per destination waits until every message and count for
// it is written (a local counter) and sets the source's flag.
// The receive half waits for every source's flag, lays out where each
// (local expert, source)'s rows begin, and a warp per message copies its
// row out. Combine: a warp group per (local expert, destination) writes rows
// into [token][k] slots of the destination and sets the expert's flag there
// (if it had rows); in the receive half, a block per token waits for the
// flags of the token's experts and reduces in top-k order in fp32.
//
// Flags are zeroed once every reader has read them, by the last block of
// the receive half to have read them. Peers write a half again only two
// calls later, after seeing flags this rank sets in the call in between,
// which runs after this call's receive half: so up to two calls may be in
// flight (one with its receive hook pending), never three.
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

// Message header: {token, entries} (16 bytes), then one word per entry.
constexpr int kLLHeaderBytes = 16 + 4 * kLLMaxTopk;
// Expert counts, after the source flags in the dispatch flags.
constexpr int kLLCountsOffset = 8 * kLLMaxRanks;

__host__ __device__ constexpr int ll_message_bytes(int hidden, bool fp8) {
    return (kLLHeaderBytes + (fp8 ? hidden + hidden / 32 : 2 * hidden) + 15) / 16 * 16;
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
    cupyep_nvshmem_putmem_nbi_warp(local_base + dst_off, src, bytes, peer);
#endif
}

// After a warp's stores or puts of one message: lane 0 may then publish them.
// __syncwarp orders the other lanes' stores before lane 0's release; quiet
// completes NVSHMEM puts.
__device__ __forceinline__ void warp_complete(bool put, int lane) {
    __syncwarp();
#ifdef CUPYEP_NVSHMEM
    if (put && lane == 0) cupyep_nvshmem_quiet();
#endif
}

// Publish a flag in a peer's half. The release (or fence before the signal)
// orders every write this thread has observed before the peer sees the flag.
// peer_base: peers[peer], loaded by the caller (unused for a put).
__device__ __forceinline__ void set_peer_flag_at(char* peer_base, char* local_base, long long off, int peer,
                                                 long long value, bool put) {
    if (put) {
#ifdef CUPYEP_NVSHMEM
        cupyep_nvshmem_fence();
        cupyep_nvshmem_signal_set(reinterpret_cast<unsigned long long*>(local_base + off),
                                  static_cast<unsigned long long>(value), peer);
#endif
    } else {
        st_release_sys(reinterpret_cast<long long*>(peer_base + off), value);
    }
}
__device__ __forceinline__ void set_peer_flag(char* const* peers, char* local_base, long long off,
                                              int peer, long long value, bool put) {
    set_peer_flag_at(put ? nullptr : peers[peer], local_base, off, peer, value, put);
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

// A flag carries the call tag of the call that set it above its count:
// (tag << kLLTagShift) | count, count >= 1. The tag packs the call's sequence
// number and parameters (cupyep/backends/gpu/call_tags.py), so a receiver
// that meets a peer at another call, or with other shapes, sees it.
constexpr int kLLTagShift = 17;
constexpr long long kLLCountMask = (1ll << kLLTagShift) - 1;

// Spin until a flag is set; its count, or 0: on timeout (after reporting it,
// or with shrink (mask != nullptr) after masking the peer instead), when
// another thread failed, or when the flag's tag is not call_tag (reported).
__device__ __forceinline__ long long wait_flag(const long long* flag, long long call_tag, long long timeout_ns,
                                               int* err, int phase, int peer, int channel,
                                               int* shrink_mask = nullptr) {
    long long v;
    if (!spin_until(v, [&] { return ld_acquire_sys(flag); }, [](long long x) { return x != 0; }, timeout_ns, err)) {
        if (shrink_mask != nullptr && *(volatile int*)err == 0)
            atomicExch(shrink_mask + peer, 1);
        else
            report_error(err, kErrTimeout, phase, peer, channel, call_tag);
        return 0;
    }
    if ((v >> kLLTagShift) != call_tag) {
        report_error(err, kErrCallMismatch, phase, peer, channel, call_tag, v >> kLLTagShift);
        return 0;
    }
    return v & kLLCountMask;
}

// Top-k entries of the dispatch, flattened [T*K]: the expert of entry i, or
// -1 where it is dropped, out of range (reported separately) or repeats an
// expert earlier in its token's row (a repeated expert gets one message
// entry, under its first k).
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

// Whether entry i is the first of its token for its expert's rank: the token
// sends that rank one message, counted there.
template <typename IdxT>
__device__ __forceinline__ bool entry_first_on_rank(const IdxT* idx, int i, int num_topk, int num_experts,
                                                    int num_local) {
    const int e = entry_expert(idx, i, num_topk, num_experts);
    if (e < 0) return false;
    const IdxT* row = idx + (i / num_topk) * (long long)num_topk;
    const long long lo = e / num_local * (long long)num_local;
    for (int j = 0; j < i % num_topk; ++j) {
        const long long id = static_cast<long long>(row[j]);
        if (id >= lo && id < lo + num_local) return false;
    }
    return true;
}

// The entries, staged once per block in shared memory when they fit: the
// slot of every message counts earlier entries, and global loads there made
// a chain of dependent latencies per message. A staged entry is -1 or its
// expert, with kFirstOnRank set where entry_first_on_rank holds.
constexpr int kLLStagedEntries = 8192;
constexpr int kFirstOnRank = 1 << 30;

template <typename IdxT>
struct TopkEntries {
    const IdxT* idx;
    const int* staged;  // nullptr: read idx
    int num_topk;
    int num_experts;
    int num_local;
    __device__ __forceinline__ int operator[](int i) const {
        if (staged == nullptr) return entry_expert(idx, i, num_topk, num_experts);
        const int v = staged[i];
        return v < 0 ? -1 : v & ~kFirstOnRank;
    }
    __device__ __forceinline__ bool first_on_rank(int i) const {
        if (staged == nullptr) return entry_first_on_rank(idx, i, num_topk, num_experts, num_local);
        return staged[i] >= 0 && (staged[i] & kFirstOnRank);
    }
    // Entries before `end` naming expert e: tokens before end / K that chose e.
    __device__ __forceinline__ int count(int end, int e, int lane) const {
        unsigned n = 0;
        for (int i = lane; i < end; i += kWarpSize) n += (*this)[i] == e;
        return static_cast<int>(__reduce_add_sync(0xffffffffu, n));
    }
};

// A message entry: top-k slot k, local expert, and the row's slot among the
// source's rows for that expert (k < 16, local expert < 4096, slot < 65536).
__device__ __forceinline__ unsigned ll_entry(int k, int local_expert, int slot) {
    return static_cast<unsigned>(k) << 28 | static_cast<unsigned>(local_expert) << 16 | static_cast<unsigned>(slot);
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
// finish_count [R]: zero between calls (a destination's publishing warp
// resets its entry). recv_done [1]: zero between calls (the receive half's
// last block resets it), one per buffer half.
namespace ll {  // cupyep::ll::dispatch: profilers written for DeepEP find "::dispatch"
// One dispatch: the kernel's parameters (phases aside) and its two halves as
// member functions, send() for phases & 1 and receive() for phases & 2, both
// inlined into the kernel below.
template <int kHidden, bool kFp8, bool kRoundScale, bool kUe8m0, typename IdxT>
struct DispatchCall {
    const __nv_bfloat16* x;
    const IdxT* topk_idx;
    int num_tokens, num_topk, max_tokens, num_experts, rank, num_ranks;
    char* local_base;
    char* const* peers;
    int force_put;
    long long off_flags, off_area, off_send;
    int* finish_count;
    int* recv_done;
    void* recv_x;
    void* recv_scales;
    int* recv_count;
    int* src_info;
    long long* layout_range;
    int* recv_k;
    int* cumulative_expert_stats;
    long long* wait_stats;
    int* mask;
    int shrink;
    int* err;
    long long timeout_ns, call_tag;
    int num_local;  // E / R, computed once by the kernel

    static constexpr int kMsg = ll_message_bytes(kHidden, kFp8);
    // Send half, a block per token: each thread loads its units of the row
    // once (one load round for hidden up to 8192 with FP8, 4096 in BF16),
    // casts them, and stores them into every message of the token.
    static constexpr int kChannels = kFp8 ? 16 : 8;  // per unit: one int4 stored
    static constexpr int kLoads = kFp8 ? 2 : 1;      // int4 of bf16 loaded per unit
    static constexpr int kUnits = kHidden / kChannels;
    static constexpr int kSteps = (kUnits + kLLThreads - 1) / kLLThreads;
    static_assert(kHidden % kChannels == 0, "hidden must be a multiple of 8 (16 with FP8)");
    using Row = int4[kSteps][kLoads];  // this thread's units of one token's row

    // Where expert counts go: [R source][L] i32 after the R source flags.
    __device__ __forceinline__ long long counts_offset() const { return off_flags + kLLCountsOffset; }

    __device__ __forceinline__ void load_row(Row& raw, int t) const {
        const int4* src = reinterpret_cast<const int4*>(x + (long long)t * kHidden);
#pragma unroll
        for (int j = 0; j < kSteps; ++j) {
            const int u = threadIdx.x + j * kLLThreads;
#pragma unroll
            for (int q = 0; q < kLoads; ++q)
                raw[j][q] = u < kUnits ? ld_nc(src + kLoads * u + q) : make_int4(0, 0, 0, 0);
        }
    }

    // Messages, counts and flags out to every destination rank. ``raw`` holds
    // the block's first row (the kernel loads it before the mask).
    __device__ __forceinline__ void send(Row& raw, const int* s_mask, int* s_entries) const {
        const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
        // Consecutive tasks go to different SMs.
        const int spread_warp = warp * gridDim.x + blockIdx.x, num_warps = gridDim.x * kLLWarps;
        const int num_entries = num_tokens * num_topk;
        const long long off_counts = counts_offset();
        // Counts bound for NVSHMEM puts are staged first: [E] i32 after the message staging.
        int* count_staging =
            reinterpret_cast<int*>(local_base + off_send + (long long)max_tokens * kLLMaxTopk * kMsg);
        __shared__ char* s_peers[kLLMaxRanks];
        // Messages per destination rank (tokens with an expert there).
        __shared__ int s_rank_msgs[kLLMaxRanks];
        for (int r = threadIdx.x; r < num_ranks; r += blockDim.x) {
            s_peers[r] = peers[r];
            s_rank_msgs[r] = 0;
        }
        // Entries per expert, for the counts below: warp w counts expert
        // w * gridDim.x + blockIdx.x first, and the block counts those
        // experts' entries together while the row loads are in flight.
        __shared__ int s_first_count[kLLWarps];
        if (threadIdx.x < kLLWarps) s_first_count[threadIdx.x] = 0;
        const bool staged = num_entries <= kLLStagedEntries;
        if (staged) {
            // Raw ids first (one coalesced load per entry), then each entry
            // is compared with the earlier ones of its token in shared
            // memory: loading them from global memory made a chain of
            // dependent latencies. Bit q of `repeated`: entry threadIdx.x +
            // q * blockDim.x names an expert its token chose before; of
            // `first`: it is its token's first entry on its expert's rank.
            static_assert(kLLStagedEntries / kLLThreads <= 32, "one bit per staged entry of a thread");
            for (int i = threadIdx.x; i < num_entries; i += blockDim.x) {
                const long long id = static_cast<long long>(topk_idx[i]);
                s_entries[i] = id < 0 || id >= num_experts ? -1 : static_cast<int>(id);
            }
            __syncthreads();
            unsigned repeated = 0, first = 0;
            for (int i = threadIdx.x, q = 0; i < num_entries; i += blockDim.x, ++q) {
                const int e = s_entries[i];
                if (e < 0) continue;
                const int lo = e / num_local * num_local;
                bool rep = false, is_first = true;
                for (int j = i - i % num_topk; j < i; ++j) {
                    const int ej = s_entries[j];
                    rep |= ej == e;
                    is_first &= !(ej >= lo && ej < lo + num_local);
                }
                repeated |= static_cast<unsigned>(rep) << q;
                first |= static_cast<unsigned>(is_first) << q;
            }
            __syncthreads();
            for (int i = threadIdx.x, q = 0; i < num_entries; i += blockDim.x, ++q) {
                if ((repeated >> q) & 1u) s_entries[i] = -1;
                else if ((first >> q) & 1u) s_entries[i] |= kFirstOnRank;
            }
        }
        __syncthreads();
        const TopkEntries<IdxT> entries{topk_idx, staged ? s_entries : nullptr, num_topk, num_experts, num_local};
        for (int i = threadIdx.x; i < num_entries; i += blockDim.x) {
            const int e = entries[i];
            if (e >= 0 && e % gridDim.x == blockIdx.x && e / gridDim.x < kLLWarps)
                atomicAdd(s_first_count + e / gridDim.x, 1);
            if (e >= 0 && entries.first_on_rank(i)) atomicAdd(s_rank_msgs + e / num_local, 1);
        }
        // A message per (token, destination rank): the row once, and an
        // entry per expert of the token on that rank. It goes into slot =
        // the number of earlier tokens sent to that rank; each entry names
        // the row's slot among the expert's rows from here = the number of
        // earlier tokens that chose the expert.
        __shared__ int s_expert[kLLMaxTopk];      // -1: no entry for this k
        __shared__ int s_slot[kLLMaxTopk];        // entry k's slot for its expert
        __shared__ int s_dst[kLLMaxTopk];         // destination j of the token: rank
        __shared__ int s_dst_slot[kLLMaxTopk];    // ... its message slot there
        __shared__ long long s_msg_off[kLLMaxTopk];
        __shared__ char* s_msg[kLLMaxTopk];       // where message j is written
        __shared__ int s_num_dst;
        for (int t = blockIdx.x; t < num_tokens; t += gridDim.x) {
            if (t != blockIdx.x) load_row(raw, t);
            __syncthreads();  // the previous token's s_* are read no more
            if (warp == 0) {
                // Lane k: entry k; lanes with the same destination rank
                // form its message, numbered in order of first appearance.
                int e = -1;
                if (lane < num_topk) {
                    e = entries[t * num_topk + lane];
                    if (e >= 0 && s_mask[e / num_local]) e = -1;  // masked: no entry
                }
                const int dst = e >= 0 ? e / num_local : -1;
                const unsigned valid = __ballot_sync(0xffffffffu, e >= 0);
                const unsigned same = __match_any_sync(0xffffffffu, dst) & valid;
                const bool leader = e >= 0 && (same & lanemask_lt(lane)) == 0;
                const unsigned leaders = __ballot_sync(0xffffffffu, leader);
                if (lane < kLLMaxTopk) {
                    s_expert[lane] = e;
                    s_slot[lane] = 0;
                }
                if (leader) {
                    const int j = __popc(leaders & lanemask_lt(lane));
                    s_dst[j] = dst;
                    s_dst_slot[j] = 0;
                }
                if (lane == 0) s_num_dst = __popc(leaders);
            }
            __syncthreads();
            const int num_dst = s_num_dst;
            {
                int mine[kLLMaxTopk], mine_dst[kLLMaxTopk];
#pragma unroll
                for (int k = 0; k < kLLMaxTopk; ++k) {
                    mine[k] = k < num_topk ? s_expert[k] : -1;
                    mine_dst[k] = k < num_dst ? s_dst[k] : -1;
                }
                for (int i = threadIdx.x; i < t * num_topk; i += kLLThreads) {
                    const int e = entries[i];
                    if (e < 0) continue;
#pragma unroll
                    for (int k = 0; k < kLLMaxTopk; ++k)
                        if (e == mine[k]) atomicAdd(s_slot + k, 1);
                    if (entries.first_on_rank(i)) {
                        const int dst = e / num_local;
#pragma unroll
                        for (int j = 0; j < kLLMaxTopk; ++j)
                            if (dst == mine_dst[j]) atomicAdd(s_dst_slot + j, 1);
                    }
                }
            }
            __syncthreads();
            if (threadIdx.x < num_dst) {
                const int j = threadIdx.x, dst = s_dst[j];
                const long long off = off_area + ((long long)rank * max_tokens + s_dst_slot[j]) * kMsg;
                s_msg_off[j] = off;
                s_msg[j] = use_put(s_peers, dst, force_put)
                               ? local_base + off_send + ((long long)t * kLLMaxTopk + j) * kMsg
                               : s_peers[dst] + off;
            }
            __syncthreads();
            if (warp == 0) {
                // The header: {token, entries} and the entries, each at its
                // place among its message's.
                const int e = lane < kLLMaxTopk ? s_expert[lane] : -1;
                const int dst = e >= 0 ? e / num_local : -1;
                const unsigned same = __match_any_sync(0xffffffffu, dst) & __ballot_sync(0xffffffffu, e >= 0);
                if (e >= 0) {
                    int j = 0;
                    while (s_dst[j] != dst) ++j;
                    unsigned* head = reinterpret_cast<unsigned*>(s_msg[j]);
                    head[4 + __popc(same & lanemask_lt(lane))] = ll_entry(lane, e % num_local, s_slot[lane]);
                    if ((same & lanemask_lt(lane)) == 0)
                        *reinterpret_cast<int2*>(head) = make_int2(t, __popc(same));
                }
            }
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
            for (int d = 0; d < num_dst; ++d) {
                char* payload = s_msg[d] + kLLHeaderBytes;
#pragma unroll
                for (int j = 0; j < kSteps; ++j) {
                    const int u = threadIdx.x + j * kLLThreads;
                    if (u >= kUnits) break;
                    st_na(reinterpret_cast<int4*>(payload) + u, out[j]);
                    if (kFp8 && u % 8 == 0) reinterpret_cast<float*>(payload + kHidden)[u / 8] = scale[j];
                }
            }
            // The barrier orders every thread's stores before warp j's
            // release add (cumulative: it covers what the barrier ordered).
            __syncthreads();
            if (warp < num_dst) {
                const int dst = s_dst[warp];
                const bool put = use_put(s_peers, dst, force_put);
                if (put) warp_put(local_base, s_msg_off[warp], s_msg[warp], kMsg, dst);
                warp_complete(put, lane);
                if (lane == 0) red_add_release_gpu(finish_count + dst, 1);
            }
        }
        __syncthreads();  // s_first_count is complete
        // Counts: a warp per expert writes how many rows it gets from here
        // into its owner's counts (staged for a put), then adds to the
        // owner's finish count like a message. The add is a release: the
        // publisher acquires the finish count before its system-scope
        // release of the flag, which therefore orders this store (and every
        // message) before the flag for the owner (cumulativity).
        for (int e = spread_warp; e < num_experts; e += num_warps) {
            const int count = e == spread_warp ? s_first_count[warp] : entries.count(num_entries, e, lane);
            const int dst = e / num_local, local_expert = e % num_local;
            if (lane == 0 && !s_mask[dst]) {
                const long long off = off_counts + 4ll * (rank * num_local + local_expert);
                if (use_put(s_peers, dst, force_put)) count_staging[e] = count;
                else *reinterpret_cast<int*>(s_peers[dst] + off) = count;
                red_add_release_gpu(finish_count + dst, 1);
            }
            __syncwarp();
        }
        // Publish: the last R warps, one per destination, wait until its
        // messages and counts are written, then set the flag (messages + 1).
        const int dst = spread_warp - (num_warps - num_ranks);
        if (dst >= 0 && !s_mask[dst]) {
            const bool put = use_put(s_peers, dst, force_put);
            bool ok = true;
            if (lane == 0) {
                const int expected = s_rank_msgs[dst] + num_local;
                int landed;
                ok = spin_until(landed, [&] { return ld_acquire_gpu(finish_count + dst); },
                                [&](int n) { return n >= expected; }, timeout_ns);
                if (!ok) report_error(err, kErrTimeout, kPhaseLowLatencySend, rank, dst, call_tag);
                finish_count[dst] = 0;  // every add for this call has landed
            }
            ok = __shfl_sync(0xffffffffu, ok, 0);
            __syncwarp();  // lane 0's acquire before the other lanes read the staged counts
            if (put && ok)
                warp_put(local_base, off_counts + 4ll * rank * num_local, count_staging + dst * num_local,
                         4 * num_local, dst);
            warp_complete(put, lane);
            if (lane == 0 && ok)
                set_peer_flag(s_peers, local_base, off_flags + 8ll * rank, dst,
                              (call_tag << kLLTagShift) | (s_rank_msgs[dst] + 1ll), put);
        }
        // Ids outside [-1, E) were dropped; block 0 reports them, raised by
        // the next call on this rank (the exchange itself completes).
        if (blockIdx.x == 0)
            for (int i = threadIdx.x; i < num_entries; i += blockDim.x) {
                const long long id = static_cast<long long>(topk_idx[i]);
                if (id < -1 || id >= num_experts) report_bad_input(err, i / num_topk, id, call_tag);
            }
    }

    // Every source's flag, then each message's row copied to its entries' rows.
    __device__ __forceinline__ void receive(const int* s_mask, int* s_entries) const {
        const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
        const int spread_warp = warp * gridDim.x + blockIdx.x, num_warps = gridDim.x * kLLWarps;
        const long long off_counts = counts_offset();
        // Every block waits for every source's flag, reads the expert
        // counts and lays out where each (local expert, source)'s rows
        // begin; then a warp per message copies its row to each of its
        // entries' rows.
        __syncthreads();  // the send half's reads of s_entries are done
        long long* flags = reinterpret_cast<long long*>(local_base + off_flags);
        const int* counts = reinterpret_cast<const int*>(local_base + off_counts);
        __shared__ int s_msgs_before[kLLMaxRanks + 1];  // messages of the sources before s
        __shared__ int s_seen[kLLMaxRanks];
        const unsigned long long start = global_timer_ns();
        for (int s = threadIdx.x; s < num_ranks; s += blockDim.x) {
            long long v = 0;
            // Known limit of shrink mode: a flag that lands just as the
            // blocks time out on it may be seen by some of them only, and
            // their row offsets then disagree for that call.
            if (!s_mask[s])
                v = wait_flag(flags + s, call_tag, timeout_ns, err, kPhaseLowLatencyDispatchRecv, s, 0,
                                 shrink ? mask : nullptr);
            s_seen[s] = v > 0;
            s_msgs_before[s + 1] = v > 0 ? static_cast<int>(v - 1) : 0;
            if (wait_stats != nullptr && blockIdx.x == 0)
                atomicAdd(reinterpret_cast<unsigned long long*>(wait_stats + s), global_timer_ns() - start);
        }
        __syncthreads();
        // begin [R][L]: where source s's rows of local expert l begin; total [L].
        // Plain loads of the counts: a thread of this block acquired the
        // source's flag, and the barrier above orders the loads after it.
        int* s_begin = s_entries;
        int* s_total = s_entries + num_experts;
        for (int i = threadIdx.x; i < num_experts; i += blockDim.x)
            s_begin[i] = s_seen[i / num_local] ? counts[i] : 0;
        if (threadIdx.x == 0) {
            s_msgs_before[0] = 0;
            for (int s = 0; s < num_ranks; ++s) s_msgs_before[s + 1] += s_msgs_before[s];
        }
        __syncthreads();
        // The last block to have read the flags and counts zeroes the flags
        // (recv_done [1], zero between calls): the ticket is taken now and
        // read at the end, so its round trip overlaps the copies. The fence
        // orders this block's reads (bar.sync above) before the ticket.
        ArrivalTicket ticket;
        ticket.take(recv_done);
        for (int le = threadIdx.x; le < num_local; le += blockDim.x) {
            int b = 0;
            for (int s = 0; s < num_ranks; ++s) {
                const int c = s_begin[s * num_local + le];
                s_begin[s * num_local + le] = b;
                b += c;
            }
            s_total[le] = b;
        }
        __syncthreads();
        const int rows_per_expert = num_ranks * max_tokens;
        const int gtid = blockIdx.x * blockDim.x + threadIdx.x, num_threads = gridDim.x * blockDim.x;
        for (int i = gtid; i < num_experts; i += num_threads) {
            const int le = i / num_ranks, s = i % num_ranks, begin = s_begin[s * num_local + le];
            const int end = s + 1 < num_ranks ? s_begin[(s + 1) * num_local + le] : s_total[le];
            layout_range[i] = ((long long)begin << 32) | (end - begin);
        }
        for (int le = gtid; le < num_local; le += num_threads) {
            recv_count[le] = s_total[le];
            if (cumulative_expert_stats != nullptr) atomicAdd(cumulative_expert_stats + le, s_total[le]);
        }
        for (long long row = gtid; row < (long long)num_local * rows_per_expert; row += num_threads)
            if (row % rows_per_expert >= s_total[row / rows_per_expert]) src_info[row] = -1;

        constexpr int kRowInt4 = kFp8 ? kHidden / 16 : kHidden / 8;
        constexpr int kBatch = 16;  // words per lane in flight: an FP8 row up to 8192 in one batch
        constexpr int kScales = kFp8 ? kHidden / kFp8Group : 0;
        const int num_msgs = s_msgs_before[num_ranks];
        for (int m = spread_warp; m < num_msgs; m += num_warps) {
            int src = 0;
            while (m >= s_msgs_before[src + 1]) ++src;
            const char* msg = local_base + off_area + ((long long)src * max_tokens + m - s_msgs_before[src]) * kMsg;
            // Lane j < n: entry j's row. Coherent loads: a peer wrote them.
            const int2 head = *reinterpret_cast<const int2*>(msg);
            const unsigned entry = lane < head.y ? reinterpret_cast<const unsigned*>(msg)[4 + lane] : 0u;
            const int le = (entry >> 16) & 0xfffu;
            const long long row = (long long)le * rows_per_expert + s_begin[src * num_local + le] + (entry & 0xffffu);
            if (lane < head.y) {
                src_info[row] = head.x;
                recv_k[row] = static_cast<int>(entry >> 28);
            }
            const int4* payload = reinterpret_cast<const int4*>(msg + kLLHeaderBytes);
            if constexpr (kFp8) {
                // Scales: lane w holds scales 4w .. 4w + 3 (a UE8M0 word).
                const int4* scales = reinterpret_cast<const int4*>(msg + kLLHeaderBytes + kHidden);
                static_assert(kScales % 4 == 0 || !kUe8m0, "UE8M0 needs hidden % 512 == 0");
                if constexpr (kScales % 4 == 0 && kScales / 4 <= kWarpSize) {
                    const int4 s4 = lane < kScales / 4 ? scales[lane] : make_int4(0, 0, 0, 0);
                    for (int j = 0; j < head.y; ++j) {
                        const long long r = __shfl_sync(0xffffffffu, row, j);
                        if (lane >= kScales / 4) continue;
                        if constexpr (kUe8m0)
                            static_cast<int*>(recv_scales)[r * (kScales / 4) + lane] = static_cast<int>(
                                ue8m0_byte(__int_as_float(s4.x)) | ue8m0_byte(__int_as_float(s4.y)) << 8 |
                                ue8m0_byte(__int_as_float(s4.z)) << 16 | ue8m0_byte(__int_as_float(s4.w)) << 24);
                        else
                            reinterpret_cast<int4*>(static_cast<float*>(recv_scales) + r * kScales)[lane] = s4;
                    }
                } else {
                    const float* f = reinterpret_cast<const float*>(scales);
                    for (int j = 0; j < head.y; ++j) {
                        const long long r = __shfl_sync(0xffffffffu, row, j);
                        if constexpr (kUe8m0) {
                            for (int w = lane; w < kScales / 4; w += kWarpSize)
                                static_cast<int*>(recv_scales)[r * (kScales / 4) + w] = static_cast<int>(
                                    ue8m0_byte(f[4 * w]) | ue8m0_byte(f[4 * w + 1]) << 8 |
                                    ue8m0_byte(f[4 * w + 2]) << 16 | ue8m0_byte(f[4 * w + 3]) << 24);
                        } else {
                            for (int c = lane; c < kScales; c += kWarpSize)
                                static_cast<float*>(recv_scales)[r * kScales + c] = f[c];
                        }
                    }
                }
            }
            // The row, a batch at a time: every load of a batch in flight,
            // then its stores into each entry's row.
            for (int first = 0; first < kRowInt4; first += kBatch * kWarpSize) {
                int4 v[kBatch];
#pragma unroll
                for (int b = 0; b < kBatch; ++b) {
                    const int w = first + b * kWarpSize + lane;
                    if (w < kRowInt4) v[b] = payload[w];
                }
                for (int j = 0; j < head.y; ++j) {
                    const long long r = __shfl_sync(0xffffffffu, row, j);
                    int4* dst = static_cast<int4*>(recv_x) + r * kRowInt4;
#pragma unroll
                    for (int b = 0; b < kBatch; ++b) {
                        const int w = first + b * kWarpSize + lane;
                        if (w < kRowInt4) st_na(dst + w, v[b]);
                    }
                }
            }
        }
        if (ticket.last() && threadIdx.x == 0) {
            __threadfence();  // every block's reads (their tickets) before the zeroes
            for (int s = 0; s < num_ranks; ++s)
                if (!s_mask[s]) flags[s] = 0;
            *recv_done = 0;
        }
    }
};

template <int kHidden, bool kFp8, bool kRoundScale, bool kUe8m0, typename IdxT>
__global__ void __launch_bounds__(kLLThreads, 1)
dispatch(const __nv_bfloat16* __restrict__ x, const IdxT* __restrict__ topk_idx,
         int num_tokens, int num_topk, int max_tokens, int num_experts, int rank,
         int num_ranks, char* local_base, char* const* peers, int force_put,
         long long off_flags, long long off_area, long long off_send, int* finish_count,
         int* recv_done, void* recv_x, void* recv_scales, int* recv_count, int* src_info,
         long long* layout_range, int* recv_k, int* cumulative_expert_stats,
         long long* wait_stats, int* mask, int shrink, int phases, int* err,
         long long timeout_ns, long long call_tag) {
    using Call = DispatchCall<kHidden, kFp8, kRoundScale, kUe8m0, IdxT>;
    const Call call{x, topk_idx, num_tokens, num_topk, max_tokens, num_experts, rank, num_ranks, local_base,
                    peers, force_put, off_flags, off_area, off_send, finish_count, recv_done, recv_x,
                    recv_scales, recv_count, src_info, layout_range, recv_k, cumulative_expert_stats,
                    wait_stats, mask, shrink, err, timeout_ns, call_tag, num_experts / num_ranks};
    __shared__ int s_entries[kLLStagedEntries];  // the send half's entries, then the receive half's tables
    __shared__ int s_mask[kLLMaxRanks];
    // The block's first row is in flight during the mask, the top-k staging
    // and the counts: these were serial latencies before any store.
    typename Call::Row raw;
    if ((phases & 1) && blockIdx.x < num_tokens) call.load_row(raw, blockIdx.x);
    load_mask(mask, rank, num_ranks, s_mask);
    if (phases & 1) call.send(raw, s_mask, s_entries);
    if (phases & 2) call.receive(s_mask, s_entries);
}
}  // namespace ll

// ----------------------------------------------------------------------------
// LogFMT-10 (defined in cupyep/formats/logfmt.py): per 64 channels, fp32 log2 of the
// largest and of the smallest non-zero magnitude (clipped to 32 octaves
// below), then per 8 channels 10 bytes: 8 sign bits and eight 9-bit codes;
// code 0 is zero, and so is a magnitude more than half a step below the clip.
// The per-value steps are MUFU approximations of log2 and exp2 and FMAs with
// products where the definition divides, so a value may land one code away
// from NumPy's at a rounding boundary (the tests bound the result against
// cupyep.formats.logfmt, not bit for bit); bf16 denormals (under 2^-126)
// count as zero.
//
// On the wire a group is 88 bytes laid out for the decoder: the header
// (8 bytes), then 8 bytes per 8 channels (bits 0..63 of their 80), then 2
// bytes per 8 channels (bits 64..79), so each decoding thread loads aligned
// words and finds its bits in place (no per-thread shifts or selects). The
// header holds what the decoder computes with, worked out once by the
// sender: the scale and base of a code's exponent (logfmt_accumulate8), the
// scale's sign bit set when the group may hold code 0 (a zero, a bf16
// denormal or a value flushed below the clip), so that decoders skip the
// zero test in groups without one.
constexpr int kLogFmtGroupBytes = 88;
// MUFU log2 / exp2 (relative error ~2^-22): a code or a decoded value may
// move by one step at a rounding boundary, well inside LogFMT's own error.
__device__ __forceinline__ float log2_approx(float x) {  // denormals count as 0
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ float exp2_approx(float x) {  // denormal results flush to 0
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
constexpr int kLogFmtWarpBytes = kWarpSize * kLogFmtGroupBytes;  // a round of a warp's encoding
constexpr float kLogFmtRange = 32.f;
constexpr float kLogFmtSteps = 510.f;  // codes 1..511

__host__ __device__ constexpr int logfmt_row_bytes(int hidden) { return hidden / 64 * kLogFmtGroupBytes; }

__host__ __device__ constexpr int logfmt_rounds(int hidden) { return (hidden / 64 + kWarpSize - 1) / kWarpSize; }

// The encoder rounds a code c (0..511, a position p as p + 1) into the low
// bits of the float 1.5 * 2^23 - 1 + c (ties to even, as rintf): c is those
// bits less kLogFmtCodeBase.
constexpr unsigned kLogFmtCodeBase = 0x4b400000u - 1;

// Where bit b (0..79) of the 80 bits of channels 8i..8i+7 lies among a
// group's 22 words: bits 0..63 in words 2 + 2i and 3 + 2i, bits 64..79 in
// half i % 2 of word 18 + i / 2. Bits 0..7 are the signs, code j starts at
// bit 8 + 9j; codes 2 and 6 cross a word (bits 32 and 64).
__host__ __device__ constexpr int logfmt_word(int i, int b) { return b < 64 ? 2 + 2 * i + b / 32 : 18 + i / 2; }
__host__ __device__ constexpr int logfmt_shift(int i, int b) { return b < 64 ? b % 32 : b - 64 + 16 * (i % 2); }
__host__ __device__ constexpr int logfmt_code_bit(int j) { return 8 + 9 * j; }
__host__ __device__ constexpr bool logfmt_code_crosses(int j) {
    return logfmt_code_bit(j) / 32 != (logfmt_code_bit(j) + 8) / 32;
}

// What the encoder adds to word k (32 bits) of a group beyond the codes
// themselves: kLogFmtCodeBase << shift for each code wholly inside word k.
__host__ __device__ constexpr unsigned logfmt_code_base_sum(int k) {
    unsigned sum = 0;
    for (int i = 0; i < 8; ++i)
        for (int j = 0; j < 8; ++j)
            if (!logfmt_code_crosses(j) && logfmt_word(i, logfmt_code_bit(j)) == k)
                sum += kLogFmtCodeBase << logfmt_shift(i, logfmt_code_bit(j));
    return sum;
}

// Groups of 64 channels in round r of a row: 32, fewer in the last round
// (a multiple of 4, since kHidden % 256 == 0).
template <int kHidden>
__device__ __forceinline__ int logfmt_round_groups(int r) {
    static_assert(kHidden % 256 == 0, "LogFMT needs a hidden size divisible by 256");
    return min(kWarpSize, kHidden / 64 - r * kWarpSize);
}

// A round of bf16 input (4 KB) in shared memory; a warp of the LogFMT send
// keeps two, one being encoded while the next one's copy is in flight.
constexpr int kLogFmtRoundBytes = kWarpSize * 8 * 16;
constexpr int kLogFmtSendSmem = kLLWarps * 2 * kLogFmtRoundBytes;  // dynamic shared memory of the LogFMT combine

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int kPending>  // wait until at most kPending of this thread's newest groups are in flight
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory"); }

// A warp copies round r of a bf16 row (groups 32r .. 32r + 31) into slots
// (kLogFmtRoundBytes of shared memory) asynchronously, coalesced: word p of
// group g (16 bytes: channels 64g + 8p ..) lands in slot 8g + (p ^ (g % 8)),
// so that the copies and each lane's reads of its own group are both free
// of bank conflicts. The caller commits and waits.
template <int kHidden>
__device__ __forceinline__ void logfmt_stage_round(int4* slots, const int4* row, int r, int lane) {
    const int words = logfmt_round_groups<kHidden>(r) * 8;
    const int4* src = row + r * kWarpSize * 8;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        const int i = k * kWarpSize + lane, g = i / 8, p = i % 8;
        if (i < words) cp_async_16(slots + 8 * g + (p ^ (g % 8)), src + i);
    }
}

// ... then, once it is in, encodes it into bytes [2816r, 2816r + 88 * groups)
// of dst (the encoded row, 16-byte aligned) and returns the bytes written.
// Lane g codes group g: every value's work is the lane's own (no shuffles),
// so its 64 log2s are in flight together; its 88 bytes are staged in slots
// (read out by then) and stored coalesced.
template <int kHidden>
__device__ __forceinline__ int logfmt_encode_round(char* dst, int4* slots, int lane, int r) {
    const int groups = logfmt_round_groups<kHidden>(r);
    int4 raw[8];
    if (lane < groups) {
#pragma unroll
        for (int p = 0; p < 8; ++p) raw[p] = slots[8 * lane + (p ^ (lane % 8))];
    }
    __syncwarp();  // slots now stage the encoded words
    uint2* words = reinterpret_cast<uint2*>(slots) + lane * (kLogFmtGroupBytes / 8);
    if (lane < groups) {
        // |x|'s largest and smallest value, on the bf16 bits (magnitudes order
        // as integers), two a word, three words an instruction.
        unsigned mx = 0, mn = 0xffffffffu;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const unsigned v[4] = {(unsigned)raw[i].x, (unsigned)raw[i].y, (unsigned)raw[i].z,
                                   (unsigned)raw[i].w};
            unsigned m[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) m[k] = v[k] & 0x7fff7fffu;
            mx = __vimax3_u16x2(__vimax3_u16x2(mx, m[0], m[1]), m[2], m[3]);
            mn = __vimin3_u16x2(__vimin3_u16x2(mn, m[0], m[1]), m[2], m[3]);
        }
        const unsigned amax_bits = max(mx >> 16, mx & 0xffffu);
        unsigned amin_bits = min(mn >> 16, mn & 0xffffu);
        const bool has_zero = amin_bits == 0;
        if (has_zero) {
            // Rare: the smallest non-zero magnitude instead. m + 0x7fff per half
            // (no carry crosses the halves, as m <= 0x7fff) read as signed 16
            // bits is -32768 + m - 1 for m >= 1 and +32767 for a zero, so the
            // signed minimum skips zeros; xor 0x8000 gives m - 1, or 0xffff
            // where every m is 0 (then +inf).
            unsigned nz = 0x7fff7fffu;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const unsigned v[4] = {(unsigned)raw[i].x, (unsigned)raw[i].y, (unsigned)raw[i].z,
                                       (unsigned)raw[i].w};
                unsigned n[4];
#pragma unroll
                for (int k = 0; k < 4; ++k) n[k] = (v[k] & 0x7fff7fffu) + 0x7fff7fffu;
                nz = __vimin3_s16x2(__vimin3_s16x2(nz, n[0], n[1]), n[2], n[3]);
            }
            nz ^= 0x80008000u;
            const unsigned less = min(nz >> 16, nz & 0xffffu);
            amin_bits = less == 0xffffu ? 0x7f80u : less + 1;
        }
        const float amax = __uint_as_float(amax_bits << 16), amin = __uint_as_float(amin_bits << 16);
        // The group's logs by the values' own MUFU log2 (not log2f's ~50 instructions),
        // so the largest value's position is range * per_step, 510 but for rounding.
        const float log_amax = log2_approx(amax), log_smallest = log2_approx(amin);
        const float clip = __fsub_rn(log_amax, kLogFmtRange);
        const float log_amin = fmaxf(log_smallest, clip);
        const float range = __fsub_rn(log_amax, log_amin);
        // Code 0 only where some magnitude is 0, a denormal (log2 -inf), or
        // below the clip; written as a test that infinities and NaNs fail.
        const bool may_be_zero = has_zero || !(log_smallest > clip);
        // A value's position p = (log2 m - log_amin) / step, step = range / 510, as
        // q = (p + 1) / 511 in one FMA that saturates to [0, 1] (NaN to 0), then code
        // q * 511 rounded: below p = -1 (a zero: log2 0 = -inf) code 0, above 510 code
        // 511, with no clamps. (A code may differ by one step from the NumPy
        // definition's quotient.)
        const float q_per_log = range > 0.f ? __fdividef(kLogFmtSteps / (kLogFmtSteps + 1.f), range) : 0.f;
        const float q0 = fmaf(-log_amin, q_per_log, 1.f / (kLogFmtSteps + 1.f));  // range <= 32
        // The decoder's header (logfmt_accumulate8): a product, not the
        // definition's quotient, for the step (within an ulp, far below
        // LogFMT's own error); the exponent of code c is f * scale + base.
        const float step = __fmul_rn(range, 1.f / kLogFmtSteps);
        unsigned w[kLogFmtGroupBytes / 4];
        w[0] = __float_as_uint(step * 512.f) | (may_be_zero ? 0x80000000u : 0u);
        w[1] = __float_as_uint(fmaf(-513.f, step, log_amin));
#pragma unroll
        for (int k = 2; k < kLogFmtGroupBytes / 4; ++k) w[k] = 0u - logfmt_code_base_sum(k);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const unsigned v[4] = {(unsigned)raw[i].x, (unsigned)raw[i].y, (unsigned)raw[i].z,
                                   (unsigned)raw[i].w};
            // the sign bits (15 and 31 of each word) to bits 0..7
            const unsigned s = (v[0] >> 15 & 0x10001u) | (v[1] >> 13 & 0x40004u) | (v[2] >> 11 & 0x100010u) |
                               (v[3] >> 9 & 0x400040u);
            w[logfmt_word(i, 0)] += (s | s >> 15) & 0xffu;  // bits no code uses
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                // Branch-free, so the 64 values' chains (MUFU latency) overlap.
                const float x = __uint_as_float(j % 2 ? v[j / 2] & 0xffff0000u : v[j / 2] << 16);
                // A magnitude below a clipped log_amin by more than half a step codes as zero too.
                const float q = __saturatef(fmaf(log2_approx(fabsf(x)), q_per_log, q0));
                const unsigned t = __float_as_uint(fmaf(q, kLogFmtSteps + 1.f, 12582911.f));  // kLogFmtCodeBase + code
                const int at = logfmt_code_bit(j);
                if (!logfmt_code_crosses(j)) {
                    w[logfmt_word(i, at)] += t << logfmt_shift(i, at);  // kLogFmtCodeBase << shift was taken off above
                } else {  // the code's low bits end its word (the rest shift out), its high bits start the next
                    const unsigned code = t - kLogFmtCodeBase;
                    const int cut = (at / 32 + 1) * 32;
                    w[logfmt_word(i, at)] += code << logfmt_shift(i, at);
                    w[logfmt_word(i, cut)] += (code >> (cut - at)) << logfmt_shift(i, cut);
                }
            }
        }
#pragma unroll
        for (int k = 0; k < kLogFmtGroupBytes / 8; ++k) words[k] = make_uint2(w[2 * k], w[2 * k + 1]);
    }
    __syncwarp();
    const int4* staged = slots;
    int4* out = reinterpret_cast<int4*>(dst + r * kWarpSize * kLogFmtGroupBytes);
    for (int i = lane; i < groups * kLogFmtGroupBytes / 16; i += kWarpSize) st_na(out + i, staged[i]);
    return groups * kLogFmtGroupBytes;
}

constexpr int kLogFmtBatch = 8;  // rows a decoding thread has in flight together

// Channels 8u .. 8u+7 of an encoded row: their group's header and their 80
// bits, as aligned loads (8, 8 and 2 bytes). load() only loads, so that a
// batch of rows' loads are all in flight before any is used.
struct LogFmt8 {
    float2 head;  // the code scale (its sign bit: the group may hold code 0) and base
    uint2 lo;     // bits 0..63: the signs, codes 0..5 and code 6's low 2 bits
    unsigned hi;  // bits 64..79: code 6's high 7 bits and code 7
    __device__ __forceinline__ void load(const char* row, int u) {
        const char* group = row + (u / 8) * kLogFmtGroupBytes;
        head = *reinterpret_cast<const float2*>(group);
        lo = *reinterpret_cast<const uint2*>(group + 8 + 8 * (u % 8));
        hi = *reinterpret_cast<const unsigned short*>(group + 72 + 2 * (u % 8));
    }
    // Whether some code of the group may be 0 (then the decoder tests each).
    __device__ __forceinline__ bool may_be_zero() const { return __float_as_int(head.x) < 0; }
};

// ... decoded, times w, added to acc[8] (fp32). Code c >= 1 is
// 2^(log_amin + (c - 1) step). The float f = 1 + c / 512 is the code's bits
// under an exponent (0x3f800000 | c << 14), so the exponent is one FMA from
// the payload: f * scale + base, with the sender's scale = 512 step (exact)
// and base = log_amin - 513 step (rounded once, |base| < 2^8: within 2^-16
// of an octave). Code 0, zero, adds nothing: with kMayBeZero each code is
// tested; groups without code 0 skip the test. The sign goes on the weight.
template <bool kMayBeZero>
__device__ __forceinline__ void logfmt_accumulate8(const LogFmt8& in, float w, float* acc) {
    const unsigned long long lo = in.lo.x | static_cast<unsigned long long>(in.lo.y) << 32;
    // bits 48..79 of the 80: codes 6 (at bit 14 here) and 7 (at 23)
    const unsigned mid = __funnelshift_r(in.lo.y, in.hi, 16);
    const float scale = kMayBeZero ? fabsf(in.head.x) : in.head.x, base = in.head.y;
    constexpr unsigned kCode = 511u << 14;
    // (bits & kCode) | 0x3f800000 in C is two LOP3s (one immediate each); with
    // 1.f's bits in a register, one lop3 masks the code and ORs them in.
    unsigned one;
    asm("mov.b32 %0, 0x3f800000;" : "=r"(one));
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        // code j sits at bit 8 + 9j of the 80; shifted to bit 14
        const unsigned bits = j == 0   ? static_cast<unsigned>(lo) << 6
                              : j < 6  ? static_cast<unsigned>(lo >> (9 * j - 6))
                              : j == 6 ? mid
                                       : mid >> 9;
        unsigned f;
        asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(f) : "r"(bits), "n"(kCode), "r"(one));
        const float v = exp2_approx(fmaf(__uint_as_float(f), scale, base));
        const float signed_w = (lo >> j) & 1 ? -w : w;
        if (!kMayBeZero || (bits & kCode)) acc[j] = fmaf(signed_w, v, acc[j]);
    }
}

// ----------------------------------------------------------------------------
// Combine. x [L][R*M][H] bf16 expert outputs in the dispatched layout (it may
// be the send area itself: zero_copy); src_info, recv_k, layout_range from the
// dispatch; topk_idx/topk_weights [T][K] of this rank's tokens; out [T][H].
namespace ll {  // cupyep::ll::combine: profilers written for DeepEP find "::combine"
// One combine: the kernel's parameters (phases aside) and its two halves,
// send() for phases & 1 and receive() for phases & 2, inlined into the kernel.
template <int kHidden, bool kLogFmt, typename IdxT>
struct CombineCall {
    const __nv_bfloat16* x;
    const int* src_info;
    const int* recv_k;
    const long long* layout_range;
    const IdxT* topk_idx;
    const float* topk_weights;
    int num_tokens, num_topk, max_tokens, num_experts, rank, num_ranks;
    char* local_base;
    char* const* peers;
    int force_put, zero_copy;
    long long off_flags, off_area, off_send;
    int* blocks_done;
    int* pair_done;
    __nv_bfloat16* out;
    long long* wait_stats;
    int* mask;
    int shrink;
    int* err;
    long long timeout_ns, call_tag;
    int num_local;  // E / R, computed once by the kernel
    long long first_range;  // layout_range[threadIdx.x], loaded beside the mask

    static constexpr int kRowBytes = kHidden * 2;

    // Each (local expert, destination)'s rows to the destination, then its flag.
    __device__ __forceinline__ void send(const int* s_mask) const {
        if constexpr (kLogFmt)
            send_logfmt(s_mask);
        else
            send_rows(s_mask);
    }

    // BF16 rows, in pieces of kPieceBytes (a copy batch: one load latency a
    // piece), each piece a unit, dealt and counted as send_logfmt's below
    // (with no staging: a piece is copied from x to its destination, or to
    // the send area and put). Pairs dealt to groups of warps, a warp a row,
    // left a pair's rows to a few warps in turn while other SMs had none.
    static constexpr int kPieceBytes = kWarpSize * kCopyBatch * 16;
    static constexpr int kRowPieces = (kRowBytes + kPieceBytes - 1) / kPieceBytes;
    __device__ __forceinline__ void send_rows(const int* s_mask) const {
        const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
        const int num_warps = gridDim.x * kLLWarps;
        const int my_warp = warp * gridDim.x + blockIdx.x;  // a unit's next units go to other SMs
        __shared__ ChunkArrays s_chunk;
        PendingPairs done;
        int dealt = 0;  // units of earlier chunks, mod num_warps: where this chunk's dealing starts
        for (int first = 0; first < num_experts; first += kLLThreads) {
            const DealtUnits chunk = number_units(first, s_chunk, lane);
            for (int u = (my_warp - dealt + num_warps) % num_warps; u < chunk.total; u += num_warps) {
                int j, unit, units;
                chunk.find(u, lane, j, unit, units);
                const int pair = first + j, dst = pair % num_ranks;
                const bool put = use_put(peers, dst, force_put), skip = s_mask[dst];
                if (!skip) {
                    const long long row = chunk.row(this, j, unit);
                    const int at = unit % kRowPieces * kPieceBytes, words = min(kPieceBytes, kRowBytes - at) / 16;
                    const long long off =
                        off_area + ((long long)src_info[row] * kLLMaxTopk + recv_k[row]) * kRowBytes + at;
                    const int4* src = reinterpret_cast<const int4*>(x + row * kHidden) + at / 16;
                    char* staged = local_base + off_send + row * kRowBytes + at;  // a put's source
                    char* const to = put ? staged : peers[dst] + off;
                    if (!put || !zero_copy)  // zero-copy: x is the send area
                        warp_copy_batch<kCopyBatch, true, true>(reinterpret_cast<int4*>(to), src, 0, words, lane);
                    if (put) {
                        __syncwarp();
                        warp_put(local_base, off, staged, words * 16, dst);
                    }
                }
                if (done.add(pair, units, put && !skip)) count_done(done, s_mask, lane);
            }
            dealt = (dealt + chunk.total) % num_warps;
        }
        count_done(done, s_mask, lane);
    }

    // The same with rows LogFMT-encoded. Encoding is the bound here (loads,
    // then ~15 instructions a value), so the work is spread evenly over every
    // warp of the grid: a unit is a round of a row (32 groups of 64 channels;
    // rounds are independent), and the units of all pairs, in pair order,
    // are dealt to the grid's warps in turn. (Pairs dealt to blocks left the
    // busiest block ~2x the mean.) Each block numbers the units of kChunk
    // pairs at a time from layout_range alone, so every block deals the same
    // units; a rank masked since would change the count, so its units are
    // dealt and skipped. A warp's rounds are pipelined: the next one's copy
    // into shared memory is in flight while this one is encoded (this pays
    // where the warp's own put follows each round; with stores, the SM's
    // other warps hid the loads already). A warp
    // counts its units done in pair_done (zero between calls) a few at a
    // time (PendingPairs); the warp that completes a pair's count sets its
    // flag and zeroes the count. Zero-copy rows sent by put are encoded in
    // place, so a unit there is a whole row, its rounds in order: round r
    // reads bytes [4096r, 4096r + 4096) and writes [2816r, 2816r + 2816), so
    // no write of a round touches bytes a later round has still to read.
    __device__ __forceinline__ void send_logfmt(const int* s_mask) const {
        constexpr int kChunk = kLLThreads;  // a pair per thread (number_units)
        constexpr int kRoundInt4 = kLogFmtRoundBytes / 16;
        const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
        const int num_warps = gridDim.x * kLLWarps;
        const int my_warp = warp * gridDim.x + blockIdx.x;  // a unit's next units go to other SMs
        extern __shared__ int4 s_rounds[];  // kLogFmtSendSmem: two rounds a warp
        __shared__ ChunkArrays s_chunk;
        __shared__ int4 s_staged[kLLWarps];  // (pair of the chunk, unit, the pair's units) a warp staged last
        int4* bufs = s_rounds + warp * 2 * kRoundInt4;
        PendingPairs done;
        int dealt = 0;  // units of earlier chunks, mod num_warps: where this chunk's dealing starts
        for (int first = 0; first < num_experts; first += kChunk) {
            const DealtUnits chunk = number_units(first, s_chunk, lane);
            const int total = chunk.total;
            // The warp's steps: (unit u, round r), r in [first_round, end_round) of u.
            int u = (my_warp - dealt + num_warps) % num_warps, r = 0, b = 0;
            if (u < total) r = stage_first_round(chunk, u, s_mask, bufs, s_staged + warp, lane);
            cp_async_commit();
            while (u < total) {
                // Where staging found u, kept in shared memory rather than
                // registers: the encode uses all 128.
                __syncwarp();  // lane 0's s_staged store
                const int4 at_unit = s_staged[warp];
                const int j = at_unit.x, unit = at_unit.y;
                const int pair = first + j, dst = pair % num_ranks;
                const int rounds = rounds_per_unit(dst);
                const long long row = chunk.row(this, j, unit);
                const bool put = use_put(peers, dst, force_put), skip = s_mask[dst];
                // Stage the next step: the unit's next round, or the warp's next unit.
                int next_u = u, next_r = r + 1;
                __syncwarp();  // buffer b ^ 1 was last read by the step before this one
                if (next_r == (rounds == 1 ? r + 1 : rounds)) {
                    next_u = u + num_warps;
                    if (next_u < total)
                        next_r = stage_first_round(chunk, next_u, s_mask, bufs + (b ^ 1) * kRoundInt4,
                                                   s_staged + warp, lane);
                } else if (!skip) {
                    logfmt_stage_round<kHidden>(bufs + (b ^ 1) * kRoundInt4,
                                                reinterpret_cast<const int4*>(x + row * kHidden), next_r, lane);
                }
                cp_async_commit();
                cp_async_wait<1>();  // this step's round is in (this lane's copies)
                __syncwarp();        // ... and every lane's
                if (!skip) {
                    const long long off =
                        off_area + ((long long)src_info[row] * kLLMaxTopk + recv_k[row]) * kRowBytes;
                    char* staged = local_base + off_send + row * kRowBytes;
                    const int bytes = logfmt_encode_round<kHidden>(put ? staged : peers[dst] + off,
                                                                   bufs + b * kRoundInt4, lane, r);
                    const int at = r * kLogFmtWarpBytes;
                    if (put && rounds == 1) warp_put(local_base, off + at, staged + at, bytes, dst);
                    if (put && rounds > 1 && r == rounds - 1)
                        warp_put(local_base, off, staged, logfmt_row_bytes(kHidden), dst);
                }
                if (next_u != u && done.add(pair, at_unit.z, put && !skip)) count_done(done, s_mask, lane);
                u = next_u, r = next_r, b ^= 1;
            }
            dealt = (dealt + total) % num_warps;
        }
        count_done(done, s_mask, lane);
    }

    // A row encoded in place (zero-copy, sent by put) is one unit of a row's
    // rounds; any other LogFMT row is a row's rounds of one round each; a
    // BF16 row is kRowPieces units.
    __device__ __forceinline__ bool in_place(int dst) const { return zero_copy && use_put(peers, dst, force_put); }
    __device__ __forceinline__ int units_per_row(int dst) const {
        if constexpr (kLogFmt)
            return in_place(dst) ? 1 : logfmt_rounds(kHidden);
        else
            return kRowPieces;
    }
    __device__ __forceinline__ int rounds_per_unit(int dst) const {
        return in_place(dst) ? logfmt_rounds(kHidden) : 1;
    }

    // A chunk's units, in pair order, in slices of 32 pairs: through [kChunk],
    // the units of pair j's slice up to j (inclusive), slice_units [kLLWarps]
    // each slice's total, begin [kChunk] the pairs' first rows (from
    // layout_range). A lane keeps the units of slices 0..lane (inclusive).
    struct ChunkArrays {
        int through[kLLThreads], slice_units[kLLWarps], begin[kLLThreads];
    };
    struct DealtUnits {
        const int* through;
        const int* begin;
        int first;
        int slices_through;  // lanes >= kLLWarps: the total
        int total;
        static_assert(kLLWarps <= kWarpSize, "a lane per slice");
        __device__ __forceinline__ DealtUnits(const int* through_, const int* slice_units, const int* begin_,
                                               int first_, int lane)
            : through(through_), begin(begin_), first(first_) {
            slices_through = warp_inclusive_sum(lane < kLLWarps ? slice_units[lane] : 0, lane);
            total = __shfl_sync(0xffffffffu, slices_through, kWarpSize - 1);
        }
        // Unit u (< total; the same in every lane) is unit `unit` of the
        // chunk's pair j, which has `units` units: two ballots (its slice,
        // then its pair), not a search of dependent loads.
        __device__ __forceinline__ void find(int u, int lane, int& j, int& unit, int& units) const {
            const int s = __popc(__ballot_sync(0xffffffffu, slices_through <= u));  // slices wholly before u
            const int slice_before = __shfl_sync(0xffffffffu, slices_through, max(s - 1, 0));
            const int v = u - (s == 0 ? 0 : slice_before);
            const int mine = through[s * kWarpSize + lane];
            const int k = __popc(__ballot_sync(0xffffffffu, mine <= v));  // pairs of the slice wholly before v
            const int before = __shfl_sync(0xffffffffu, mine, max(k - 1, 0));
            const int after = __shfl_sync(0xffffffffu, mine, k);
            j = s * kWarpSize + k;
            unit = v - (k == 0 ? 0 : before);
            units = after - (k == 0 ? 0 : before);
        }
        // The row [L][R*M] of a unit of the chunk's pair j.
        __device__ __forceinline__ long long row(const CombineCall* call, int j, int unit) const {
            const int pair = first + j;
            return (long long)(pair / call->num_ranks) * call->num_ranks * call->max_tokens + begin[j] +
                   unit / call->units_per_row(pair % call->num_ranks);
        }
    };

    // Numbers the units of pairs [first, first + kLLThreads) (a pair a thread)
    // into s: a barrier, and one before it but for the first chunk, which
    // follows load_mask's (the previous chunk's arrays are read by then).
    __device__ __forceinline__ DealtUnits number_units(int first, ChunkArrays& s, int lane) const {
        const int p = first + threadIdx.x;  // [L][R]: p = le * R + dst
        const long long range = first == 0 ? first_range : p < num_experts ? layout_range[p] : 0;
        const int units = static_cast<int>(range & 0xffffffff) * units_per_row(p % num_ranks);
        const int inclusive = warp_inclusive_sum(units, lane);
        if (first > 0) __syncthreads();
        s.begin[threadIdx.x] = static_cast<int>(range >> 32);
        s.through[threadIdx.x] = inclusive;
        if (lane == kWarpSize - 1) s.slice_units[threadIdx.x / kWarpSize] = inclusive;
        __syncthreads();
        return DealtUnits(s.through, s.slice_units, s.begin, first, lane);
    }

    // Stages unit u's first round into buf (nothing for a masked
    // destination) and leaves where u is in *staged (lane 0; the warp reads
    // it after a __syncwarp); returns the round.
    __device__ __forceinline__ int stage_first_round(const DealtUnits& chunk, int u, const int* s_mask, int4* buf,
                                                     int4* staged, int lane) const {
        int j, unit, units;
        chunk.find(u, lane, j, unit, units);
        if (lane == 0) *staged = make_int4(j, unit, units, 0);
        const int pair = chunk.first + j, dst = pair % num_ranks;
        const int rounds = rounds_per_unit(dst);
        const int r = rounds == 1 ? unit % logfmt_rounds(kHidden) : 0;
        if (!s_mask[dst]) {
            const long long row = chunk.row(this, j, unit);
            logfmt_stage_round<kHidden>(buf, reinterpret_cast<const int4*>(x + row * kHidden), r, lane);
        }
        return r;
    }

    // A warp's units done, not yet counted: their pairs and the pairs' units.
    struct PendingPairs {
        static constexpr int kMax = 4;
        int pair[kMax], units[kMax];
        int n = 0;
        bool put = false;  // some unit was sent by put
        // Returns whether the list is full.
        __device__ __forceinline__ bool add(int p, int u, bool by_put) {
#pragma unroll
            for (int i = 0; i < kMax; ++i)
                if (i == n) pair[i] = p, units[i] = u;
            put |= by_put;
            return ++n == kMax;
        }
    };

    // Lane i counts the warp's pending unit i: the atomics in parallel, not
    // a round trip each. Each add is a GPU-scope release and acquire (one
    // instruction, no SC fence): it releases the warp's stores (ordered
    // before it by warp_complete's __syncwarp; the release is cumulative)
    // and, in the lane that completes a pair's count, acquires every other
    // unit's, so that its flag's release orders them all first.
    __device__ __forceinline__ void count_done(PendingPairs& done, const int* s_mask, int lane) const {
        warp_complete(done.put, lane);  // the warp's stores before the adds, its puts done
        if (done.put) __syncwarp();     // ... by lane 0's quiet, before any lane's add
        if (lane < done.n) {
            int p = 0, units = 0;
#pragma unroll
            for (int i = 0; i < PendingPairs::kMax; ++i)
                if (i == lane) p = done.pair[i], units = done.units[i];
            // The flag's place before the add: after it (an acquire: L1 is
            // invalidated) the load would wait on L2 in the flag's path.
            const int le = p / num_ranks, dst = p % num_ranks;
            const bool put = use_put(peers, dst, force_put);
            char* const peer_base = put ? nullptr : peers[dst];
            if (atom_add_acq_rel_gpu(pair_done + p, 1) == units - 1) {
                if (!s_mask[dst])
                    set_peer_flag_at(peer_base, local_base, off_flags + 8ll * (rank * num_local + le), dst,
                                     (call_tag << kLLTagShift) | 1, put);
                // After the flag, whose release then need not wait for this
                // store; the next call on this half comes after this kernel.
                pair_done[p] = 0;
            }
        }
        __syncwarp();
        done.n = 0;
        done.put = false;
    }

    // A block per token: its experts' flags, then its rows summed in top-k order.
    __device__ __forceinline__ void receive(const int* s_mask) const {
        // A block per token. Lane k of the first warp waits for the flag of
        // the token's k-th expert (its owner has sent every row it has for
        // this rank), so a token is summed as soon as its own rows are in,
        // while other tokens' rows are still on their way. Its slots and
        // weights go to shared memory; then each thread sums 8 channels over
        // every k with all the rows' loads in flight, in top-k order.
        long long* flags = reinterpret_cast<long long*>(local_base + off_flags);
        // The last block to have read its flags zeroes every flag
        // (blocks_done [1], zero between calls): each flag set in this call
        // is awaited by some token here, since owners set flags only for
        // experts with rows for this rank. A block takes its ticket once its
        // last token's flags are read, so the round trip overlaps the sums;
        // the fence orders the block's flag reads (bar.sync) before it.
        ArrivalTicket ticket;
        if (blockIdx.x >= num_tokens) ticket.take(blocks_done);
        constexpr int kUnits = kHidden / 8;
        const char* area = local_base + off_area;
        __shared__ int s_slot[kLLMaxTopk];
        __shared__ float s_weight[kLLMaxTopk];
        __shared__ bool s_dense;  // LogFMT: the token has 8 slots, each with a row (no guards)
        for (int t = blockIdx.x; t < num_tokens; t += gridDim.x) {
            if (threadIdx.x < num_topk) {
                const int k = threadIdx.x;
                const IdxT* idx = topk_idx + (long long)t * num_topk;
                const long long id = static_cast<long long>(idx[k]);
                const float weight = topk_weights[(long long)t * num_topk + k];
                const int e = static_cast<int>(id);
                // Out of range: dropped by the dispatch. A repeated expert sent its row once, in its first slot.
                int first = id < 0 || id >= num_experts || s_mask[e / num_local] ? -1 : k;
                for (int j = 0; j < k && first >= 0; ++j)
                    if (static_cast<int>(idx[j]) == e) { first = j; break; }
                // A rank masked by a timeout since the block started (shrink): no wait.
                if (shrink && first >= 0 && *(volatile const int*)(mask + e / num_local)) first = -1;
                if (first >= 0) {
                    // Repeats wait too, so that a timeout (shrink) leaves out every slot of the expert.
                    const unsigned long long start = global_timer_ns();
                    if (wait_flag(flags + e, call_tag, timeout_ns, err, kPhaseLowLatencyCombineRecv, e / num_local,
                                     e % num_local, shrink ? mask : nullptr) == 0)
                        first = -1;
                    // Block 0 alone adds its waits (per owner rank).
                    if (wait_stats != nullptr && blockIdx.x == 0 && first == k)
                        atomicAdd(reinterpret_cast<unsigned long long*>(wait_stats + e / num_local),
                                  global_timer_ns() - start);
                }
                s_slot[k] = first;
                s_weight[k] = weight;
            }
            if (kLogFmt && threadIdx.x < kWarpSize) {
                __syncwarp();  // the first warp's s_slot stores
                const bool row = threadIdx.x < num_topk && s_slot[threadIdx.x] >= 0;
                const unsigned rows = __ballot_sync(0xffffffffu, row);
                if (threadIdx.x == 0) s_dense = num_topk == kLogFmtBatch && rows == (1u << kLogFmtBatch) - 1;
            }
            __syncthreads();
            if (t + gridDim.x >= num_tokens) ticket.take(blocks_done);
            const char* token_rows = area + (long long)t * kLLMaxTopk * kRowBytes;
            for (int c = threadIdx.x; c < kUnits && kLogFmt; c += blockDim.x) {
                float acc[8];
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[j] = 0.f;
                if (s_dense) {
                    // The common case (top-8, a row for each k): no per-row guards, and
                    // one test for code 0 for the 8 rows (the general loop's per-row
                    // branches were ~1/7 of the decode's instructions).
                    LogFmt8 in[kLogFmtBatch];
                    bool may_be_zero = false;
#pragma unroll
                    for (int b = 0; b < kLogFmtBatch; ++b) {
                        in[b].load(token_rows + s_slot[b] * kRowBytes, c);
                        may_be_zero |= in[b].may_be_zero();
                    }
                    if (may_be_zero) {
#pragma unroll
                        for (int b = 0; b < kLogFmtBatch; ++b) logfmt_accumulate8<true>(in[b], s_weight[b], acc);
                    } else {
#pragma unroll
                        for (int b = 0; b < kLogFmtBatch; ++b) logfmt_accumulate8<false>(in[b], s_weight[b], acc);
                    }
                } else {
                    for (int k0 = 0; k0 < num_topk; k0 += kLogFmtBatch) {
                        LogFmt8 in[kLogFmtBatch];
#pragma unroll
                        for (int b = 0; b < kLogFmtBatch; ++b)
                            if (k0 + b < num_topk && s_slot[k0 + b] >= 0)
                                in[b].load(token_rows + s_slot[k0 + b] * kRowBytes, c);
#pragma unroll
                        for (int b = 0; b < kLogFmtBatch; ++b) {
                            if (k0 + b < num_topk && s_slot[k0 + b] >= 0) {
                                if (in[b].may_be_zero())
                                    logfmt_accumulate8<true>(in[b], s_weight[k0 + b], acc);
                                else
                                    logfmt_accumulate8<false>(in[b], s_weight[k0 + b], acc);
                            }
                        }
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
        if (ticket.last()) {
            __threadfence();
            for (int e = threadIdx.x; e < num_experts; e += blockDim.x) flags[e] = 0;
            if (threadIdx.x == 0) *blocks_done = 0;
        }
    }
};

template <int kHidden, bool kLogFmt, typename IdxT>
__global__ void __launch_bounds__(kLLThreads, 1)
combine(const __nv_bfloat16* __restrict__ x, const int* __restrict__ src_info,
        const int* __restrict__ recv_k, const long long* __restrict__ layout_range,
        const IdxT* __restrict__ topk_idx, const float* __restrict__ topk_weights,
        int num_tokens, int num_topk, int max_tokens, int num_experts, int rank,
        int num_ranks, char* local_base, char* const* peers, int force_put,
        int zero_copy, long long off_flags, long long off_area, long long off_send,
        int* blocks_done, int* pair_done, __nv_bfloat16* out, long long* wait_stats,
        int* mask, int shrink, int phases, int* err, long long timeout_ns, long long call_tag) {
    // The send's first step reads these ranges: their load is in flight
    // with the mask's (one latency before the first unit, not two).
    const long long first_range =
        (phases & 1) && static_cast<int>(threadIdx.x) < num_experts ? layout_range[threadIdx.x] : 0;
    const CombineCall<kHidden, kLogFmt, IdxT> call{
        x, src_info, recv_k, layout_range, topk_idx, topk_weights, num_tokens, num_topk, max_tokens, num_experts,
        rank, num_ranks, local_base, peers, force_put, zero_copy, off_flags, off_area, off_send,
        blocks_done, pair_done, out, wait_stats, mask, shrink, err, timeout_ns, call_tag, num_experts / num_ranks,
        first_range};
    __shared__ int s_mask[kLLMaxRanks];
    load_mask(mask, rank, num_ranks, s_mask);
    if (phases & 1) call.send(s_mask);
    if (phases & 2) call.receive(s_mask);
}
}  // namespace ll

// ----------------------------------------------------------------------------
// Barrier of the low-latency ranks, ordered on the caller's stream:
// clean_low_latency_buffer runs one before zeroing the buffer (every peer's
// earlier calls have finished writing into it) and one after (no peer writes
// a fresh call into it before it is zeroed). No host collective, so a clean
// can be captured in a CUDA graph.
// slots [R] i64 sit in a symmetric allocation of their own, which the
// zeroing leaves alone: slot s holds the count of barriers rank s has
// reached. seq: this rank's count, kept on the device so that a graph replay
// advances it. One block, a thread per peer. Masked peers are skipped; a
// peer that does not arrive within timeout_ns is masked (shrink) or
// reported. A pending error does not cut the wait short: cleaning is how a
// caller recovers from one.
namespace ll {
__global__ void __launch_bounds__(kLLMaxRanks, 1)
barrier(char* slots, char* const* peers, int force_put, int rank, int num_ranks, long long* seq,
        int* mask, int shrink, int* err, long long timeout_ns) {
    __shared__ int s_mask[kLLMaxRanks];
    load_mask(mask, rank, num_ranks, s_mask);  // its __syncthreads orders every read of *seq first
    const long long target = *seq + 1;
#ifdef CUPYEP_NVSHMEM
    if (threadIdx.x == 0) cupyep_nvshmem_quiet();
#endif
    // This rank's earlier kernels wrote into peers; the fence makes those
    // writes visible system-wide before any peer sees this rank arrive.
    __threadfence_system();
    __syncthreads();
    const int j = threadIdx.x;
    if (j < num_ranks && j != rank && !s_mask[j]) {
        set_peer_flag(peers, slots, 8ll * rank, j, target, use_put(peers, j, force_put));
        const long long* slot = reinterpret_cast<const long long*>(slots) + j;
        long long seen;
        if (!spin_until(seen, [&] { return ld_acquire_sys(slot); }, [&](long long v) { return v >= target; },
                        timeout_ns)) {
            if (shrink)
                atomicExch(mask + j, 1);
            else
                report_error(err, kErrTimeout, kPhaseLowLatencyClean, j, -1);
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) *seq = target;
}
}  // namespace ll

}  // namespace cupyep
