"""Normal (high-throughput) dispatch and combine against loop-computed expectations."""
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest

import cupyep
from cupyep.formats import fp8

from conftest import RANK, SIZE
from helpers import (agree_all, assert_close_bf16, bits, capture_graph, expected_dispatch, gather, graph_inputs,
                     random_rows, random_topk, replay_and_check, to_backend, to_host)


@dataclass(frozen=True)
class Case:
    name: str
    tokens: int = 96
    hidden: int = 2560
    experts_per_rank: int = 4
    topk: int = 4
    mode: str = "random"
    drop: float = 0.0
    zero_rank: bool = False
    use_fp8: bool = False
    alignment: int = 1
    worst: bool = False
    num_bias: int = 0
    config: Optional[cupyep.Config] = None  # None: the defaults
    combine_config: Optional[cupyep.Config] = None  # None: config


CASES = [
    Case("random"),
    Case("hidden7168", hidden=7168, tokens=64, topk=8, experts_per_rank=8),
    Case("hidden4096_k8", hidden=4096, tokens=80, topk=8, experts_per_rank=8),
    Case("one_expert", mode="one_expert"),
    Case("one_rank", mode="one_rank"),
    Case("zero_tokens_rank", zero_rank=True),
    Case("dropped_slots", drop=0.3),
    Case("k1", topk=1),
    Case("k9", topk=9, experts_per_rank=5),
    Case("fp8", use_fp8=True, hidden=7168, tokens=64, topk=8, experts_per_rank=8),
    Case("alignment", alignment=8),
    Case("worst_tokens", worst=True, drop=0.2),
    Case("bias1", num_bias=1),
    Case("bias2", num_bias=2, drop=0.1),
]


# Launch shapes other than the defaults (blocks, warps per dispatch block,
# tokens per progress round, warps per combine block, which side copies own
# rows), inside a node.
SHAPES = [
    Case("sms8_warps32_chunk4", hidden=7168, tokens=128, topk=8, experts_per_rank=8,
         config=cupyep.Config(num_sms=8, num_warps=32, chunk_tokens=4, num_combine_warps=16)),
    Case("sms48_warps8_chunk2", tokens=160, drop=0.1,
         config=cupyep.Config(num_sms=48, num_warps=8, chunk_tokens=2, num_combine_warps=8)),
    Case("sms16_warps24_fp8", use_fp8=True, hidden=7168, tokens=96, topk=8, experts_per_rank=8,
         config=cupyep.Config(num_sms=16, num_warps=24, chunk_tokens=1, num_combine_warps=24)),
    # Rows a rank sends itself copied by its senders, its receivers, or both,
    # whatever the rank count's default.
    Case("own_rows_by_senders_fp8", use_fp8=True, hidden=7168, tokens=96, topk=8, experts_per_rank=8,
         worst=True, drop=0.1, config=cupyep.Config(num_sms=24, num_warps=24, own_rows_receiver_share=0)),
    Case("own_rows_by_receivers", tokens=128, drop=0.2, alignment=4,
         config=cupyep.Config(num_sms=24, num_warps=16, own_rows_receiver_share=1)),
    Case("own_rows_shared", tokens=200, worst=True, topk=8, experts_per_rank=8,
         config=cupyep.Config(num_sms=8, num_warps=16, own_rows_receiver_share=0.4)),
    # Combine on another grid than the dispatch's channels: many senders,
    # items that end mid-stream, one receiver; then one sender.
    Case("combine_7_senders_3_row_items", tokens=300, drop=0.1, num_bias=1,
         combine_config=cupyep.Config(num_sms=10, num_combine_senders=7, combine_chunk_rows=3)),
    Case("combine_1_sender_1_row_items", tokens=150, hidden=7168, topk=8, experts_per_rank=8,
         config=cupyep.Config(num_sms=4),
         combine_config=cupyep.Config(num_sms=32, num_combine_senders=1, combine_chunk_rows=1,
                                      num_combine_warps=8)),
]


def _num_tokens(case):
    return 0 if case.zero_rank and RANK == SIZE - 1 and SIZE > 1 else case.tokens


@pytest.fixture(params=["intranode", "internode"])
def normal_buffer(request, backend):
    """A buffer on one node, or on two emulated nodes (NVSHMEM puts between
    them, NVLink forwarding inside; see conftest.internode_group)."""
    return request.getfixturevalue("buffer" if request.param == "intranode" else "internode_buffer")


def _roundings(buf):
    """Combine across nodes reduces inside each node first: two bf16 roundings."""
    return 2 if buf.group.num_nodes > 1 and buf.group.num_ranks_per_node > 1 else 1


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_dispatch_combine(normal_buffer, backend, rng, case):
    _dispatch_combine(normal_buffer, backend, rng, case, _roundings(normal_buffer))


@pytest.mark.parametrize("case", SHAPES, ids=lambda c: c.name)
def test_launch_shapes(buffer, backend, rng, case):
    _dispatch_combine(buffer, backend, rng, case)


def test_layout_counts_call_after_call(buffer, backend, rng):
    """get_dispatch_layout's counts and mask, call after call with the outputs
    kept (the GPU kernel leaves its scratch zeroed for the next launch), for
    token counts of one block, several (256 tokens a block), and none."""
    num_experts = 4 * SIZE
    local = num_experts // SIZE
    layouts = []
    for t in (700, 1, 0, 300, 700):
        idx = random_topk(rng, t, num_experts, 4, drop=0.2)
        layouts.append((idx, buffer.get_dispatch_layout(to_backend(idx, backend), num_experts)))

    def check():
        for idx, lay in layouts:
            in_rank = np.zeros((idx.shape[0], SIZE), bool)
            for r in range(SIZE):
                in_rank[:, r] = ((idx >= r * local) & (idx < (r + 1) * local)).any(axis=1)
            assert (to_host(lay.is_token_in_rank) == in_rank).all(), f"mask, T={idx.shape[0]}"
            assert (to_host(lay.num_tokens_per_rank) == in_rank.sum(0)).all(), f"per rank, T={idx.shape[0]}"
            per_expert = np.array([(idx == e).sum() for e in range(num_experts)])
            assert (to_host(lay.num_tokens_per_expert) == per_expert).all(), f"per expert, T={idx.shape[0]}"
    agree_all(check)


def _dispatch_combine(buffer, backend, rng, case, roundings=1):
    num_experts = case.experts_per_rank * SIZE
    t, h = _num_tokens(case), case.hidden
    x = random_rows(rng, t, h)
    idx = random_topk(rng, t, num_experts, case.topk, case.mode, case.drop)
    w = rng.random(idx.shape).astype(np.float32) + 0.5
    everyone = gather(x, idx, w)

    layout = buffer.get_dispatch_layout(to_backend(idx, backend), num_experts)
    local = num_experts // SIZE
    want_in_rank = np.zeros((t, SIZE), bool)
    for r in range(SIZE):
        want_in_rank[:, r] = ((idx >= r * local) & (idx < (r + 1) * local)).any(axis=1)
    assert (to_host(layout.is_token_in_rank) == want_in_rank).all()
    assert (to_host(layout.num_tokens_per_rank) == want_in_rank.sum(0)).all()
    want_per_expert = np.array([(idx == e).sum() for e in range(num_experts)])
    assert (to_host(layout.num_tokens_per_expert) == want_per_expert).all()

    if case.use_fp8:
        q, s = fp8.per_token_cast_to_fp8(x)
        x_in = (to_backend(q, backend), to_backend(s, backend))
    else:
        x_in = to_backend(x, backend)
    worst = sum(e[0].shape[0] for e in everyone) if case.worst else 0
    res = buffer.dispatch(x_in, to_backend(idx, backend), to_backend(w, backend), layout=layout,
                          expert_alignment=case.alignment, num_worst_tokens=worst, config=case.config)

    rows, ids, ws, src = expected_dispatch(everyone, num_experts)
    n = rows.shape[0]
    got_rows = to_host(res.recv_x, fp8.float8_e4m3 if case.use_fp8 else None)
    assert got_rows.shape[0] == (worst or n)
    if case.use_fp8:
        q_all = [fp8.per_token_cast_to_fp8(e[0]) for e in everyone]
        want_q, _, _, _ = expected_dispatch([(qq, e[1], e[2]) for (qq, _), e in zip(q_all, everyone)], num_experts)
        want_s, _, _, _ = expected_dispatch([(ss, e[1], e[2]) for (_, ss), e in zip(q_all, everyone)], num_experts)
        assert (bits(got_rows[:n]) == bits(want_q)).all()
        assert (to_host(res.recv_x_scales)[:n] == want_s).all()
    else:
        assert (bits(got_rows[:n]) == bits(rows)).all(), "received rows differ"
    assert (to_host(res.recv_topk_idx)[:n] == ids).all()
    assert (to_host(res.recv_topk_weights)[:n] == ws).all()
    assert (to_host(res.handle.recv_src_idx)[:n] == src).all()
    if worst:
        assert (to_host(res.recv_topk_idx)[n:] == -1).all()
        assert (to_host(res.recv_topk_weights)[n:] == 0).all()
        assert (to_host(res.handle.recv_src_idx)[n:] == -1).all()
    counts = [int((ids == e).sum()) for e in range(local)]
    padded = [-(-c // case.alignment) * case.alignment for c in counts]
    assert [int(c) for c in to_host(np.asarray(res.num_recv_tokens_per_expert)
                                    if isinstance(res.num_recv_tokens_per_expert, list)
                                    else res.num_recv_tokens_per_expert)] == padded

    # combine: each rank scales its rows by (rank + 1); the origin sums them.
    y = np.zeros((res.recv_x.shape[0], h), fp8.bfloat16)
    y[:n] = (rows.astype(np.float32) * (RANK + 1)).astype(fp8.bfloat16)
    biases = [random_rows(rng, t, h) for _ in range(case.num_bias)]
    bias_arg = None
    if case.num_bias == 1:
        bias_arg = to_backend(biases[0], backend)
    elif case.num_bias == 2:
        bias_arg = tuple(to_backend(b, backend) for b in biases)
    recv_w = np.zeros((y.shape[0], idx.shape[1]), np.float32)
    recv_w[:n] = ws
    out = buffer.combine(to_backend(y, backend), res.handle, to_backend(recv_w, backend), bias_arg,
                         config=case.combine_config or case.config)

    want = np.zeros((t, h), np.float32)
    parts = np.zeros((t, h), np.float32)  # bounds the magnitude of per-node partial sums
    for j in range(SIZE):
        scaled = (x.astype(np.float32) * (j + 1)).astype(fp8.bfloat16).astype(np.float32)
        want[want_in_rank[:, j]] += scaled[want_in_rank[:, j]]
        parts[want_in_rank[:, j]] += np.abs(scaled[want_in_rank[:, j]])
    for b in biases:
        want += b.astype(np.float32)
    assert_close_bf16(to_host(out.combined_x), want, "combined_x", roundings, parts)
    want_w = np.where(idx >= 0, w, 0).astype(np.float32)
    np.testing.assert_allclose(to_host(out.combined_topk_weights), want_w, rtol=1e-6)


def test_cached_dispatch(normal_buffer, backend, rng):
    _cached_dispatch(normal_buffer, backend, rng)


def _cached_dispatch(buffer, backend, rng):
    num_experts = 4 * SIZE
    x = random_rows(rng, 64, 2560)
    idx = random_topk(rng, 64, num_experts, 3, drop=0.2)
    w = rng.random(idx.shape).astype(np.float32)
    first = buffer.dispatch(to_backend(x, backend), to_backend(idx, backend), to_backend(w, backend),
                            num_experts=num_experts)
    x2 = random_rows(rng, 64, 2560)
    again = buffer.dispatch(to_backend(x2, backend), handle=first.handle)
    rows, _, _, _ = expected_dispatch(gather(x2, idx, w), num_experts)
    assert again.recv_topk_idx is None
    assert (bits(to_host(again.recv_x)) == bits(rows)).all()


def test_plain_row_all_to_all(normal_buffer, backend, rng):
    buffer = normal_buffer
    t, h = 50, 1024
    x = random_rows(rng, t, h)
    in_rank = rng.random((t, SIZE)) < 0.5
    res = buffer.dispatch(to_backend(x, backend), is_token_in_rank=to_backend(in_rank, backend))
    everyone = gather(x, in_rank)
    want = np.concatenate([xs[m[:, RANK]] for xs, m in everyone])
    assert res.recv_topk_idx is None
    assert (bits(to_host(res.recv_x)) == bits(want)).all()
    out = buffer.combine(res.recv_x, res.handle)
    want_sum = (x.astype(np.float32) * in_rank.sum(1, keepdims=True)).astype(np.float32)
    assert_close_bf16(to_host(out.combined_x), want_sum, "combined_x", _roundings(buffer))


def test_deterministic(normal_buffer, backend, rng):
    buffer = normal_buffer
    num_experts = 4 * SIZE
    x = random_rows(rng, 80, 2560)
    idx = random_topk(rng, 80, num_experts, 4)
    outs = []
    for _ in range(2):
        d = buffer.dispatch(to_backend(x, backend), to_backend(idx, backend), num_experts=num_experts)
        c = buffer.combine(d.recv_x, d.handle)
        outs.append((bits(to_host(d.recv_x)).copy(), bits(to_host(c.combined_x)).copy()))
    assert (outs[0][0] == outs[1][0]).all() and (outs[0][1] == outs[1][1]).all()


def test_worst_token_mode_in_cuda_graph(normal_buffer, backend, rng):
    """Layout, worst-token dispatch and combine captured in one CUDA graph and
    replayed 20 times with new tokens and routing; every replay checked."""
    if backend != "gpu":
        pytest.skip("CUDA graphs need the GPU backend")
    buffer = normal_buffer
    t, h, k, num_experts = 48, 1024, 4, 4 * SIZE
    worst = t * SIZE
    x_dev, idx_dev, w_dev, fill = graph_inputs(rng, t, h, num_experts, k, min_weight=0.5)

    def step():
        lay = buffer.get_dispatch_layout(idx_dev, num_experts)
        d = buffer.dispatch(x_dev, idx_dev, w_dev, layout=lay, num_worst_tokens=worst)
        return d, buffer.combine(d.recv_x, d.handle, d.recv_topk_weights)

    graph, stream, (d, c) = capture_graph(fill, step)

    def check(i, inputs):
        x, idx, w = inputs
        everyone = gather(x, idx, w)
        buffer._impl.check_errors()
        rows, ids, ws, src = expected_dispatch(everyone, num_experts)
        n = rows.shape[0]
        assert (bits(to_host(d.recv_x)[:n]) == bits(rows)).all(), f"rows of replay {i}"
        assert (to_host(d.recv_topk_idx)[:n] == ids).all() and (to_host(d.recv_topk_idx)[n:] == -1).all()
        assert (to_host(d.recv_topk_weights)[:n] == ws).all() and (to_host(d.recv_topk_weights)[n:] == 0).all()
        assert (to_host(d.handle.recv_src_idx)[:n] == src).all() and (to_host(d.handle.recv_src_idx)[n:] == -1).all()
        local = num_experts // SIZE
        in_rank = np.stack([((idx >= r * local) & (idx < (r + 1) * local)).any(1) for r in range(SIZE)], 1)
        want = x.astype(np.float32) * in_rank.sum(1, keepdims=True)
        assert_close_bf16(to_host(c.combined_x), want, f"combined_x of replay {i}", _roundings(buffer))
        np.testing.assert_array_equal(to_host(c.combined_topk_weights), np.where(idx >= 0, w, 0))

    replay_and_check(graph, stream, fill, check, 20)


def test_events_order_and_async_finish(normal_buffer, backend, rng):
    """previous_event orders a call after work on another stream; with
    async_finish the call returns an event and the caller waits on it."""
    if backend != "gpu":
        pytest.skip("events exist on the GPU backend only")
    import cupy
    buffer = normal_buffer
    num_experts = 4 * SIZE
    x = random_rows(rng, 64, 1024)
    idx = random_topk(rng, 64, num_experts, 4, drop=0.1)
    w = rng.random(idx.shape).astype(np.float32) + 0.5
    producer = cupy.cuda.Stream(non_blocking=True)
    with producer:  # the input is written on another stream; the event orders dispatch after it
        xb = cupy.empty((64, 1024), fp8.bfloat16)
        xb[...] = to_backend(x, backend)
        ready = producer.record()
    d = buffer.dispatch(xb, to_backend(idx, backend), to_backend(w, backend), num_experts=num_experts,
                        previous_event=ready, async_finish=True)
    assert d.event is not None
    d.event.current_stream_wait()
    c = buffer.combine(d.recv_x, d.handle, d.recv_topk_weights, previous_event=d.event, async_finish=True)
    c.event.current_stream_wait()
    rows, ids, _, _ = expected_dispatch(gather(x, idx, w), num_experts)
    assert (bits(to_host(d.recv_x)) == bits(rows)).all()
    assert (to_host(d.recv_topk_idx) == ids).all()
    np.testing.assert_array_equal(to_host(c.combined_topk_weights), np.where(idx >= 0, w, 0))


def test_calls_on_different_streams_stay_ordered(normal_buffer, backend, rng):
    """A plain call runs on the caller's stream; one made on another stream
    waits for the previous call (they share the buffer) without the caller
    ordering them: here behind an async dispatch held back by a spin kernel."""
    if backend != "gpu":
        pytest.skip("streams exist on the GPU backend only")
    import cupy
    from cupyep.jit import KernelSpec, launch
    buffer = normal_buffer
    num_experts = 4 * SIZE
    x = random_rows(rng, 64, 1024)
    x2 = random_rows(rng, 64, 1024)
    idx = random_topk(rng, 64, num_experts, 4, drop=0.1)
    w = rng.random(idx.shape).astype(np.float32) + 0.5
    args = (to_backend(idx, backend), to_backend(w, backend))
    d0 = buffer.dispatch(to_backend(x, backend), *args, num_experts=num_experts)  # compiles, sizes
    held = cupy.cuda.Stream(non_blocking=True)
    with held:
        launch(KernelSpec("cupyep/bench_kernels.cu", "cupyep::spin_ns"), (1,), (1,), (np.int64(300_000_000),))
        ready = held.record()
    d1 = buffer.dispatch(to_backend(x, backend), *args, num_experts=num_experts, previous_event=ready,
                         num_worst_tokens=64 * SIZE, async_finish=True)
    other = cupy.cuda.Stream(non_blocking=True)
    with other:
        d2 = buffer.dispatch(to_backend(x2, backend), handle=d0.handle)
        after = other.record()
    time.sleep(0.05)  # d2 alone would be done by now; d1 spins 250 ms more
    waited = not after.done
    after.synchronize()
    d1.event.current_stream_wait()
    rows, ids, _, _ = expected_dispatch(gather(x, idx, w), num_experts)
    rows2, _, _, _ = expected_dispatch(gather(x2, idx, w), num_experts)
    n = len(rows)
    assert waited, "a call on another stream did not wait for the previous call"
    assert (bits(to_host(d1.recv_x)[:n]) == bits(rows)).all()
    assert (to_host(d1.recv_topk_idx)[:n] == ids).all()
    assert (bits(to_host(d2.recv_x)) == bits(rows2)).all()
