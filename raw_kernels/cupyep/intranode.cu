// Normal (high-throughput) dispatch and combine inside one NVLink domain.
//
// Every rank owns one symmetric buffer (layout in nvl_layout.cuh) and sees its
// peers' buffers through NVLink-mapped pointers (peers[r]). A token of source
// s, channel c, that is the n-th of that channel going to rank d lands in slot
// c * slots_per_channel + n of region s on rank d. Regions are sized for the
// worst case, so senders never wait for space: they copy rows, then publish
// how many rows of (s, c) are complete (a release store of the tail); the
// receiver acquires the tail and copies the rows to the output. A rank's rows
// for itself skip the buffer: dispatch copies them from x into the outputs,
// combine's receivers read them from combine's input. Combine runs
// the same slots backwards; its senders flag work items of rows instead of
// publishing tails.
#include "cupyep/common.cuh"
#include "cupyep/nvl_layout.cuh"
#include "cupyep/nvl_receive.cuh"

namespace cupyep {

// Call tags (cupyep/backends/gpu/call_tags.py): before its release of a barrier sequence
// to a peer, a rank writes its call's tag into its slot of the peer's
// call_tags, by the sequence's parity; after acquiring a peer's sequence it
// reads the peer's tag there and reports one other than its own. A peer is
// at most one barrier ahead (it needs this rank's arrival to pass this
// one), and then it writes the other parity.
__device__ __forceinline__ void put_call_tag(char* peer, const NvlLayout& lay, int seq, int rank, int num_ranks,
                                             long long call_tag) {
    at<long long>(peer, lay.call_tags)[(seq & 1) * num_ranks + rank] = call_tag;
}

// After acquiring peer's sequence seq: true when its tag is call_tag, else reported.
__device__ __forceinline__ bool same_call(char* own, const NvlLayout& lay, int seq, int peer, int num_ranks,
                                          long long call_tag, int* err) {
    const long long theirs =
        *reinterpret_cast<const volatile long long*>(at<long long>(own, lay.call_tags) + (seq & 1) * num_ranks + peer);
    if (theirs == call_tag) return true;
    report_error(err, kErrCallMismatch, kPhaseBarrier, peer, -1, call_tag, theirs);
    return false;
}

// Cross-rank barrier: one block of kNumRanks threads. Everything this rank's
// earlier kernels did (including reads of its own buffer) is complete when
// a peer sees our sequence number (counters: see next_barrier_seq).
template <int kNumRanks>
__device__ __forceinline__ void barrier_block(char* const* peers, const NvlLayout& lay, int rank,
                                              int* counters, int* err, long long timeout_ns, long long call_tag) {
    const int seq = next_barrier_seq(counters);
    const int j = threadIdx.x;
    if (j == 0) set_running_call(err, call_tag);
    if (j < kNumRanks) {
        // Make prior kernels' remote stores visible system-wide before the
        // flag that tells peer j we are here (the release orders the tag too).
        __threadfence_system();
        put_call_tag(peers[j], lay, seq, rank, kNumRanks, call_tag);
        st_release_sys(at<int>(peers[j], lay.sync) + rank, seq);
        if (wait_at_least(at<int>(peers[rank], lay.sync) + j, seq, timeout_ns, err, kPhaseBarrier, j, -1) >= seq)
            same_call(peers[rank], lay, seq, j, kNumRanks, call_tag, err);
    }
    __syncthreads();
}

template <int kNumRanks>
__global__ void barrier(char* const* peers, const NvlLayout* layout, int rank, int* counters, int* err,
                        long long timeout_ns, long long call_tag) {
    const NvlLayout lay = *layout;
    barrier_block<kNumRanks>(peers, lay, rank, counters, err, timeout_ns, call_tag);
}

// The same barrier inside the combine kernel, instead of a barrier kernel
// before it (~5 us and a launch gap per call; in the dispatch kernel the same
// change slowed the FP8 copy loop, so cached dispatch keeps the kernel).
// Block 0 tells every peer at the start that this rank's earlier kernels are
// complete (stream order: they are); a sender block waits, before its first
// store into a peer's buffer, until every peer has said the same. Every block
// reads the sequence at its start, so the last block to finish advances it.
template <int kNumRanks>
struct KernelBarrier {
    int* counters;
    int* blocks_done;
    int seq;
    long long call_tag;

    __device__ __forceinline__ KernelBarrier(int* counters_, int* blocks_done_, char* const* peers,
                                             const NvlLayout& lay, int rank, long long call_tag_, int* err)
        : counters(counters_), blocks_done(blocks_done_), seq(counters_[0] + 1), call_tag(call_tag_) {
        if (blockIdx.x == 0 && threadIdx.x == 0) set_running_call(err, call_tag);
        if (blockIdx.x == 0 && threadIdx.x < kNumRanks) {
            __threadfence_system();  // as in barrier_block
            put_call_tag(peers[threadIdx.x], lay, seq, rank, kNumRanks, call_tag);
            st_release_sys(at<int>(peers[threadIdx.x], lay.sync) + rank, seq);
        }
    }

    // Block-wide; false (the error word set) when a peer never arrived or
    // arrived from another call.
    __device__ __forceinline__ bool wait(char* const* peers, const NvlLayout& lay, int rank, int* err,
                                         long long timeout_ns) const {
        bool failed = false;
        if (threadIdx.x < kNumRanks && threadIdx.x != rank) {
            const int j = static_cast<int>(threadIdx.x);
            failed = wait_at_least(at<int>(peers[rank], lay.sync) + j, seq, timeout_ns, err, kPhaseBarrier, j, -1) < seq
                     || !same_call(peers[rank], lay, seq, j, kNumRanks, call_tag, err);
        }
        // The acquires above, extended to the block, order its later stores.
        return !__syncthreads_or(failed);
    }

    // Block-wide; true in the last block to get here, which advances the
    // sequence (every block read it at its start).
    __device__ __forceinline__ bool finish() const {
        const bool last = last_block_to_arrive<Arrival::kReadsOnly>(blocks_done);
        if (last && threadIdx.x == 0) counters[0] = seq;
        return last;
    }
};

// Grid: num_channels + 1 blocks. Blocks c < num_channels number the tokens of
// channel c per destination (send_pos) and tell each destination how many it
// gets; the last block sends per-expert counts. The last block to finish runs
// the barrier and turns what peers sent us into receive offsets.
//
// recv_channel_offset: [R * num_channels + 1] exclusive prefix in (source,
// channel) order; recv_expert_counts: [L] padded to expert_alignment;
// host_info (host-mapped): [0] rows received, [1 + l] padded count of expert l,
// [1 + L] 1 + the first rank whose layout saw bad routing (0: none), [2 + L]
// what it saw (2: an expert id out of range, 3: more nodes than allowed).
template <int kNumRanks>
__global__ void notify_dispatch(const bool* __restrict__ is_token_in_rank, int num_tokens,
                                int num_channels, const int* __restrict__ num_tokens_per_expert,
                                int num_local_experts, int expert_alignment, int* send_pos,
                                char* const* peers, const NvlLayout* layout, int rank,
                                int* counters, int* blocks_done, int* recv_channel_offset,
                                int* recv_expert_counts, int* host_info, int* layout_error,
                                int* err, long long timeout_ns, long long call_tag) {
    const NvlLayout lay = *layout;
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int num_warps = blockDim.x / kWarpSize;
    // Read by every block before the last one advances it (after all arrived).
    const int parity = counters[1] & 1;
    const long long counts_base = lay.channel_counts + 4ll * parity * kNumRanks * kMaxChannels;
    const long long experts_base = lay.expert_counts + 4ll * parity * kNumRanks * kMaxLocalExperts;

    if (blockIdx.x < num_channels) {
        const int c = blockIdx.x;
        int begin, end;
        channel_range(num_tokens, num_channels, c, begin, end);
        const int slot_base = c * static_cast<int>(lay.slots_per_channel);
        for (int d = warp; d < kNumRanks; d += num_warps) {
            const int n = warp_number_tokens(
                begin, end, lane, [&](int t) { return is_token_in_rank[(long long)t * kNumRanks + d]; },
                [&](int t, int pos) { send_pos[(long long)t * kNumRanks + d] = pos < 0 ? -1 : slot_base + pos; });
            if (lane == 0) at<int>(peers[d], counts_base)[rank * kMaxChannels + c] = n;
        }
    } else {
        if (num_tokens_per_expert != nullptr)
            for (int i = threadIdx.x; i < kNumRanks * num_local_experts; i += blockDim.x) {
                const int d = i / num_local_experts, l = i % num_local_experts;
                at<int>(peers[d], experts_base)[rank * kMaxLocalExperts + l] = num_tokens_per_expert[i];
            }
        // Tell every peer whether our layout saw a bad expert id, so that all
        // ranks reject the call together. Channel slot kMaxChannels - 1 is
        // never a real channel.
        if (threadIdx.x == 0) {
            const int bad = *layout_error;
            *layout_error = 0;
            for (int d = 0; d < kNumRanks; ++d)
                at<int>(peers[d], counts_base)[rank * kMaxChannels + kMaxChannels - 1] = bad;
        }
    }

    // The last block done runs the barrier (this block's remote count stores
    // are ordered before its arrival).
    if (!last_block_to_arrive<Arrival::kSystemWrites>(blocks_done)) return;
    barrier_block<kNumRanks>(peers, lay, rank, counters, err, timeout_ns, call_tag);
    if (threadIdx.x == 0) counters[1] += 1;

    // Peers' counts are visible: each thread d < R acquired peer d's flag and
    // the block barrier above extends that to every thread.
    if (warp == 0)
        warp_receive_offsets(at<int>(peers[rank], counts_base), kNumRanks, num_channels, kMaxChannels,
                             recv_channel_offset, host_info, num_local_experts, lane);
    finish_expert_counts(num_tokens_per_expert != nullptr ? at<int>(peers[rank], experts_base) : nullptr,
                         kNumRanks, kMaxLocalExperts, num_local_experts, expert_alignment, recv_expert_counts,
                         host_info);
}

// Token t of x, a row this rank sends itself, straight into row out of
// dispatch's outputs (no buffer in between).
template <int kHiddenInt4, int kNumScales, int kNumTopk>
__device__ __forceinline__ void store_own_row(const int4* __restrict__ x, int t,
                                              const RowMeta<kNumScales, kNumTopk>& meta, long long out,
                                              int num_recv_capacity, int rank, int c, int num_local_experts,
                                              int4* recv_x, float* recv_x_scales, long long* recv_topk_idx,
                                              float* recv_topk_weights, int* recv_src_idx, int* err, int lane) {
    if (out >= num_recv_capacity) {
        if (lane == 0) report_error(err, kErrTooManyRows, kPhaseDispatchRecv, rank, c, running_call(err));
        return;
    }
    warp_copy_nc<kHiddenInt4>(recv_x + out * kHiddenInt4, x + (long long)t * kHiddenInt4, lane);
    meta.store_output(out, rank * num_local_experts, num_local_experts, recv_x_scales, recv_topk_idx,
                      recv_topk_weights, recv_src_idx, lane);
}

// Grid: 2 * num_channels blocks; even blocks send channel blockIdx.x / 2, odd
// blocks receive it. Rows are kHiddenInt4 16-byte words (bf16 or e4m3 bytes);
// kNumScales fp32 scales per row for FP8 (else 0); kNumTopk 0 without top-k.
// A rank's rows for itself skip the buffer: they are copied from x into the
// outputs, those of the channel's tokens before own_split by the receiver
// block (first, before the peers' rows), the rest by the sender block (after
// each token's peer rows). own_split: own_share_1024 / 1024 of the channel's
// tokens (Config.own_rows_receiver_share). recv_src_idx null: not written
// (a cached dispatch, whose handle has the sources).
template <int kNumRanks, int kHiddenInt4, int kNumScales, int kNumTopk, typename IdxT>
__global__ void __launch_bounds__(1024, 1)
dispatch(const int4* __restrict__ x, const float* __restrict__ x_scales,
         const IdxT* __restrict__ topk_idx, const float* __restrict__ topk_weights,
         const int* __restrict__ send_pos, int num_tokens, int num_channels,
         char* const* peers, const NvlLayout* layout, const int* __restrict__ recv_channel_offset,
         int rank, int num_local_experts, int num_recv_capacity, int chunk_tokens,
         int own_share_1024, int4* recv_x,
         float* recv_x_scales, long long* recv_topk_idx, float* recv_topk_weights,
         int* recv_src_idx, int* err, long long timeout_ns) {
    const NvlLayout lay = *layout;
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int num_warps = blockDim.x / kWarpSize;
    const int c = blockIdx.x / 2;
    const int slot_base = c * static_cast<int>(lay.slots_per_channel);
    constexpr long long kRowBytes = kHiddenInt4 * 16ll;
    int begin, end;
    channel_range(num_tokens, num_channels, c, begin, end);
    // Row of the outputs of an own row in slot s: self_first + s.
    const int self_first = recv_channel_offset[rank * num_channels + c] - slot_base;
    const int own_split = begin + static_cast<int>((long long)(end - begin) * own_share_1024 / 1024);
    fill_unused_rows<kNumRanks, kNumTopk>(recv_channel_offset, num_channels, num_recv_capacity, recv_topk_idx,
                                         recv_topk_weights, recv_src_idx);

    if (blockIdx.x % 2 == 0) {
        // ---------------- sender ----------------
        PublishedTail<int> tail;  // owned by thread d < kNumRanks, d != rank
        // A round is num_warps * chunk_tokens tokens; warp w copies tokens
        // round + w, round + w + num_warps, ... Publishing once per round keeps
        // the system-scope release (which drains this SM's stores) rare.
        const int round_tokens = num_warps * chunk_tokens;
        for (int round = begin; round < end; round += round_tokens) {
            for (int t = round + warp; t < min(round + round_tokens, end); t += num_warps) {
                // The token's slots and metadata are loaded once, together, for
                // every destination: each dependent load costs a full latency.
                // slot[i] is on rank (rank + 1 + i) % R: peers first (their
                // NVLink stores take longest), this rank last.
                int slot[kNumRanks];
#pragma unroll
                for (int i = 0; i < kNumRanks; ++i)
                    slot[i] = send_pos[(long long)t * kNumRanks + (rank + 1 + i) % kNumRanks];
                const RowMeta<kNumScales, kNumTopk> meta =
                    RowMeta<kNumScales, kNumTopk>::load_input(x_scales, topk_idx, topk_weights, t, lane);
#pragma unroll
                for (int i = 0; i < kNumRanks - 1; ++i) {
                    if (slot[i] < 0) continue;
                    char* base = peers[(rank + 1 + i) % kNumRanks];
                    const long long row = (long long)rank * lay.max_tokens + slot[i];
                    warp_copy_nc<kHiddenInt4>(at<int4>(base, lay.rows + row * kRowBytes),
                                              x + (long long)t * kHiddenInt4, lane);
                    meta.store(base, lay, row, lane);
                }
                if (t >= own_split && slot[kNumRanks - 1] >= 0)
                    store_own_row<kHiddenInt4>(x, t, meta, self_first + slot[kNumRanks - 1], num_recv_capacity,
                                               rank, c, num_local_experts, recv_x, recv_x_scales,
                                               recv_topk_idx, recv_topk_weights, recv_src_idx, err, lane);
            }
            // All warps' row stores of this round happen-before the release
            // below (bar.sync, then a cumulative release at system scope).
            __syncthreads();
            const int d = threadIdx.x;
            if (d < kNumRanks && d != rank) {
                const int last = min(round + round_tokens, end);
                int done = tail.published;
                for (int tt = round; tt < last; ++tt) {
                    const int slot = send_pos[(long long)tt * kNumRanks + d];
                    if (slot >= 0) done = slot - slot_base + 1;
                }
                tail.publish(done, [&](int n) {
                    st_release_sys(at<int>(peers[d], lay.dispatch_tail) + rank * kMaxChannels + c, n);
                });
            }
        }
        return;
    }

    // ---------------- receiver ----------------
    // Own rows first: they need no wait, and meanwhile the peers' arrive.
    for (int t = begin + warp; t < own_split; t += num_warps) {
        const int slot = send_pos[(long long)t * kNumRanks + rank];
        if (slot < 0) continue;
        const RowMeta<kNumScales, kNumTopk> meta =
            RowMeta<kNumScales, kNumTopk>::load_input(x_scales, topk_idx, topk_weights, t, lane);
        store_own_row<kHiddenInt4>(x, t, meta, self_first + slot, num_recv_capacity, rank, c,
                                   num_local_experts, recv_x, recv_x_scales, recv_topk_idx,
                                   recv_topk_weights, recv_src_idx, err, lane);
    }
    receive_channel<kNumRanks, kHiddenInt4, kNumScales, kNumTopk>(
        lay, peers[rank], c, num_channels, rank, recv_channel_offset, rank * num_local_experts,
        num_local_experts, num_recv_capacity, recv_x, recv_x_scales, recv_topk_idx,
        recv_topk_weights, recv_src_idx, err, timeout_ns);
}

// Combine's work items: chunks of rows of one (source, channel) stream, at
// least chunk_rows, more where a source's items would not fit its
// kCombineFlags flags. The flag of item k of channel c is c * per_channel + k.
struct CombineItems {
    int rows, per_channel;
    __device__ __forceinline__ CombineItems(const NvlLayout& lay, int chunk_rows) {
        const int spc = static_cast<int>(lay.slots_per_channel);
        const int fit = (static_cast<int>(lay.max_tokens) + kCombineFlags - kMaxChannels - 1) /
                        (kCombineFlags - kMaxChannels);
        rows = max(chunk_rows, fit);
        per_channel = (spc + rows - 1) / rows;
    }
};

// Combine senders: every (peer, channel) stream of rows this rank received
// in the dispatch is cut into work items. The warps of all sender blocks
// take items from one ticket in order (item j: chunk j / P of stream j % P,
// P streams), so every stream advances at the same pace, as receivers
// consume them, and no warp idles while items are left. A warp copies its
// item's rows into the peer's buffer, then sets the item's flag there to
// this call's sequence number: flags only grow, so none is ever reset.
template <int kNumRanks, int kHiddenInt4, int kNumTopk>
__device__ __forceinline__ void combine_send(const int4* __restrict__ x, const float* __restrict__ topk_weights,
                                             const int* __restrict__ recv_channel_offset, int num_channels,
                                             const CombineItems& items, char* const* peers, const NvlLayout& lay,
                                             int rank, int seq, int* ticket) {
    constexpr int kNumPeers = kNumRanks - 1;
    constexpr long long kRowBytes = kHiddenInt4 * 16ll;
    const int lane = threadIdx.x % kWarpSize;
    // Stream p: peer (rank + 1 + p % kNumPeers) % R (ranks start on
    // different peers), channel p / kNumPeers.
    const int num_streams = kNumPeers * num_channels;
    int max_count = 0;
    for (int p = lane; p < num_streams; p += kWarpSize) {
        const int d = (rank + 1 + p % kNumPeers) % kNumRanks, c = p / kNumPeers;
        max_count = max(max_count, recv_channel_offset[d * num_channels + c + 1] -
                                       recv_channel_offset[d * num_channels + c]);
    }
#pragma unroll
    for (int m = kWarpSize / 2; m > 0; m /= 2) max_count = max(max_count, __shfl_xor_sync(0xffffffffu, max_count, m));
    const int num_items = (max_count + items.rows - 1) / items.rows * num_streams;
    auto take = [&] { return __shfl_sync(0xffffffffu, lane == 0 ? atomicAdd(ticket, 1) : 0, 0); };
    for (int j = take(); j < num_items; j = take()) {
        const int p = j % num_streams, k = j / num_streams, n0 = k * items.rows;
        const int d = (rank + 1 + p % kNumPeers) % kNumRanks, c = p / kNumPeers;
        const int first = recv_channel_offset[d * num_channels + c];
        const int n1 = min(n0 + items.rows, recv_channel_offset[d * num_channels + c + 1] - first);
        if (n0 >= n1) continue;
        char* base = peers[d];
        const long long slot0 = (long long)rank * lay.max_tokens + (long long)c * lay.slots_per_channel;
        for (int n = n0; n < n1; ++n) {
            // The warp's next row into L2 while this one is copied.
            if (lane == 0 && n + 1 < n1) prefetch_l2(x + (long long)(first + n + 1) * kHiddenInt4, kRowBytes);
            // Loaded before the copy so that the two latencies overlap.
            const float w = lane < kNumTopk ? topk_weights[(long long)(first + n) * kNumTopk + lane] : 0.f;
            warp_copy_nc<kHiddenInt4>(at<int4>(base, lay.rows + (slot0 + n) * kRowBytes),
                                      x + (long long)(first + n) * kHiddenInt4, lane);
            if (lane < kNumTopk) at<float>(base, lay.topk_weights)[(slot0 + n) * kNumTopk + lane] = w;
        }
        // bar.warp.sync orders every lane's row stores before lane 0's
        // release, which is cumulative: whoever acquires the flag sees them.
        __syncwarp();
        if (lane == 0)
            st_release_sys(at<int>(base, lay.combine_flags) + rank * kCombineFlags + c * items.per_channel + k, seq);
    }
}

// Combine receivers: token (c, i), the i-th of channel c, is reduced by
// receiver warp (i * C + c) mod G of all G receiver warps (warp g of them
// here), so that receivers take the channels' rows in the order senders
// send them. A token's rows are summed in rank order (fp32), then bias0,
// then bias1, and stored as bf16. Rows that this rank sent itself never
// pass through the buffer: they are read from x (a copy into the local
// buffer would cost the senders 1/R of their time and the memory a write
// and a read). (Waiting once for the rows of several tokens was slower:
// the first token's sum then waits for the last token's rows.)
template <int kNumRanks, int kHiddenInt4, int kNumTopk>
__device__ __forceinline__ void combine_receive(const int4* __restrict__ x, const float* __restrict__ topk_weights,
                                                const int* __restrict__ send_pos,
                                                const int* __restrict__ recv_channel_offset, int num_tokens,
                                                int num_channels, const CombineItems& items, int g,
                                                int num_receiver_warps, char* local, const NvlLayout& lay,
                                                int rank, int seq, const int4* __restrict__ bias0,
                                                const int4* __restrict__ bias1, int4* out, float* out_weights,
                                                int* err, long long timeout_ns) {
    static_assert(kNumRanks <= kWarpSize, "a lane per rank");
    constexpr long long kRowBytes = kHiddenInt4 * 16ll;
    const int lane = threadIdx.x % kWarpSize;
    const int spc = static_cast<int>(lay.slots_per_channel);
    const int max_tokens = static_cast<int>(lay.max_tokens);
    const int per_channel = (num_tokens + num_channels - 1) / num_channels;  // as channel_range
    const int num_positions = per_channel * num_channels;
    const int* flags = at<int>(local, lay.combine_flags);
    // Position q: token i = q / C of channel c = q % C; -1 past a channel's end.
    auto token_of = [&](int q) {
        const int c = q % num_channels, t = c * per_channel + q / num_channels;
        return q < num_positions && t < num_tokens ? t : -1;
    };
    // Lane r < R finds rank r's row of token tt, a token ahead of its use: a
    // row of x (r == rank) or of this buffer (r * max_tokens + slot), -1 for
    // none; and for r != rank the flag of the row's item (else -1).
    auto locate = [&](int tt, int& row, int& flag) {
        row = flag = -1;
        if (lane >= kNumRanks || tt < 0) return;
        const int s = send_pos[(long long)tt * kNumRanks + lane];
        if (s < 0) return;
        const int c = tt / per_channel, n = s - c * spc;
        if (lane == rank) {
            row = recv_channel_offset[rank * num_channels + c] + n;
        } else {
            row = lane * max_tokens + s;
            flag = lane * kCombineFlags + c * items.per_channel + n / items.rows;
        }
    };
    int t = token_of(g), my_row, my_flag, seen = -1;  // seen: the last flag this lane saw set
    locate(t, my_row, my_flag);
    for (int q = g; q < num_positions; q += num_receiver_warps) {
        const int next_t = token_of(q + num_receiver_warps);
        int next_row, next_flag;
        locate(next_t, next_row, next_flag);
        if (t >= 0) {
            // Lane r waits for rank r's item; the warp barrier then extends
            // each lane's acquire to the whole warp before anyone reads rows.
            bool failed = false;
            if (my_flag >= 0 && my_flag != seen) {
                failed = wait_at_least(flags + my_flag, seq, timeout_ns, err, kPhaseCombineRecv, lane,
                                       t / per_channel) < 0;
                seen = my_flag;
            }
            __syncwarp();
            if (__any_sync(0xffffffffu, failed)) return;
            int row[kNumRanks];
            const int4* rows[kNumRanks];
#pragma unroll
            for (int r = 0; r < kNumRanks; ++r) {
                row[r] = __shfl_sync(0xffffffffu, my_row, r);
                rows[r] = row[r] < 0 ? nullptr
                          : r == rank ? x + (long long)row[r] * kHiddenInt4
                                      : at<int4>(local, lay.rows + (long long)row[r] * kRowBytes);
            }
            const long long row_off = (long long)t * kHiddenInt4;
            warp_sum_rows<kHiddenInt4, kNumRanks>(out + row_off, rows, bias0 != nullptr ? bias0 + row_off : nullptr,
                                                  bias1 != nullptr ? bias1 + row_off : nullptr, lane);
            if (lane < kNumTopk) {
                float w = 0.f;
#pragma unroll
                for (int r = 0; r < kNumRanks; ++r)
                    if (row[r] >= 0)
                        w += r == rank ? topk_weights[(long long)row[r] * kNumTopk + lane]
                                       : at<float>(local, lay.topk_weights)[(long long)row[r] * kNumTopk + lane];
                out_weights[(long long)t * kNumTopk + lane] = w;
            }
        }
        t = next_t;
        my_row = next_row;
        my_flag = next_flag;
    }
}

// Grid: num_senders blocks that send (combine_send), then blocks that reduce
// (combine_receive): any split of any grid, whatever the dispatch's channel
// count, so that senders, which store over NVLink, can get more SMs than
// receivers. scratch: [0] blocks done, [1] the senders' ticket; zero
// between calls.
template <int kNumRanks, int kHiddenInt4, int kNumTopk>
__global__ void __launch_bounds__(1024, 1)
combine(const int4* __restrict__ x, const float* __restrict__ topk_weights,
        const int* __restrict__ send_pos, const int* __restrict__ recv_channel_offset,
        int num_tokens, int num_channels, int num_senders, int chunk_rows, char* const* peers,
        const NvlLayout* layout, int rank, const int4* __restrict__ bias0, const int4* __restrict__ bias1,
        int4* out, float* out_weights, int* counters, int* scratch, int* err, long long timeout_ns,
        long long call_tag) {
    const NvlLayout lay = *layout;
    const KernelBarrier<kNumRanks> barrier(counters, scratch, peers, lay, rank, call_tag, err);
    const CombineItems items(lay, chunk_rows);
    const int num_warps = blockDim.x / kWarpSize;
    const int block = static_cast<int>(blockIdx.x);
    if (block < num_senders) {
        if (kNumRanks > 1 && barrier.wait(peers, lay, rank, err, timeout_ns))
            combine_send<kNumRanks, kHiddenInt4, kNumTopk>(x, topk_weights, recv_channel_offset, num_channels,
                                                           items, peers, lay, rank, barrier.seq, scratch + 1);
    } else {
        combine_receive<kNumRanks, kHiddenInt4, kNumTopk>(
            x, topk_weights, send_pos, recv_channel_offset, num_tokens, num_channels, items,
            (block - num_senders) * num_warps + static_cast<int>(threadIdx.x) / kWarpSize,
            (static_cast<int>(gridDim.x) - num_senders) * num_warps, peers[rank], lay, rank, barrier.seq, bias0,
            bias1, out, out_weights, err, timeout_ns);
    }
    // Every block took its last ticket before it got here.
    if (barrier.finish() && threadIdx.x == 0) scratch[1] = 0;
}

}  // namespace cupyep
