// Smallest kernel on the NVSHMEM-linked path: put a block of ints into a
// peer's symmetric array, then set the peer's signal; wait for our own.
// Used by the runtime test to prove device-side NVSHMEM works end to end.
namespace cupyep {

__global__ void put_signal_probe(int* dst, const int* src, int num_ints, unsigned long long* signal,
                                 int peer, unsigned long long value) {
    if (threadIdx.x < 32)
        nvshmemx_putmem_nbi_warp(dst, src, sizeof(int) * num_ints, peer);
    __syncthreads();
    if (threadIdx.x == 0) {
        // The fence orders the put before the signal at the peer.
        nvshmem_fence();
        nvshmemx_signal_op(reinterpret_cast<uint64_t*>(signal), value, NVSHMEM_SIGNAL_SET, peer);
        nvshmem_signal_wait_until(reinterpret_cast<uint64_t*>(signal), NVSHMEM_CMP_GE, value);
    }
}

}  // namespace cupyep
