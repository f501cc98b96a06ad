"""cupyep.deep_ep driven the way DeepEP V1 users drive deep_ep, checked against
cupyep's own API on the same inputs (results must be identical)."""
import numpy as np
import pytest

import cupyep

from conftest import SIZE
from helpers import bits, random_rows, random_topk, to_backend, to_host

torch = pytest.importorskip("torch", reason="the DeepEP facade is for torch users")
deep_ep = pytest.importorskip("cupyep.deep_ep")


def host(a):
    if isinstance(a, torch.Tensor):
        a = a.cpu()
        if a.dtype == torch.bfloat16:
            a = a.view(torch.int16)
        elif a.element_size() == 1 and a.dtype != torch.uint8:
            a = a.view(torch.uint8)
        return a.numpy()
    return to_host(a)


def same(a, b):
    a, b = host(a), host(b)
    return a.shape == b.shape and (bits(a) == bits(b)).all()


def same_rows(a, b, counts):
    """Equal in the rows each local expert received (the rest is undefined)."""
    a, b, counts = host(a), host(b), host(counts)
    return a.shape == b.shape and all((bits(a[e, :c]) == bits(b[e, :c])).all() for e, c in enumerate(counts))


def as_torch(a):
    return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if a.dtype.name == "bfloat16" else torch.from_numpy(a)


@pytest.fixture
def inputs(rng, backend):
    """(x, topk_idx, topk_weights) as torch tensors (on the GPU for the GPU
    backend), the same as NumPy arrays, and the expert count."""
    num_experts, h = 4 * SIZE, 512
    x = random_rows(rng, 40, h)
    idx = random_topk(rng, 40, num_experts, 4, drop=0.1)
    w = rng.random(idx.shape).astype(np.float32)
    dev = torch.device("cuda", torch.cuda.current_device()) if backend == "gpu" else torch.device("cpu")
    tensors = tuple(t.to(dev) for t in (as_torch(x), torch.from_numpy(idx), torch.from_numpy(w)))
    return tensors, tuple(to_backend(a, backend) for a in (x, idx, w)), num_experts


def test_normal_dispatch_combine_like_deepep(torch_world, buffer, backend, inputs):
    (x, topk_idx, topk_weights), arrays, num_experts = inputs
    native = buffer  # cupyep's own API on the same backend gives the expected results
    buffer = deep_ep.Buffer(torch_world, num_nvl_bytes=cupyep.nvl_size_hint(512, 40, SIZE, 4), backend=backend,
                            explicitly_destroy=True)
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, previous_event = \
        buffer.get_dispatch_layout(topk_idx, num_experts, previous_event=None, async_finish=False,
                                   allocate_on_comm_stream=False)
    assert num_tokens_per_rdma_rank is None and isinstance(num_tokens_per_rank, torch.Tensor)
    recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event = \
        buffer.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights,
                        num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
                        num_tokens_per_expert=num_tokens_per_expert, previous_event=previous_event,
                        async_finish=False, allocate_on_comm_stream=False)
    event.current_stream_wait()
    assert isinstance(recv_x, torch.Tensor) and recv_x.dtype == torch.bfloat16 and recv_x.device == x.device
    assert isinstance(num_recv_tokens_per_expert_list, list)
    combined_x, combined_topk_weights, event = buffer.combine(recv_x, handle, topk_weights=recv_topk_weights)
    cached_x, none_idx, none_w, none_counts, same_handle, _ = buffer.dispatch(x, handle=handle)
    assert none_idx is None and same_handle is handle

    d = native.dispatch(*arrays, num_experts=num_experts)
    c = native.combine(d.recv_x, d.handle, d.recv_topk_weights)
    assert same(recv_x, d.recv_x) and same(recv_topk_idx, d.recv_topk_idx) and same(cached_x, d.recv_x)
    assert same(recv_topk_weights, d.recv_topk_weights)
    assert num_recv_tokens_per_expert_list == list(d.num_recv_tokens_per_expert)
    assert same(combined_x, c.combined_x) and same(combined_topk_weights, c.combined_topk_weights)
    buffer.destroy()


def test_low_latency_like_deepep(torch_world, buffer, backend, inputs):
    (x, topk_idx, topk_weights), arrays, num_experts = inputs
    native = buffer
    m, h = 64, x.shape[1]
    num_rdma_bytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(m, h, SIZE, num_experts)
    buffer = deep_ep.Buffer(torch_world, 0, num_rdma_bytes, low_latency_mode=True,
                            num_qps_per_rank=num_experts // SIZE, backend=backend, explicitly_destroy=True)
    (recv_q, recv_s), recv_count, handle, event, hook = buffer.low_latency_dispatch(
        x, topk_idx, m, num_experts, use_fp8=True, async_finish=False, return_recv_hook=True)
    hook()
    recv_bf16, _, handle_bf16, _, _ = buffer.low_latency_dispatch(x, topk_idx, m, num_experts, use_fp8=False)
    # experts: identity on the bf16 rows, written straight into the send buffer
    buffer.get_next_low_latency_combine_buffer(handle_bf16)[...] = recv_bf16
    waits = torch.zeros(SIZE, dtype=torch.int64, device=x.device)
    combined_x, event, hook = buffer.low_latency_combine(recv_bf16, topk_idx, topk_weights, handle_bf16,
                                                         zero_copy=True, return_recv_hook=True,
                                                         combine_wait_recv_cost_stats=waits)
    hook()
    # rank masking, as DeepEP's shrink mode exposes it
    status = torch.ones(SIZE, dtype=torch.int32, device=x.device)
    buffer.low_latency_update_mask_buffer(SIZE - 1, True)
    buffer.low_latency_query_mask_buffer(status)
    assert status.tolist() == [int(r == SIZE - 1) for r in range(SIZE)]
    buffer.low_latency_clean_mask_buffer()
    buffer.low_latency_query_mask_buffer(status)
    assert not status.any()

    x_np, idx_np, w_np = arrays
    d = native.low_latency_dispatch(x_np, idx_np, m, num_experts, use_fp8=True)
    assert same(recv_count, d.recv_count)
    assert same_rows(recv_q, d.recv_x, recv_count) and same_rows(recv_s, d.recv_x_scales, recv_count)
    b = native.low_latency_dispatch(x_np, idx_np, m, num_experts, use_fp8=False)
    assert same_rows(recv_bf16, b.recv_x, recv_count)
    c = native.low_latency_combine(b.recv_x, idx_np, w_np, b.handle)
    assert same(combined_x, c.combined_x)
    buffer.destroy()


def test_static_helpers_and_config():
    assert deep_ep.topk_idx_t == torch.int64 and deep_ep.Buffer.is_sm90_compiled()
    assert deep_ep.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 288) == \
        cupyep.low_latency_size_hint(128, 7168, 8, 288)
    old = deep_ep.Buffer.num_sms
    deep_ep.Buffer.set_num_sms(24)
    assert deep_ep.Buffer.get_dispatch_config(SIZE).num_sms == 24
    assert deep_ep.Buffer.get_combine_config(SIZE).to_cupyep(SIZE).num_sms == 24
    with pytest.raises(cupyep.InvalidInputError):
        deep_ep.Buffer.set_num_sms(7)
    deep_ep.Buffer.set_num_sms(old)
    deep_ep.EventOverlap().current_stream_wait()  # a synchronous call's event: nothing to wait for


def test_handles_are_deepep_tuples(torch_world, buffer, backend, inputs):
    """Every element of the intranode and low-latency handle tuples, against
    values computed here from every rank's inputs (DeepEP's definitions) and
    against cupyep's own handle; mixing handles is refused."""
    from conftest import COMM, RANK
    from helpers import agree_all
    (x, topk_idx, topk_weights), arrays, num_experts = inputs
    facade = deep_ep.Buffer(torch_world, num_nvl_bytes=cupyep.nvl_size_hint(512, 40, SIZE, 4),
                            num_rdma_bytes=deep_ep.Buffer.get_low_latency_rdma_size_hint(64, 512, SIZE, num_experts),
                            low_latency_mode=True, backend=backend, explicitly_destroy=True)
    try:
        per_rank, _, per_expert, in_rank, _ = facade.get_dispatch_layout(topk_idx, num_experts)
        config = deep_ep.Config(8)
        recv_x, recv_idx, _, counts, handle, _ = facade.dispatch(
            x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
            topk_idx=topk_idx, topk_weights=topk_weights, config=config)
        plain_x, _, _, plain_counts, plain_handle, _ = facade.dispatch(
            x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
            config=config)  # no top-k: per-expert counts still come back, as in DeepEP
        native = buffer.dispatch(*arrays, num_experts=num_experts)
        lx, lcount, lhandle, _, _ = facade.low_latency_dispatch(x, topk_idx, 64, num_experts, use_fp8=False)
        everyone = COMM.allgather(host(in_rank).astype(bool))
        sends = np.array([[m[:, j].sum() for j in range(SIZE)] for m in everyone])
        c = 4  # channels of Config(8)

        def check():
            assert isinstance(handle, tuple) and len(handle) == 6 and isinstance(lhandle, tuple) and len(lhandle) == 5
            rank_prefix, channel_prefix, recv_channel_prefix, recv_src_idx, hin_rank, send_head = handle
            np.testing.assert_array_equal(host(rank_prefix), np.cumsum(sends, 0))
            mine = host(in_rank).astype(bool)
            per = -(-mine.shape[0] // c)
            want_chan = np.stack([np.cumsum([mine[k * per:(k + 1) * per, j].sum() for k in range(c)])
                                  for j in range(SIZE)])
            np.testing.assert_array_equal(host(channel_prefix), want_chan)
            starts = np.cumsum(sends[:, RANK]) - sends[:, RANK]
            theirs = [np.concatenate([[0], np.cumsum([m[k * per:(k + 1) * per, RANK].sum() for k in range(c)])[:-1]])
                      for m in everyone]
            np.testing.assert_array_equal(host(recv_channel_prefix), starts[:, None] + np.stack(theirs))
            np.testing.assert_array_equal(host(recv_src_idx), host(native.handle.recv_src_idx))
            np.testing.assert_array_equal(host(hin_rank), mine)
            np.testing.assert_array_equal(host(send_head), np.where(mine, np.cumsum(mine, 0) - 1, -1))
            assert host(rank_prefix)[-1, RANK] == recv_x.shape[0]
            assert counts == list(native.num_recv_tokens_per_expert) == plain_counts
            assert recv_idx.dtype == topk_idx.dtype and same(plain_x, recv_x)
            src_info, layout_range, m, hidden, e = lhandle
            assert (m, hidden, e) == (64, 512, num_experts)
            assert src_info is lhandle.cupyep_handle.src_info and layout_range is lhandle.cupyep_handle.layout_range
        agree_all(check)
        with pytest.raises(cupyep.InvalidInputError, match="handle tuple this facade's dispatch returned"):
            facade.combine(native.recv_x, native.handle)
        with pytest.raises(cupyep.InvalidInputError, match="expected a DispatchHandle"):
            buffer.combine(native.recv_x, handle)
        with pytest.raises(cupyep.InvalidInputError, match="another buffer"):
            facade.combine(recv_x, deep_ep.Handle(tuple(handle), native.handle, -1))
        out, _, _ = facade.combine(plain_x, plain_handle)  # the buffer still works
        assert out.shape == x.shape
        facade.low_latency_combine(lx, topk_idx, topk_weights, lhandle)
    finally:
        facade.destroy()


def test_destroy_needs_explicitly_destroy(torch_world, backend):
    """As in DeepEP: destroy() only for a buffer made with explicitly_destroy=True."""
    b = deep_ep.Buffer(torch_world, num_nvl_bytes=cupyep.nvl_size_hint(512, 8, SIZE, 2), backend=backend)
    with pytest.raises(cupyep.InvalidInputError, match="explicitly_destroy"):
        b.destroy()
    b._buffer.destroy()  # freed here rather than at exit (collective)
    b._group.destroy()
