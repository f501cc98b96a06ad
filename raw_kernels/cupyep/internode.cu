// Normal (high-throughput) dispatch and combine across nodes: NVSHMEM puts
// between nodes, NVLink stores inside a node. Always linked with NVSHMEM.
//
// Ranks are node-major: rank = node * P + local. A token of rank (n, p)
// crosses to every node m that needs it exactly once, to rank (m, p), the
// "forwarder", which copies it over NVLink to the ranks of node m that need
// it. The final hop writes the NVLink buffer exactly as intranode dispatch
// does (region = source rank, slot = the token's place among its channel's
// tokens for that destination), so the receiving half is shared
// (nvl_receive.cuh) and rows arrive ordered by source rank, then token.
//
// Combine runs backwards: each rank returns its rows to the forwarder of
// their source in its own node (NVLink), the forwarder sums a token's rows
// from its node in fp32, in rank order, and puts one bf16 row back to the
// source, which sums the nodes' rows in node order (fp32), adds the bias and
// stores bf16. Rows are therefore rounded to bf16 once more than in
// intranode combine.
//
// Buffers are sized for the worst case (cupyep/layouts/sizing.py), so no writer ever
// waits for space. Progress is published per (source, channel): a u64 tail in
// the RDMA buffer set with an NVSHMEM signal after a fence, an i32 tail in
// the NVLink buffer set with a system-scope release store. The reader of a
// tail resets it after its last use; writers touch it again only after the
// next call's barrier.
#include "cupyep/common.cuh"
#include "cupyep/nvl_layout.cuh"
#include "cupyep/nvl_receive.cuh"

namespace cupyep {

// Offsets of the RDMA buffer, built by cupyep/layouts/sizing.py as an int64 array in
// this field order.
struct RdmaLayout {
    long long sync;           // u64 [R]: barrier sequence signalled by each rank
    long long node_counts;    // u64 [2][N][kMaxChannels]: messages from (node, channel)
    long long rank_counts;    // u64 [2][R][kMaxChannels]: rows from (source rank, channel)
    long long expert_counts;  // u64 [2][R][kMaxLocalExperts]
    long long dispatch_tail;  // u64 [N][kMaxChannels]
    long long combine_tail;   // u64 [N][kMaxChannels]
    long long call_tags;      // u64 [2][R]: call tag of each rank's barrier arrival, by its parity
    long long recv;           // messages [N][max_tokens]
    long long send;           // messages [N][max_tokens] (staging: puts read symmetric memory)
    long long max_tokens;
    long long slots_per_channel;
    long long message_stride;
};

// One dispatch message: row | fp32 scales | src_idx | is_token_in_rank bits |
// top-k ids | top-k weights.
template <int kNumRanks, int kHiddenInt4, int kNumScales, int kNumTopk>
struct DispatchMessage {
    static constexpr int kBitWords = (kNumRanks + 31) / 32;
    static constexpr int kScales = kHiddenInt4 * 16;
    static constexpr int kSrc = kScales + 4 * kNumScales;
    static constexpr int kBits = kSrc + 4;
    static constexpr int kTopk = kBits + 4 * kBitWords;
    static constexpr int kWeights = kTopk + 4 * kNumTopk;
    static constexpr int kBytes = (kWeights + 4 * kNumTopk + 15) / 16 * 16;
};

// One combine message: bf16 row | summed top-k weights.
template <int kHiddenInt4, int kNumTopk>
struct CombineMessage {
    static constexpr int kWeights = kHiddenInt4 * 16;
    static constexpr int kBytes = (kWeights + 4 * kNumTopk + 15) / 16 * 16;
};

__device__ __forceinline__ long long* rdma_word(char* rdma, long long offset) {
    return reinterpret_cast<long long*>(rdma + offset);
}

// Set a u64 word of `pe`'s RDMA buffer. The fence orders this thread's
// earlier puts (and, with a quiet before, other warps' completed ones) before
// the signal.
__device__ __forceinline__ void signal_set(char* rdma, long long offset, long long value, int pe) {
    cupyep_nvshmem_fence();
    cupyep_nvshmem_signal_set(reinterpret_cast<unsigned long long*>(rdma + offset),
                              static_cast<unsigned long long>(value), pe);
}

// Barrier over all ranks, run by one block. Everything this rank's earlier
// kernels wrote (puts and NVLink stores) is complete and visible when a peer
// sees our sequence number. Call tags travel as in intranode.cu's
// barrier_block: this rank's into its slot of each peer's call_tags (parity
// of the sequence), ordered before the sequence by signal_set's fence.
template <int kNumRanks>
__device__ __forceinline__ void rdma_barrier_block(char* rdma, const RdmaLayout& lay, int rank,
                                                   int* counters, int* err, long long timeout_ns,
                                                   long long call_tag) {
    const long long seq = next_barrier_seq(counters);
    const long long tags = lay.call_tags + 8ll * (seq & 1) * kNumRanks;
    if (threadIdx.x == 0) set_running_call(err, call_tag);
    __threadfence_system();
    cupyep_nvshmem_quiet();
    for (int j = threadIdx.x; j < kNumRanks; j += blockDim.x) {
        signal_set(rdma, tags + 8ll * rank, call_tag, j);
        signal_set(rdma, lay.sync + 8ll * rank, seq, j);
        if (wait_at_least(rdma_word(rdma, lay.sync) + j, seq, timeout_ns, err, kPhaseBarrier, j, -1) >= seq) {
            const long long theirs = *reinterpret_cast<const volatile long long*>(rdma_word(rdma, tags) + j);
            if (theirs != call_tag) report_error(err, kErrCallMismatch, kPhaseBarrier, j, -1, call_tag, theirs);
        }
    }
    __syncthreads();
}

template <int kNumRanks>
__global__ void rdma_barrier(char* rdma, const RdmaLayout* layout, int rank, int* counters, int* err,
                             long long timeout_ns, long long call_tag) {
    const RdmaLayout lay = *layout;
    rdma_barrier_block<kNumRanks>(rdma, lay, rank, counters, err, timeout_ns, call_tag);
}

// Grid: num_channels + 1 blocks. Block c numbers channel c's tokens per
// destination rank (send_pos [T, R], NVLink slots) and per destination node
// (rdma_pos [T, N], RDMA slots) and signals the counts to the final
// receivers and to the forwarders; the last block signals per-expert counts
// and the layout verdict. The last block to finish runs the barrier, then
// turns what arrived into recv_channel_offset [R * C + 1] (final receiver),
// rdma_recv_count [N * C] (forwarder), recv_expert_counts [L] and host_info
// (as in intranode notify_dispatch).
template <int kNumRanks, int kRanksPerNode>
__global__ void notify_dispatch(const bool* __restrict__ is_token_in_rank, int num_tokens,
                                int num_channels, const int* __restrict__ num_tokens_per_expert,
                                int num_local_experts, int expert_alignment, int* send_pos,
                                int* rdma_pos, const NvlLayout* nvl_layout, char* rdma,
                                const RdmaLayout* rdma_layout, int rank, int* counters,
                                int* blocks_done, int* recv_channel_offset, int* rdma_recv_count,
                                int* recv_expert_counts, int* host_info, int* layout_error,
                                int* err, long long timeout_ns, long long call_tag) {
    constexpr int kNumNodes = kNumRanks / kRanksPerNode;
    const NvlLayout nvl = *nvl_layout;
    const RdmaLayout lay = *rdma_layout;
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int num_warps = blockDim.x / kWarpSize;
    const int node = rank / kRanksPerNode, local_rank = rank % kRanksPerNode;
    const int parity = counters[1] & 1;  // advanced by the last block, after all arrived
    const long long rank_counts = lay.rank_counts + 8ll * parity * kNumRanks * kMaxChannels;
    const long long node_counts = lay.node_counts + 8ll * parity * kNumNodes * kMaxChannels;
    const long long expert_counts = lay.expert_counts + 8ll * parity * kNumRanks * kMaxLocalExperts;

    if (blockIdx.x < num_channels) {
        const int c = blockIdx.x;
        int begin, end;
        channel_range(num_tokens, num_channels, c, begin, end);
        const int nvl_base = c * static_cast<int>(nvl.slots_per_channel);
        const int rdma_base = c * static_cast<int>(lay.slots_per_channel);
        // Targets d < R are ranks, d >= R nodes.
        for (int d = warp; d < kNumRanks + kNumNodes; d += num_warps) {
            const bool to_node = d >= kNumRanks;
            const int m = d - kNumRanks;
            const int n = warp_number_tokens(
                begin, end, lane,
                [&](int t) {
                    const bool* row = is_token_in_rank + (long long)t * kNumRanks;
                    if (!to_node) return row[d];
                    bool in = false;
#pragma unroll
                    for (int q = 0; q < kRanksPerNode; ++q) in |= row[m * kRanksPerNode + q];
                    return in;
                },
                [&](int t, int pos) {
                    if (!to_node)
                        send_pos[(long long)t * kNumRanks + d] = pos < 0 ? -1 : nvl_base + pos;
                    else
                        rdma_pos[(long long)t * kNumNodes + m] = pos < 0 ? -1 : rdma_base + pos;
                });
            if (lane == 0) {
                if (!to_node)
                    signal_set(rdma, rank_counts + 8ll * (rank * kMaxChannels + c), n, d);
                else
                    signal_set(rdma, node_counts + 8ll * (node * kMaxChannels + c), n,
                               m * kRanksPerNode + local_rank);
            }
        }
    } else {
        if (num_tokens_per_expert != nullptr)
            for (int i = threadIdx.x; i < kNumRanks * num_local_experts; i += blockDim.x) {
                const int d = i / num_local_experts, l = i % num_local_experts;
                signal_set(rdma, expert_counts + 8ll * (rank * kMaxLocalExperts + l), num_tokens_per_expert[i], d);
            }
        // The layout verdict goes to every rank so that all reject the call
        // together; channel slot kMaxChannels - 1 is never a real channel.
        if (threadIdx.x == 0) {
            const int bad = *layout_error;
            *layout_error = 0;
            for (int d = 0; d < kNumRanks; ++d)
                signal_set(rdma, rank_counts + 8ll * (rank * kMaxChannels + kMaxChannels - 1), bad, d);
        }
    }
    // Complete this thread's signals before the block reports done.
    cupyep_nvshmem_quiet();

    if (!last_block_to_arrive<Arrival::kSystemWrites>(blocks_done)) return;
    rdma_barrier_block<kNumRanks>(rdma, lay, rank, counters, err, timeout_ns, call_tag);
    if (threadIdx.x == 0) counters[1] += 1;

    if (threadIdx.x / kWarpSize == 0)
        warp_receive_offsets(rdma_word(rdma, rank_counts), kNumRanks, num_channels, kMaxChannels,
                             recv_channel_offset, host_info, num_local_experts, threadIdx.x);
    const long long* from_nodes = rdma_word(rdma, node_counts);
    for (int i = threadIdx.x; i < kNumNodes * num_channels; i += blockDim.x)
        rdma_recv_count[i] = static_cast<int>(from_nodes[(i / num_channels) * kMaxChannels + i % num_channels]);
    finish_expert_counts(num_tokens_per_expert != nullptr ? rdma_word(rdma, expert_counts) : nullptr, kNumRanks,
                         kMaxLocalExperts, num_local_experts, expert_alignment, recv_expert_counts, host_info);
}

// Grid: 2 * num_channels blocks. Even block 2c: the first half of its warps
// send channel c's tokens to the nodes (staged in the send area, one put per
// token and node), the second half forward the messages that arrived from
// each node's rank with our local index to the ranks of our node. Odd block
// 2c + 1 receives channel c from every source (nvl_receive.cuh).
// fwd_slots [N][max_tokens][P] records where each forwarded message went
// (-1: not to that rank) for combine; null in cached dispatch.
template <int kNumRanks, int kRanksPerNode, int kHiddenInt4, int kNumScales, int kNumTopk, typename IdxT>
__global__ void __launch_bounds__(1024, 1)
dispatch(const int4* __restrict__ x, const float* __restrict__ x_scales,
         const IdxT* __restrict__ topk_idx, const float* __restrict__ topk_weights,
         const bool* __restrict__ is_token_in_rank, const int* __restrict__ rdma_pos,
         int num_tokens, int num_channels, char* const* peers, const NvlLayout* nvl_layout,
         char* rdma, const RdmaLayout* rdma_layout, const int* __restrict__ recv_channel_offset,
         const int* __restrict__ rdma_recv_count, int* fwd_slots, int rank, int num_local_experts,
         int num_recv_capacity, int chunk_tokens, int4* recv_x, float* recv_x_scales,
         long long* recv_topk_idx, float* recv_topk_weights, int* recv_src_idx, int* err,
         long long timeout_ns) {
    using Msg = DispatchMessage<kNumRanks, kHiddenInt4, kNumScales, kNumTopk>;
    constexpr int kNumNodes = kNumRanks / kRanksPerNode;
    constexpr long long kRowBytes = kHiddenInt4 * 16ll;
    const NvlLayout nvl = *nvl_layout;
    const RdmaLayout lay = *rdma_layout;
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int num_warps = blockDim.x / kWarpSize;
    const int c = blockIdx.x / 2;
    const int node = rank / kRanksPerNode, local_rank = rank % kRanksPerNode;
    const int nvl_base = c * static_cast<int>(nvl.slots_per_channel);
    const int rdma_base = c * static_cast<int>(lay.slots_per_channel);
    const long long stride = lay.message_stride;
    fill_unused_rows<kNumRanks, kNumTopk>(recv_channel_offset, num_channels, num_recv_capacity, recv_topk_idx,
                                         recv_topk_weights, recv_src_idx);

    if (blockIdx.x % 2 == 1) {
        receive_channel<kNumRanks, kHiddenInt4, kNumScales, kNumTopk>(
            nvl, peers[rank], c, num_channels, -1, recv_channel_offset, rank * num_local_experts,
            num_local_experts, num_recv_capacity, recv_x, recv_x_scales, recv_topk_idx,
            recv_topk_weights, recv_src_idx, err, timeout_ns);
        return;
    }

    const int num_senders = num_warps / 2;
    if (warp < num_senders) {
        // ---------------- sender: one message per (token, node) ----------------
        int begin, end;
        channel_range(num_tokens, num_channels, c, begin, end);
        PublishedTail<long long> tail;  // owned by thread m < N
        const int round_tokens = num_senders * chunk_tokens;
        for (int round = begin; round < end; round += round_tokens) {
            for (int t = round + warp; t < min(round + round_tokens, end); t += num_senders) {
                const int* pos = rdma_pos + (long long)t * kNumNodes;
                bool any = false;
                for (int m = lane; m < kNumNodes; m += kWarpSize) any |= pos[m] >= 0;
                if (!__any_sync(0xffffffffu, any)) continue;
                char* msg = rdma + lay.send + (long long)t * stride;
                warp_copy_nc<kHiddenInt4>(reinterpret_cast<int4*>(msg), x + (long long)t * kHiddenInt4, lane);
                for (int i = lane; i < kNumScales; i += kWarpSize)
                    reinterpret_cast<float*>(msg + Msg::kScales)[i] = x_scales[(long long)t * kNumScales + i];
                if (lane == 0) *reinterpret_cast<int*>(msg + Msg::kSrc) = t;
                for (int w = lane; w < Msg::kBitWords; w += kWarpSize) {
                    unsigned word = 0;
                    for (int b = 0; b < 32 && w * 32 + b < kNumRanks; ++b)
                        if (is_token_in_rank[(long long)t * kNumRanks + w * 32 + b]) word |= 1u << b;
                    reinterpret_cast<unsigned*>(msg + Msg::kBits)[w] = word;
                }
                if (lane < kNumTopk) {
                    reinterpret_cast<int*>(msg + Msg::kTopk)[lane] =
                        static_cast<int>(topk_idx[(long long)t * kNumTopk + lane]);
                    reinterpret_cast<float*>(msg + Msg::kWeights)[lane] =
                        topk_weights != nullptr ? topk_weights[(long long)t * kNumTopk + lane] : 0.f;
                }
                // The put reads the staged message with this warp's lanes.
                __syncwarp();
                for (int m = 0; m < kNumNodes; ++m) {
                    const int p = pos[m];
                    if (p < 0) continue;
                    // Symmetric address: our recv region `node` names the peer's.
                    cupyep_nvshmem_putmem_nbi_warp(rdma + lay.recv + ((long long)node * lay.max_tokens + p) * stride,
                                             msg, Msg::kBytes, m * kRanksPerNode + local_rank);
                }
            }
            // Complete this warp's puts, then the senders' barrier orders
            // them before the signals below.
            __syncwarp();
            if (lane == 0) cupyep_nvshmem_quiet();
            sync_warps(1, num_senders * kWarpSize);
            const int m = threadIdx.x;
            if (m < kNumNodes) {
                const int last = min(round + round_tokens, end);
                long long done = tail.published;
                for (int tt = round; tt < last; ++tt) {
                    const int p = rdma_pos[(long long)tt * kNumNodes + m];
                    if (p >= 0) done = p - rdma_base + 1;
                }
                tail.publish(done, [&](long long n) {
                    signal_set(rdma, lay.dispatch_tail + 8ll * (node * kMaxChannels + c), n,
                               m * kRanksPerNode + local_rank);
                });
            }
        }
        return;
    }

    // ---------------- forwarder: node m's messages to our node's ranks ----------------
    const WarpGroups wg(warp - num_senders, num_warps - num_senders, kNumNodes);  // groups over nodes
    if (wg.group >= wg.num_groups) return;
    for (int m = wg.group; m < kNumNodes; m += wg.num_groups) {
        const int s = m * kRanksPerNode + local_rank;  // the source rank
        const int count = rdma_recv_count[m * num_channels + c];
        long long* tail = rdma_word(rdma, lay.dispatch_tail) + m * kMaxChannels + c;
        const long long region = (long long)m * lay.max_tokens + rdma_base;
        int sent[kRanksPerNode];
#pragma unroll
        for (int q = 0; q < kRanksPerNode; ++q) sent[q] = 0;
        PublishedTail<int> to_rank;  // lane q < P of warp sub 0: rows published to rank (node, q)
        long long seen = 0;
        for (int b = 0; b < count; b += kWarpSize) {
            const int nb = min(kWarpSize, count - b);
            if (seen >= 0 && seen < b + nb) {
                long long v = 0;
                if (lane == 0)
                    v = wait_at_least(static_cast<const long long*>(tail), (long long)(b + nb), timeout_ns,
                                      err, kPhaseDispatchRecv, s, c);
                seen = __shfl_sync(0xffffffffu, v, 0);
            }
            // Lane i takes message b + i; a ballot per rank of our node gives
            // each message its slot there. After a timeout nothing is copied,
            // but the group still meets at every barrier below.
            const bool ok = seen >= 0 && lane < nb;
            const unsigned* bits = reinterpret_cast<const unsigned*>(rdma + lay.recv + (region + b + lane) * stride + Msg::kBits);
            unsigned mask[kRanksPerNode];
            int slot[kRanksPerNode];
#pragma unroll
            for (int q = 0; q < kRanksPerNode; ++q) {
                const int r = node * kRanksPerNode + q;
                const bool in = ok && ((bits[r / 32] >> (r % 32)) & 1u);
                mask[q] = __ballot_sync(0xffffffffu, in);
                slot[q] = in ? nvl_base + sent[q] + __popc(mask[q] & lanemask_lt(lane)) : -1;
                if (fwd_slots != nullptr && wg.sub == 0 && ok)
                    fwd_slots[(region + b + lane) * kRanksPerNode + q] = slot[q];
            }
            for (int i = wg.sub; i < nb; i += wg.size) {
                const char* msg = rdma + lay.recv + (region + b + i) * stride;
#pragma unroll
                for (int q = 0; q < kRanksPerNode; ++q) {
                    const int to = __shfl_sync(0xffffffffu, slot[q], i);
                    if (to < 0) continue;
                    char* dst = peers[node * kRanksPerNode + q];
                    const long long row = (long long)s * nvl.max_tokens + to;
                    warp_copy_coherent<kHiddenInt4>(at<int4>(dst, nvl.rows + row * kRowBytes),
                                                    reinterpret_cast<const int4*>(msg), lane);
                    for (int k = lane; k < kNumScales; k += kWarpSize)
                        at<float>(dst, nvl.scales)[row * kNumScales + k] =
                            reinterpret_cast<const float*>(msg + Msg::kScales)[k];
                    if (lane == 0) at<int>(dst, nvl.src_idx)[row] = *reinterpret_cast<const int*>(msg + Msg::kSrc);
                    if (lane < kNumTopk) {
                        at<int>(dst, nvl.topk_idx)[row * kNumTopk + lane] =
                            reinterpret_cast<const int*>(msg + Msg::kTopk)[lane];
                        at<float>(dst, nvl.topk_weights)[row * kNumTopk + lane] =
                            reinterpret_cast<const float*>(msg + Msg::kWeights)[lane];
                    }
                }
            }
#pragma unroll
            for (int q = 0; q < kRanksPerNode; ++q) sent[q] += __popc(mask[q]);
            // The group's row stores happen-before the release below.
            sync_warps(2 + wg.group, wg.size * kWarpSize);
            if (wg.sub == 0 && lane < kRanksPerNode) {
                int now = 0;
#pragma unroll
                for (int q = 0; q < kRanksPerNode; ++q)
                    if (q == lane) now = sent[q];
                to_rank.publish(now, [&](int n) {
                    st_release_sys(at<int>(peers[node * kRanksPerNode + lane], nvl.dispatch_tail) + s * kMaxChannels + c, n);
                });
            }
        }
        // Every wait on this tail is behind the group's last barrier.
        if (wg.sub == 0 && lane == 0) *reinterpret_cast<volatile long long*>(tail) = 0;
    }
}

// Grid: 2 * num_channels (the dispatch's channels). Even block 2c: the first
// half of its warps return the rows this rank received in channel c to the
// forwarder of their source (our node's rank with the source's local index),
// the second half (forwarders) sum, per message they forwarded in dispatch,
// the rows of our node's ranks and put the sum back to the source. Odd block
// 2c + 1 sums, for this rank's own tokens, the rows back from every node in
// node order (fp32), adds bias0 and bias1, and stores bf16.
template <int kNumRanks, int kRanksPerNode, int kHiddenInt4, int kNumTopk>
__global__ void __launch_bounds__(1024, 1)
combine(const int4* __restrict__ x, const float* __restrict__ topk_weights,
        const int* __restrict__ rdma_pos, const int* __restrict__ recv_channel_offset,
        const int* __restrict__ rdma_recv_count, const int* __restrict__ fwd_slots, int num_tokens,
        int num_channels, int chunk_tokens, char* const* peers, const NvlLayout* nvl_layout,
        char* rdma, const RdmaLayout* rdma_layout, int rank, const int4* __restrict__ bias0,
        const int4* __restrict__ bias1, int4* out, float* out_weights, int* err,
        long long timeout_ns) {
    using Msg = CombineMessage<kHiddenInt4, kNumTopk>;
    constexpr int kNumNodes = kNumRanks / kRanksPerNode;
    constexpr long long kRowBytes = kHiddenInt4 * 16ll;
    const NvlLayout nvl = *nvl_layout;
    const RdmaLayout lay = *rdma_layout;
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int num_warps = blockDim.x / kWarpSize;
    const int c = blockIdx.x / 2;
    const int node = rank / kRanksPerNode, local_rank = rank % kRanksPerNode;
    const int nvl_base = c * static_cast<int>(nvl.slots_per_channel);
    const int rdma_base = c * static_cast<int>(lay.slots_per_channel);
    const long long stride = lay.message_stride;
    char* local = peers[rank];

    if (blockIdx.x % 2 == 1) {
        // ---------------- final reduction of this rank's tokens ----------------
        int begin, end;
        channel_range(num_tokens, num_channels, c, begin, end);
        long long seen[kNumNodes];
#pragma unroll
        for (int m = 0; m < kNumNodes; ++m) seen[m] = 0;
        bool failed = false;
        for (int t = begin + warp; t < end && !failed; t += num_warps) {
            int pos[kNumNodes];
#pragma unroll
            for (int m = 0; m < kNumNodes; ++m) {
                pos[m] = rdma_pos[(long long)t * kNumNodes + m];
                const int n = pos[m] - rdma_base;
                if (pos[m] >= 0 && seen[m] <= n) {
                    long long v = 0;
                    if (lane == 0)
                        v = wait_at_least(static_cast<const long long*>(rdma_word(rdma, lay.combine_tail) + m * kMaxChannels + c),
                                          (long long)(n + 1), timeout_ns, err, kPhaseCombineRecv,
                                          m * kRanksPerNode + local_rank, c);
                    seen[m] = __shfl_sync(0xffffffffu, v, 0);
                    if (seen[m] < 0) failed = true;
                }
            }
            if (failed) break;
            const int4* rows[kNumNodes];
#pragma unroll
            for (int m = 0; m < kNumNodes; ++m)
                rows[m] = pos[m] < 0 ? nullptr : reinterpret_cast<const int4*>(
                    rdma + lay.recv + ((long long)m * lay.max_tokens + pos[m]) * stride);
            const long long row_off = (long long)t * kHiddenInt4;
            warp_sum_rows<kHiddenInt4, kNumNodes>(out + row_off, rows, bias0 != nullptr ? bias0 + row_off : nullptr,
                                                  bias1 != nullptr ? bias1 + row_off : nullptr, lane);
            if (lane < kNumTopk) {
                float w = 0.f;
#pragma unroll
                for (int m = 0; m < kNumNodes; ++m)
                    if (pos[m] >= 0)
                        w += reinterpret_cast<const float*>(
                            rdma + lay.recv + ((long long)m * lay.max_tokens + pos[m]) * stride + Msg::kWeights)[lane];
                out_weights[(long long)t * kNumTopk + lane] = w;
            }
        }
        __syncthreads();
        for (int m = threadIdx.x; m < kNumNodes; m += blockDim.x)
            rdma_word(rdma, lay.combine_tail)[m * kMaxChannels + c] = 0;
        return;
    }

    const int num_senders = num_warps / 2;
    if (warp < num_senders) {
        // ---------------- rows back to their source's forwarder ----------------
        // Forwarder of source s in our node: local index s % P; its region
        // for our rows of s: (s's node) * P + our local index.
        const WarpGroups wg(warp, num_senders, kNumRanks);  // groups over sources
        int max_count = 0;
        for (int s = 0; s < kNumRanks; ++s)
            max_count = max(max_count, recv_channel_offset[s * num_channels + c + 1] -
                                           recv_channel_offset[s * num_channels + c]);
        PublishedTail<int> tail;  // owned by thread s < R
        const int round_rows = wg.size * chunk_tokens;
        for (int round = 0; round < max_count; round += round_rows) {
            for (int s = wg.group; wg.group < wg.num_groups && s < kNumRanks; s += wg.num_groups) {
                const int first = recv_channel_offset[s * num_channels + c];
                const int count = recv_channel_offset[s * num_channels + c + 1] - first;
                char* dst = peers[node * kRanksPerNode + s % kRanksPerNode];
                const long long region = (long long)(s / kRanksPerNode) * kRanksPerNode + local_rank;
                for (int n = round + wg.sub; n < min(round + round_rows, count); n += wg.size) {
                    const long long row = region * nvl.max_tokens + nvl_base + n;
                    warp_copy_nc<kHiddenInt4>(at<int4>(dst, nvl.rows + row * kRowBytes),
                                              x + (long long)(first + n) * kHiddenInt4, lane);
                    if (lane < kNumTopk)
                        at<float>(dst, nvl.topk_weights)[row * kNumTopk + lane] =
                            topk_weights[(long long)(first + n) * kNumTopk + lane];
                }
            }
            // Row stores of the round happen-before the release.
            sync_warps(1, num_senders * kWarpSize);
            const int s = threadIdx.x;
            if (s < kNumRanks) {
                const int count = recv_channel_offset[s * num_channels + c + 1] -
                                  recv_channel_offset[s * num_channels + c];
                const int done = min(count, round + round_rows);
                tail.publish(done, [&](int n) {
                    const long long region = (long long)(s / kRanksPerNode) * kRanksPerNode + local_rank;
                    st_release_sys(at<int>(peers[node * kRanksPerNode + s % kRanksPerNode], nvl.combine_tail) +
                                       region * kMaxChannels + c, n);
                });
            }
        }
        return;
    }

    // ---------------- forwarder: sum our node's rows, one put per message ----------------
    const WarpGroups wg(warp - num_senders, num_warps - num_senders, kNumNodes);  // groups over nodes
    if (wg.group >= wg.num_groups) return;
    for (int m = wg.group; m < kNumNodes; m += wg.num_groups) {
        const int s = m * kRanksPerNode + local_rank;
        const int count = rdma_recv_count[m * num_channels + c];
        const long long region = (long long)m * lay.max_tokens + rdma_base;
        int seen[kRanksPerNode];
#pragma unroll
        for (int q = 0; q < kRanksPerNode; ++q) seen[q] = 0;
        for (int b = 0; b < count; b += kWarpSize) {
            const int nb = min(kWarpSize, count - b);
            for (int i = wg.sub; i < nb; i += wg.size) {
                int slot[kRanksPerNode];
                bool ok = true;
#pragma unroll
                for (int q = 0; q < kRanksPerNode; ++q) {
                    slot[q] = fwd_slots[(region + b + i) * kRanksPerNode + q];
                    const int n = slot[q] - nvl_base;
                    if (slot[q] >= 0 && seen[q] <= n) {
                        int v = 0;
                        if (lane == 0)
                            v = wait_at_least(at<int>(local, nvl.combine_tail) + (m * kRanksPerNode + q) * kMaxChannels + c,
                                              n + 1, timeout_ns, err, kPhaseCombineRecv, node * kRanksPerNode + q, c);
                        seen[q] = __shfl_sync(0xffffffffu, v, 0);
                        ok = ok && seen[q] >= 0;
                    }
                }
                if (!ok) continue;  // a timeout was reported; the group still meets below
                char* msg = rdma + lay.send + (region + b + i) * stride;
                const int4* rows[kRanksPerNode];
#pragma unroll
                for (int q = 0; q < kRanksPerNode; ++q)
                    rows[q] = slot[q] < 0 ? nullptr : at<int4>(local, nvl.rows + ((long long)(m * kRanksPerNode + q) *
                                                                                   nvl.max_tokens + slot[q]) * kRowBytes);
                warp_sum_rows<kHiddenInt4, kRanksPerNode>(reinterpret_cast<int4*>(msg), rows, nullptr, nullptr, lane);
                if (lane < kNumTopk) {
                    float w = 0.f;
#pragma unroll
                    for (int q = 0; q < kRanksPerNode; ++q)
                        if (slot[q] >= 0)
                            w += at<float>(local, nvl.topk_weights)[((long long)(m * kRanksPerNode + q) * nvl.max_tokens +
                                                                     slot[q]) * kNumTopk + lane];
                    reinterpret_cast<float*>(msg + Msg::kWeights)[lane] = w;
                }
                __syncwarp();
                cupyep_nvshmem_putmem_nbi_warp(rdma + lay.recv + ((long long)node * lay.max_tokens + rdma_base + b + i) * stride,
                                         msg, Msg::kBytes, s);
            }
            __syncwarp();
            if (lane == 0) cupyep_nvshmem_quiet();
            sync_warps(2 + wg.group, wg.size * kWarpSize);
            if (wg.sub == 0 && lane == 0)
                signal_set(rdma, lay.combine_tail + 8ll * (node * kMaxChannels + c), b + nb, s);
        }
        // Every wait on these tails is behind the group's last barrier.
        if (wg.sub == 0 && lane < kRanksPerNode)
            at<int>(local, nvl.combine_tail)[(m * kRanksPerNode + lane) * kMaxChannels + c] = 0;
    }
}

}  // namespace cupyep
