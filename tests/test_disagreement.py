"""When ranks disagree (reference backend): one rank's bad argument, ranks
passing different parameters, a rank that does not come. Every rank ends the
call in an error (none pairs with another call, none hangs), within the
timeout, and the next correct call works on every rank."""
import time

import numpy as np
import pytest

import cupyep

from conftest import COMM, RANK, SIZE
from helpers import random_rows, random_topk

pytestmark = pytest.mark.skipif(SIZE < 2, reason="disagreement needs two ranks or more")
LAST = SIZE - 1


@pytest.fixture
def quick_buffer(group, monkeypatch):
    """A reference buffer whose waits give up after 2 s."""
    monkeypatch.setenv("CUPYEP_TIMEOUT_S", "2")
    buf = cupyep.Buffer(group, num_nvl_bytes=cupyep.nvl_size_hint(512, 32, SIZE, 4),
                        num_rdma_bytes=cupyep.low_latency_size_hint(32, 512, SIZE, 4 * SIZE), backend="reference")
    yield buf
    buf.destroy()


def inputs(rng, hidden=256):
    e = 4 * SIZE
    return random_rows(rng, 16, hidden), random_topk(rng, 16, e, 2), e


def outcome(call):
    """The exception type a call raised (None if it returned) and its message."""
    try:
        call()
        return None, ""
    except cupyep.CupyepError as e:
        return type(e), str(e)


def test_one_rank_bad_argument_then_next_call_works(quick_buffer, rng):
    x, idx, e = inputs(rng)
    bad = idx.astype(np.float32) if RANK == LAST else idx  # only the last rank errs
    first = outcome(lambda: quick_buffer.dispatch(x, bad, num_experts=e))
    second = outcome(lambda: quick_buffer.dispatch(x, idx, num_experts=e))
    results = COMM.allgather((first, second))
    for r, ((err, msg), (err2, msg2)) in enumerate(results):
        want = cupyep.InvalidInputError if r == LAST else cupyep.CallMismatchError
        assert err is want, f"rank {r}: {err} {msg}"
        if r != LAST:
            assert f"rank {LAST}" in msg, msg
        assert err2 is None, f"rank {r}'s next correct call: {err2} {msg2}"


def test_ranks_passing_different_parameters(quick_buffer, rng):
    x, idx, e = inputs(rng, hidden=512 if RANK == 0 else 256)
    first = outcome(lambda: quick_buffer.dispatch(x, idx, num_experts=e))
    x, idx, e = inputs(rng)
    second = outcome(lambda: quick_buffer.dispatch(x, idx, num_experts=e))
    results = COMM.allgather((first, second))
    for r, ((err, msg), (err2, msg2)) in enumerate(results):
        assert err is cupyep.CallMismatchError, f"rank {r}: {err} {msg}"
        assert err2 is None, f"rank {r}'s next correct call: {err2} {msg2}"
    assert any("512" in msg and "256" in msg for (_, msg), _ in results)


def test_low_latency_top_k_disagreement(quick_buffer, rng):
    x, idx, e = inputs(rng)
    k_idx = idx[:, :1].copy() if RANK == LAST else idx
    first = outcome(lambda: quick_buffer.low_latency_dispatch(x, k_idx, 32, e))
    d = [None]
    second = outcome(lambda: d.__setitem__(0, quick_buffer.low_latency_dispatch(x, idx, 32, e, use_fp8=False)))
    third = outcome(lambda: quick_buffer.low_latency_combine(d[0].recv_x, idx, np.ones(idx.shape, np.float32),
                                                             d[0].handle))
    for r, (a, b, c) in enumerate(COMM.allgather((first, second, third))):
        assert a[0] is cupyep.CallMismatchError, f"rank {r}: {a}"
        assert b[0] is None and c[0] is None, f"rank {r}: {b} {c}"


def test_a_rank_that_does_not_come_times_out(quick_buffer, rng):
    x, idx, e = inputs(rng)
    # The others must meet within the timeout for the late rank to be the one
    # named (on an oversubscribed CPU a rank could otherwise start its call
    # 2 s after another, which would then rightly name it).
    COMM.Barrier()
    t0 = time.monotonic()
    if RANK == LAST:
        first = outcome(lambda: quick_buffer.dispatch(x, idx.astype(np.float32), num_experts=e))
        time.sleep(3.0)  # longer than the others' 2 s timeout
    else:
        first = outcome(lambda: quick_buffer.dispatch(x, idx, num_experts=e))
    waited = time.monotonic() - t0
    second = outcome(lambda: quick_buffer.dispatch(x, idx, num_experts=e))
    for r, ((err, msg), w, (err2, msg2)) in enumerate(COMM.allgather((first, waited, second))):
        if r == LAST:
            assert err is cupyep.InvalidInputError, f"rank {r}: {err} {msg}"
        else:
            assert err in (cupyep.CommTimeoutError, cupyep.CallMismatchError), f"rank {r}: {err} {msg}"
            assert f"rank {LAST}" in msg and w < 2.0 + 1.5, (msg, w)
        assert err2 is None, f"rank {r}'s next correct call: {err2} {msg2}"


def test_reset_after_a_rank_skipped_a_call(quick_buffer, rng):
    """The last rank raises on a bad argument; the others' call times out or
    mismatches; reset() on every rank, and the next calls pair from there."""
    x, idx, e = inputs(rng)
    first = outcome(lambda: quick_buffer.dispatch(x, idx.astype(np.float32) if RANK == LAST else idx,
                                                  num_experts=e))
    quick_buffer.reset()
    second = outcome(lambda: quick_buffer.dispatch(x, idx, num_experts=e))
    third = outcome(lambda: quick_buffer.low_latency_dispatch(x, idx, 32, e, use_fp8=False))
    for r, (a, b, c) in enumerate(COMM.allgather((first, second, third))):
        assert a[0] is not None, f"rank {r}'s first call: {a}"
        assert b[0] is None and c[0] is None, f"rank {r} after reset: {b} {c}"


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["hidden", "skipped_call", "combine_weights", "internode_hidden",
                                  "internode_combine_weights"])
def test_normal_call_mismatch_on_the_gpu_then_reset(request, backend, rng, case):
    """GPU normal calls: each barrier carries the call's tag. Rank 0 with
    another hidden size, or without weights in combine, or the last rank one
    call ahead after its bad argument: every rank raises CallMismatchError
    naming a peer and both calls; after reset() the next calls are right.
    The internode cases run across two emulated nodes (RDMA barrier)."""
    if backend != "gpu":
        pytest.skip("the GPU's call tags (the reference: test_ranks_passing_different_parameters)")
    buffer = request.getfixturevalue("internode_buffer" if case.startswith("internode") else "buffer")
    case = case.removeprefix("internode_")
    import cupy
    from helpers import agree_all, bits, expected_dispatch, gather, to_backend, to_host
    e = 4 * SIZE
    odd_rank = LAST if case == "skipped_call" else 0
    odd = RANK == odd_rank
    h = 2048 if case == "hidden" and odd else 1024
    x, idx = random_rows(rng, 16, h), random_topk(rng, 16, e, 2)
    w = rng.random(idx.shape).astype(np.float32)
    tb = lambda a: to_backend(a, backend)  # noqa: E731
    impl = buffer._impl
    saved, impl.timeout_ns = impl.timeout_ns, int(2e9)
    message = None
    try:
        if case == "skipped_call" and odd:
            with pytest.raises(cupyep.InvalidInputError):
                buffer.dispatch(tb(x.astype(np.float32)), tb(idx), tb(w), num_experts=e)
        d = buffer.dispatch(tb(x), tb(idx), tb(w), num_experts=e)
        if case == "combine_weights":
            buffer.combine(d.recv_x, d.handle, None if odd else d.recv_topk_weights)
        cupy.cuda.Device().synchronize()
        impl.check_errors()
    except cupyep.CallMismatchError as ex:
        message = str(ex)
    except Exception as ex:  # noqa: BLE001 - every rank must reach the reset below
        message = repr(ex)
    finally:
        impl.timeout_ns = saved
    buffer.reset()
    peers = [odd_rank] if not odd else [r for r in range(SIZE) if r != odd_rank]
    right = message is not None and any(f"rank {p} was at" in message for p in peers) and "reset()" in message
    if right and case == "hidden":
        right = "hidden=2048" in message and "hidden=1024" in message
    for r, (ok, msg) in enumerate(COMM.allgather((right, message))):
        assert ok, f"rank {r}: expected a CallMismatchError naming a peer, got {msg!r}"
    x = random_rows(rng, 16, 1024)
    d = buffer.dispatch(tb(x), tb(idx), tb(w), num_experts=e)
    c = buffer.combine(d.recv_x, d.handle, d.recv_topk_weights)
    rows, ids, _, _ = expected_dispatch(gather(x, idx, w), e)

    def check():
        assert (bits(to_host(d.recv_x)) == bits(rows)).all() and (to_host(d.recv_topk_idx) == ids).all()
        assert to_host(c.combined_x).shape == x.shape
    agree_all(check)


@pytest.mark.gpu
def test_normal_timeout_on_the_gpu_names_the_call_then_reset(buffer, backend, rng):
    """Rank 0 skips a dispatch: the others' notify barrier times out, and the
    CommTimeoutError names rank 0, the phase and the call; reset() on every
    rank (their barrier counts went apart), and the next dispatch is right."""
    if backend != "gpu":
        pytest.skip("GPU kernels' reports (the reference: test_a_rank_that_does_not_come_times_out)")
    from helpers import agree_all, bits, expected_dispatch, gather, to_backend, to_host
    e = 4 * SIZE
    x, idx = random_rows(rng, 16, 1024), random_topk(rng, 16, e, 2)
    w = rng.random(idx.shape).astype(np.float32)
    impl = buffer._impl
    saved, impl.timeout_ns = impl.timeout_ns, int(1e9)
    error = None
    try:
        if RANK != 0:
            buffer.dispatch(to_backend(x, backend), to_backend(idx, backend), to_backend(w, backend), num_experts=e)
    except cupyep.CommTimeoutError as ex:
        error = ex
    except Exception as ex:  # noqa: BLE001 - every rank must reach the reset below
        error = ex
    finally:
        impl.timeout_ns = saved
    buffer.reset()
    right = RANK == 0 or (isinstance(error, cupyep.CommTimeoutError) and error.peer == 0
                          and error.phase == "barrier" and "dispatch call #" in error.call)
    for r, (ok, msg) in enumerate(COMM.allgather((right, repr(error)))):
        assert ok, f"rank {r}: expected a timeout naming rank 0 and the dispatch call, got {msg}"
    d = buffer.dispatch(to_backend(x, backend), to_backend(idx, backend), to_backend(w, backend), num_experts=e)
    rows, ids, _, _ = expected_dispatch(gather(x, idx, w), e)

    def check():
        assert (bits(to_host(d.recv_x)) == bits(rows)).all() and (to_host(d.recv_topk_idx) == ids).all()
    agree_all(check)
