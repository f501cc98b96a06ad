// Kernels that measure the machine, not cupyep: the ceiling of 16-byte
// stores from SMs into every peer's memory at once; the per-SM rate of the
// combine receiver's row sums; a spin that keeps the stream busy while the
// host queues the calls being timed.
#include "cupyep/common.cuh"

namespace cupyep {

// Blocks are dealt round-robin to the kNumRanks - 1 peers; each peer gets
// num_int4 words from this rank, written into its buffer at
// offset + rank * num_int4 * 16, as an all-to-all would.
template <int kNumRanks>
__global__ void store_to_peers(char* const* peers, int rank, long long offset, const int4* src,
                               long long num_int4) {
    const int p = blockIdx.x % (kNumRanks - 1);
    const int blocks_per_peer = gridDim.x / (kNumRanks - 1);
    const int b = blockIdx.x / (kNumRanks - 1);
    if (b >= blocks_per_peer) return;
    int4* dst = reinterpret_cast<int4*>(peers[(rank + 1 + p) % kNumRanks] + offset) +
                (long long)rank * num_int4;
    for (long long i = (long long)b * blockDim.x + threadIdx.x; i < num_int4;
         i += (long long)blocks_per_peer * blockDim.x)
        st_na(dst + i, ld_nc(src + i));
}

// The combine receiver's inner loop alone (warp_sum_rows), on one GPU: a warp
// per token sums the kNumRows rows rows_of_token[t] names, taken from a pool
// larger than L2, so the rate per block is what one SM reaches on rows in
// DRAM. kPrefetch 1: lane r first asks for the token's row r in L2
// (prefetch_l2); 2: for the warp's next token's rows instead; 0: neither.
template <int kHiddenInt4, int kNumRows, int kPrefetch>
__global__ void __launch_bounds__(1024, 1)
row_sum_probe(const int4* pool, const int* rows_of_token, int num_tokens, int4* out) {
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int stride = gridDim.x * (blockDim.x / kWarpSize);
    auto row = [&](int t, int r) { return pool + (long long)rows_of_token[t * kNumRows + r] * kHiddenInt4; };
    for (int t = blockIdx.x * (blockDim.x / kWarpSize) + warp; t < num_tokens; t += stride) {
        const int4* rows[kNumRows];
#pragma unroll
        for (int r = 0; r < kNumRows; ++r) rows[r] = row(t, r);
        if (kPrefetch == 1 && lane < kNumRows) prefetch_l2(row(t, lane), kHiddenInt4 * 16);
        if (kPrefetch == 2 && lane < kNumRows && t + stride < num_tokens)
            prefetch_l2(row(t + stride, lane), kHiddenInt4 * 16);
        warp_sum_rows<kHiddenInt4, kNumRows>(out + (long long)t * kHiddenInt4, rows, nullptr, nullptr, lane);
    }
}

// One thread waits ns nanoseconds: calls queued behind it then run back to
// back, so CUDA events time the GPU and not the host's launch rate.
__global__ void spin_ns(long long ns) {
    const unsigned long long start = global_timer_ns();
    while (global_timer_ns() - start < (unsigned long long)ns) {
    }
}

}  // namespace cupyep
