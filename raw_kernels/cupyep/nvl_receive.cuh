// The receiving half of normal dispatch, shared by the intranode and the
// inter-node kernels: rows that arrived in this rank's NVLink buffer are
// copied to the outputs in (source rank, slot) order.
#pragma once

#include "cupyep/common.cuh"
#include "cupyep/nvl_layout.cuh"

namespace cupyep {

// Worst-token mode: the output rows past the received count (the total of
// recv_channel_offset, [R * C + 1]) get source -1, top-k ids -1 and weights
// 0, spread over every thread of the grid (this saves three fill kernels).
// recv_src_idx is null in a cached dispatch (the handle has the sources).
template <int kNumRanks, int kNumTopk>
__device__ __forceinline__ void fill_unused_rows(const int* __restrict__ recv_channel_offset, int num_channels,
                                                 int num_recv_capacity, long long* recv_topk_idx,
                                                 float* recv_topk_weights, int* recv_src_idx) {
    if (kNumTopk == 0 && recv_src_idx == nullptr) return;
    for (int row = recv_channel_offset[kNumRanks * num_channels] + blockIdx.x * blockDim.x + threadIdx.x;
         row < num_recv_capacity; row += gridDim.x * blockDim.x) {
        if (recv_src_idx != nullptr) recv_src_idx[row] = -1;
#pragma unroll
        for (int k = 0; k < kNumTopk; ++k) {
            recv_topk_idx[(long long)row * kNumTopk + k] = -1;
            recv_topk_weights[(long long)row * kNumTopk + k] = 0.f;
        }
    }
}

// One block receives channel c from every source rank but skip_source (-1:
// none; intranode dispatch copies a rank's rows for itself from x, so they
// are not in the buffer).
// Region s of the buffer holds source s's rows; the writer of region s (the
// source itself inside a node, its forwarder across nodes) publishes how
// many rows of (s, c) are complete in dispatch_tail[s][c] with a release
// store. Warps split over sources (several per source when there are more
// warps than sources). Received top-k ids become local ids (-1 elsewhere,
// weight 0).
template <int kNumRanks, int kHiddenInt4, int kNumScales, int kNumTopk>
__device__ __forceinline__ void receive_channel(
        const NvlLayout& lay, char* local, int c, int num_channels, int skip_source,
        const int* __restrict__ recv_channel_offset, int first_local_expert, int num_local_experts,
        int num_recv_capacity, int4* recv_x, float* recv_x_scales, long long* recv_topk_idx,
        float* recv_topk_weights, int* recv_src_idx, int* err, long long timeout_ns) {
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int num_warps = blockDim.x / kWarpSize;
    const int slot_base = c * static_cast<int>(lay.slots_per_channel);
    constexpr long long kRowBytes = kHiddenInt4 * 16ll;
    const int num_sources = skip_source >= 0 ? kNumRanks - 1 : kNumRanks;
    const WarpGroups wg(warp, num_warps, max(num_sources, 1));  // groups over sources
    bool failed = false;
    for (int i = wg.group; wg.group < wg.num_groups && i < num_sources && !failed; i += wg.num_groups) {
        const int s = skip_source >= 0 && i >= skip_source ? i + 1 : i;
        const int first = recv_channel_offset[s * num_channels + c];
        const int count = recv_channel_offset[s * num_channels + c + 1] - first;
        int* tail = at<int>(local, lay.dispatch_tail) + s * kMaxChannels + c;
        int seen = 0;
        for (int n = wg.sub; n < count; n += wg.size) {
            if (seen <= n) {
                int v = 0;
                if (lane == 0) v = wait_at_least(tail, n + 1, timeout_ns, err, kPhaseDispatchRecv, s, c);
                seen = __shfl_sync(0xffffffffu, v, 0);
                if (seen < 0) {
                    failed = true;
                    break;
                }
            }
            const long long out = first + n;
            if (out >= num_recv_capacity) {
                if (lane == 0) report_error(err, kErrTooManyRows, kPhaseDispatchRecv, s, c, running_call(err));
                failed = true;
                break;
            }
            const long long row = (long long)s * lay.max_tokens + slot_base + n;
            const RowMeta<kNumScales, kNumTopk> meta = RowMeta<kNumScales, kNumTopk>::load_slot(local, lay, row, lane);
            warp_copy_coherent<kHiddenInt4>(recv_x + out * kHiddenInt4,
                                            at<int4>(local, lay.rows + row * kRowBytes), lane);
            meta.store_output(out, first_local_expert, num_local_experts, recv_x_scales, recv_topk_idx,
                              recv_topk_weights, recv_src_idx, lane);
        }
    }
    // Every row of (s, c) has been read: reset the tails for the next call.
    // Writers store them again only after the next barrier.
    __syncthreads();
    for (int s = threadIdx.x; s < kNumRanks; s += blockDim.x)
        at<int>(local, lay.dispatch_tail)[s * kMaxChannels + c] = 0;
}

}  // namespace cupyep
