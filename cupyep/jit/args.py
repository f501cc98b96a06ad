"""Every kernel's parameters by name, in the kernel's order, and the one way a
launch's arguments are built: by name.

A kernel is named "<file>.<kernel>" after its source under raw_kernels/cupyep/
(``"intranode.dispatch"`` is ``dispatch`` in intranode.cu). tests/test_kernel_args.py
checks each list against the kernel's source, so a parameter added, removed or
moved in a kernel fails on the CPU, not as a wrong pointer on a GPU.
"""
from __future__ import annotations

from operator import itemgetter

from cupyep.errors import CupyepError

PARAMS = {
    "layout.get_dispatch_layout": (
        "topk_idx", "num_tokens", "num_experts", "num_ranks", "num_ranks_per_node", "num_tokens_per_rank",
        "num_tokens_per_node", "num_tokens_per_expert", "is_token_in_rank", "max_nodes_per_token", "error",
        "scratch"),
    "intranode.barrier": ("peers", "layout", "rank", "counters", "err", "timeout_ns", "call_tag"),
    "intranode.notify_dispatch": (
        "is_token_in_rank", "num_tokens", "num_channels", "num_tokens_per_expert", "num_local_experts",
        "expert_alignment", "send_pos", "peers", "layout", "rank", "counters", "blocks_done",
        "recv_channel_offset", "recv_expert_counts", "host_info", "layout_error", "err", "timeout_ns", "call_tag"),
    "intranode.dispatch": (
        "x", "x_scales", "topk_idx", "topk_weights", "send_pos", "num_tokens", "num_channels", "peers", "layout",
        "recv_channel_offset", "rank", "num_local_experts", "num_recv_capacity", "chunk_tokens", "own_share_1024",
        "recv_x", "recv_x_scales", "recv_topk_idx", "recv_topk_weights", "recv_src_idx", "err", "timeout_ns"),
    "intranode.combine": (
        "x", "topk_weights", "send_pos", "recv_channel_offset", "num_tokens", "num_channels", "num_senders",
        "chunk_rows", "peers", "layout", "rank", "bias0", "bias1", "out", "out_weights", "counters", "scratch",
        "err", "timeout_ns", "call_tag"),
    "internode.rdma_barrier": ("rdma", "layout", "rank", "counters", "err", "timeout_ns", "call_tag"),
    "internode.notify_dispatch": (
        "is_token_in_rank", "num_tokens", "num_channels", "num_tokens_per_expert", "num_local_experts",
        "expert_alignment", "send_pos", "rdma_pos", "nvl_layout", "rdma", "rdma_layout", "rank", "counters",
        "blocks_done", "recv_channel_offset", "rdma_recv_count", "recv_expert_counts", "host_info",
        "layout_error", "err", "timeout_ns", "call_tag"),
    "internode.dispatch": (
        "x", "x_scales", "topk_idx", "topk_weights", "is_token_in_rank", "rdma_pos", "num_tokens", "num_channels",
        "peers", "nvl_layout", "rdma", "rdma_layout", "recv_channel_offset", "rdma_recv_count", "fwd_slots",
        "rank", "num_local_experts", "num_recv_capacity", "chunk_tokens", "recv_x", "recv_x_scales",
        "recv_topk_idx", "recv_topk_weights", "recv_src_idx", "err", "timeout_ns"),
    "internode.combine": (
        "x", "topk_weights", "rdma_pos", "recv_channel_offset", "rdma_recv_count", "fwd_slots", "num_tokens",
        "num_channels", "chunk_tokens", "peers", "nvl_layout", "rdma", "rdma_layout", "rank", "bias0", "bias1",
        "out", "out_weights", "err", "timeout_ns"),
    "low_latency.dispatch": (
        "x", "topk_idx", "num_tokens", "num_topk", "max_tokens", "num_experts", "rank", "num_ranks", "local_base",
        "peers", "force_put", "off_flags", "off_area", "off_send", "finish_count", "recv_done", "recv_x",
        "recv_scales", "recv_count", "src_info", "layout_range", "recv_k", "cumulative_expert_stats",
        "wait_stats", "mask", "shrink", "phases", "err", "timeout_ns", "call_tag"),
    "low_latency.combine": (
        "x", "src_info", "recv_k", "layout_range", "topk_idx", "topk_weights", "num_tokens", "num_topk",
        "max_tokens", "num_experts", "rank", "num_ranks", "local_base", "peers", "force_put", "zero_copy",
        "off_flags", "off_area", "off_send", "blocks_done", "pair_done", "out", "wait_stats", "mask", "shrink",
        "phases", "err", "timeout_ns", "call_tag"),
    "low_latency.barrier": ("slots", "peers", "force_put", "rank", "num_ranks", "seq", "mask", "shrink", "err",
                            "timeout_ns"),
}


_GETTERS = {name: itemgetter(*params) for name, params in PARAMS.items()}  # one C call per launch


def kernel_args(kernel: str, **values) -> tuple:
    """The arguments of ``kernel`` in its parameter order, every one given by
    name (arrays, addresses or integers, as :func:`cupyep.jit.launch` takes)."""
    params = PARAMS[kernel]
    try:
        args = _GETTERS[kernel](values)
    except KeyError:
        args = None
    if args is None or len(values) != len(params):
        raise CupyepError(f"{kernel} arguments: missing {sorted(set(params) - set(values))}, "
                          f"unknown {sorted(set(values) - set(params))}")
    return args
