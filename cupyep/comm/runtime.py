"""GPU side of a Group: device choice, NVSHMEM, symmetric memory, streams.

NVSHMEM starts with the unique-id method: rank 0 draws the id and the group's
communicator broadcasts it, which works under any MPI (and torch.distributed).
"""
from __future__ import annotations

import os

import numpy as np

from cupyep.comm.group import SHARE_GPUS_ENV
from cupyep.errors import BufferTooSmallError, CupyepError

# NVLink multicast stays off unless the user explicitly turns it on.
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

_DEFAULT_HEAP = 2 << 30
# Device memory a rank takes beside its symmetric heap (CUDA context, NVSHMEM's
# own state, CuPy's and torch's pools at start).
_CONTEXT_RESERVE = 1 << 30

# NVSHMEM is one per process: Groups over the same ranks (an mpi4py
# communicator and a torch.distributed group, say) share it. Counts its users.
_nvshmem_users = 0


def heap_problem(ranks_per_gpu: int, heap_bytes: int, gpu_bytes: int, device_id: int = 0):
    """Why ``ranks_per_gpu`` symmetric heaps of ``heap_bytes`` cannot share a
    GPU of ``gpu_bytes``, or None when they fit (with a context reserve each)."""
    need = ranks_per_gpu * (heap_bytes + _CONTEXT_RESERVE)
    if not heap_bytes or need <= gpu_bytes:
        return None
    return (f"{ranks_per_gpu} rank(s) on GPU {device_id} would each need a {heap_bytes / 2**30:.2f} GiB "
            f"symmetric heap (NVSHMEM_SYMMETRIC_SIZE, from the buffers' num_nvl_bytes + num_rdma_bytes) "
            f"plus ~{_CONTEXT_RESERVE / 2**30:.0f} GiB of context: {need / 2**30:.1f} GiB, more than the "
            f"GPU's {gpu_bytes / 2**30:.1f} GiB; use smaller buffers or fewer ranks per GPU")


class SymmetricBuffer:
    """One symmetric allocation and its NVLink-mapped peer addresses.

    Attributes:
        ptr: local device address.
        nbytes: size in bytes.
        peer_ptrs: [R] addresses of every rank's copy as mapped here (0 where
            a peer is not reachable over NVLink or P2P).
        peers: the same as a device uint64 array, for kernels.
    """

    def __init__(self, runtime, nbytes: int):
        import cupy
        import nvshmem.core as nvshmem
        self._nvshmem = nvshmem
        try:
            self._buf = nvshmem.buffer(nbytes)
        except Exception as e:
            raise BufferTooSmallError(
                f"NVSHMEM could not allocate {nbytes} symmetric bytes ({e}); raise "
                f"NVSHMEM_SYMMETRIC_SIZE (now {os.environ.get('NVSHMEM_SYMMETRIC_SIZE', 'default')}) "
                "before the first GPU Buffer is created") from None
        self.nbytes = nbytes
        self.ptr = int(self._buf.handle)
        self.peer_ptrs = []
        for pe in range(runtime.size):
            try:
                self.peer_ptrs.append(int(nvshmem.get_peer_buffer(self._buf, pe).handle))
            except Exception:
                self.peer_ptrs.append(0)
        self.peers = cupy.asarray(np.array(self.peer_ptrs, np.uint64))
        cupy.cuda.runtime.memset(self.ptr, 0, nbytes)

    def free(self):
        if self._buf is not None:
            self._nvshmem.free(self._buf)
            self._buf = None


class GpuRuntime:
    """Device and NVSHMEM state of a :class:`cupyep.Group`."""

    def __init__(self, group, heap_bytes: int = 0):
        import cupy
        self.group = group
        self.rank, self.size = group.rank, group.size
        ndev = cupy.cuda.runtime.getDeviceCount()
        if group.local_size > ndev and not group.share_gpus:
            raise CupyepError(
                f"{group.local_size} ranks share this host but it has {ndev} GPUs; run one rank "
                f"per GPU, or opt in to several ranks per GPU for correctness tests with "
                f"{SHARE_GPUS_ENV}=1 or Group(share_gpus=True)")
        self.device_id = group.local_rank % ndev
        # Ranks of this host on this rank's GPU (local ranks are dealt round robin).
        self.ranks_per_gpu = len(range(self.device_id, group.local_size, ndev))
        cupy.cuda.Device(self.device_id).use()
        from cuda.core import Device
        self._cuda_device = Device(self.device_id)
        self._cuda_device.set_current()
        if heap_bytes and "NVSHMEM_SYMMETRIC_SIZE" not in os.environ:
            os.environ["NVSHMEM_SYMMETRIC_SIZE"] = str(max(heap_bytes, _DEFAULT_HEAP))
        self._check_memory()
        self._init_nvshmem()
        self._buffers = []

    def _check_memory(self):
        """Collective: refuse, on every rank, a symmetric heap that the ranks
        sharing a GPU cannot all have (NVSHMEM would fail or hang part-way)."""
        import cupy
        heap = 0 if _nvshmem_users else int(os.environ.get("NVSHMEM_SYMMETRIC_SIZE", _DEFAULT_HEAP))
        problem = heap_problem(self.ranks_per_gpu, heap, cupy.cuda.runtime.memGetInfo()[1], self.device_id)
        if not self.group.agree(problem is None):
            raise BufferTooSmallError(problem or "another rank's GPU cannot hold the requested "
                                      "symmetric heap (its error says how much)")

    def _init_nvshmem(self):
        global _nvshmem_users
        import nvshmem.core as nvshmem
        self._nvshmem = nvshmem
        sl = self.group.ib_service_level
        if sl is not None:
            running = os.environ.get("NVSHMEM_IB_SL")
            if _nvshmem_users and running != str(sl):
                raise CupyepError(f"NVSHMEM already runs here with NVSHMEM_IB_SL={running}; one process has "
                                  f"one InfiniBand service level (asked for {sl})")
            os.environ["NVSHMEM_IB_SL"] = str(sl)
        if _nvshmem_users:
            pe, npes = nvshmem.my_pe(), nvshmem.n_pes()
            if (pe, npes) != (self.rank, self.size):
                raise CupyepError(
                    f"NVSHMEM already runs here as PE {pe} of {npes}; a second Group must span the same "
                    f"ranks in the same order (this one is rank {self.rank} of {self.size})")
            _nvshmem_users += 1
            return
        comm = self.group.comm
        uid = nvshmem.get_unique_id(empty=self.rank != 0)
        raw = uid._data.view(np.int8)
        comm.Bcast(raw, root=0)
        nvshmem.init(device=self._cuda_device, uid=uid, rank=self.rank, nranks=self.size,
                     initializer_method="uid")
        _nvshmem_users += 1

    def alloc(self, nbytes: int) -> SymmetricBuffer:
        """Collective: every rank allocates the same size."""
        buf = SymmetricBuffer(self, nbytes)
        self._buffers.append(buf)
        return buf

    def free(self, buf: SymmetricBuffer):
        """Collective."""
        buf.free()
        if buf in self._buffers:
            self._buffers.remove(buf)

    def sync_barrier(self):
        """Device sync, then a host barrier: peers' earlier GPU work is done."""
        import cupy
        cupy.cuda.Device().synchronize()
        self.group.comm.Barrier()

    def destroy(self):
        """Collective: frees this runtime's buffers; the last user finalizes NVSHMEM."""
        global _nvshmem_users
        import cupy
        cupy.cuda.Device().synchronize()
        for b in list(self._buffers):
            b.free()
        self._buffers.clear()
        self.group.comm.Barrier()
        _nvshmem_users -= 1
        if _nvshmem_users == 0:
            self._nvshmem.finalize()


def mapped_host_ints(n: int):
    """Pinned, mapped host int32 array the GPU writes directly.

    Returns:
        (numpy view [n] int32, device address, owner to keep alive). Under
        unified addressing the device address equals the host address.
    """
    import ctypes

    import cupy
    flags = cupy.cuda.runtime.hostAllocMapped | cupy.cuda.runtime.hostAllocPortable
    mem = cupy.cuda.PinnedMemory(4 * n, flags)
    host = np.ctypeslib.as_array((ctypes.c_int32 * n).from_address(mem.ptr))
    host[:] = 0
    return host, mem.ptr, mem


def card_label(group) -> str:
    """'4 x NVIDIA H200' for benchmark titles; when ranks share GPUs, says so
    loudly: ranks on one GPU are not NVLink peers, so the figures are not
    comparable with one rank per GPU."""
    import cupy
    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
    ndev = cupy.cuda.runtime.getDeviceCount()
    if group.local_size <= ndev:
        return f"{group.size} x {name}"
    gpus = ndev * group.num_nodes if group.num_nodes > 1 else ndev
    return (f"{group.size} ranks SHARING {gpus} x {name} -- WARNING: several ranks per GPU "
            "(CUPYEP_SHARE_GPUS): these figures are NOT comparable with one rank per GPU")
