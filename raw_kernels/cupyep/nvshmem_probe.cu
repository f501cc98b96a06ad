// Smallest kernel on the NVSHMEM-linked path: put a block of ints into a
// peer's symmetric array, then set the peer's signal; wait for our own.
// Used by the runtime test to prove device-side NVSHMEM works end to end.
namespace cupyep {

__global__ void put_signal_probe(int* dst, const int* src, int num_ints, unsigned long long* signal,
                                 int peer, unsigned long long value) {
    if (threadIdx.x < 32)
        cupyep_nvshmem_putmem_nbi_warp(dst, src, sizeof(int) * num_ints, peer);
    __syncthreads();
    if (threadIdx.x == 0) {
        // The fence orders the put before the signal at the peer.
        cupyep_nvshmem_fence();
        cupyep_nvshmem_signal_set(signal, value, peer);
        cupyep_nvshmem_signal_wait_ge(signal, value);
    }
}

}  // namespace cupyep
