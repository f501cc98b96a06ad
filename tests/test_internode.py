"""Inter-node specifics on two emulated nodes (the shared normal cases run in
test_normal.py on both topologies): per-node layout counts, group-limited
routing, the RDMA memory shared with low-latency calls, bad node sizes."""
import numpy as np
import pytest

import cupyep

from conftest import INTERNODE_RANKS_PER_NODE, RANK, SIZE
from helpers import bits, expected_dispatch, gather, random_rows, random_topk, to_backend, to_host

P = INTERNODE_RANKS_PER_NODE


def _one_node_topk(rng, t, experts_per_rank, k):
    """Top-k ids whose experts all sit on one (random) node per token."""
    per_node = experts_per_rank * P
    node = rng.integers(0, 2, size=t)
    picks = np.stack([rng.choice(per_node, size=k, replace=False) for _ in range(t)])
    return (node[:, None] * per_node + picks).astype(np.int64)


def test_tokens_per_node(internode_buffer, backend, rng):
    num_experts = 4 * SIZE
    idx = random_topk(rng, 70, num_experts, 4, drop=0.2)
    lay = internode_buffer.get_dispatch_layout(to_backend(idx, backend), num_experts)
    node_of = np.where(idx >= 0, idx // (num_experts // SIZE) // P, -1)
    want = [int((node_of == n).any(axis=1).sum()) for n in range(2)]
    assert [int(v) for v in to_host(lay.num_tokens_per_node)] == want


def test_group_limited_routing(internode_group, backend, rng):
    """A layout that breaks max_nodes_per_token is refused on every rank; the
    buffer then runs routing that keeps to the limit."""
    if backend == "gpu" and not cupyep.gpu_available():
        pytest.skip("GPU backend unavailable")
    with pytest.raises(cupyep.InvalidInputError, match="max_nodes_per_token"):
        cupyep.Buffer(internode_group, backend="reference", max_nodes_per_token=3)
    nbytes = cupyep.nvl_size_hint(512, 64, SIZE, 4)
    rdma = cupyep.rdma_size_hint(512, 64, SIZE, P, 4)
    buf = cupyep.Buffer(internode_group, num_nvl_bytes=nbytes, num_rdma_bytes=rdma, backend=backend,
                        max_nodes_per_token=1)
    try:
        num_experts = 4 * SIZE
        x = random_rows(rng, 64, 512)
        both = np.zeros((64, 2), np.int64)
        both[:, 1] = num_experts - 1  # node 0 and node 1
        with pytest.raises(cupyep.InvalidInputError, match="max_nodes_per_token"):
            lay = buf.get_dispatch_layout(to_backend(both, backend), num_experts)
            buf.dispatch(to_backend(x, backend), to_backend(both, backend), layout=lay)
        idx = _one_node_topk(rng, 64, 4, 4)
        res = buf.dispatch(to_backend(x, backend), to_backend(idx, backend), num_experts=num_experts)
        rows, ids, _, _ = expected_dispatch(gather(x, idx, np.ones(idx.shape, np.float32)), num_experts)
        assert (bits(to_host(res.recv_x)) == bits(rows)).all()
        assert (to_host(res.recv_topk_idx) == ids).all()
    finally:
        buf.destroy()


def test_rdma_memory_switch_needs_clean(internode_buffer, backend, rng):
    """Inter-node normal calls and low-latency calls share num_rdma_bytes."""
    if backend != "gpu":
        pytest.skip("the reference backend keeps no device state")
    num_experts = 4 * SIZE
    x = random_rows(rng, 32, 1024)
    idx = random_topk(rng, 32, num_experts, 4)
    xb, ib = to_backend(x, backend), to_backend(idx, backend)
    internode_buffer.dispatch(xb, ib, num_experts=num_experts)
    with pytest.raises(cupyep.InvalidInputError, match="clean_low_latency_buffer"):
        internode_buffer.low_latency_dispatch(xb, ib, 32, num_experts, use_fp8=False)
    internode_buffer.clean_low_latency_buffer()
    ll = internode_buffer.low_latency_dispatch(xb, ib, 32, num_experts, use_fp8=False)
    w = to_backend(np.ones(idx.shape, np.float32), backend)
    internode_buffer.low_latency_combine(ll.recv_x, ib, w, ll.handle)
    with pytest.raises(cupyep.InvalidInputError, match="clean_low_latency_buffer"):
        internode_buffer.dispatch(xb, ib, num_experts=num_experts)
    internode_buffer.clean_low_latency_buffer()
    d = internode_buffer.dispatch(xb, ib, num_experts=num_experts)
    rows, _, _, _ = expected_dispatch(gather(x, idx, np.ones(idx.shape, np.float32)), num_experts)
    assert (bits(to_host(d.recv_x)) == bits(rows)).all()


def test_rdma_buffer_too_small(internode_group, backend, rng):
    if backend != "gpu":
        pytest.skip("the reference backend has no buffers")
    buf = cupyep.Buffer(internode_group, num_nvl_bytes=cupyep.nvl_size_hint(256, 64, SIZE, 2),
                        num_rdma_bytes=64 << 10, backend=backend)
    try:
        x = random_rows(rng, 64, 256)
        idx = random_topk(rng, 64, 4 * SIZE, 2)
        need = cupyep.rdma_size_hint(256, 64, SIZE, P, 2)
        if need <= 64 << 10:
            pytest.skip("the small buffer is large enough at this size")
        with pytest.raises(cupyep.BufferTooSmallError, match="rdma_size_hint"):
            buf.dispatch(to_backend(x, backend), to_backend(idx, backend), num_experts=4 * SIZE)
    finally:
        buf.destroy()


def test_rank_order_and_source_index(internode_buffer, backend, rng):
    """Rows arrive by source rank, then token, whatever node they crossed from."""
    num_experts = 2 * SIZE
    t = 40 + 7 * RANK  # ranks send different numbers of tokens
    x = random_rows(rng, t, 768)
    idx = random_topk(rng, t, num_experts, 2)
    res = internode_buffer.dispatch(to_backend(x, backend), to_backend(idx, backend), num_experts=num_experts)
    rows, _, _, src = expected_dispatch(gather(x, idx, np.ones(idx.shape, np.float32)), num_experts)
    assert (bits(to_host(res.recv_x)) == bits(rows)).all()
    assert (to_host(res.handle.recv_src_idx) == src).all()
