// Kernels that measure the machine, not cupyep: the ceiling of 16-byte
// stores from SMs into every peer's memory at once; a spin that keeps the
// stream busy while the host queues the calls being timed.
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

// One thread waits ns nanoseconds: calls queued behind it then run back to
// back, so CUDA events time the GPU and not the host's launch rate.
__global__ void spin_ns(long long ns) {
    const unsigned long long start = global_timer_ns();
    while (global_timer_ns() - start < (unsigned long long)ns) {
    }
}

}  // namespace cupyep
