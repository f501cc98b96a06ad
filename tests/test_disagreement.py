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
