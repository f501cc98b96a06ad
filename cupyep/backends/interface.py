"""What cupyep.Buffer asks of a backend (reference and gpu implement it).

``Buffer`` validates every argument and converts arrays to the backend's
kind (NumPy for the reference backend, CuPy or torch CUDA tensors for the GPU
backend) before it calls these; results come back in that kind and ``Buffer``
hands them to the caller's framework. tests/test_backend_interface.py checks
that both backends define each method with these parameters.
"""
from __future__ import annotations

from typing import Protocol


class Backend(Protocol):
    def next_call(self) -> None:
        """A collective call starts (counted even if it raises before communicating)."""

    def get_dispatch_layout(self, topk_idx, num_experts):
        """topk_idx [T, K] -> cupyep.DispatchLayout (counts per rank, node, expert;
        is_token_in_rank [T, R] bool)."""

    def dispatch(self, x, scales, topk_idx, topk_weights, is_token_in_rank, per_expert, num_experts,
                 expert_alignment, num_worst_tokens, config, previous_event, async_finish,
                 layout_in_call=False) -> dict:
        """Normal dispatch. Returns recv_x, recv_x_scales, recv_topk_idx,
        recv_topk_weights, num_recv_tokens_per_expert, recv_src_idx,
        num_recv_tokens, routing (kept in the handle), event."""

    def cached_dispatch(self, handle, x, scales, config, previous_event, async_finish) -> tuple:
        """Dispatch along ``handle``'s routing: (recv_x, recv_x_scales, event)."""

    def combine(self, handle, x, topk_weights, bias, config, previous_event, async_finish) -> tuple:
        """Reduce back along ``handle``: (combined_x, combined_topk_weights, event)."""

    def low_latency_dispatch(self, x, topk_idx, m, num_experts, use_fp8, round_scale, use_ue8m0,
                             async_finish, return_recv_hook, cumulative_stats=None, wait_stats=None) -> dict:
        """Returns recv_x, recv_x_scales, recv_count, src_info, layout_range,
        routing (kept in the handle), call_id, and event / hook where asked."""

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, out, async_finish,
                            return_recv_hook, use_logfmt=False, wait_stats=None) -> dict:
        """Returns combined_x, and event / hook where asked."""

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
