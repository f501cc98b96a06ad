"""Low-latency dispatch and combine against loop-computed expectations."""
import numpy as np
import pytest

from cupyep.formats import fp8

from conftest import COMM, RANK, SIZE
from helpers import (agree_all, assert_close_bf16, bits, capture_graph, gather, graph_inputs, random_rows,
                     random_topk, replay_and_check, to_backend, to_host)


def expert_scale(e):
    return np.float32((e % 7 + 1) * 0.25)


@pytest.fixture(params=["auto", "nvshmem"])
def transport(request, buffer, backend):
    """GPU calls run over NVLink stores and again with NVSHMEM puts forced."""
    if backend == "reference" and request.param != "auto":
        pytest.skip("the transport is a GPU setting")
    buffer.set_low_latency_transport(request.param)
    yield request.param
    buffer.set_low_latency_transport("auto")


def check_dispatch(res, everyone, m, h, local, use_fp8, round_scale, ue8m0):
    """Assert the received layout, rows and scales; return the expert outputs
    y [L, R*M, H] bf16 (each source row times a per-expert constant)."""
    got_count = to_host(res.recv_count)
    got_x = to_host(res.recv_x, fp8.float8_e4m3 if use_fp8 else None)
    assert got_x.shape == (local, SIZE * m, h)
    got_src = to_host(res.handle.src_info)
    got_range = to_host(res.handle.layout_range)
    got_s = to_host(res.recv_x_scales)
    if ue8m0:
        assert got_s.dtype == np.int32 and got_s.shape == (local, SIZE * m, h // 512)
        got_s = fp8.unpack_ue8m0(got_s.reshape(-1, h // 512)).reshape(local, SIZE * m, h // 128)
    y = np.zeros((local, SIZE * m, h), fp8.bfloat16)
    for e in range(local):
        row = 0
        for s, (xs, idx_s) in enumerate(everyone):
            toks = np.flatnonzero((idx_s == RANK * local + e).any(axis=1))
            assert got_range[e, s] == (row << 32) | len(toks), f"layout_range[{e},{s}]"
            assert (got_src[e, row:row + len(toks)] == toks).all(), f"src_info of expert {e} from {s}"
            if use_fp8:
                q, sc = fp8.per_token_cast_to_fp8(xs[toks], round_scale=round_scale or ue8m0)
                assert (bits(got_x[e, row:row + len(toks)]) == bits(q)).all(), f"e4m3 rows {e}/{s}"
                assert (got_s[e, row:row + len(toks)] == sc).all(), f"scales {e}/{s}"
            else:
                assert (bits(got_x[e, row:row + len(toks)]) == bits(xs[toks])).all(), f"rows {e}/{s}"
            y[e, row:row + len(toks)] = (xs[toks].astype(np.float32)
                                         * expert_scale(RANK * local + e)).astype(fp8.bfloat16)
            row += len(toks)
        assert got_count[e] == row, f"recv_count[{e}]"
        assert (got_src[e, row:] == -1).all(), f"src_info past the count of expert {e}"
    return y


def expected_combine(x, idx, w, scale_of=expert_scale):
    """out[t] = sum over valid k, in k order, of w[t,k] * bf16(x[t] * scale(e))."""
    t, h = x.shape
    acc = np.zeros((t, h), np.float32)
    for kk in range(idx.shape[1]):
        e = idx[:, kk]
        valid = e >= 0
        scale = np.array([scale_of(v) for v in np.where(valid, e, 0)], np.float32)
        ye = (x.astype(np.float32) * scale[:, None]).astype(fp8.bfloat16).astype(np.float32)
        acc = acc + np.where(valid, w[:, kk], 0).astype(np.float32)[:, None] * ye
    return acc


CASES = [  # (M, tokens, hidden, experts, topk, use_fp8, round_scale, ue8m0, drop)
    (128, 100, 2048, 4 * SIZE, 4, False, False, False, 0.1),
    (128, 128, 7168, 8 * SIZE, 8, True, False, False, 0.0),
    (1, 1, 5120, 2 * SIZE, 1, True, True, False, 0.0),
    (256, 200, 2048, 9 * SIZE, 9, True, True, True, 0.2),
    (32, 0, 2048, 4 * SIZE, 8, False, False, False, 0.0),
    (16, 16, 2048, 288, 8, True, False, False, 0.05),
    (8, 5, 2048, 8, 9, False, False, False, 0.0) if 8 % SIZE == 0 else (8, 5, 2048, 2 * SIZE, 9, False, False, False, 0.0),
    (64, 60, 2048, 8 * SIZE, 16, False, False, False, 0.0),  # the most top-k slots
    (1040, 1030, 512, 8 * SIZE, 8, True, False, False, 0.1),  # more entries than a block stages (8192)
]


@pytest.mark.parametrize("m,t,h,num_experts,k,use_fp8,round_scale,ue8m0,drop", CASES)
def test_low_latency(buffer, backend, transport, rng, m, t, h, num_experts, k, use_fp8, round_scale,
                     ue8m0, drop):
    local = num_experts // SIZE
    k = min(k, num_experts)
    x = random_rows(rng, t, h)
    idx = random_topk(rng, t, num_experts, k, drop=drop)
    w = rng.random(idx.shape).astype(np.float32)
    everyone = gather(x, idx)
    res = buffer.low_latency_dispatch(to_backend(x, backend), to_backend(idx, backend), m,
                                      num_experts, use_fp8=use_fp8, round_scale=round_scale,
                                      use_ue8m0=ue8m0)
    y = check_dispatch(res, everyone, m, h, local, use_fp8, round_scale, ue8m0)
    out = buffer.low_latency_combine(to_backend(y, backend), to_backend(idx, backend),
                                     to_backend(w, backend), res.handle)
    assert_close_bf16(to_host(out.combined_x), expected_combine(x, idx, w), "low-latency combined_x")


def test_low_latency_repeated_expert(buffer, backend, transport, rng):
    """A token that lists one expert twice receives it once and sums it twice."""
    m, h, num_experts = 16, 2048, 4 * SIZE
    x = random_rows(rng, 12, h)
    idx = random_topk(rng, 12, num_experts, 4)
    idx[::3, 2] = idx[::3, 0]
    w = rng.random(idx.shape).astype(np.float32)
    everyone = gather(x, idx)
    res = buffer.low_latency_dispatch(to_backend(x, backend), to_backend(idx, backend), m,
                                      num_experts, use_fp8=False)
    y = check_dispatch(res, everyone, m, h, num_experts // SIZE, False, False, False)
    out = buffer.low_latency_combine(to_backend(y, backend), to_backend(idx, backend),
                                     to_backend(w, backend), res.handle)
    assert_close_bf16(to_host(out.combined_x), expected_combine(x, idx, w), "combined_x")


def test_low_latency_hooks_zero_copy_out_and_stats(buffer, backend, transport, rng):
    """Send halves first, receive halves through the hooks; combine reads the
    send buffer in place and writes into ``out``; statistics accumulate."""
    m, h, num_experts, k = 64, 5120, 6 * SIZE, 8
    local = num_experts // SIZE
    stats = to_backend(np.zeros(local, np.int32), backend)
    dispatch_waits = to_backend(np.zeros(SIZE, np.int64), backend)
    combine_waits = to_backend(np.zeros(SIZE, np.int64), backend)
    for _ in range(2):
        x = random_rows(rng, m, h)
        idx = random_topk(rng, m, num_experts, k, drop=0.1)
        w = rng.random(idx.shape).astype(np.float32)
        everyone = gather(x, idx)
        res = buffer.low_latency_dispatch(to_backend(x, backend), to_backend(idx, backend), m,
                                          num_experts, use_fp8=True, return_recv_hook=True,
                                          cumulative_local_expert_recv_stats=stats,
                                          dispatch_wait_recv_cost_stats=dispatch_waits)
        assert res.hook is not None
        res.hook()
        y = check_dispatch(res, everyone, m, h, local, True, False, False)
        send_buf = buffer.get_next_low_latency_combine_buffer(res.handle)
        assert tuple(send_buf.shape) == (local, SIZE * m, h)
        send_buf[...] = to_backend(y, backend)
        out = to_backend(np.zeros((m, h), fp8.bfloat16), backend)
        comb = buffer.low_latency_combine(send_buf, to_backend(idx, backend), to_backend(w, backend),
                                          res.handle, out=out, return_recv_hook=True,
                                          combine_wait_recv_cost_stats=combine_waits)
        comb.hook()
        assert comb.combined_x is out
        assert_close_bf16(to_host(out), expected_combine(x, idx, w), "combined_x through hooks")
    assert (to_host(stats) >= 0).all() and to_host(stats).sum() > 0
    # nanoseconds waited per source rank, accumulated in place (nothing waits
    # on the reference backend; on the GPU a wait may be shorter than the timer's tick)
    for waits in (dispatch_waits, combine_waits):
        got = to_host(waits)
        assert got.dtype == np.int64 and got.shape == (SIZE,) and (got >= 0).all()
        assert backend == "gpu" or not got.any()


@pytest.mark.gpu
@pytest.mark.parametrize("hold", ["a slice", "a dtype view", "the handle"])
def test_cupy_outputs_are_reused_only_once_dropped(buffer, backend, rng, hold):
    """A CuPy caller's low-latency outputs come back (the same memory) once
    every array of the call and every view of one is dropped, never while one
    is held (what it holds stays intact) or on another stream; every call's
    rows and sums checked."""
    if backend != "gpu":
        pytest.skip("output sets are the GPU backend's")
    import cupy
    m, h, num_experts, k = 32, 2048, 4 * SIZE, 4
    local = num_experts // SIZE

    def call():
        x = random_rows(rng, m, h)
        idx = random_topk(rng, m, num_experts, k, drop=0.1)
        w = rng.random(idx.shape).astype(np.float32) + 0.5
        everyone = gather(x, idx)
        d = buffer.low_latency_dispatch(to_backend(x, backend), to_backend(idx, backend), m, num_experts,
                                        use_fp8=False)
        y = []
        agree_all(lambda: y.append(check_dispatch(d, everyone, m, h, local, False, False, False)))
        c = buffer.low_latency_combine(to_backend(y[0], backend), to_backend(idx, backend), to_backend(w, backend),
                                       d.handle)
        got = to_host(c.combined_x)
        agree_all(lambda: assert_close_bf16(got, expected_combine(x, idx, w), "combined_x"))
        return d, c

    seen = set()
    for _ in range(5):  # a decode loop: each step drops the last step's results
        d, c = call()
        seen.add(d.recv_x.data.ptr)
    del d, c
    first, _ = call()
    ptr = first.recv_x.data.ptr
    held = {"a slice": lambda r: r.recv_x[1:], "a dtype view": lambda r: r.recv_x.view(np.int16),
            "the handle": lambda r: r.handle}[hold](first)
    snapshot = cupy.asnumpy(first.handle.src_info if hold == "the handle" else first.recv_x)
    del first
    second, _ = call()
    cupy.cuda.Device().synchronize()
    now = cupy.asnumpy(held.src_info if hold == "the handle" else held)
    intact = bool((now.view(np.uint8) == (snapshot[1:] if hold == "a slice" else snapshot).view(np.uint8)).all())
    second_ptr = second.recv_x.data.ptr
    del held, second
    again, _ = call()
    again_ptr = again.recv_x.data.ptr
    del again
    side = cupy.cuda.Stream(non_blocking=True)
    with side:
        on_side, _ = call()
    side.synchronize()
    side_ptr = on_side.recv_x.data.ptr
    del on_side

    def check():
        assert len(seen) <= 2, f"a loop that drops its results used {len(seen)} output sets"
        assert intact, f"{hold} the caller held was overwritten"
        assert second_ptr != ptr, f"a set with {hold} held was handed out"
        assert again_ptr in (ptr, second_ptr), "dropped sets were not reused"
        assert side_ptr not in (ptr, second_ptr), "a set went to another stream"
    agree_all(check)


@pytest.mark.gpu
def test_low_latency_cuda_graph_replays(buffer, backend, transport, rng):
    """Dispatch, an expert step and combine captured in one CUDA graph,
    replayed 100 times with new tokens and routing, every replay checked."""
    if backend != "gpu":
        pytest.skip("CUDA graphs need the GPU backend")
    m, h, num_experts, k = 32, 2048, 4 * SIZE, 4
    local = num_experts // SIZE
    x_dev, idx_dev, w_dev, fill = graph_inputs(rng, m, h, num_experts, k)

    def step():
        d = buffer.low_latency_dispatch(x_dev, idx_dev, m, num_experts, use_fp8=False)
        y = buffer.get_next_low_latency_combine_buffer(d.handle)
        y[...] = d.recv_x
        c = buffer.low_latency_combine(y, idx_dev, w_dev, d.handle)
        return d, c

    graph, stream, (d, c) = capture_graph(fill, step)

    def check(i, inputs):
        x, idx, w = inputs
        everyone = gather(x, idx)
        buffer._impl.check_errors()
        check_dispatch(d, everyone, m, h, local, False, False, False)
        assert_close_bf16(to_host(c.combined_x), expected_combine(x, idx, w, lambda e: 1.0),
                          f"combined_x of replay {i}")

    replay_and_check(graph, stream, fill, check, 100)


@pytest.mark.gpu
def test_low_latency_timeout_names_the_missing_rank_then_clean(buffer, backend, rng):
    """Rank 0 skips a dispatch: the others raise CommTimeoutError naming rank 0
    and the receive phase; after clean_low_latency_buffer every rank goes on."""
    if backend != "gpu" or SIZE < 2:
        pytest.skip("needs the GPU backend and two ranks")
    import cupy
    import cupyep
    from mpi4py import MPI
    m, h, num_experts = 8, 2048, 2 * SIZE
    x = random_rows(rng, m, h)
    idx = random_topk(rng, m, num_experts, 2)
    impl = buffer._impl
    saved, impl.timeout_ns = impl.timeout_ns, int(1e9)
    error = None
    try:
        if RANK != 0:
            try:
                buffer.low_latency_dispatch(to_backend(x, backend), to_backend(idx, backend), m, num_experts)
                cupy.cuda.Device().synchronize()
                impl.check_errors()
            except cupyep.CommTimeoutError as e:
                error = e
    finally:
        impl.timeout_ns = saved
    right = RANK == 0 or (error is not None and error.peer == 0 and "low_latency_dispatch.recv" in error.phase)
    all_right = COMM.allreduce(right, op=MPI.LAND)
    buffer.clean_low_latency_buffer()
    assert all_right, f"rank {RANK}: expected a timeout naming rank 0, got {error!r}"
    everyone = gather(x, idx)
    res = buffer.low_latency_dispatch(to_backend(x, backend), to_backend(idx, backend), m, num_experts,
                                      use_fp8=False)
    check_dispatch(res, everyone, m, h, num_experts // SIZE, False, False, False)


@pytest.mark.gpu
@pytest.mark.parametrize("shrink", [False, True])
def test_clean_that_a_rank_misses_then_blocking_clean(buffer, backend, rng, shrink):
    """Rank 0 skips a clean: the others' barrier times out and names rank 0
    (CommTimeoutError at their next call), or with shrink masks it. A
    blocking clean brings every rank back; the next dispatch is right."""
    if backend != "gpu" or SIZE < 2:
        pytest.skip("needs the GPU backend and two ranks")
    import cupy
    import cupyep
    from mpi4py import MPI
    m, h, num_experts = 8, 2048, 2 * SIZE
    x = random_rows(rng, m, h)
    idx = random_topk(rng, m, num_experts, 2)
    impl, ll = buffer._impl, buffer._impl.ll
    saved = impl.timeout_ns
    impl.timeout_ns, ll.shrink = int(1e9), shrink
    right = RANK == 0
    try:
        if RANK != 0:
            buffer.clean_low_latency_buffer()
            cupy.cuda.Device().synchronize()
            if shrink:
                mask = buffer.low_latency_query_mask_buffer()
                right = list(mask) == [int(r == 0) for r in range(SIZE)]
                impl.check_errors()  # no error with shrink
            else:
                try:
                    impl.check_errors()
                except cupyep.CommTimeoutError as e:
                    right = e.peer == 0 and e.phase == "clean_low_latency_buffer"
    except Exception as e:  # noqa: BLE001 - every rank must reach the clean below
        right = repr(e)
    finally:
        impl.timeout_ns, ll.shrink = saved, False
    buffer.low_latency_clean_mask_buffer()
    buffer.clean_low_latency_buffer(blocking=True)
    all_right = COMM.allreduce(right is True, op=MPI.LAND)
    assert all_right, f"rank {RANK}: expected {'rank 0 masked' if shrink else 'a timeout naming rank 0'}: {right}"
    everyone = gather(x, idx)
    res = buffer.low_latency_dispatch(to_backend(x, backend), to_backend(idx, backend), m, num_experts,
                                      use_fp8=False)
    check_dispatch(res, everyone, m, h, num_experts // SIZE, False, False, False)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["hidden", "skipped_call", "fp8", "logfmt"])
def test_low_latency_call_mismatch_is_reported_then_clean(buffer, backend, rng, case):
    """Ranks that disagree in a low-latency call (rank 0 with another hidden
    size, FP8 or LogFMT setting, or the last rank one call ahead after its bad
    argument): every rank's kernel sees a peer's flag of another call, uses
    none of its rows, and the rank's next check raises CallMismatchError
    naming the peer and both calls; after a clean the next call is right."""
    if backend != "gpu" or SIZE < 2:
        pytest.skip("needs the GPU backend and two ranks")
    import cupy
    import cupyep
    from mpi4py import MPI
    m, num_experts, k = 16, 2 * SIZE, 2
    h = 2048 if case == "hidden" and RANK == 0 else 1024
    x = random_rows(rng, m, h)
    idx = random_topk(rng, m, num_experts, k)
    w = rng.random(idx.shape).astype(np.float32)
    odd_rank = SIZE - 1 if case == "skipped_call" else 0
    odd = RANK == odd_rank
    impl = buffer._impl
    saved, impl.timeout_ns = impl.timeout_ns, int(2e9)
    outcome = None
    try:
        if case == "skipped_call" and odd:
            with pytest.raises(cupyep.InvalidInputError):
                buffer.low_latency_dispatch(to_backend(x.astype(np.float32), backend), to_backend(idx, backend),
                                            m, num_experts)
        d = buffer.low_latency_dispatch(to_backend(x, backend), to_backend(idx, backend), m, num_experts,
                                        use_fp8=odd if case == "fp8" else False)
        if case == "logfmt":
            cupy.cuda.Device().synchronize()
            impl.check_errors()  # the dispatch itself agreed
            y = cupy.zeros((num_experts // SIZE, SIZE * m, h), fp8.bfloat16)
            buffer.low_latency_combine(y, to_backend(idx, backend), to_backend(w, backend), d.handle,
                                       use_logfmt=odd)
        cupy.cuda.Device().synchronize()
        impl.check_errors()
    except cupyep.CallMismatchError as e:
        outcome = str(e)
    except Exception as e:  # noqa: BLE001 - every rank must reach the clean below
        outcome = repr(e)
    finally:
        impl.timeout_ns = saved
    buffer.clean_low_latency_buffer()
    peers = [odd_rank] if not odd else [r for r in range(SIZE) if r != odd_rank]
    right = outcome is not None and any(f"rank {p} was at" in outcome for p in peers)
    if right and case == "hidden":
        right = "hidden=2048" in outcome and "hidden=1024" in outcome
    all_right = COMM.allreduce(bool(right), op=MPI.LAND)
    assert all_right, f"rank {RANK}: expected a CallMismatchError naming a peer in {peers}, got {outcome!r}"
    x = random_rows(rng, m, 1024)
    res = buffer.low_latency_dispatch(to_backend(x, backend), to_backend(idx, backend), m, num_experts,
                                      use_fp8=False)
    check_dispatch(res, gather(x, idx), m, 1024, num_experts // SIZE, False, False, False)


def masked_everyone(everyone, masked, local):
    """Every rank's (x, topk_idx) as the masked exchange sees it: entries of
    masked ranks' experts dropped, and nothing at all from a masked source."""
    out = []
    for s, (xs, idx_s) in enumerate(everyone):
        idx_s = np.where((idx_s >= 0) & np.isin(idx_s // local, masked), -1, idx_s)
        if s in masked:
            idx_s = np.full_like(idx_s, -1)
        out.append((xs, idx_s))
    return out


@pytest.mark.parametrize("use_logfmt", [False, True])
def test_masked_rank_is_left_out(buffer, backend, rng, use_logfmt):
    """Every rank masks the last rank: it receives nothing, sends nothing, and
    the others' results are those of the remaining ranks (a BF16 or a LogFMT
    combine, whose send deals the masked rank's work and skips it); after
    cleaning the mask a call includes it again."""
    m, h, local, k = 32, 2048, 3, 4
    num_experts = local * SIZE
    masked = [SIZE - 1]
    x = random_rows(rng, 20, h)
    idx = random_topk(rng, 20, num_experts, k, drop=0.1)
    w = rng.random(idx.shape).astype(np.float32)
    everyone = masked_everyone(gather(x, idx), masked, local)
    buffer.low_latency_update_mask_buffer(SIZE - 1, True)
    error = None
    try:  # collectives first; a failed check is voted on after them
        res = buffer.low_latency_dispatch(to_backend(x, backend), to_backend(idx, backend), m, num_experts,
                                          use_fp8=False)
        try:
            y = check_dispatch(res, everyone, m, h, local, False, False, False)
        except AssertionError as e:
            error, y = e, np.zeros((local, SIZE * m, h), fp8.bfloat16)
        c = buffer.low_latency_combine(to_backend(y, backend), to_backend(idx, backend),
                                       to_backend(w, backend), res.handle, use_logfmt=use_logfmt)
        if error is None:
            assert list(buffer.low_latency_query_mask_buffer()) == [int(r in masked) for r in range(SIZE)]
            if use_logfmt:
                check_logfmt_result(to_host(c.combined_x), x, everyone[RANK][1], w, backend)
            else:
                assert_close_bf16(to_host(c.combined_x), expected_combine(x, everyone[RANK][1], w), "masked combine")
    except AssertionError as e:
        error = error or e
    finally:
        buffer.low_latency_clean_mask_buffer()
    from mpi4py import MPI
    assert COMM.allreduce(error is None, op=MPI.LAND), f"rank {RANK}: {error!r}"
    assert not buffer.low_latency_query_mask_buffer().any()
    res = buffer.low_latency_dispatch(to_backend(x, backend), to_backend(idx, backend), m, num_experts,
                                      use_fp8=False)
    check_dispatch(res, gather(x, idx), m, h, local, False, False, False)


@pytest.mark.gpu
def test_shrink_masks_a_rank_that_times_out(buffer, backend, rng):
    """With shrink on, the last rank skips a dispatch: the others' waits time
    out, mask it, and return the remaining ranks' rows without an error; their
    combine then leaves it out without waiting. Clean mask and buffer: all on."""
    if backend != "gpu" or SIZE < 2:
        pytest.skip("needs the GPU backend and two ranks")
    import cupy
    m, h, local = 16, 2048, 2
    num_experts = local * SIZE
    late = SIZE - 1
    x = random_rows(rng, m, h)
    idx = random_topk(rng, m, num_experts, 2)
    w = rng.random(idx.shape).astype(np.float32)
    everyone = gather(x, idx)
    ll = buffer._impl.ll
    saved = buffer._impl.timeout_ns
    buffer._impl.timeout_ns, ll.shrink = int(1e9), True
    error = None
    try:
        if RANK != late:
            res = buffer.low_latency_dispatch(to_backend(x, backend), to_backend(idx, backend), m,
                                              num_experts, use_fp8=False)
            cupy.cuda.Device().synchronize()
            buffer._impl.check_errors()
            mask = buffer.low_latency_query_mask_buffer()
            assert list(mask) == [int(r == late) for r in range(SIZE)], f"mask {mask}"
            y = check_dispatch(res, masked_everyone(everyone, [late], local), m, h, local, False, False, False)
            c = buffer.low_latency_combine(to_backend(y, backend), to_backend(idx, backend),
                                           to_backend(w, backend), res.handle)
            want = expected_combine(x, masked_everyone(everyone, [late], local)[RANK][1], w)
            assert_close_bf16(to_host(c.combined_x), want, "combine without the late rank")
            buffer._impl.check_errors()
    except Exception as e:  # noqa: BLE001 - every rank must reach the clean below
        error = e
    finally:
        buffer._impl.timeout_ns, ll.shrink = saved, False
    buffer.low_latency_clean_mask_buffer()
    buffer.clean_low_latency_buffer()
    from mpi4py import MPI
    all_right = COMM.allreduce(error is None, op=MPI.LAND)
    assert all_right, f"rank {RANK}: {error!r}"
    res = buffer.low_latency_dispatch(to_backend(x, backend), to_backend(idx, backend), m, num_experts,
                                      use_fp8=False)
    check_dispatch(res, everyone, m, h, local, False, False, False)


@pytest.mark.parametrize("hidden,zero_copy", [(2048, False), (7168, False), (7168, True)])
def test_logfmt_combine(buffer, backend, transport, rng, hidden, zero_copy):
    """use_logfmt: the sum of the LogFMT-decoded expert rows (cupyep.formats.logfmt);
    its error against the BF16 combine stays within the format's resolution.
    Over NVLink stores and NVSHMEM puts; zero_copy: x is the send buffer,
    which puts encode in place."""
    check_logfmt_combine(buffer, backend, rng, m=32, t=24, hidden=hidden, local=3, k=min(8, 3 * SIZE),
                         zero_copy=zero_copy)


@pytest.mark.parametrize("hidden", [7168, 9216])
def test_logfmt_combine_dense_tokens(buffer, backend, transport, rng, hidden):
    """Top-8 with no dropped slot, so every token has a row in each of its 8
    slots: the decode's unguarded path (the other LogFMT tests drop slots,
    and at 2 ranks take top-6). Hidden 7168: 896 units of 8 channels for a
    block's 512 threads, a second unit for some; 9216: 1152, a third for some."""
    check_logfmt_combine(buffer, backend, rng, m=32, t=24, hidden=hidden, local=-(-8 // SIZE), k=8,
                         zero_copy=False, drop=0.0)


def test_combine_many_experts_call_after_call(buffer, backend, transport, rng):
    """The BF16 send deals pieces of rows over every (expert, destination)
    pair, numbered in chunks of 512, and counts each pair's pieces in device
    memory, zeroed by the pair's last piece: over ~1,030 experts (three
    chunks) and three calls in a row, each with fresh rows and routing."""
    local, m, h = -(-1030 // SIZE), 16, 256
    num_experts = local * SIZE
    for _ in range(3):
        x = random_rows(rng, m, h)
        idx = random_topk(rng, m, num_experts, 8, drop=0.1)
        w = rng.random(idx.shape).astype(np.float32)
        res = buffer.low_latency_dispatch(to_backend(x, backend), to_backend(idx, backend), m, num_experts,
                                          use_fp8=False)
        y = check_dispatch(res, gather(x, idx), m, h, local, False, False, False)
        out = buffer.low_latency_combine(to_backend(y, backend), to_backend(idx, backend),
                                         to_backend(w, backend), res.handle)
        assert_close_bf16(to_host(out.combined_x), expected_combine(x, idx, w), "many-expert combined_x")


def test_logfmt_combine_many_experts_call_after_call(buffer, backend, transport, rng):
    """The LogFMT send numbers its work over every (expert, destination) pair
    in chunks of 512 and counts each pair's units in device memory, zeroed by
    the pair's last unit: over ~1,030 experts (three chunks) and three calls
    in a row, each with fresh rows and routing."""
    local = -(-1030 // SIZE)
    for _ in range(3):
        check_logfmt_combine(buffer, backend, rng, m=16, t=16, hidden=256, local=local, k=8, zero_copy=False)


def test_logfmt_combine_edge_groups(buffer, backend, transport, rng):
    """Every 64-channel group kind the encoder branches on without branches:
    all zeros; one non-zero value (a range of 0); one magnitude with mixed
    signs; normal values with exact zeros; 1 beside values 2^-40, below the
    32-octave range (they decode as 0); values near 2^-100 and near 2^100.
    Top-1, so each output value is one decoded value times its weight: each
    must be within a LogFMT step of cupyep.formats.logfmt's (zeros exactly)."""
    from cupyep.formats import logfmt
    m, t, hidden, local = 32, 24, 7168, 3
    num_experts = local * SIZE
    x = special_logfmt_rows(rng, t, hidden)
    idx = random_topk(rng, t, num_experts, 1)
    w = rng.uniform(0.5, 1.5, idx.shape).astype(np.float32)
    res = buffer.low_latency_dispatch(to_backend(x, backend), to_backend(idx, backend), m, num_experts,
                                      use_fp8=False)
    y = check_dispatch(res, gather(x, idx), m, h=hidden, local=local, use_fp8=False, round_scale=False,
                       ue8m0=False)
    c = buffer.low_latency_combine(to_backend(y, backend), to_backend(idx, backend), to_backend(w, backend),
                                   res.handle, use_logfmt=True)
    got = to_host(c.combined_x).astype(np.float32)
    scale = np.array([expert_scale(e) for e in idx[:, 0]], np.float32)
    want = w[:, :1] * logfmt.quantize((x.astype(np.float32) * scale[:, None]).astype(fp8.bfloat16))
    assert (got[want == 0] == 0).all(), "a zero (or a value below the range) decoded as non-zero"
    rel = np.abs(got - want) / np.where(want != 0, np.abs(want), 1)
    # one step of a 32-octave range (2^(32/510) - 1 = 4.4%) and bf16 output rounding
    assert float(rel.max()) < 0.05, f"LogFMT edge groups: worst relative error {float(rel.max()):.3e}"


def special_logfmt_rows(rng, t, hidden):
    """[t, hidden] bf16 rows whose 64-channel groups cycle through seven kinds
    (see test_logfmt_combine_edge_groups), each row starting at another."""
    g = np.zeros((t, hidden // 64, 64), np.float32)
    normal = rng.standard_normal(g.shape).astype(np.float32)
    signs = np.where(rng.random(g.shape) < 0.5, -1, 1).astype(np.float32)
    for r in range(t):
        for j in range(hidden // 64):
            kind, v = (r + j) % 7, g[r, j]
            if kind == 1:
                v[rng.integers(64)] = -3.5
            elif kind == 2:
                v[:] = 0.75 * signs[r, j]
            elif kind == 3:
                v[:] = normal[r, j] * (rng.random(64) < 0.7)
            elif kind == 4:
                v[:] = signs[r, j] * 2.0 ** -40
                v[rng.integers(64)] = 1.0
            elif kind == 5:
                v[:] = normal[r, j] * 2.0 ** -100
            elif kind == 6:
                v[:] = normal[r, j] * 2.0 ** 100
    return g.reshape(t, hidden).astype(fp8.bfloat16)


def check_logfmt_combine(buffer, backend, rng, m, t, hidden, local, k, zero_copy, drop=0.1):
    """A dispatch of t random rows (top-k of local * SIZE experts, a share
    ``drop`` of slots dropped) then a LogFMT combine of the dispatched rows,
    checked against the reference format and against the BF16 combine."""
    num_experts = local * SIZE
    x = random_rows(rng, t, hidden)
    idx = random_topk(rng, t, num_experts, k, drop=drop)
    w = rng.random(idx.shape).astype(np.float32)
    everyone = gather(x, idx)
    res = buffer.low_latency_dispatch(to_backend(x, backend), to_backend(idx, backend), m, num_experts,
                                      use_fp8=False)
    y = check_dispatch(res, everyone, m, h=hidden, local=local, use_fp8=False, round_scale=False, ue8m0=False)
    y_in = to_backend(y, backend)
    if zero_copy:
        y_in = buffer.get_next_low_latency_combine_buffer(res.handle)
        y_in[...] = to_backend(y, backend)
    c = buffer.low_latency_combine(y_in, to_backend(idx, backend), to_backend(w, backend), res.handle,
                                   use_logfmt=True)
    check_logfmt_result(to_host(c.combined_x), x, idx, w, backend)


def check_logfmt_result(got, x, idx, w, backend):
    """got [T, H]: the LogFMT combine of the rows x [T, H] sent to idx [T, K]
    (each times expert_scale), weights w: within the format's resolution of
    the sum of LogFMT-decoded rows (cupyep.formats.logfmt), and of the BF16
    combine."""
    from cupyep.formats import logfmt
    got = got.astype(np.float32)
    want = np.zeros(got.shape, np.float32)
    for kk in range(idx.shape[1]):
        e = idx[:, kk]
        scale = np.array([expert_scale(v) for v in np.where(e >= 0, e, 0)], np.float32)
        rows = logfmt.quantize((x.astype(np.float32) * scale[:, None]).astype(fp8.bfloat16))
        want = want + np.where(e >= 0, w[:, kk], 0).astype(np.float32)[:, None] * rows
    peak = max(float(np.abs(want).max()), 1e-30)
    if backend == "reference":
        assert_close_bf16(got, want, "logfmt combine")
    else:  # log2f/exp2f may move a code by one step
        assert float(np.abs(got - want).max()) / peak < 1e-2, "logfmt combine against cupyep.formats.logfmt"
    exact = expected_combine(x, idx, w)
    err = float(np.abs(got - exact).max()) / max(float(np.abs(exact).max()), 1e-30)
    assert err < 2e-2, f"LogFMT error against the BF16 combine: {err:.2e}"
