// The NVSHMEM device calls cupyep's kernels make, as plain extern "C"
// functions. They are defined in nvshmem_device.cu, the only source that
// includes NVSHMEM's headers: it is compiled once per NVSHMEM version and
// architecture (parsing those headers is most of a cold NVRTC compile) and
// linked, with libnvshmem_device.a, into every NVSHMEM kernel. Link-time
// optimisation inlines each wrapper, so the machine code is that of calling
// NVSHMEM directly.
#pragma once

extern "C" {
// nvshmem_quiet: every put this thread issued is complete and visible.
__device__ void cupyep_nvshmem_quiet();
// nvshmem_fence: this thread's puts to a PE are delivered in order.
__device__ void cupyep_nvshmem_fence();
// nvshmemx_putmem_nbi_warp: the warp copies `bytes` from local `src` to the
// symmetric address `dst` on `pe`; completes at a quiet.
__device__ void cupyep_nvshmem_putmem_nbi_warp(void* dst, const void* src, unsigned long long bytes, int pe);
// nvshmemx_signal_op(sig, value, NVSHMEM_SIGNAL_SET, pe).
__device__ void cupyep_nvshmem_signal_set(unsigned long long* sig, unsigned long long value, int pe);
// nvshmem_signal_wait_until(sig, NVSHMEM_CMP_GE, value): the signal's value.
__device__ unsigned long long cupyep_nvshmem_signal_wait_ge(unsigned long long* sig, unsigned long long value);
}
