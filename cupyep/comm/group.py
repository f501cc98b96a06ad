"""Process group: ranks, node layout, GPU choice and NVSHMEM lifetime.

Created from an mpi4py communicator (default ``COMM_WORLD``) or from a
torch.distributed process group (through :class:`cupyep.comm.torch_comm.TorchComm`).
The GPU side (device, NVSHMEM) starts only when a GPU buffer first asks for
it, so the reference backend needs no GPU.
"""
from __future__ import annotations

import atexit
import os

from cupyep.errors import BackendUnavailableError, GroupDestroyedError, InvalidInputError


def _as_comm(comm):
    """An mpi4py communicator, or a TorchComm for a torch.distributed group."""
    if comm is None:
        from mpi4py import MPI
        return MPI.COMM_WORLD
    module = type(comm).__module__
    if module.startswith("mpi4py") or type(comm).__name__ == "TorchComm":
        return comm
    if module.startswith("torch"):
        from cupyep.comm.torch_comm import TorchComm
        return TorchComm(comm)
    raise InvalidInputError(f"expected an mpi4py communicator or a torch.distributed group, got {type(comm)}")


class Group:
    """The ranks taking part in expert parallelism.

    Args:
        comm: mpi4py communicator, a torch.distributed ProcessGroup, or None
            for ``MPI.COMM_WORLD``.
        num_ranks_per_node: ranks in one NVLink domain. Default: the ranks
            sharing this host. A smaller value makes one host act as several
            nodes (4 GPUs as 2 x 2) to exercise the inter-node path.
        ib_service_level: InfiniBand service level (0-15) of this process's
            NVSHMEM traffic (sets NVSHMEM_IB_SL before NVSHMEM starts). Give
            normal-kernel and low-latency jobs different levels, mapped to
            different virtual lanes by the fabric, to isolate their traffic;
            NVSHMEM keeps one level per process.
        share_gpus: let more ranks than GPUs run on a host, several ranks
            per GPU (default: the ``CUPYEP_SHARE_GPUS`` environment variable,
            else False: one rank per GPU is required). For correctness tests
            on a machine with fewer GPUs than ranks: ranks on one GPU are
            not NVLink peers, so timings taken this way mean nothing.

    Attributes:
        rank, size, local_rank, local_size, num_ranks_per_node, num_nodes,
        share_gpus.
    """

    def __init__(self, comm=None, num_ranks_per_node: int | None = None,
                 ib_service_level: int | None = None, share_gpus: bool | None = None):
        if ib_service_level is not None and not 0 <= int(ib_service_level) <= 15:
            raise InvalidInputError(f"ib_service_level must be in [0, 15], got {ib_service_level}")
        self.ib_service_level = ib_service_level
        self.comm = _as_comm(comm)
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.local_rank, self.local_size = self._host_local()
        sizes = set(self.comm.allgather(self.local_size))
        if len(sizes) > 1:
            raise InvalidInputError(
                f"hosts run different numbers of ranks ({sorted(sizes)}): every node must have the "
                "same number of ranks")
        rpn = self.local_size if num_ranks_per_node is None else int(num_ranks_per_node)
        if rpn <= 0 or self.size % rpn:
            raise InvalidInputError(
                f"num_ranks_per_node={rpn} must divide the number of ranks ({self.size})")
        if rpn > self.local_size:
            raise InvalidInputError(
                f"num_ranks_per_node={rpn} is larger than the {self.local_size} ranks on this host")
        self.num_ranks_per_node = rpn
        self.num_nodes = self.size // rpn
        self.share_gpus = share_gpus_requested() if share_gpus is None else bool(share_gpus)
        self._gpu = None
        self._destroyed = False
        atexit.register(self.destroy)

    def _host_local(self):
        if hasattr(self.comm, "host_local"):
            return self.comm.host_local()
        from mpi4py import MPI
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        try:
            return local.Get_rank(), local.Get_size()
        finally:
            local.Free()

    @property
    def node(self) -> int:
        return self.rank // self.num_ranks_per_node

    @property
    def nvl_rank(self) -> int:
        """Index of this rank inside its NVLink domain."""
        return self.rank % self.num_ranks_per_node

    def check_alive(self):
        if self._destroyed:
            raise GroupDestroyedError("this cupyep Group was destroyed")

    def barrier(self):
        """Host barrier over all ranks."""
        self.check_alive()
        self.comm.Barrier()

    def agree(self, ok: bool) -> bool:
        """True only when every rank passes ``ok`` (a collective)."""
        from mpi4py import MPI
        return bool(self.comm.allreduce(bool(ok), op=MPI.LAND))

    # ---- GPU side -------------------------------------------------------- #
    def gpu_runtime(self, heap_bytes: int = 0):
        """The GPU runtime of this group (device, NVSHMEM), started on first use.

        Args:
            heap_bytes: symmetric heap the first caller needs (sets
                NVSHMEM_SYMMETRIC_SIZE unless the environment already does).
        """
        self.check_alive()
        if self._gpu is None:
            from cupyep.comm.runtime import GpuRuntime
            self._gpu = GpuRuntime(self, heap_bytes)
        return self._gpu

    def destroy(self):
        """Free symmetric memory and finalize NVSHMEM. Idempotent; collective."""
        if self._destroyed:
            return
        self._destroyed = True
        atexit.unregister(self.destroy)
        if self._gpu is not None:
            self._gpu.destroy()
            self._gpu = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.destroy()
        return False


SHARE_GPUS_ENV = "CUPYEP_SHARE_GPUS"


def share_gpus_requested() -> bool:
    """True when ``CUPYEP_SHARE_GPUS`` asks for several ranks per GPU."""
    return os.environ.get(SHARE_GPUS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def gpu_available() -> bool:
    """True when CuPy, a CUDA device and nvshmem4py are all usable."""
    if os.environ.get("CUPYEP_BACKEND", "").lower() == "reference":
        return False
    try:
        import cupy
        import nvshmem.core  # noqa: F401
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def require_gpu():
    if not gpu_available():
        raise BackendUnavailableError(
            "the GPU backend needs cupy, nvshmem4py and a CUDA device; install "
            "cupyep[gpu] on a GPU machine or use backend='reference'")
