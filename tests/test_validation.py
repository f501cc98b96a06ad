"""Bad input raises InvalidInputError before any work, and the buffer stays usable."""
import numpy as np
import pytest

import cupyep
from cupyep.formats import fp8

from conftest import SIZE
from helpers import random_rows, random_topk, to_backend, to_host


@pytest.fixture
def good(rng):
    num_experts = 4 * SIZE
    x = random_rows(rng, 16, 256)
    idx = random_topk(rng, 16, num_experts, 2)
    w = rng.random(idx.shape).astype(np.float32)
    return x, idx, w, num_experts


def _dispatch(buffer, backend, x, idx, w, num_experts):
    return buffer.dispatch(to_backend(x, backend), to_backend(idx, backend),
                           to_backend(w, backend), num_experts=num_experts)


def test_wrong_dtype(buffer, backend, good):
    x, idx, w, e = good
    with pytest.raises(cupyep.InvalidInputError, match="bfloat16"):
        _dispatch(buffer, backend, x.astype(np.float32), idx, w, e)


def test_shape_mismatch(buffer, backend, good):
    x, idx, w, e = good
    with pytest.raises(cupyep.InvalidInputError, match="rows"):
        _dispatch(buffer, backend, x, idx[:-1], w[:-1], e)
    with pytest.raises(cupyep.InvalidInputError, match="topk_weights shape"):
        _dispatch(buffer, backend, x, idx, w[:, :1].copy(), e)


def test_non_contiguous(buffer, backend, good):
    x, idx, w, e = good
    wide = np.concatenate([x, x], axis=1)
    with pytest.raises(cupyep.InvalidInputError, match="contiguous"):
        buffer.dispatch(to_backend(wide, backend)[:, ::2], to_backend(idx, backend), num_experts=e)


def test_expert_out_of_range(buffer, backend, good):
    x, idx, w, e = good
    bad = idx.copy()
    bad[0, 0] = e
    # The GPU backend checks on the device and raises at dispatch, on every rank.
    for value in (e, -2):
        bad[0, 0] = value
        with pytest.raises(cupyep.InvalidInputError, match="outside"):
            lay = buffer.get_dispatch_layout(to_backend(bad, backend), e)
            buffer.dispatch(to_backend(x, backend), to_backend(bad, backend), layout=lay)
    _dispatch(buffer, backend, x, idx, w, e)  # still usable


def test_experts_not_divisible(buffer, backend, good):
    x, idx, w, e = good
    with pytest.raises(cupyep.InvalidInputError, match="multiple"):
        buffer.get_dispatch_layout(to_backend(idx, backend), SIZE * 4 + (1 if SIZE > 1 else -5))


def test_unsupported_hidden(buffer, backend, good, rng):
    x, idx, w, e = good
    with pytest.raises(cupyep.InvalidInputError, match="multiples of 128"):
        _dispatch(buffer, backend, random_rows(rng, 16, 200), idx, w, e)


def test_handle_from_other_buffer(group, buffer, backend, good):
    x, idx, w, e = good
    d = _dispatch(buffer, backend, x, idx, w, e)
    other = cupyep.Buffer(group, backend="reference")
    with pytest.raises(cupyep.InvalidInputError, match="another buffer"):
        other.combine(to_backend(np.zeros((1, 256), fp8.bfloat16), "reference"), d.handle)
    other.destroy()
    # the buffer that raised nothing is still usable, and so after a rejected call
    with pytest.raises(cupyep.InvalidInputError):
        buffer.combine(d.recv_x[:0], d.handle)
    out = buffer.combine(d.recv_x, d.handle)
    assert out.combined_x.shape == x.shape


def test_low_latency_too_many_tokens(buffer, backend, good):
    x, idx, w, e = good
    with pytest.raises(cupyep.InvalidInputError, match="exceed"):
        buffer.low_latency_dispatch(to_backend(x, backend), to_backend(idx, backend), 8, e)


def test_low_latency_layout_limits():
    """Limits of the message format: a row slot is 16 bits, flags sit in fixed places."""
    from cupyep.layouts.low_latency import LL_MAX_EXPERTS, LL_MAX_TOKENS, check_low_latency_fits
    big = 1 << 50
    lay = check_low_latency_fits(big, LL_MAX_TOKENS, 512, 2, 2 * SIZE)
    assert lay.total_bytes <= big
    with pytest.raises(cupyep.InvalidInputError, match=f"at most {LL_MAX_TOKENS} tokens per rank"):
        check_low_latency_fits(big, LL_MAX_TOKENS + 1, 512, 2, 2 * SIZE)
    with pytest.raises(cupyep.InvalidInputError, match=f"at most {LL_MAX_EXPERTS} experts"):
        check_low_latency_fits(big, 16, 512, 2, LL_MAX_EXPERTS + 2)


def test_low_latency_bad_arguments(buffer, backend, good, rng):
    """Each is rejected before launch; the buffer keeps working afterwards."""
    x, idx, w, e = good
    t = x.shape[0]
    xb, ib = to_backend(x, backend), to_backend(idx, backend)
    wide = to_backend(np.zeros((t, 17), np.int64), backend)
    with pytest.raises(cupyep.InvalidInputError, match="at most 16"):
        buffer.low_latency_dispatch(xb, wide, t, e)
    with pytest.raises(cupyep.InvalidInputError, match="cumulative_local_expert_recv_stats"):
        buffer.low_latency_dispatch(xb, ib, t, e,
                                    cumulative_local_expert_recv_stats=to_backend(np.zeros(3, np.int64), backend))
    with pytest.raises(cupyep.InvalidInputError, match="transport"):
        buffer.set_low_latency_transport("carrier-pigeon")
    if backend == "gpu":
        with pytest.raises(cupyep.BufferTooSmallError, match="low_latency_size_hint"):
            buffer.low_latency_dispatch(xb, ib, 1 << 16, e)
    res = buffer.low_latency_dispatch(xb, ib, t, e, use_fp8=False)
    with pytest.raises(cupyep.InvalidInputError, match="x must be bf16"):
        buffer.low_latency_combine(res.recv_x[:1], ib, to_backend(w, backend), res.handle)
    with pytest.raises(cupyep.InvalidInputError, match="out"):
        buffer.low_latency_combine(res.recv_x, ib, to_backend(w, backend), res.handle,
                                   out=to_backend(np.zeros((t + 1, x.shape[1]), x.dtype), backend))
    out = buffer.low_latency_combine(res.recv_x, ib, to_backend(w, backend), res.handle)
    assert tuple(out.combined_x.shape) == x.shape


def test_low_latency_expert_out_of_range(buffer, backend, good):
    """An id outside [-1, E) is never followed out of bounds: the reference
    raises at once; the GPU drops the entry (no host synchronisation) and the
    first call after the kernel has run raises. Both name the value."""
    x, idx, w, e = good
    t = x.shape[0]
    xb, ib, wb = to_backend(x, backend), to_backend(idx, backend), to_backend(w, backend)
    for value in (e, -2, 1 << 40):
        bad = idx.copy()
        bad[3, 1] = value
        bb = to_backend(bad, backend)
        with pytest.raises(cupyep.InvalidInputError, match=rf"expert id {value}\b.*outside"):
            res = buffer.low_latency_dispatch(xb, bb, t, e, use_fp8=False)
            if backend == "gpu":  # the report is there once the kernel has run
                import cupy
                cupy.cuda.Device().synchronize()
            buffer.low_latency_combine(res.recv_x, bb, wb, res.handle)
    res = buffer.low_latency_dispatch(xb, ib, t, e, use_fp8=False)
    out = buffer.low_latency_combine(res.recv_x, ib, wb, res.handle)
    assert tuple(out.combined_x.shape) == x.shape


def test_low_latency_stale_zero_copy_view(buffer, backend, good):
    """A send-buffer view taken before another low-latency call is refused."""
    if backend != "gpu":
        pytest.skip("zero-copy views exist on the GPU backend only")
    x, idx, w, e = good
    t = x.shape[0]
    xb, ib, wb = to_backend(x, backend), to_backend(idx, backend), to_backend(w, backend)
    first = buffer.low_latency_dispatch(xb, ib, t, e, use_fp8=False)
    stale = buffer.get_next_low_latency_combine_buffer(first.handle)
    second = buffer.low_latency_dispatch(xb, ib, t, e, use_fp8=False)  # takes stale's half
    with pytest.raises(cupyep.InvalidInputError, match="get_next_low_latency_combine_buffer"):
        buffer.low_latency_combine(stale, ib, wb, second.handle)
    out = buffer.low_latency_combine(second.recv_x, ib, wb, second.handle)
    assert tuple(out.combined_x.shape) == x.shape


def test_bad_arguments_of_every_normal_call(buffer, backend, good):
    """dispatch, cached dispatch and combine reject bad arguments before any
    launch; the buffer then still gives correct results."""
    x, idx, w, e = good
    xb, ib, wb = to_backend(x, backend), to_backend(idx, backend), to_backend(w, backend)
    bad_calls = {
        "expert_alignment": lambda: buffer.dispatch(xb, ib, wb, num_experts=e, expert_alignment=0),
        "num_worst_tokens": lambda: buffer.dispatch(xb, ib, wb, num_experts=e, num_worst_tokens=-1),
        "needs topk_idx": lambda: buffer.dispatch(xb, None, wb, num_experts=e),
        "needs topk_idx, layout": lambda: buffer.dispatch(xb),
        "layout= or num_experts=": lambda: buffer.dispatch(xb, ib, wb),
        "pair": lambda: buffer.dispatch((xb,), ib, wb, num_experts=e),
    }
    for what, call in bad_calls.items():
        with pytest.raises(cupyep.InvalidInputError, match=what):
            call()
    d = buffer.dispatch(xb, ib, wb, num_experts=e)
    n = d.recv_x.shape[0]
    with pytest.raises(cupyep.InvalidInputError, match="cached dispatch"):
        buffer.dispatch(to_backend(x[:-1].copy(), backend), handle=d.handle)
    with pytest.raises(cupyep.InvalidInputError, match="topk_weights"):
        buffer.combine(d.recv_x, d.handle, to_backend(np.zeros((n, 1), np.float32), backend))
    with pytest.raises(cupyep.InvalidInputError, match="at most two bias"):
        buffer.combine(d.recv_x, d.handle, bias=(xb, xb, xb))
    with pytest.raises(cupyep.InvalidInputError, match="bias"):
        buffer.combine(d.recv_x, d.handle, bias=to_backend(x[:-1].copy(), backend))
    if backend == "gpu":  # more blocks than SMs could wait for blocks that never run
        with pytest.raises(cupyep.InvalidInputError, match="SMs"):
            buffer.combine(d.recv_x, d.handle, config=cupyep.Config(num_sms=1000))
    c = buffer.combine(d.recv_x, d.handle, d.recv_topk_weights)
    got_w = to_host(c.combined_topk_weights)
    assert np.allclose(got_w, np.where(idx >= 0, w, 0), rtol=1e-6), "weights summed back"


def test_bad_arguments_of_low_latency_calls(group, buffer, backend, good):
    x, idx, w, e = good
    t = x.shape[0]
    xb, ib, wb = to_backend(x, backend), to_backend(idx, backend), to_backend(w, backend)
    with pytest.raises(cupyep.InvalidInputError, match="use_ue8m0"):
        buffer.low_latency_dispatch(xb, ib, t, e, use_fp8=False, use_ue8m0=True)
    res = buffer.low_latency_dispatch(xb, ib, t, e, use_fp8=False)
    with pytest.raises(cupyep.InvalidInputError, match="K="):
        buffer.low_latency_combine(res.recv_x, ib[:, :1].copy(), wb[:, :1].copy(), res.handle)
    with pytest.raises(cupyep.InvalidInputError, match="needs topk_weights"):
        buffer.low_latency_combine(res.recv_x, ib, None, res.handle)
    other = cupyep.Buffer(group, backend="reference")
    with pytest.raises(cupyep.InvalidInputError, match="another buffer"):
        other.get_next_low_latency_combine_buffer(res.handle)
    other.destroy()
    out = buffer.low_latency_combine(res.recv_x, ib, wb, res.handle)
    assert tuple(out.combined_x.shape) == x.shape


def test_bad_config():
    with pytest.raises(cupyep.InvalidInputError, match="even"):
        cupyep.Config(num_sms=7)
    with pytest.raises(cupyep.InvalidInputError, match="own_rows_receiver_share"):
        cupyep.Config(own_rows_receiver_share=1.5)
    with pytest.raises(cupyep.InvalidInputError, match="num_combine_senders"):
        cupyep.Config(num_sms=8, num_combine_senders=8)
    with pytest.raises(cupyep.InvalidInputError, match="num_combine_senders"):
        cupyep.Config(num_combine_senders=0)
    with pytest.raises(cupyep.InvalidInputError, match="combine_chunk_rows"):
        cupyep.Config(combine_chunk_rows=0)


def test_bad_node_size(group):
    with pytest.raises(cupyep.InvalidInputError, match="divide|larger"):
        cupyep.Group(group.comm, num_ranks_per_node=SIZE + 1)


def test_destroyed_buffer(group):
    b = cupyep.Buffer(group, backend="reference")
    b.destroy()
    with pytest.raises(cupyep.GroupDestroyedError):
        b.get_dispatch_layout(np.zeros((1, 1), np.int64), SIZE)


def test_size_hint_is_enough_for_every_channel_count():
    from cupyep.layouts import sizing
    for ranks in (2, 3, 8):
        for tokens in (1, 255, 256, 4096):
            nbytes = cupyep.nvl_size_hint(1024, tokens, ranks, 4)
            t_max = sizing.max_tokens_for(nbytes, ranks, 1024, 4)
            for channels in range(1, sizing.MAX_CHANNELS):
                assert t_max // channels >= -(-tokens // channels)


def test_combine_flags_never_share_bytes_with_data():
    """Combine's flags live in the control region: no layout's data (any
    hidden, top-k, buffer size) overlaps them, so none reads as a set flag."""
    from cupyep.layouts import sizing
    for ranks in (2, 3, 8):
        for hidden, topk in ((256, 1), (2560, 4), (7168, 8)):
            for tokens in (1, 4096, 70000):
                lay = sizing.nvl_layout(ranks, hidden, topk, tokens)
                assert lay.combine_tail + 4 * ranks * sizing.MAX_CHANNELS <= lay.combine_flags
                assert lay.combine_flags + 4 * ranks * sizing.COMBINE_FLAGS <= lay.rows
                assert lay.rows == sizing.control_bytes(ranks)


def test_default_combine_split_leaves_both_roles_a_block():
    from cupyep.config import combine_senders
    for ranks in (2, 3, 4, 8):
        for sms in range(2, 128, 2):
            senders = combine_senders(cupyep.Config(num_sms=sms), ranks)
            assert 1 <= senders < sms
    assert combine_senders(cupyep.Config(num_sms=24), 1) == 0  # nothing to send
    assert combine_senders(cupyep.Config(num_sms=24, num_combine_senders=5), 4) == 5


def test_mask_calls_reject_bad_arguments(buffer, backend):
    with pytest.raises(cupyep.InvalidInputError, match="rank_to_mask"):
        buffer.low_latency_update_mask_buffer(SIZE, True)
    with pytest.raises(cupyep.InvalidInputError, match="rank_to_mask"):
        buffer.low_latency_update_mask_buffer(-1, True)
    with pytest.raises(cupyep.InvalidInputError, match="mask_status"):
        buffer.low_latency_query_mask_buffer(to_backend(np.zeros(SIZE + 1, np.int32), backend))
    status = to_backend(np.full(SIZE, 7, np.int32), backend)
    assert not buffer.low_latency_query_mask_buffer(status).any()
    assert not to_host(status).any()  # filled in place


def low_latency_combine_args(buffer, backend, rng, hidden):
    """(x, topk_idx, topk_weights, handle) of a small low-latency combine."""
    x = random_rows(rng, 4, hidden)
    idx = random_topk(rng, 4, 2 * SIZE, 2)
    w = np.ones(idx.shape, np.float32)
    d = buffer.low_latency_dispatch(to_backend(x, backend), to_backend(idx, backend), 8, 2 * SIZE, use_fp8=False)
    y = to_backend(np.zeros((2, SIZE * 8, hidden), fp8.bfloat16), backend)
    return y, to_backend(idx, backend), to_backend(w, backend), d.handle


def test_logfmt_needs_hidden_divisible_by_256(buffer, backend, rng):
    args = low_latency_combine_args(buffer, backend, rng, 640)
    with pytest.raises(cupyep.InvalidInputError, match="use_logfmt"):
        buffer.low_latency_combine(*args, use_logfmt=True)
    buffer.low_latency_combine(*args)  # still usable


def test_combine_wait_stats_must_be_int64_per_rank(buffer, backend, rng):
    args = low_latency_combine_args(buffer, backend, rng, 512)
    with pytest.raises(cupyep.InvalidInputError, match="combine_wait_recv_cost_stats"):
        buffer.low_latency_combine(*args, combine_wait_recv_cost_stats=to_backend(np.zeros(SIZE, np.int32), backend))
    buffer.low_latency_combine(*args)  # still usable


def test_bad_ib_service_level(group):
    with pytest.raises(cupyep.InvalidInputError, match="ib_service_level"):
        cupyep.Group(group.comm, ib_service_level=16)


def test_mixed_topology_is_refused(group, monkeypatch):
    """Hosts with different numbers of ranks cannot form equal nodes: every rank raises."""
    if SIZE < 2:
        pytest.skip("needs two ranks")
    from conftest import RANK
    monkeypatch.setattr(cupyep.Group, "_host_local", lambda self: (0, 1 if RANK == 0 else 2))
    with pytest.raises(cupyep.InvalidInputError, match="different numbers of ranks"):
        cupyep.Group(group.comm)


def test_share_gpus_opt_in(monkeypatch):
    """Several ranks per GPU only when asked: the environment or Group(share_gpus=)."""
    from cupyep.comm.group import share_gpus_requested
    monkeypatch.delenv("CUPYEP_SHARE_GPUS", raising=False)
    assert not share_gpus_requested()
    assert not cupyep.Group().share_gpus
    for on in ("1", "true", "YES"):
        monkeypatch.setenv("CUPYEP_SHARE_GPUS", on)
        assert share_gpus_requested() and cupyep.Group().share_gpus
    monkeypatch.setenv("CUPYEP_SHARE_GPUS", "0")
    assert not cupyep.Group().share_gpus
    assert cupyep.Group(share_gpus=True).share_gpus


def test_heap_too_large_for_ranks_sharing_a_gpu():
    """Ranks sharing a GPU whose heaps cannot all fit: the message names the per-rank size."""
    from cupyep.comm.runtime import heap_problem
    gib = 1 << 30
    assert heap_problem(4, 2 * gib, 140 * gib) is None
    assert heap_problem(1, 0, 1) is None  # NVSHMEM already running: nothing new to place
    msg = heap_problem(4, 40 * gib, 140 * gib, device_id=0)
    assert "4 rank(s) on GPU 0" in msg and "40.00 GiB symmetric heap" in msg and "164.0 GiB" in msg


def test_reference_buffers_are_sized_as_on_the_gpu(group, rng):
    """Sizes the GPU backend would refuse are refused on the CPU too, with the
    bytes needed; what fits still works on the same buffer."""
    e = 4 * SIZE
    x = random_rows(rng, 16, 256)
    idx = random_topk(rng, 16, e, 2)
    for nvl in (0, 1024):
        b = cupyep.Buffer(group, num_nvl_bytes=nvl, backend="reference")
        with pytest.raises(cupyep.BufferTooSmallError, match=r"num_nvl_bytes >= \d+ \(cupyep.nvl_size_hint\)"):
            b.dispatch(x, idx, num_experts=e)
        with pytest.raises(cupyep.InvalidInputError, match="no low-latency memory"):
            b.low_latency_dispatch(x, idx, 16, e)
        b.destroy()
    small = cupyep.low_latency_size_hint(8, 256, SIZE, e)
    b = cupyep.Buffer(group, num_nvl_bytes=cupyep.nvl_size_hint(256, 16, SIZE, 2), num_rdma_bytes=small,
                      backend="reference")
    with pytest.raises(cupyep.BufferTooSmallError, match="low_latency_size_hint"):
        b.low_latency_dispatch(x, idx, 16, e)
    d = b.dispatch(x, idx, num_experts=e)  # the normal calls fit
    b.combine(d.recv_x, d.handle)
    b.low_latency_dispatch(x[:8], idx[:8], 8, e)
    b.destroy()


def test_misleading_inputs_get_clear_messages(buffer, backend, rng):
    e = 4 * SIZE
    x = random_rows(rng, 16, 256)
    idx = random_topk(rng, 16, e, 2)
    w = rng.random(idx.shape).astype(np.float32)
    xb, ib, wb = (to_backend(a, backend) for a in (x, idx, w))
    with pytest.raises(cupyep.InvalidInputError, match="got a list of 16"):
        buffer.dispatch([list(r) for r in x.astype(np.float32)], ib, num_experts=e)
    d = buffer.low_latency_dispatch(xb, ib, 16, e, use_fp8=False)
    with pytest.raises(cupyep.InvalidInputError, match="topk_idx has 8 rows but the dispatch that made the handle had 16"):
        buffer.low_latency_combine(d.recv_x, ib[:8].copy(), wb[:8].copy(), d.handle)
    buffer.low_latency_combine(d.recv_x, ib, wb, d.handle)  # still usable


def test_layout_from_another_topk_idx_is_refused(buffer, backend, rng):
    e = 4 * SIZE
    x = to_backend(random_rows(rng, 16, 256), backend)
    idx_a = to_backend(random_topk(rng, 16, e, 2), backend)
    idx_b = to_backend(random_topk(rng, 16, e, 2), backend)
    lay = buffer.get_dispatch_layout(idx_a, e)
    with pytest.raises(cupyep.InvalidInputError, match="computed from another topk_idx"):
        buffer.dispatch(x, idx_b, layout=lay)
    with pytest.raises(cupyep.InvalidInputError, match="computed for"):
        buffer.dispatch(x, idx_a, layout=lay, num_experts=2 * e)
    d = buffer.dispatch(x, idx_a, layout=lay)  # the right pairing works
    buffer.combine(d.recv_x, d.handle)


def _ll_inputs(rng, t=8, h=512, k=4, e=16):
    return random_rows(rng, t, h), random_topk(rng, t, e, k)


@pytest.mark.parametrize("case", ["good", "float32 x", "3-D x", "int16 ids", "1-D ids", "rows differ", "T > M",
                                  "M < 1", "K > 16", "K = 0", "hidden % 128", "experts % ranks", "no experts",
                                  "ue8m0 without fp8", "ue8m0 hidden % 512", "strided x", "strided ids", "no tokens"])
def test_low_latency_dispatch_check_fast_path_agrees(rng, case):
    """check_low_latency_dispatch's one-expression fast path passes exactly
    what its detailed checks pass: each bad case raises, the good ones return
    their (T, H, K)."""
    from cupyep import validation
    x, idx = _ll_inputs(rng)
    m, e, r, use_fp8, ue8m0 = 8, 16, 4, True, False
    if case == "float32 x":
        x = x.astype(np.float32)
    elif case == "3-D x":
        x = x.reshape(2, 4, 512)
    elif case == "int16 ids":
        idx = idx.astype(np.int16)
    elif case == "1-D ids":
        idx = idx.reshape(-1)
    elif case == "rows differ":
        idx = idx[:4]
    elif case == "T > M":
        m = 4
    elif case == "M < 1":
        x, idx, m = x[:0], idx[:0], 0
    elif case == "K > 16":
        idx = np.concatenate([idx] * 5, axis=1)
    elif case == "K = 0":
        idx = idx[:, :0]
    elif case == "hidden % 128":
        x = random_rows(rng, 8, 192)
    elif case == "experts % ranks":
        e = 18
    elif case == "no experts":
        e = 0
    elif case == "ue8m0 without fp8":
        use_fp8, ue8m0 = False, True
    elif case == "ue8m0 hidden % 512":
        x, ue8m0 = random_rows(rng, 8, 384), True
    elif case == "strided x":
        x = random_rows(rng, 8, 1024)[:, ::2]
    elif case == "strided ids":
        idx = np.asfortranarray(idx)
    elif case == "no tokens":
        x, idx = x[:0], idx[:0]
    check = lambda: validation.check_low_latency_dispatch(x, idx, m, e, r, use_fp8, ue8m0, 16)  # noqa: E731
    if case in ("good", "no tokens"):
        assert check() == (x.shape[0], x.shape[1], idx.shape[1])  # (T, H, K)
    else:
        with pytest.raises(cupyep.InvalidInputError):
            check()


@pytest.mark.parametrize("case", ["good", "no weights", "x shape", "x dtype", "strided x", "ids rows", "ids K",
                                  "weights shape", "weights dtype", "int16 ids", "strided weights"])
def test_low_latency_combine_check_fast_path_agrees(rng, case):
    from cupyep import validation
    want, t, k = (4, 32, 256), 8, 4
    x = random_rows(rng, 4 * 32, 256).reshape(want)
    idx = random_topk(rng, t, 16, k)
    w = rng.random(idx.shape).astype(np.float32)
    if case == "no weights":
        w = None
    elif case == "x shape":
        x = x[:2]
    elif case == "x dtype":
        x = x.astype(np.float32)
    elif case == "strided x":
        x = random_rows(rng, 4 * 32, 512).reshape(4, 32, 512)[:, :, ::2]
    elif case == "ids rows":
        idx, w = idx[:4], w[:4]
    elif case == "ids K":
        idx, w = idx[:, :2], w[:, :2]
    elif case == "weights shape":
        w = w[:, :2]
    elif case == "weights dtype":
        w = w.astype(np.float64)
    elif case == "int16 ids":
        idx = idx.astype(np.int16)
    elif case == "strided weights":
        w = np.asfortranarray(w)
    check = lambda: validation.check_low_latency_combine(x, idx, w, want, t, k)  # noqa: E731
    if case == "good":
        assert check() is None
    else:
        with pytest.raises(cupyep.InvalidInputError):
            check()
