"""An mpi4py-shaped communicator over a torch.distributed process group.

cupyep talks to its ranks through a few mpi4py calls: rank and size, barrier,
broadcast of the NVSHMEM unique id, small all-to-alls and reductions of
Python values, the host-local split, and (reference backend only) all-to-all-v
of bytes. ``TorchComm`` provides exactly those over torch.distributed, so a
:class:`cupyep.Group` can start from the process group a torch program already
has (gloo or NCCL; NCCL moves bytes through the current CUDA device).
"""
from __future__ import annotations

import socket

import numpy as np

from cupyep.errors import InvalidInputError


class TorchComm:
    """The subset of ``mpi4py.MPI.Comm`` that cupyep uses, over a torch group.

    Args:
        group: a ``torch.distributed.ProcessGroup`` (None: the default group).
    """

    def __init__(self, group=None):
        import torch
        import torch.distributed as dist
        if not dist.is_available() or not dist.is_initialized():
            raise InvalidInputError("torch.distributed is not initialised: call init_process_group first")
        self._dist = dist
        self.group = group
        backend = str(dist.get_backend(group)).lower()
        self._device = (torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend
                        else torch.device("cpu"))
        self._rank = dist.get_rank(group)
        self._size = dist.get_world_size(group)

    # ---- mpi4py names ------------------------------------------------------ #
    def Get_rank(self) -> int:
        return self._rank

    def Get_size(self) -> int:
        return self._size

    def Barrier(self) -> None:
        self._dist.barrier(group=self.group)

    def _global(self, rank: int) -> int:
        return rank if self.group is None else self._dist.get_global_rank(self.group, rank)

    def bcast(self, obj, root: int = 0):
        box = [obj]
        self._dist.broadcast_object_list(box, src=self._global(root), group=self.group)
        return box[0]

    def Bcast(self, buf, root: int = 0) -> None:
        """Broadcast a NumPy buffer in place."""
        arr = np.asarray(buf)
        data = self.bcast(arr.tobytes() if self._rank == root else None, root)
        arr.reshape(-1).view(np.uint8)[:] = np.frombuffer(data, np.uint8)

    def allgather(self, obj) -> list:
        out = [None] * self._size
        self._dist.all_gather_object(out, obj, group=self.group)
        return out

    def alltoall(self, objs) -> list:
        """objs[j] goes to rank j; returns what every rank sent here."""
        if len(objs) != self._size:
            raise InvalidInputError(f"alltoall needs {self._size} items, got {len(objs)}")
        gathered = self.allgather(list(objs))
        return [gathered[j][self._rank] for j in range(self._size)]

    def allreduce(self, value, op=None):
        values = self.allgather(value)
        name = _op_name(op)
        if name == "land":
            return all(values)
        if name == "lor":
            return any(values)
        if name == "max":
            return max(values)
        if name == "min":
            return min(values)
        total = values[0]
        for v in values[1:]:
            total = total + v
        return total

    def Alltoallv(self, send, recv) -> None:
        """Bytes all-to-all-v: ``[buf, (counts, displs), MPI.BYTE]`` on both sides."""
        import torch
        sbuf, (scounts, sdispls) = np.asarray(send[0]), send[1]
        rbuf, (rcounts, rdispls) = np.asarray(recv[0]), recv[1]
        sbytes, rbytes = sbuf.reshape(-1).view(np.uint8), rbuf.reshape(-1).view(np.uint8)
        me = self._rank
        rbytes[rdispls[me]:rdispls[me] + rcounts[me]] = sbytes[sdispls[me]:sdispls[me] + scounts[me]]
        ops, outs = [], []
        for peer in range(self._size):
            if peer == me:
                continue
            if scounts[peer]:
                t = torch.from_numpy(sbytes[sdispls[peer]:sdispls[peer] + scounts[peer]].copy()).to(self._device)
                ops.append(self._dist.P2POp(self._dist.isend, t, self._global(peer), self.group))
            if rcounts[peer]:
                t = torch.empty(int(rcounts[peer]), dtype=torch.uint8, device=self._device)
                ops.append(self._dist.P2POp(self._dist.irecv, t, self._global(peer), self.group))
                outs.append((peer, t))
        if ops:
            for req in self._dist.batch_isend_irecv(ops):
                req.wait()
        for peer, t in outs:
            rbytes[rdispls[peer]:rdispls[peer] + rcounts[peer]] = t.cpu().numpy()

    # ---- what mpi4py's Split_type(COMM_TYPE_SHARED) gives ----------------- #
    def host_local(self):
        """(rank among the ranks on this host, number of ranks on this host)."""
        hosts = self.allgather(socket.gethostname())
        mine = [r for r, h in enumerate(hosts) if h == hosts[self._rank]]
        return mine.index(self._rank), len(mine)


def init_torch_distributed(comm, backend: str = "nccl", port_base: int = 29500) -> bool:
    """Start torch.distributed on the ranks of an mpi4py communicator.

    Rank 0 picks a port on 127.0.0.1 (one host) and broadcasts it; with NCCL the
    current CUDA device is bound. Returns False when it was already started.
    """
    import os

    import torch
    import torch.distributed as dist
    if dist.is_initialized():
        return False
    rank, size = comm.Get_rank(), comm.Get_size()
    port = comm.bcast(port_base + int(np.random.default_rng().integers(0, 1000)) if rank == 0 else None)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    kw = {"device_id": torch.device("cuda", torch.cuda.current_device())} if backend == "nccl" else {}
    dist.init_process_group(backend, rank=rank, world_size=size, **kw)
    return True


def _op_name(op) -> str:
    if op is None:
        return "sum"
    if isinstance(op, str):
        return op.lower()
    try:
        from mpi4py import MPI
    except ImportError:
        return "sum"
    for mpi_op, name in ((MPI.LAND, "land"), (MPI.LOR, "lor"), (MPI.MAX, "max"), (MPI.MIN, "min")):
        if op == mpi_op:
            return name
    return "sum"
