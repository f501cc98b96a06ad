"""Results and handles returned by :class:`cupyep.Buffer`.

All are dataclasses with slots, to be read, not changed (not frozen: a
frozen dataclass costs ~1.5 us more to build, on every call). Arrays are in the caller's framework unless a
field says "backend-native" (NumPy on the reference backend, CuPy on the GPU).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional


@dataclass(eq=False, slots=True)
class DispatchLayout:
    """Where each token goes, computed from ``topk_idx``.

    Attributes:
        num_tokens_per_rank: [num_ranks] int32, tokens sent to each rank.
        num_tokens_per_node: [num_nodes] int32 (None inside one node).
        num_tokens_per_expert: [num_experts] int32, (token, expert) pairs.
        is_token_in_rank: [num_tokens, num_ranks] bool.
        num_experts: total number of experts E.
        source: a weak reference to the ``topk_idx`` it was computed from
            (None when unknown): a dispatch given another ``topk_idx`` while
            that one is still alive is refused.
    """
    num_tokens_per_rank: Any
    num_tokens_per_node: Optional[Any]
    num_tokens_per_expert: Any
    is_token_in_rank: Any
    num_experts: int
    source: Any = field(default=None, repr=False)


@dataclass(eq=False, slots=True)
class DispatchHandle:
    """Routing of one normal dispatch, reused by cached dispatch and combine.

    Attributes:
        buffer_id: identity of the buffer that made it.
        num_tokens: tokens this rank sent (T).
        hidden: row width H.
        num_recv_tokens: rows received (N); -1 in worst-token mode, where the
            count stays on the device.
        num_worst_tokens: 0, or the fixed row count of worst-token mode.
        num_topk: K of the dispatch that made it (0 without top-k).
        is_token_in_rank: [T, R] bool, backend-native.
        recv_src_idx: [N or num_worst_tokens] int32 source token index per
            received row (-1 past N), backend-native.
        state: backend-specific routing tables.
    """
    buffer_id: int
    num_tokens: int
    hidden: int
    num_recv_tokens: int
    num_worst_tokens: int
    num_topk: int
    is_token_in_rank: Any
    recv_src_idx: Any
    state: Any = field(repr=False, default=None)


@dataclass(eq=False, slots=True)
class DispatchResult:
    """Output of :meth:`cupyep.Buffer.dispatch`.

    Attributes:
        recv_x: [N, H] bf16, or e4m3 for FP8 dispatch (N = num_worst_tokens in
            worst-token mode; rows past the real count are unspecified).
        recv_x_scales: [N, H/128] fp32 for FP8 dispatch, else None.
        recv_topk_idx: [N, K] int64 local expert ids, -1 where the expert is on
            another rank (None for cached or top-k-less dispatch).
        recv_topk_weights: [N, K] fp32, 0 where recv_topk_idx is -1.
        num_recv_tokens_per_expert: list of L ints padded to
            ``expert_alignment``; in worst-token mode an [L] int32 array.
        handle: the :class:`DispatchHandle`.
        event: an :class:`cupyep.EventOverlap` when ``async_finish``, else None.
    """
    recv_x: Any
    recv_x_scales: Optional[Any]
    recv_topk_idx: Optional[Any]
    recv_topk_weights: Optional[Any]
    num_recv_tokens_per_expert: Any
    handle: DispatchHandle
    event: Any = None


@dataclass(eq=False, slots=True)
class CombineResult:
    """Output of :meth:`cupyep.Buffer.combine`.

    Attributes:
        combined_x: [T, H] bf16, fp32 sums over ranks (rank order) plus bias.
        combined_topk_weights: [T, K] fp32 summed back, or None.
        event: an :class:`cupyep.EventOverlap` when ``async_finish``, else None.
    """
    combined_x: Any
    combined_topk_weights: Optional[Any]
    event: Any = None


@dataclass(eq=False, slots=True)
class LowLatencyHandle:
    """Routing of one low-latency dispatch, used by its combine.

    Attributes:
        buffer_id: identity of the buffer that made it.
        call_id: number of the dispatch call that made it.
        num_max_dispatch_tokens_per_rank: M.
        hidden: H.
        num_experts: E.
        num_tokens: T of the dispatching rank.
        num_topk: K.
        src_info: [L, R*M] int32 source token index per received row.
        layout_range: [L, R] int64, (begin << 32) | count per source rank.
        state: backend-specific tables.
        framework: the caller's array framework, for views handed back.
    """
    buffer_id: int
    call_id: int
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int
    num_tokens: int
    num_topk: int
    src_info: Any
    layout_range: Any
    state: Any = field(repr=False, default=None)
    framework: str = "numpy"

    def combine_x_shape(self, num_ranks: int) -> tuple:
        """(L, R*M, H): the shape of the combine's x."""
        return (self.num_experts // num_ranks, num_ranks * self.num_max_dispatch_tokens_per_rank, self.hidden)


@dataclass(eq=False, slots=True)
class LowLatencyDispatchResult:
    """Output of :meth:`cupyep.Buffer.low_latency_dispatch`.

    Attributes:
        recv_x: [L, R*M, H] bf16, or e4m3 with FP8.
        recv_x_scales: [L, R*M, H/128] fp32 with FP8 (with UE8M0:
            [L, R*M, H/512] int32, four exponent bytes per word), else None.
        recv_count: [L] int32 rows received per local expert.
        handle: the :class:`LowLatencyHandle`.
        event: an :class:`cupyep.EventOverlap` when ``async_finish``.
        hook: with ``return_recv_hook``, call it to run the receive half.
    """
    recv_x: Any
    recv_x_scales: Optional[Any]
    recv_count: Any
    handle: LowLatencyHandle
    event: Any = None
    hook: Optional[Callable[[], None]] = None


@dataclass(eq=False, slots=True)
class LowLatencyCombineResult:
    """Output of :meth:`cupyep.Buffer.low_latency_combine`.

    Attributes:
        combined_x: [T, H] bf16.
        event: an :class:`cupyep.EventOverlap` when ``async_finish``.
        hook: with ``return_recv_hook``, call it to run the receive half.
    """
    combined_x: Any
    event: Any = None
    hook: Optional[Callable[[], None]] = None
