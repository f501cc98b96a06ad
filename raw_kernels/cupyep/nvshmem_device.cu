// Definitions of nvshmem_device.cuh's wrappers. Compiled on its own to LTO IR,
// with NVSHMEM's headers (cupyep/jit prepends them), then linked into each
// NVSHMEM kernel, where link-time optimisation inlines the wrappers.
extern "C" {

__device__ void cupyep_nvshmem_quiet() { nvshmem_quiet(); }

__device__ void cupyep_nvshmem_fence() { nvshmem_fence(); }

__device__ void cupyep_nvshmem_putmem_nbi_warp(void* dst, const void* src, unsigned long long bytes, int pe) {
    nvshmemx_putmem_nbi_warp(dst, src, bytes, pe);
}

__device__ void cupyep_nvshmem_signal_set(unsigned long long* sig, unsigned long long value, int pe) {
    nvshmemx_signal_op(reinterpret_cast<uint64_t*>(sig), static_cast<uint64_t>(value), NVSHMEM_SIGNAL_SET, pe);
}

__device__ unsigned long long cupyep_nvshmem_signal_wait_ge(unsigned long long* sig, unsigned long long value) {
    return nvshmem_signal_wait_until(reinterpret_cast<uint64_t*>(sig), NVSHMEM_CMP_GE, static_cast<uint64_t>(value));
}

}  // extern "C"
