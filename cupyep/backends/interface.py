"""What cupyep.Buffer asks of a backend (reference and gpu implement it), and
what the calls return.

``Buffer`` validates every argument and converts arrays to the backend's
kind (NumPy for the reference backend, CuPy or torch CUDA tensors for the GPU
backend) before it calls these; results come back in that kind and ``Buffer``
hands them to the caller's framework. tests/test_backend_interface.py checks
that both backends define each method with these parameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol


@dataclass(eq=False, slots=True)
class NormalDispatchOut:
    """A normal dispatch's outputs (the backend's arrays; Buffer makes the
    DispatchResult and its handle from them)."""
    recv_x: Any                       # [N, H] bf16, or e4m3 (uint8) with scales
    recv_x_scales: Any                # [N, H/128] fp32, or None
    recv_topk_idx: Any                # [N, K] local expert ids (-1: another rank's), or None
    recv_topk_weights: Any            # [N, K] fp32, or None
    num_recv_tokens_per_expert: Any   # [L] (host list, or a device array with num_worst_tokens)
    recv_src_idx: Any                 # [N] int32 source token of each row
    num_recv_tokens: int
    routing: Any                      # kept in the handle
    event: Any = None


@dataclass(eq=False, slots=True)
class CachedDispatchOut:
    recv_x: Any
    recv_x_scales: Any
    event: Any = None


@dataclass(eq=False, slots=True)
class CombineOut:
    combined_x: Any                   # [T, H] bf16
    combined_topk_weights: Any        # [T, K] fp32, or None
    event: Any = None


@dataclass(eq=False, slots=True)
class LowLatencyDispatchOut:
    recv_x: Any                       # [L, R*M, H] bf16, or e4m3 (uint8; torch: float8_e4m3fn)
    recv_x_scales: Any                # [L, R*M, H/128] fp32, [L, R*M, H/512] int32 (UE8M0) or None
    recv_count: Any                   # [L] int32
    src_info: Any                     # [L, R*M] int32
    layout_range: Any                 # [L, R] int64
    routing: Any                      # kept in the handle
    call_id: int
    event: Any = None
    hook: Optional[Any] = None


@dataclass(eq=False, slots=True)
class LowLatencyCombineOut:
    combined_x: Any                   # [T, H] bf16
    event: Any = None
    hook: Optional[Any] = None


class Backend(Protocol):
    def next_call(self) -> None:
        """A collective call starts (counted even if it raises before communicating)."""

    def get_dispatch_layout(self, topk_idx, num_experts):
        """topk_idx [T, K] -> cupyep.DispatchLayout (counts per rank, node, expert;
        is_token_in_rank [T, R] bool)."""

    def dispatch(self, x, scales, topk_idx, topk_weights, is_token_in_rank, per_expert, num_experts,
                 expert_alignment, num_worst_tokens, config, previous_event, async_finish,
                 layout_in_call=False) -> NormalDispatchOut:
        """Normal dispatch."""

    def cached_dispatch(self, handle, x, scales, config, previous_event, async_finish) -> CachedDispatchOut:
        """Dispatch along ``handle``'s routing."""

    def combine(self, handle, x, topk_weights, bias, config, previous_event, async_finish) -> CombineOut:
        """Reduce back along ``handle``."""

    def low_latency_dispatch(self, x, topk_idx, m, num_experts, use_fp8, round_scale, use_ue8m0,
                             async_finish, return_recv_hook, cumulative_stats=None,
                             wait_stats=None) -> LowLatencyDispatchOut:
        """Low-latency dispatch; event / hook where asked."""

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, out, async_finish,
                            return_recv_hook, use_logfmt=False, wait_stats=None) -> LowLatencyCombineOut:
        """Low-latency combine; event / hook where asked."""

    def next_low_latency_combine_buffer(self, handle):
        """[L, R*M, H] bf16: where the next combine after ``handle``'s dispatch reads in place."""

    def set_low_latency_transport(self, transport: str) -> None:
        """'auto', 'nvlink' or 'nvshmem' (the reference backend only checks the name)."""

    def update_mask(self, rank: int, masked: bool) -> None:
        """Set or clear ``rank``'s entry of the low-latency mask (ordered after queued calls)."""

    def query_mask(self):
        """[R] int32 host copy of the mask, after this rank's queued calls."""

    def copy_mask(self, dst) -> None:
        """The mask into ``dst`` ([R] int32, the backend's array kind)."""

    def clean_mask(self) -> None:
        """Clear every entry of the mask."""

    def reset(self) -> None:
        """Collective: every flag, counter and call sequence back to zero."""

    def clean_low_latency_buffer(self, blocking: bool = False) -> None:
        """Collective: zero the low-latency flags (see Buffer.clean_low_latency_buffer)."""

    def destroy(self) -> None:
        """Free the backend's memory (collective on the GPU)."""
