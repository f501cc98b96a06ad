"""Input generators, backend conversion and independent expectations.

The expectations here are computed with plain loops over every rank's inputs
(gathered with allgather), independently of cupyep.backends.reference.semantics.
"""
import numpy as np

from cupyep.formats.fp8 import bfloat16, float8_e4m3

from conftest import COMM, RANK, SIZE


def to_backend(a, backend):
    """NumPy test data to the backend's array type (CuPy on the GPU)."""
    if a is None or backend == "reference":
        return a
    import cupy
    if a.dtype == float8_e4m3:
        return cupy.asarray(a.view(np.uint8))
    if a.dtype == bfloat16:
        return cupy.asarray(a.view(np.uint16)).view(bfloat16)
    return cupy.asarray(a)


def to_host(a, dtype=None):
    """A result back to NumPy (uint8 FP8 views become e4m3 again)."""
    if a is None:
        return None
    if type(a).__module__.split(".")[0] in ("jax", "jaxlib"):
        a = np.asarray(a)
        return a.view(dtype) if dtype is not None and a.dtype != dtype else a
    if type(a).__module__.startswith("torch"):
        import torch
        a = a.detach().cpu()
        if a.dtype == torch.bfloat16:
            return a.view(torch.int16).numpy().view(bfloat16)
        if a.dtype == torch.float8_e4m3fn:
            return a.view(torch.uint8).numpy().view(float8_e4m3)
        a = a.numpy()
        return a.view(dtype) if dtype is not None and a.dtype != dtype else a
    if type(a).__module__.startswith("cupy"):
        import cupy
        if a.dtype == bfloat16:
            a = cupy.asnumpy(a.view(np.uint16)).view(bfloat16)
        else:
            a = cupy.asnumpy(a)
    a = np.asarray(a)
    if dtype is not None and a.dtype != dtype:
        a = a.view(dtype)
    return a


def random_topk(rng, num_tokens, num_experts, k, mode="random", drop=0.0):
    """[T, K] int64 distinct experts per token; -1 for dropped slots."""
    if mode == "one_expert":
        idx = np.full((num_tokens, k), -1, np.int64)
        idx[:, 0] = 0
        return idx
    if mode == "one_rank":
        per = num_experts // SIZE
        k_eff = min(k, per)
        idx = np.full((num_tokens, k), -1, np.int64)
        idx[:, :k_eff] = np.argsort(rng.random((num_tokens, per)), axis=1)[:, :k_eff]
        return idx
    idx = np.argsort(rng.random((num_tokens, num_experts)), axis=1)[:, :k].astype(np.int64)
    if drop:
        idx[rng.random(idx.shape) < drop] = -1
    return idx


def random_rows(rng, n, hidden):
    return (rng.standard_normal((n, hidden)) * 2).astype(np.float32).astype(bfloat16)


def bits(a):
    """Bit pattern view for exact comparisons of bf16 / fp8 arrays."""
    a = np.ascontiguousarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def gather(*arrays):
    """Every rank's arrays: a list over ranks of tuples."""
    return COMM.allgather(arrays)


def expected_dispatch(all_inputs, num_experts, rank=RANK):
    """Rows, local ids, weights and source indices rank ``rank`` receives.

    all_inputs: per source rank (x, topk_idx, topk_weights).
    """
    local = num_experts // SIZE
    lo, hi = rank * local, (rank + 1) * local
    rows, ids, ws, src = [], [], [], []
    for x, idx, w in all_inputs:
        for t in range(x.shape[0]):
            mine = [lo <= e < hi for e in idx[t]]
            if any(mine):
                rows.append(x[t])
                ids.append([e - lo if m else -1 for e, m in zip(idx[t], mine)])
                ws.append([wt if m else 0.0 for wt, m in zip(w[t], mine)])
                src.append(t)
    k = all_inputs[0][1].shape[1]
    h = all_inputs[0][0].shape[1]
    return (np.array(rows, all_inputs[0][0].dtype).reshape(-1, h),
            np.array(ids, np.int64).reshape(-1, k), np.array(ws, np.float32).reshape(-1, k),
            np.array(src, np.int32))


def assert_close_bf16(actual, expected, what, roundings=1, partial_magnitude=None):
    """Within bf16 rounding (one ulp) of an fp32 expectation. roundings=2: the
    sum was also rounded to bf16 in parts (inter-node combine rounds each node's
    partial sum), which adds up to half an ulp of each part: partial_magnitude
    bounds the sum of the parts' magnitudes (default |expected|)."""
    a = actual.astype(np.float32)
    e = expected.astype(np.float32)
    assert not np.isnan(a).any(), f"{what}: NaN in output"
    parts = np.abs(e) if partial_magnitude is None else partial_magnitude.astype(np.float32)
    tol = np.abs(e) * 2.0 ** -7 + (roundings - 1) * parts * 2.0 ** -7 + 1e-6
    bad = np.abs(a - e) > tol
    assert not bad.any(), (f"{what}: {bad.sum()} elements differ beyond bf16 rounding, "
                           f"first at {np.argwhere(bad)[0]}: {a[bad][0]} vs {e[bad][0]}")


def graph_inputs(rng, n, hidden, num_experts, k, min_weight=0.0):
    """Device inputs that keep their addresses across CUDA-graph replays:
    x [n, hidden] bf16, topk_idx [n, k] int64 (10% of slots -1), weights
    [n, k] fp32 in [min_weight, min_weight + 1). Returns (x, idx, w, fill);
    fill() draws new values into them and returns their host copies."""
    import cupy
    x_dev = cupy.empty((n, hidden), bfloat16)
    idx_dev = cupy.empty((n, k), np.int64)
    w_dev = cupy.empty((n, k), np.float32)

    def fill():
        x = random_rows(rng, n, hidden)
        idx = random_topk(rng, n, num_experts, k, drop=0.1)
        w = rng.random(idx.shape).astype(np.float32) + min_weight
        x_dev[...] = cupy.asarray(x)
        idx_dev[...] = cupy.asarray(idx)
        w_dev[...] = cupy.asarray(w)
        return x, idx, w

    return x_dev, idx_dev, w_dev, fill


def capture_graph(fill, step):
    """fill() and step() once outside capture (compiles kernels, fills the
    memory pool), then step() captured on a new stream.

    Returns (graph, stream, what the captured step() returned).
    """
    import cupy
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        fill()
        step()
        stream.synchronize()
        COMM.Barrier()
        stream.begin_capture()
        outputs = step()
        graph = stream.end_capture()
    return graph, stream, outputs


def replay_and_check(graph, stream, fill, check, replays):
    """Replay the graph with new inputs; every rank checks every replay, and
    the ranks agree on the verdict before the next replay (a rank that
    failed alone would leave the others waiting in the next exchange).

    fill() writes new inputs into the graph's arrays and returns them;
    check(i, inputs) raises if replay i is wrong (a collective in it runs
    before anything that can raise).
    """
    from mpi4py import MPI
    for i in range(replays):
        with stream:
            inputs = fill()
            graph.launch(stream)
            stream.synchronize()
        error = None
        try:
            check(i, inputs)
        except Exception as e:  # noqa: BLE001 - reported below, after the vote
            error = e
        if COMM.allreduce(error is not None, op=MPI.LOR):
            raise AssertionError(f"replay {i} failed on some rank; here: {error!r}")


def agree_all(check):
    """Run check() on every rank; raise everywhere if it raised anywhere (a
    rank failing alone would leave the others waiting in the next collective)."""
    from mpi4py import MPI
    error = None
    try:
        check()
    except Exception as e:  # noqa: BLE001 - reported after the vote
        error = e
    if COMM.allreduce(error is not None, op=MPI.LOR):
        raise AssertionError(f"failed on some rank; here: {error!r}")
