"""Argument checks that run before anything is launched.

They read only shapes, dtypes and strides (never array contents on the GPU),
so they cost no synchronisation. Arrays are backend-native: NumPy, CuPy, or
torch CUDA tensors (dtypes compared as NumPy's through interop.dtype_of).
"""
from __future__ import annotations

import numpy as np

from cupyep.arrays.interop import dtype_of, is_c_contiguous, strides_of
from cupyep.errors import InvalidInputError
from cupyep.formats.fp8 import FP8_GROUP, bfloat16, float8_e4m3

_FP8_DTYPES = (float8_e4m3, np.dtype(np.uint8))
# dtype objects, not scalar types: comparing a dtype with np.int64 converts it on every call
_INDEX_DTYPES = (np.dtype(np.int64), np.dtype(np.int32))
_FLOAT32 = np.dtype(np.float32)


def check_contiguous(a, name: str) -> None:
    if not is_c_contiguous(a):
        raise InvalidInputError(f"{name} must be C-contiguous (got strides {strides_of(a)} bytes)")


def check_hidden(hidden: int) -> None:
    """Any positive multiple of 128 is supported (kernels are specialised per size)."""
    if hidden <= 0 or hidden % FP8_GROUP:
        raise InvalidInputError(
            f"unsupported hidden size {hidden}: supported sizes are the positive "
            f"multiples of {FP8_GROUP}")


def check_bf16_rows(x, name: str = "x", rows: int | None = None) -> None:
    """x: [rows, H] bf16, contiguous, H supported."""
    xs = x.shape  # read once: a torch attribute read costs ~0.25 us
    if (len(xs) == 2 and xs[1] > 0 and xs[1] % FP8_GROUP == 0 and (rows is None or xs[0] == rows)
            and dtype_of(x) == bfloat16 and is_c_contiguous(x)):
        return
    if x.ndim != 2:
        raise InvalidInputError(f"{name} must be 2-D [tokens, hidden], got shape {tuple(x.shape)}")
    if dtype_of(x) != bfloat16:
        raise InvalidInputError(f"{name} must be bfloat16, got {x.dtype}")
    check_contiguous(x, name)
    check_hidden(x.shape[1])
    if rows is not None and x.shape[0] != rows:
        raise InvalidInputError(f"{name} has {x.shape[0]} rows, expected {rows}")


def check_fp8_pair(q, scales, name: str = "x") -> None:
    """(q [T, H] e4m3 or uint8, scales [T, H/128] fp32)."""
    if q.ndim != 2 or dtype_of(q) not in _FP8_DTYPES:
        raise InvalidInputError(
            f"{name}[0] must be 2-D float8_e4m3fn (or its uint8 view), got "
            f"{q.dtype} {tuple(q.shape)}")
    check_contiguous(q, f"{name}[0]")
    check_hidden(q.shape[1])
    want = (q.shape[0], q.shape[1] // FP8_GROUP)
    if dtype_of(scales) != _FLOAT32 or tuple(scales.shape) != want:
        raise InvalidInputError(
            f"{name}[1] (scales) must be float32 of shape {want}, got "
            f"{scales.dtype} {tuple(scales.shape)}")
    check_contiguous(scales, f"{name}[1]")


def check_topk(topk_idx, topk_weights, num_tokens: int, tokens_of: str = "x has") -> None:
    """topk_idx [T, K] int64/int32; topk_weights [T, K] fp32 or None.
    ``tokens_of`` says where ``num_tokens`` comes from, for the message.
    Fast path as in check_low_latency_dispatch."""
    ks = topk_idx.shape
    if (len(ks) == 2 and ks[0] == num_tokens and ks[1] >= 1 and dtype_of(topk_idx) in _INDEX_DTYPES
            and is_c_contiguous(topk_idx)
            and (topk_weights is None or (topk_weights.shape == ks and dtype_of(topk_weights) == _FLOAT32
                                          and is_c_contiguous(topk_weights)))):
        return
    if topk_idx.ndim != 2 or dtype_of(topk_idx) not in _INDEX_DTYPES:
        raise InvalidInputError(
            f"topk_idx must be 2-D int64 (or int32), got {topk_idx.dtype} {tuple(topk_idx.shape)}")
    if topk_idx.shape[0] != num_tokens:
        raise InvalidInputError(
            f"topk_idx has {topk_idx.shape[0]} rows but {tokens_of} {num_tokens} tokens")
    if topk_idx.shape[1] < 1:
        raise InvalidInputError("topk_idx needs at least one column")
    check_contiguous(topk_idx, "topk_idx")
    if topk_weights is not None:
        if dtype_of(topk_weights) != _FLOAT32:
            raise InvalidInputError(f"topk_weights must be float32, got {topk_weights.dtype}")
        if topk_weights.shape != topk_idx.shape:  # same framework: tuples or torch.Size
            raise InvalidInputError(
                f"topk_weights shape {tuple(topk_weights.shape)} differs from "
                f"topk_idx shape {tuple(topk_idx.shape)}")
        check_contiguous(topk_weights, "topk_weights")
    raise AssertionError(f"check_topk: no check failed for topk_idx {tuple(ks)}")


def check_num_experts(num_experts: int, num_ranks: int) -> None:
    if num_experts <= 0 or num_experts % num_ranks:
        raise InvalidInputError(
            f"num_experts ({num_experts}) must be a positive multiple of the "
            f"number of ranks ({num_ranks})")


def check_expert_range_host(topk_idx: np.ndarray, num_experts: int) -> None:
    """Host check of expert ids; the GPU backend checks on the device."""
    if topk_idx.size and (topk_idx.min() < -1 or topk_idx.max() >= num_experts):
        bad = topk_idx[(topk_idx < -1) | (topk_idx >= num_experts)]
        raise InvalidInputError(
            f"expert id {int(bad.flat[0])} in topk_idx is outside [-1, {num_experts})")


def check_node_limit(is_token_in_rank: np.ndarray, num_ranks_per_node: int, max_nodes: int) -> None:
    """Group-limited routing: no token may reach more than ``max_nodes`` nodes."""
    t, r = is_token_in_rank.shape
    nodes = is_token_in_rank.reshape(t, r // num_ranks_per_node, num_ranks_per_node).any(axis=2).sum(axis=1)
    if t and nodes.max() > max_nodes:
        raise InvalidInputError(
            f"token {int(np.argmax(nodes > max_nodes))}'s experts span {int(nodes.max())} nodes, more than "
            f"max_nodes_per_token={max_nodes} (group-limited routing)")


def check_is_token_in_rank(is_token_in_rank, num_tokens: int, num_ranks: int) -> None:
    if dtype_of(is_token_in_rank) != np.bool_ or tuple(is_token_in_rank.shape) != (num_tokens, num_ranks):
        raise InvalidInputError(
            f"is_token_in_rank must be bool [{num_tokens}, {num_ranks}], got "
            f"{is_token_in_rank.dtype} {tuple(is_token_in_rank.shape)}")
    check_contiguous(is_token_in_rank, "is_token_in_rank")


def check_handle(handle, handle_type, buffer_id: int) -> None:
    if not isinstance(handle, handle_type):
        raise InvalidInputError(f"expected a {handle_type.__name__}, got {type(handle).__name__}")
    if handle.buffer_id != buffer_id:
        raise InvalidInputError("the handle was made by another buffer")


def check_combine_weights(w, rows: int, num_topk: int) -> None:
    """A normal combine's topk_weights: float32 [rows, K], K the dispatch's top-k (> 0), contiguous."""
    if dtype_of(w) != _FLOAT32 or tuple(w.shape) != (rows, num_topk) or not num_topk:
        raise InvalidInputError(f"combine: topk_weights must be float32 [{rows}, {num_topk}] (the "
                                f"dispatch's top-k), got {w.dtype} {tuple(w.shape)}")
    check_contiguous(w, "topk_weights")


def check_normal_combine(x, topk_weights, rows: int, hidden: int, num_topk: int) -> None:
    """A normal combine's inputs: x [rows, hidden] bf16 (the dispatch's
    rows) and topk_weights None or [rows, K] fp32 with K the dispatch's
    top-k (> 0), both contiguous. Fast path as in check_low_latency_dispatch."""
    if (x.shape == (rows, hidden) and dtype_of(x) == bfloat16 and is_c_contiguous(x)
            and (topk_weights is None or (num_topk and topk_weights.shape == (rows, num_topk)
                                          and dtype_of(topk_weights) == _FLOAT32
                                          and is_c_contiguous(topk_weights)))):
        return
    check_bf16_rows(x)
    if tuple(x.shape) != (rows, hidden):
        raise InvalidInputError(f"combine: x has shape {tuple(x.shape)}, the handle expects {(rows, hidden)}")
    if topk_weights is not None:
        check_combine_weights(topk_weights, rows, num_topk)
    raise AssertionError(f"check_normal_combine: no check failed for x {tuple(x.shape)}")


def check_bias(bias, num_tokens: int, hidden: int) -> None:
    for i, b in enumerate(bias):
        check_bf16_rows(b, f"bias[{i}]", rows=num_tokens)
        if b.shape[1] != hidden:
            raise InvalidInputError(f"bias[{i}] has hidden {b.shape[1]}, expected {hidden}")


def check_low_latency_dispatch(x, topk_idx, m: int, num_experts: int, num_ranks: int, use_fp8: bool,
                               use_ue8m0: bool, max_topk: int) -> tuple:
    """A low-latency dispatch's inputs: x [T, H] bf16, topk_idx [T, K]
    int64/int32, both contiguous, 1 <= T <= m, 1 <= K <= max_topk. Returns
    (T, H, K). Each shape is read once (a torch attribute read costs ~0.25
    us); what fails goes through the checks above for their messages."""
    xs, ks = x.shape, topk_idx.shape
    if (len(xs) == 2 and len(ks) == 2 and xs[0] == ks[0] and xs[0] <= m and m >= 1 and 1 <= ks[1] <= max_topk
            and xs[1] > 0 and xs[1] % FP8_GROUP == 0 and dtype_of(x) == bfloat16
            and dtype_of(topk_idx) in _INDEX_DTYPES and num_experts > 0 and num_experts % num_ranks == 0
            and not (use_ue8m0 and (not use_fp8 or xs[1] % 512)) and is_c_contiguous(x)
            and is_c_contiguous(topk_idx)):
        return xs[0], xs[1], ks[1]
    check_bf16_rows(x)
    check_topk(topk_idx, None, xs[0])
    check_num_experts(num_experts, num_ranks)
    if m < 1 or xs[0] > m:
        raise InvalidInputError(f"{xs[0]} tokens exceed num_max_dispatch_tokens_per_rank={m} (or it is < 1)")
    if ks[1] > max_topk:
        raise InvalidInputError(f"low-latency calls take at most {max_topk} experts per token, got {ks[1]}")
    if use_ue8m0 and (not use_fp8 or xs[1] % 512):
        raise InvalidInputError("use_ue8m0 needs use_fp8 and a hidden size divisible by 512")
    raise AssertionError(f"check_low_latency_dispatch: no check failed for x {xs}, topk_idx {ks}")


def check_low_latency_combine(x, topk_idx, topk_weights, want: tuple, num_tokens: int, num_topk: int) -> None:
    """A low-latency combine's inputs: x bf16 of shape ``want`` ([L, R*M, H]),
    topk_idx [T, K] int64/int32 and topk_weights [T, K] fp32 with T and K
    those of the dispatch; all contiguous. Fast path as in check_low_latency_dispatch."""
    xs, ks = x.shape, topk_idx.shape
    if (topk_weights is not None and xs == want and ks == topk_weights.shape and len(ks) == 2
            and ks[0] == num_tokens and ks[1] == num_topk and dtype_of(x) == bfloat16
            and dtype_of(topk_idx) in _INDEX_DTYPES and dtype_of(topk_weights) == _FLOAT32
            and is_c_contiguous(x) and is_c_contiguous(topk_idx) and is_c_contiguous(topk_weights)):
        return
    if len(xs) != 3 or tuple(xs) != tuple(want) or dtype_of(x) != bfloat16:
        raise InvalidInputError(f"low_latency_combine: x must be bf16 {want}, got {x.dtype} {tuple(xs)}")
    check_contiguous(x, "x")
    if topk_weights is None:
        raise InvalidInputError("low_latency_combine needs topk_weights")
    check_topk(topk_idx, topk_weights, num_tokens, "the dispatch that made the handle had")
    if ks[1] != num_topk:
        raise InvalidInputError(f"topk_idx has K={ks[1]}, the handle has K={num_topk}")
    raise AssertionError(f"check_low_latency_combine: no check failed for x {xs}, topk_idx {ks}")
