"""A Group started from a torch.distributed process group (gloo here).

The same calls over the torch group and over MPI must give identical results:
the reference backend moves its rows with the group's all-to-all-v.
"""
import numpy as np
import pytest

import cupyep
from cupyep.formats import fp8

from conftest import RANK, SIZE
from helpers import bits, random_rows, random_topk

torch = pytest.importorskip("torch", reason="torch is not installed")
dist = pytest.importorskip("torch.distributed", reason="torch.distributed is not available")


def test_group_from_torch_matches_mpi(torch_world, group):
    g = cupyep.Group(torch_world)
    try:
        assert (g.rank, g.size) == (RANK, SIZE)
        assert (g.local_rank, g.local_size) == (group.local_rank, group.local_size)
        assert g.agree(True) and not g.agree(RANK != 0)
        uid = np.arange(16, dtype=np.int8) if RANK == 0 else np.zeros(16, np.int8)
        g.comm.Bcast(uid, root=0)
        assert (uid == np.arange(16)).all()
        assert g.comm.alltoall([RANK * 100 + j for j in range(SIZE)]) == [j * 100 + RANK for j in range(SIZE)]
    finally:
        g.destroy()


def test_reference_backend_over_torch_group(torch_world, group, rng):
    """Dispatch, combine and low-latency calls give bit-identical results over both groups."""
    tg = cupyep.Group(torch_world)
    num_experts, h = 4 * SIZE, 256
    x = random_rows(rng, 24, h)
    idx = random_topk(rng, 24, num_experts, 4, drop=0.1)
    w = rng.random(idx.shape).astype(np.float32)
    outs = []
    try:
        for g in (group, tg):
            buf = cupyep.Buffer(g, num_nvl_bytes=cupyep.nvl_size_hint(x.shape[1], 24, SIZE, 4),
                                num_rdma_bytes=cupyep.low_latency_size_hint(32, x.shape[1], SIZE, num_experts),
                                backend="reference")
            d = buf.dispatch(x, idx, w, num_experts=num_experts)
            c = buf.combine(d.recv_x, d.handle, d.recv_topk_weights)
            ll = buf.low_latency_dispatch(x, idx, 32, num_experts, use_fp8=True)
            outs.append((d.recv_x, d.recv_topk_idx, c.combined_x, c.combined_topk_weights,
                         ll.recv_x, ll.recv_x_scales, ll.recv_count))
            buf.destroy()
    finally:
        tg.destroy()
    for a, b in zip(*outs):
        assert a.shape == b.shape and (bits(np.asarray(a)) == bits(np.asarray(b))).all()
    assert outs[0][0].dtype == fp8.bfloat16 and outs[0][0].shape[0] > 0
