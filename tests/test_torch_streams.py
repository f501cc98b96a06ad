"""torch callers on the GPU: calls run on torch's current stream, outputs are
torch tensors from torch's allocator, and dispatch + combine can be captured
in ``torch.cuda.graph`` (through cupyep.Buffer and through cupyep.deep_ep)
and replayed with new inputs, every replay checked against the expectation."""
import numpy as np
import pytest

import cupyep

from conftest import COMM, RANK, SIZE
from helpers import agree_all, assert_close_bf16, bits, expected_dispatch, gather, random_rows, random_topk, to_host
from test_low_latency import check_dispatch, expected_combine

torch = pytest.importorskip("torch", reason="torch is not installed")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not cupyep.gpu_available(), reason="needs a GPU and nvshmem4py")]


@pytest.fixture
def gpu_buffer(buffer, backend):
    if backend != "gpu":
        pytest.skip("torch streams and graphs are GPU matters")
    torch.cuda.set_device(buffer._impl.rt.device_id)
    return buffer


def as_torch(a):
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).cuda()
    return torch.from_numpy(np.ascontiguousarray(a)).cuda()


def agree(check, *args):
    agree_all(lambda: check(*args))


class GraphInputs:
    """torch tensors that keep their addresses across replays; fill() draws
    new tokens, routing and weights into them (on the current stream)."""

    def __init__(self, rng, n, hidden, num_experts, k, min_weight=0.0):
        self.rng, self.n, self.hidden, self.num_experts, self.k = rng, n, hidden, num_experts, k
        self.min_weight = min_weight
        self.x = torch.empty(n, hidden, dtype=torch.bfloat16, device="cuda")
        self.idx = torch.empty(n, k, dtype=torch.int64, device="cuda")
        self.w = torch.empty(n, k, dtype=torch.float32, device="cuda")

    def fill(self):
        x = random_rows(self.rng, self.n, self.hidden)
        idx = random_topk(self.rng, self.n, self.num_experts, self.k, drop=0.1)
        w = self.rng.random(idx.shape).astype(np.float32) + self.min_weight
        self.x.copy_(as_torch(x))
        self.idx.copy_(as_torch(idx))
        self.w.copy_(as_torch(w))
        return x, idx, w


def capture(step, fill):
    """step() once eagerly on a side stream, then captured by torch.cuda.graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fill()
        step()
    s.synchronize()
    COMM.Barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=s):
        outputs = step()
    torch.cuda.synchronize()
    return graph, outputs


def test_calls_run_on_torchs_current_stream(gpu_buffer, rng):
    """x is rewritten on a side stream behind a long sleep: a call made inside
    ``torch.cuda.stream(side)`` must read the new rows, so it ran on `side`."""
    buf = gpu_buffer
    m, h, num_experts, k = 32, 2048, 4 * SIZE, 4
    x0, x1 = random_rows(rng, m, h), random_rows(rng, m, h)
    idx = random_topk(rng, m, num_experts, k, drop=0.1)
    w = rng.random(idx.shape).astype(np.float32) + 0.5
    xt, idx_t, w_t = as_torch(x0), as_torch(idx), as_torch(w)
    new_rows = as_torch(x1)
    buf.low_latency_dispatch(xt, idx_t, m, num_experts, use_fp8=False)  # compile outside the timing
    buf.clean_low_latency_buffer()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU cycles
        xt.copy_(new_rows)
        d = buf.low_latency_dispatch(xt, idx_t, m, num_experts, use_fp8=False)
        y = d.recv_x.clone()
        c = buf.low_latency_combine(y, idx_t, w_t, d.handle)
        lay = buf.get_dispatch_layout(idx_t, num_experts)
        nd = buf.dispatch(xt, idx_t, w_t, layout=lay)
        nc = buf.combine(nd.recv_x, nd.handle, nd.recv_topk_weights)
    side.synchronize()

    def check():
        for a in (d.recv_x, d.recv_count, d.handle.src_info, c.combined_x, nd.recv_x, nc.combined_x):
            assert isinstance(a, torch.Tensor) and a.is_cuda
        check_dispatch(d, everyone, m, h, num_experts // SIZE, False, False, False)
        assert_close_bf16(to_host(c.combined_x), expected_combine(x1, idx, w, lambda e: 1.0), "LL combined_x")
        rows, ids, _, _ = expected_dispatch(gather(x1, idx, w), num_experts)
        assert (bits(to_host(nd.recv_x)) == bits(rows)).all(), "normal dispatch read stale rows"
        assert (to_host(nd.recv_topk_idx) == ids).all()
        np.testing.assert_array_equal(to_host(nc.combined_topk_weights), np.where(idx >= 0, w, 0))

    everyone = gather(x1, idx)
    agree(check)


@pytest.mark.parametrize("api,hook,zero_copy", [("cupyep", False, False), ("cupyep", True, False),
                                                ("cupyep", False, True), ("cupyep", True, True),
                                                ("deep_ep", False, False), ("deep_ep", True, True)])
def test_low_latency_in_torch_graph(gpu_buffer, torch_world, rng, api, hook, zero_copy):
    """Dispatch, an expert step and combine in one torch.cuda.graph, replayed
    with new tokens and routing; every replay checked."""
    m, h, num_experts, k = 32, 2048, 4 * SIZE, 4
    local = num_experts // SIZE
    inp = GraphInputs(rng, m, h, num_experts, k)
    if api == "cupyep":
        buf = gpu_buffer

        def step():
            d = buf.low_latency_dispatch(inp.x, inp.idx, m, num_experts, use_fp8=False, return_recv_hook=hook)
            if hook:
                d.hook()
            if zero_copy:
                y = buf.get_next_low_latency_combine_buffer(d.handle)
                y.copy_(d.recv_x)
            else:
                y = d.recv_x.clone()
            c = buf.low_latency_combine(y, inp.idx, inp.w, d.handle, return_recv_hook=hook)
            if hook:
                c.hook()
            return d.recv_x, d.recv_count, d.handle, c.combined_x
    else:
        from cupyep import deep_ep
        buf = deep_ep.Buffer(torch_world, num_rdma_bytes=cupyep.low_latency_size_hint(m, h, SIZE, num_experts),
                             low_latency_mode=True, explicitly_destroy=True)

        def step():
            recv_x, count, handle, _, recv_hook = buf.low_latency_dispatch(
                inp.x, inp.idx, m, num_experts, use_fp8=False, return_recv_hook=hook)
            if hook:
                recv_hook()
            if zero_copy:
                buf.get_next_low_latency_combine_buffer(handle).copy_(recv_x)
                y = recv_x
            else:
                y = recv_x.clone()
            out, _, recv_hook = buf.low_latency_combine(y, inp.idx, inp.w, handle, zero_copy=zero_copy,
                                                        return_recv_hook=hook)
            if hook:
                recv_hook()
            return recv_x, count, handle, out
    try:
        graph, (recv_x, count, handle, out) = capture(step, inp.fill)
        for i in range(8):
            x, idx, w = inp.fill()
            graph.replay()
            torch.cuda.synchronize()
            res = cupyep.LowLatencyDispatchResult(recv_x, None, count, getattr(handle, "cupyep_handle", handle))

            def check():
                check_dispatch(res, everyone, m, h, local, False, False, False)
                assert_close_bf16(to_host(out), expected_combine(x, idx, w, lambda e: 1.0),
                                  f"combined_x of replay {i}")
            everyone = gather(x, idx)
            agree(check)
    finally:
        if api == "deep_ep":
            buf.destroy()


@pytest.mark.parametrize("api", ["cupyep", "deep_ep"])
def test_clean_and_mask_calls_in_torch_graph(gpu_buffer, torch_world, rng, api):
    """clean_low_latency_buffer, a mask update, dispatch + combine, the mask
    query into a tensor and the mask's reset, in one torch.cuda.graph: none
    of them waits on the host. Every replay checked, the mask included."""
    m, h, num_experts, k = 32, 2048, 4 * SIZE, 4
    local = num_experts // SIZE
    masked = [SIZE - 1] if SIZE > 1 else []
    inp = GraphInputs(rng, m, h, num_experts, k)
    status = torch.full((SIZE,), -1, dtype=torch.int32, device="cuda")
    if api == "cupyep":
        buf = gpu_buffer

        def clean():  # no array to say whose stream: torch's, then that of the last call
            buf.clean_low_latency_buffer(framework="torch")
    else:
        from cupyep import deep_ep
        buf = deep_ep.Buffer(torch_world, num_rdma_bytes=cupyep.low_latency_size_hint(m, h, SIZE, num_experts),
                             low_latency_mode=True, explicitly_destroy=True)

        def clean():
            buf.clean_low_latency_buffer(m, h, num_experts)

    def step():
        clean()
        for r in masked:
            buf.low_latency_update_mask_buffer(r, True)
        if api == "cupyep":
            d = buf.low_latency_dispatch(inp.x, inp.idx, m, num_experts, use_fp8=False)
            recv_x, count, handle = d.recv_x, d.recv_count, d.handle
            out = buf.low_latency_combine(recv_x.clone(), inp.idx, inp.w, handle).combined_x
        else:
            recv_x, count, handle, _, _ = buf.low_latency_dispatch(inp.x, inp.idx, m, num_experts, use_fp8=False)
            out, _, _ = buf.low_latency_combine(recv_x.clone(), inp.idx, inp.w, handle)
        buf.low_latency_query_mask_buffer(status)
        buf.low_latency_clean_mask_buffer()
        return recv_x, count, handle, out

    from test_low_latency import masked_everyone
    try:
        graph, (recv_x, count, handle, out) = capture(step, inp.fill)
        for i in range(6):
            x, idx, w = inp.fill()
            status.fill_(-1)
            graph.replay()
            torch.cuda.synchronize()
            res = cupyep.LowLatencyDispatchResult(recv_x, None, count, getattr(handle, "cupyep_handle", handle))
            seen = masked_everyone(gather(x, idx), masked, local)

            def check():
                assert status.tolist() == [int(r in masked) for r in range(SIZE)], f"mask of replay {i}"
                check_dispatch(res, seen, m, h, local, False, False, False)
                assert_close_bf16(to_host(out), expected_combine(x, seen[RANK][1], w, lambda e: 1.0),
                                  f"combined_x of replay {i}")
            agree(check)
    finally:
        if api == "deep_ep":
            buf.destroy()


def test_worst_token_normal_in_torch_graph(gpu_buffer, rng):
    """Layout, worst-token dispatch and combine in one torch.cuda.graph."""
    buf = gpu_buffer
    t, h, k, num_experts = 48, 1024, 4, 4 * SIZE
    worst = t * SIZE
    inp = GraphInputs(rng, t, h, num_experts, k, min_weight=0.5)

    def step():
        lay = buf.get_dispatch_layout(inp.idx, num_experts)
        d = buf.dispatch(inp.x, inp.idx, inp.w, layout=lay, num_worst_tokens=worst)
        return d, buf.combine(d.recv_x, d.handle, d.recv_topk_weights)

    graph, (d, c) = capture(step, inp.fill)
    assert isinstance(d.recv_x, torch.Tensor) and isinstance(c.combined_x, torch.Tensor)
    for i in range(8):
        x, idx, w = inp.fill()
        graph.replay()
        torch.cuda.synchronize()

        def check():
            buf._impl.check_errors()
            rows, ids, ws, src = expected_dispatch(everyone, num_experts)
            n = rows.shape[0]
            assert (bits(to_host(d.recv_x)[:n]) == bits(rows)).all(), f"rows of replay {i}"
            assert (to_host(d.recv_topk_idx)[:n] == ids).all()
            assert (to_host(d.handle.recv_src_idx)[:n] == src).all()
            local = num_experts // SIZE
            in_rank = np.stack([((idx >= r * local) & (idx < (r + 1) * local)).any(1) for r in range(SIZE)], 1)
            want = x.astype(np.float32) * in_rank.sum(1, keepdims=True)
            assert_close_bf16(to_host(c.combined_x), want, f"combined_x of replay {i}")
            np.testing.assert_array_equal(to_host(c.combined_topk_weights), np.where(idx >= 0, w, 0))
        everyone = gather(x, idx, w)
        agree(check)


def test_async_finish_and_previous_event_with_torch_events(gpu_buffer, rng):
    """A torch.cuda.Event as previous_event orders the call after torch work;
    the returned event makes torch's current stream wait."""
    buf = gpu_buffer
    num_experts = 4 * SIZE
    x = random_rows(rng, 64, 1024)
    idx = random_topk(rng, 64, num_experts, 4, drop=0.1)
    w = rng.random(idx.shape).astype(np.float32) + 0.5
    producer = torch.cuda.Stream()
    xt = torch.empty(64, 1024, dtype=torch.bfloat16, device="cuda")
    src = as_torch(x)
    torch.cuda.synchronize()
    with torch.cuda.stream(producer):
        torch.cuda._sleep(100_000_000)
        xt.copy_(src)
        ready = torch.cuda.Event()
        ready.record()
    d = buf.dispatch(xt, as_torch(idx), as_torch(w), num_experts=num_experts, previous_event=ready,
                     async_finish=True)
    d.event.current_stream_wait()
    got = d.recv_x.clone()  # on torch's stream, after the event
    torch.cuda.synchronize()
    rows, ids, _, _ = expected_dispatch(gather(x, idx, w), num_experts)

    def check():
        assert (bits(to_host(got)) == bits(rows)).all()
        assert (to_host(d.recv_topk_idx) == ids).all()
    agree(check)


def test_torch_bad_input_launches_nothing(gpu_buffer, rng):
    """A CPU tensor is refused before launch; a tensor that requires grad is
    read as it is; the buffer works after."""
    buf = gpu_buffer
    m, h, num_experts = 8, 512, 4 * SIZE
    x = random_rows(rng, m, h)
    idx = random_topk(rng, m, num_experts, 2)
    with pytest.raises(cupyep.InvalidInputError, match="CPU tensor"):
        buf.low_latency_dispatch(as_torch(x).cpu(), as_torch(idx), m, num_experts)
    with pytest.raises(cupyep.InvalidInputError, match="topk_idx.*CPU tensor"):
        buf.low_latency_dispatch(as_torch(x), as_torch(idx).cpu(), m, num_experts)
    xg = as_torch(x).float().requires_grad_(True)
    d = buf.low_latency_dispatch(xg.to(torch.bfloat16), as_torch(idx), m, num_experts, use_fp8=False)
    torch.cuda.synchronize()
    everyone = gather(x, idx)
    agree(check_dispatch, d, everyone, m, h, num_experts // SIZE, False, False, False)
    buf.clean_low_latency_buffer()


@pytest.mark.parametrize("use_fp8", [False, True])
def test_torch_outputs_are_reused_only_once_dropped(gpu_buffer, rng, use_fp8):
    """A torch caller's low-latency outputs come back (the same memory) once
    every tensor of the call and every view of one is dropped, never while one
    is held, on another stream, or inside a graph capture; every call checked."""
    buf = gpu_buffer
    m, h, num_experts, k = 32, 2048, 4 * SIZE, 4
    local = num_experts // SIZE

    def call():
        x = random_rows(rng, m, h)
        idx = random_topk(rng, m, num_experts, k, drop=0.1)
        w = rng.random(idx.shape).astype(np.float32) + 0.5
        d = buf.low_latency_dispatch(as_torch(x), as_torch(idx), m, num_experts, use_fp8=use_fp8)
        y = check_now(d, x, idx)
        c = buf.low_latency_combine(as_torch(y), as_torch(idx), as_torch(w), d.handle)
        torch.cuda.synchronize()
        got = to_host(c.combined_x)
        agree(lambda: assert_close_bf16(got, expected_combine(x, idx, w), "combined_x"))
        return d, c

    def check_now(d, x, idx):
        torch.cuda.synchronize()
        everyone = gather(x, idx)
        out = []
        agree(lambda: out.append(check_dispatch(d, everyone, m, h, local, use_fp8, False, False)))
        assert d.recv_x.dtype == (torch.float8_e4m3fn if use_fp8 else torch.bfloat16)
        return out[0]

    buf.clean_low_latency_buffer()
    seen = set()
    for _ in range(5):  # a decode loop: each step drops the last step's results
        d, c = call()
        seen.add(d.recv_x.data_ptr())
    del d, c
    first, _ = call()
    held_view = first.recv_x[0]
    snapshot = first.recv_x.clone()
    ptr = first.recv_x.data_ptr()
    del first  # only a view of one tensor is left
    second, _ = call()
    torch.cuda.synchronize()
    intact = bool(torch.equal(held_view.view(torch.uint8), snapshot[0].view(torch.uint8)))
    second_ptr = second.recv_x.data_ptr()
    del held_view, second
    again, _ = call()
    again_ptr = again.recv_x.data_ptr()
    del again
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side, _ = call()
    side_ptr = on_side.recv_x.data_ptr()
    del on_side

    x = as_torch(random_rows(rng, m, h))
    idx = as_torch(random_topk(rng, m, num_experts, k, drop=0.1))
    with torch.cuda.stream(side):
        buf.low_latency_dispatch(x, idx, m, num_experts, use_fp8=use_fp8)  # a set of this stream, dropped
    side.synchronize()
    COMM.Barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        captured = buf.low_latency_dispatch(x, idx, m, num_experts, use_fp8=use_fp8)
    torch.cuda.synchronize()
    graph.replay()
    torch.cuda.synchronize()
    kept = {p for s in buf._frontends["torch"]._output_sets.values() for p in
            (t[0].data_ptr() for t in (e[0] for e in s._sets))}

    def check():
        assert len(seen) <= 2, f"a loop that drops its results used {len(seen)} output sets"
        assert intact, "a view the caller held was overwritten"
        assert second_ptr != ptr, "a set with a live view was handed out"
        assert again_ptr in (ptr, second_ptr), "dropped sets were not reused"
        assert side_ptr not in (ptr, second_ptr), "a set went to another stream"
        assert captured.recv_x.data_ptr() not in kept, "a capture took a kept set"
    agree(check)
    buf.clean_low_latency_buffer()


def test_torch_cached_dispatch_and_combine_call_after_call(gpu_buffer, rng):
    """Cached dispatch and combine from torch, call after call on one handle
    (their launches come from the handle's kept argument plans): every call's
    rows and sums checked, and outputs the caller holds stay intact."""
    buf = gpu_buffer
    t, h, k, num_experts = 64, 1024, 4, 4 * SIZE
    local = num_experts // SIZE
    idx = random_topk(rng, t, num_experts, k, drop=0.1)
    w = rng.random(idx.shape).astype(np.float32) + 0.5
    handle = buf.dispatch(as_torch(random_rows(rng, t, h)), as_torch(idx), as_torch(w),
                          num_experts=num_experts).handle
    in_rank = np.stack([((idx >= r * local) & (idx < (r + 1) * local)).any(1) for r in range(SIZE)], 1)
    failures = []

    def call(label):
        x = random_rows(rng, t, h)
        d = buf.dispatch(as_torch(x), handle=handle)
        c = buf.combine(d.recv_x, handle)
        torch.cuda.synchronize()
        rows = expected_dispatch(gather(x, idx, w), num_experts)[0]
        if not (bits(to_host(d.recv_x)) == bits(rows)).all():
            failures.append(f"cached dispatch rows of {label}")
        try:
            assert_close_bf16(to_host(c.combined_x), x.astype(np.float32) * in_rank.sum(1, keepdims=True), label)
        except AssertionError as e:
            failures.append(str(e))
        return d, c

    for i in range(5):  # a loop that drops each step's results
        call(f"step {i}")
    held, held_c = call("held")
    snapshot, snapshot_c = held.recv_x.clone(), held_c.combined_x.clone()
    call("next")
    torch.cuda.synchronize()
    intact = bool(torch.equal(held.recv_x, snapshot)) and bool(torch.equal(held_c.combined_x, snapshot_c))

    def check():
        assert not failures, failures
        assert intact, "outputs the caller held were overwritten"
    agree(check)


def test_calls_under_torch_set_default_device(gpu_buffer, rng):
    """DeepEP's test programs run under torch.set_default_device("cuda"), a
    TorchFunctionMode that would see every tensor read of a call (~1 us
    each). Low-latency and normal calls made under it are right, and a
    mode above it sees none of their torch calls."""
    from test_interop import recording_torch_mode
    buf = gpu_buffer
    m, h, num_experts, k = 32, 2048, 4 * SIZE, 4
    local = num_experts // SIZE
    x = random_rows(rng, m, h)
    idx = random_topk(rng, m, num_experts, k, drop=0.1)
    w = rng.random(idx.shape).astype(np.float32) + 0.5
    tx, tidx, tw = as_torch(x), as_torch(idx), as_torch(w)
    mode = recording_torch_mode(torch)
    torch.set_default_device("cuda")
    try:
        with mode:
            d = buf.low_latency_dispatch(tx, tidx, m, num_experts, use_fp8=False)
        y = d.recv_x.clone()
        with mode:
            c = buf.low_latency_combine(y, tidx, tw, d.handle)
            nd = buf.dispatch(tx, tidx, tw, num_experts=num_experts)
            nc = buf.combine(nd.recv_x, nd.handle)
        torch.cuda.synchronize()
    finally:
        torch.set_default_device(None)
    everyone = gather(x, idx)
    in_rank = np.stack([((idx >= r * local) & (idx < (r + 1) * local)).any(1) for r in range(SIZE)], 1)

    def check():
        assert mode.calls == [], mode.calls
        check_dispatch(d, everyone, m, h, local, False, False, False)
        assert_close_bf16(to_host(c.combined_x), expected_combine(x, idx, w, lambda e: 1.0), "low-latency combine")
        assert_close_bf16(to_host(nc.combined_x), x.astype(np.float32) * in_rank.sum(1, keepdims=True),
                          "normal combine")
    agree(check)
