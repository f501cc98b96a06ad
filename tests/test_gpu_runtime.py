"""GPU runtime: NVSHMEM device calls through the linked JIT path, symmetric memory."""
import numpy as np
import pytest

import cupyep
from cupyep.jit.specs import nvshmem_specs

from conftest import COMM, RANK, SIZE

pytestmark = pytest.mark.skipif(not cupyep.gpu_available(), reason="needs a GPU and nvshmem4py")


def test_nvshmem_put_and_signal(group, rng):
    import cupy
    from cupyep import jit
    rt = group.gpu_runtime()
    n = 1000
    dst = rt.alloc(4 * n)
    sig = rt.alloc(8)
    try:
        payload = rng.integers(0, 2 ** 31 - 1, n, dtype=np.int32)
        src = cupy.asarray(payload)
        cupy.cuda.runtime.memset(dst.ptr, 0xFF, 4 * n)  # poison
        rt.sync_barrier()
        peer = (RANK + 1) % SIZE
        jit.launch(nvshmem_specs()[0], (1,), (64,),
                   (np.uint64(dst.ptr), src, np.int32(n), np.uint64(sig.ptr), np.int32(peer),
                    np.uint64(7)))
        cupy.cuda.Device().synchronize()
        got = cupy.asnumpy(cupy.ndarray(n, np.int32, cupy.cuda.MemoryPointer(
            cupy.cuda.UnownedMemory(dst.ptr, 4 * n, dst), 0)))
        everyone = COMM.allgather(payload)
        assert (got == everyone[(RANK - 1) % SIZE]).all()
    finally:
        rt.sync_barrier()
        rt.free(dst)
        rt.free(sig)


def test_peer_pointers_cover_every_rank(group):
    rt = group.gpu_runtime()
    buf = rt.alloc(4096)
    try:
        assert len(buf.peer_ptrs) == SIZE and all(p != 0 for p in buf.peer_ptrs)
        assert buf.peer_ptrs[RANK] == buf.ptr
    finally:
        rt.free(buf)


def test_one_rank_per_gpu_unless_shared(group):
    """The default refuses more local ranks than GPUs and names the opt-in;
    CUPYEP_SHARE_GPUS=1 (this suite on a one-GPU machine) lets them share."""
    import cupy
    from cupyep.comm.runtime import GpuRuntime
    ndev = cupy.cuda.runtime.getDeviceCount()
    rt = group.gpu_runtime()
    assert rt.ranks_per_gpu == len(range(rt.device_id, group.local_size, ndev))
    if group.local_size <= ndev:
        pytest.skip("one rank per GPU here: the refusal needs more local ranks than GPUs")
    assert group.share_gpus
    strict = cupyep.Group(share_gpus=False)
    try:
        with pytest.raises(cupyep.CupyepError, match="CUPYEP_SHARE_GPUS=1 or Group\\(share_gpus=True\\)"):
            GpuRuntime(strict)
    finally:
        strict.destroy()
