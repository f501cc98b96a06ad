"""NumPy reference backend: the whole contract, moving real data over MPI.

Each function runs on one rank with that rank's arrays and exchanges rows
with the other ranks through ``MPI_Alltoallv``; nothing is gathered on one
rank. It defines the semantics the GPU kernels must reproduce (bit-exact where
data is only moved; same summation order where it is reduced) and is the
backend a user gets without a GPU.

Shapes: R ranks, E experts, L = E / R local experts, T tokens on this rank,
H hidden, K top-k, N rows received, M max tokens per rank (low latency).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from cupyep.errors import InvalidInputError
from cupyep.formats import fp8
from cupyep.formats import logfmt
from cupyep.types import DispatchLayout

bfloat16 = fp8.bfloat16


# --------------------------------------------------------------------------- #
# Row exchange over MPI
# --------------------------------------------------------------------------- #
def exchange_rows(comm, blocks: Sequence[np.ndarray], row_shape, dtype) -> list:
    """All-to-all-v of row blocks.

    Args:
        comm: mpi4py communicator of R ranks.
        blocks: R arrays, blocks[j] [n_j, *row_shape] of ``dtype`` goes to rank j.
        row_shape: shape of one row (the same on every rank).
        dtype: element dtype (the same on every rank).

    Returns:
        R arrays, the i-th [m_i, *row_shape] received from rank i.
    """
    from mpi4py import MPI

    dtype = np.dtype(dtype)
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
    send_counts = [int(b.shape[0]) for b in blocks]
    recv_counts = comm.alltoall(send_counts)
    send = np.concatenate(
        [np.ascontiguousarray(b).reshape(-1).view(np.uint8) for b in blocks]
        + [np.empty(0, np.uint8)])
    recv = np.empty(sum(recv_counts) * row_bytes, np.uint8)
    sc = [c * row_bytes for c in send_counts]
    rc = [c * row_bytes for c in recv_counts]
    comm.Alltoallv([send, (sc, _displs(sc)), MPI.BYTE], [recv, (rc, _displs(rc)), MPI.BYTE])
    out, off = [], 0
    for c in rc:
        out.append(recv[off:off + c].view(dtype).reshape((-1, *row_shape)))
        off += c
    return out


def _displs(counts):
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64).tolist()


# --------------------------------------------------------------------------- #
# Layout
# --------------------------------------------------------------------------- #
def get_dispatch_layout(topk_idx: np.ndarray, num_experts: int, num_ranks: int,
                        num_ranks_per_node: int) -> DispatchLayout:
    """Count where tokens go.

    Args:
        topk_idx: [T, K] int64/int32 expert ids, -1 for unused slots.
        num_experts: E, a multiple of num_ranks.
        num_ranks: R.
        num_ranks_per_node: ranks in one NVLink domain.

    Returns:
        DispatchLayout with NumPy arrays.
    """
    idx = topk_idx.astype(np.int64)
    per_rank = num_experts // num_ranks
    valid = idx >= 0
    rank_of = np.where(valid, idx // per_rank, -1)
    is_token_in_rank = np.stack([(rank_of == r).any(axis=1) for r in range(num_ranks)], axis=1) \
        if num_ranks else np.zeros((idx.shape[0], 0), bool)
    is_token_in_rank = np.ascontiguousarray(is_token_in_rank.reshape(idx.shape[0], num_ranks))
    num_tokens_per_rank = is_token_in_rank.sum(axis=0).astype(np.int32)
    num_tokens_per_expert = np.bincount(idx[valid], minlength=num_experts).astype(np.int32)
    num_nodes = num_ranks // num_ranks_per_node
    per_node = None
    if num_nodes > 1:
        in_node = is_token_in_rank.reshape(-1, num_nodes, num_ranks_per_node).any(axis=2)
        per_node = in_node.sum(axis=0).astype(np.int32)
    return DispatchLayout(num_tokens_per_rank, per_node, num_tokens_per_expert,
                          is_token_in_rank, num_experts)


# --------------------------------------------------------------------------- #
# Normal dispatch / combine
# --------------------------------------------------------------------------- #
@dataclass(frozen=True, eq=False)
class NormalRouting:
    """Reference routing tables kept in a DispatchHandle.

    send_index: R arrays, token ids (ascending) sent to each rank.
    recv_counts: [R] rows received from each source rank.
    """
    send_index: list
    recv_counts: np.ndarray


def routing_from_mask(is_token_in_rank: np.ndarray) -> list:
    return [np.flatnonzero(is_token_in_rank[:, j]) for j in range(is_token_in_rank.shape[1])]


def localize_topk(recv_topk_idx: np.ndarray, recv_topk_weights: Optional[np.ndarray],
                  rank: int, num_local_experts: int):
    """Global expert ids to local ones (-1 elsewhere); weights 0 there."""
    lo = rank * num_local_experts
    mine = (recv_topk_idx >= lo) & (recv_topk_idx < lo + num_local_experts)
    local = np.where(mine, recv_topk_idx - lo, -1).astype(np.int64)
    weights = None
    if recv_topk_weights is not None:
        weights = np.where(mine, recv_topk_weights, np.float32(0)).astype(np.float32)
    return local, weights


def padded_expert_counts(local_topk_idx: np.ndarray, num_local_experts: int,
                         expert_alignment: int) -> list:
    counts = np.bincount(local_topk_idx[local_topk_idx >= 0], minlength=num_local_experts)
    a = max(1, int(expert_alignment))
    return [int(-(-int(c) // a) * a) for c in counts]


def dispatch(comm, x, x_scales, topk_idx, topk_weights, is_token_in_rank,
             num_experts, expert_alignment=1, num_worst_tokens=0):
    """Normal dispatch on one rank.

    Args:
        comm: mpi4py communicator.
        x: [T, H] bf16, or e4m3 with ``x_scales`` [T, H/128] fp32.
        topk_idx: [T, K] int64 or None; topk_weights: [T, K] fp32 or None.
        is_token_in_rank: [T, R] bool.
        num_experts: E (ignored without top-k).
        expert_alignment: pad each per-expert count up to this multiple.
        num_worst_tokens: 0, or a fixed row count for the outputs.

    Returns:
        dict of recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights,
        num_recv_tokens_per_expert, recv_src_idx, num_recv_tokens, routing.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    send_index = routing_from_mask(is_token_in_rank)
    hidden = x.shape[1]
    recv_x = exchange_rows(comm, [x[s] for s in send_index], (hidden,), x.dtype)
    recv_counts = np.array([b.shape[0] for b in recv_x], np.int64)
    out = {"recv_x": np.concatenate(recv_x), "recv_x_scales": None,
           "recv_topk_idx": None, "recv_topk_weights": None,
           "num_recv_tokens_per_expert": None}
    if x_scales is not None:
        out["recv_x_scales"] = np.concatenate(exchange_rows(
            comm, [x_scales[s] for s in send_index], (x_scales.shape[1],), np.float32))
    src = exchange_rows(comm, [s.astype(np.int32) for s in send_index], (), np.int32)
    out["recv_src_idx"] = np.concatenate(src)
    if topk_idx is not None:
        k = topk_idx.shape[1]
        idx = topk_idx.astype(np.int64)
        ridx = np.concatenate(exchange_rows(comm, [idx[s] for s in send_index], (k,), np.int64))
        rw = None
        if topk_weights is not None:
            rw = np.concatenate(exchange_rows(
                comm, [topk_weights[s] for s in send_index], (k,), np.float32))
        local_experts = num_experts // size
        ridx, rw = localize_topk(ridx, rw, rank, local_experts)
        out["recv_topk_idx"], out["recv_topk_weights"] = ridx, rw
        out["num_recv_tokens_per_expert"] = padded_expert_counts(ridx, local_experts, expert_alignment)
    n = out["recv_x"].shape[0]
    out["num_recv_tokens"] = n
    if num_worst_tokens:
        if n > num_worst_tokens:
            raise InvalidInputError(
                f"rank {rank} received {n} tokens, more than num_worst_tokens={num_worst_tokens}")
        out = pad_to_worst(out, num_worst_tokens)
    out["routing"] = NormalRouting(send_index, recv_counts)
    return out


def pad_to_worst(out: dict, num_worst_tokens: int) -> dict:
    """Pad received arrays to ``num_worst_tokens`` rows (x 0, ids -1, weights 0)."""
    fills = {"recv_x": 0, "recv_x_scales": 0, "recv_topk_idx": -1,
             "recv_topk_weights": 0, "recv_src_idx": -1}
    for key, fill in fills.items():
        a = out.get(key)
        if a is None:
            continue
        pad = np.full((num_worst_tokens - a.shape[0], *a.shape[1:]), fill, a.dtype)
        out[key] = np.concatenate([a, pad])
    if out.get("num_recv_tokens_per_expert") is not None:
        out["num_recv_tokens_per_expert"] = np.asarray(out["num_recv_tokens_per_expert"], np.int32)
    return out


def cached_dispatch(comm, routing: NormalRouting, x, x_scales, num_worst_tokens=0):
    """Dispatch new data along the routing of an earlier dispatch.

    Returns:
        (recv_x, recv_x_scales), shaped as the original dispatch's outputs.
    """
    hidden = x.shape[1]
    recv_x = np.concatenate(exchange_rows(comm, [x[s] for s in routing.send_index], (hidden,), x.dtype))
    recv_s = None
    if x_scales is not None:
        recv_s = np.concatenate(exchange_rows(
            comm, [x_scales[s] for s in routing.send_index], (x_scales.shape[1],), np.float32))
    if num_worst_tokens:
        padded = pad_to_worst({"recv_x": recv_x, "recv_x_scales": recv_s}, num_worst_tokens)
        recv_x, recv_s = padded["recv_x"], padded["recv_x_scales"]
    return recv_x, recv_s


def combine(comm, routing: NormalRouting, num_tokens: int, x: np.ndarray,
            topk_weights: Optional[np.ndarray], bias: Sequence[np.ndarray]):
    """Normal combine on one rank.

    Args:
        routing: tables of the dispatch being reversed.
        num_tokens: T, tokens this rank dispatched.
        x: [N, H] bf16 rows aligned with the received rows (extra worst-mode
            rows are ignored).
        topk_weights: [N, K] fp32 or None.
        bias: zero, one or two [T, H] bf16 arrays.

    Returns:
        (combined_x [T, H] bf16, combined_topk_weights [T, K] fp32 or None).
        combined_x[t] = bf16(((sum over ranks j in order of row_j) + bias0) + bias1)
        with every sum in fp32.
    """
    hidden = x.shape[1]
    bounds = np.concatenate([[0], np.cumsum(routing.recv_counts)])
    x_blocks = [x[bounds[i]:bounds[i + 1]] for i in range(len(routing.recv_counts))]
    back = exchange_rows(comm, x_blocks, (hidden,), x.dtype)
    acc = np.zeros((num_tokens, hidden), np.float32)
    for sel, rows in zip(routing.send_index, back):
        acc[sel] += rows.astype(np.float32)
    for b in bias:
        acc += b.astype(np.float32)
    weights = None
    if topk_weights is not None:
        k = topk_weights.shape[1]
        w_blocks = [topk_weights[bounds[i]:bounds[i + 1]] for i in range(len(routing.recv_counts))]
        wback = exchange_rows(comm, w_blocks, (k,), np.float32)
        weights = np.zeros((num_tokens, k), np.float32)
        for sel, rows in zip(routing.send_index, wback):
            weights[sel] += rows
    return acc.astype(bfloat16), weights


# --------------------------------------------------------------------------- #
# Low-latency dispatch / combine
# --------------------------------------------------------------------------- #
@dataclass(frozen=True, eq=False)
class LowLatencyRouting:
    """Reference tables kept in a LowLatencyHandle.

    recv_counts: [L, R] rows received per (local expert, source rank).
    """
    recv_counts: np.ndarray


def tokens_for_expert(topk_idx: np.ndarray, expert: int) -> np.ndarray:
    """Token ids (ascending) that chose ``expert``; a token counts once."""
    return np.flatnonzero((topk_idx == expert).any(axis=1))


def left_out(mask, rank, size) -> np.ndarray:
    """[R] bool: ranks this rank leaves out of low-latency calls (all of them
    when it masks itself: it is out of the exchange)."""
    if mask is None:
        return np.zeros(size, bool)
    return np.asarray(mask, bool) | bool(mask[rank])


def masked_topk(topk_idx, out: np.ndarray, num_local: int) -> np.ndarray:
    """topk_idx (int64) with -1 where the expert's rank is left out (``out`` [R] bool)."""
    idx = topk_idx.astype(np.int64)
    if not out.any():
        return idx
    return np.where((idx >= 0) & out[np.clip(idx, 0, None) // num_local], -1, idx)


def low_latency_dispatch(comm, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                         use_fp8=True, round_scale=False, use_ue8m0=False, mask=None):
    """Low-latency dispatch on one rank.

    Args:
        x: [T, H] bf16, T <= M.
        topk_idx: [T, K] int64, -1 for unused slots.
        num_max_dispatch_tokens_per_rank: M.
        num_experts: E.
        use_fp8: cast to e4m3 with per-128 scales before sending.
        round_scale: power-of-two scales. use_ue8m0: pack scales as UE8M0.
        mask: optional [R] int, 1 = rank left out (see left_out); its
            experts get nothing and rows from it are dropped.

    Returns:
        dict of recv_x [L, R*M, H], recv_x_scales, recv_count [L] int32,
        src_info [L, R*M] int32 (-1 past the count), layout_range [L, R] int64,
        routing.
    """
    size = comm.Get_size()
    m = num_max_dispatch_tokens_per_rank
    local = num_experts // size
    hidden = x.shape[1]
    dropped = left_out(mask, comm.Get_rank(), size)
    idx = masked_topk(topk_idx, dropped, local)
    if use_fp8:
        q, scales = fp8.per_token_cast_to_fp8(x, round_scale=round_scale or use_ue8m0)
    per_dest_tokens = [[tokens_for_expert(idx, j * local + e) for e in range(local)]
                       for j in range(size)]
    counts = comm.alltoall([[len(t) for t in per_dest_tokens[j]] for j in range(size)])
    recv_counts = np.array(counts, np.int64).T  # [L, R]
    sel = [np.concatenate(per_dest_tokens[j] + [np.empty(0, np.int64)]) for j in range(size)]
    if use_fp8:
        rows = exchange_rows(comm, [q[s] for s in sel], (hidden,), q.dtype)
        srows = exchange_rows(comm, [scales[s] for s in sel], (hidden // fp8.FP8_GROUP,), np.float32)
    else:
        rows = exchange_rows(comm, [x[s] for s in sel], (hidden,), x.dtype)
    srcs = exchange_rows(comm, [s.astype(np.int32) for s in sel], (), np.int32)

    recv_x = np.zeros((local, size * m, hidden), rows[0].dtype)
    recv_s = np.zeros((local, size * m, hidden // fp8.FP8_GROUP), np.float32) if use_fp8 else None
    src_info = np.full((local, size * m), -1, np.int32)
    layout_range = np.zeros((local, size), np.int64)
    recv_count = np.zeros(local, np.int32)
    for i in range(size):
        if dropped[i]:
            recv_counts[:, i] = 0
        off = 0
        for e in range(local):
            c = int(recv_counts[e, i])
            begin = int(recv_count[e])
            recv_x[e, begin:begin + c] = rows[i][off:off + c]
            if use_fp8:
                recv_s[e, begin:begin + c] = srows[i][off:off + c]
            src_info[e, begin:begin + c] = srcs[i][off:off + c]
            layout_range[e, i] = (begin << 32) | c
            recv_count[e] += c
            off += c
    if use_fp8 and use_ue8m0:
        recv_s = fp8.pack_ue8m0(recv_s)
    return {"recv_x": recv_x, "recv_x_scales": recv_s, "recv_count": recv_count,
            "src_info": src_info, "layout_range": layout_range,
            "routing": LowLatencyRouting(recv_counts)}


def low_latency_combine(comm, x, topk_idx, topk_weights, routing: LowLatencyRouting, mask=None,
                        use_logfmt=False):
    """Low-latency combine on one rank.

    Args:
        x: [L, R*M, H] bf16 expert outputs in the received layout.
        topk_idx, topk_weights: [T, K] of the dispatch being reversed.
        routing: tables of that dispatch.
        mask: optional [R] int: experts of masked ranks add nothing.
        use_logfmt: rows travel LogFMT-10 encoded (cupyep.formats.logfmt): the sum
            takes the decoded values.

    Returns:
        [T, H] bf16: out[t] = sum over valid k, in k order, of
        topk_weights[t, k] * y(expert topk_idx[t, k], t), accumulated in fp32.
    """
    size = comm.Get_size()
    local, _, hidden = x.shape
    dropped = left_out(mask, comm.Get_rank(), size)
    idx = masked_topk(topk_idx, dropped, local)
    t = idx.shape[0]
    begins = np.concatenate([np.zeros((local, 1), np.int64),
                             np.cumsum(routing.recv_counts, axis=1)], axis=1)
    blocks = [np.concatenate([x[e, begins[e, i]:begins[e, i + 1]] for e in range(local)]
                             + [np.empty((0, hidden), x.dtype)]) for i in range(size)]
    back = exchange_rows(comm, blocks, (hidden,), x.dtype)
    acc = np.zeros((t, hidden), np.float32)
    for k in range(idx.shape[1]):
        contrib = np.zeros((t, hidden), np.float32)
        valid = idx[:, k] >= 0
        for j in range(size):
            if dropped[j]:
                continue
            off = 0
            for e in range(local):
                toks = tokens_for_expert(idx, j * local + e)
                rows = back[j][off:off + len(toks)]
                rows = logfmt.quantize(rows) if use_logfmt else rows.astype(np.float32)
                off += len(toks)
                hit = idx[toks, k] == j * local + e
                contrib[toks[hit]] = rows[hit]
        w = np.where(valid, topk_weights[:, k], np.float32(0)).astype(np.float32)
        acc = acc + w[:, None] * contrib
    return acc.astype(bfloat16)
