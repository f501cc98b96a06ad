"""Byte layout of the symmetric NVLink buffer, shared by kernels and hints.

One buffer per rank, the same layout on every rank::

    control   sync counters [R] u32 | channel counts [2][R][C_MAX] i32 |
              expert counts [2][R][L_MAX] i32 | dispatch tails [R][C_MAX] i32 |
              combine tails [R][C_MAX] i32 | combine flags [R][F] i32 |
              call tags [2][R] i64 (cupyep/backends/gpu/call_tags.py; slot [seq & 1][s] by source s)
    data      per source rank s, per slot t < T_MAX:
              rows [R][T_MAX][H] (bf16 bytes, e4m3 use half) |
              scales [R][T_MAX][H/128] f32 | src_idx [R][T_MAX] i32 |
              topk_idx [R][T_MAX][K] i32 | topk_weights [R][T_MAX][K] f32

A token of source rank s lands in slot ``channel_start + n`` of region s, its
n-th among its channel's tokens for that destination, so regions never overlap
and no ring (head/tail flow control) is needed. Combine flags its rows per
work item of a (source, channel) stream with the call's sequence number; they
sit in the control region, which no layout's data overlaps, so a flag is
never mistaken for data that another layout left there.
"""
from __future__ import annotations

from dataclasses import dataclass

from cupyep.errors import BufferTooSmallError

MAX_CHANNELS = 64
# Ranks in one NVLink domain: the intranode kernels give each rank a lane of a
# warp (intranode.cu: static_assert(kNumRanks <= kWarpSize)).
MAX_NVL_RANKS = 32
# Ranks in all: the NVLink buffer's control region and the inter-node barrier.
MAX_RANKS = 64
MAX_LOCAL_EXPERTS = 512
# F: combine work-item flags per source rank (kCombineFlags, 256 KB). A layout
# with more slots per source than F - MAX_CHANNELS gets items of several rows:
# a 2e9-byte buffer at hidden 7168, top-8 holds 68343 slots at 2 ranks (2-row
# items), 34162 at 4 (1-row).
COMBINE_FLAGS = 65536
ALIGN = 256


def _align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def control_bytes(num_ranks: int) -> int:
    words = (num_ranks + 2 * num_ranks * MAX_CHANNELS + 2 * num_ranks * MAX_LOCAL_EXPERTS
             + 2 * num_ranks * MAX_CHANNELS + num_ranks * COMBINE_FLAGS)
    return _align(_align(4 * words, 8) + 8 * 2 * num_ranks)  # then the call tags, i64 [2][R]


@dataclass(frozen=True)
class NvlLayout:
    """Offsets (bytes from the buffer start) for one (R, H, K, T_MAX)."""
    num_ranks: int
    hidden: int
    num_topk: int
    max_tokens: int
    sync: int
    channel_counts: int
    expert_counts: int
    dispatch_tail: int
    combine_tail: int
    combine_flags: int
    call_tags: int
    rows: int
    scales: int
    src_idx: int
    topk_idx: int
    topk_weights: int
    end: int


# NvlLayout's fields as the kernels' struct (raw_kernels/cupyep/nvl_layout.cuh)
# holds them, in order, as int64.
NVL_LAYOUT_FIELDS = ("sync", "channel_counts", "expert_counts", "dispatch_tail", "combine_tail",
                     "combine_flags", "call_tags", "rows", "scales", "src_idx", "topk_idx", "topk_weights",
                     "max_tokens", "slots_per_channel")


def nvl_layout_words(lay: NvlLayout, slots_per_channel: int) -> list:
    """The kernels' NvlLayout struct as a list of int64 values."""
    return [slots_per_channel if f == "slots_per_channel" else getattr(lay, f) for f in NVL_LAYOUT_FIELDS]


def _data_bytes_per_token(num_ranks: int, hidden: int, num_topk: int) -> int:
    return num_ranks * (2 * hidden + hidden // 32 + 4 + 8 * num_topk)


def nvl_layout(num_ranks: int, hidden: int, num_topk: int, max_tokens: int) -> NvlLayout:
    r = num_ranks
    sync = 0
    channel_counts = sync + 4 * r
    expert_counts = channel_counts + 4 * 2 * r * MAX_CHANNELS
    dispatch_tail = expert_counts + 4 * 2 * r * MAX_LOCAL_EXPERTS
    combine_tail = dispatch_tail + 4 * r * MAX_CHANNELS
    combine_flags = combine_tail + 4 * r * MAX_CHANNELS
    call_tags = _align(combine_flags + 4 * r * COMBINE_FLAGS, 8)
    rows = control_bytes(r)
    scales = _align(rows + r * max_tokens * 2 * hidden)
    src_idx = _align(scales + r * max_tokens * (hidden // 128) * 4)
    topk_idx = _align(src_idx + r * max_tokens * 4)
    topk_weights = _align(topk_idx + r * max_tokens * num_topk * 4)
    end = _align(topk_weights + r * max_tokens * num_topk * 4)
    return NvlLayout(r, hidden, num_topk, max_tokens, sync, channel_counts, expert_counts,
                     dispatch_tail, combine_tail, combine_flags, call_tags, rows, scales, src_idx, topk_idx,
                     topk_weights, end)


def nvl_size_hint(hidden: int, num_max_tokens_per_rank: int, num_ranks: int,
                  num_topk: int = 8) -> int:
    """Bytes of ``num_nvl_bytes`` for normal kernels.

    Args:
        hidden: H. num_max_tokens_per_rank: the most tokens one rank sends.
        num_ranks: R. num_topk: the largest K used (0 without top-k).
    """
    # Tokens are split into channels and each channel owns max_tokens // C
    # slots, so up to one slot per channel is lost to rounding.
    return nvl_layout(num_ranks, hidden, max(num_topk, 1), num_max_tokens_per_rank + MAX_CHANNELS).end


def max_tokens_for(num_nvl_bytes: int, num_ranks: int, hidden: int, num_topk: int) -> int:
    """The most tokens per rank a buffer of ``num_nvl_bytes`` can dispatch."""
    per_token = _data_bytes_per_token(num_ranks, hidden, max(num_topk, 1))
    t = max(0, (num_nvl_bytes - control_bytes(num_ranks) - 6 * ALIGN) // per_token)
    while t > 0 and nvl_layout(num_ranks, hidden, max(num_topk, 1), t).end > num_nvl_bytes:
        t -= 1
    return t


def check_fits(num_nvl_bytes: int, num_ranks: int, hidden: int, num_topk: int,
               num_tokens: int) -> NvlLayout:
    """Layout for a call, or BufferTooSmallError saying the bytes needed."""
    t_max = max_tokens_for(num_nvl_bytes, num_ranks, hidden, num_topk)
    if num_tokens > t_max:
        need = nvl_size_hint(hidden, num_tokens, num_ranks, num_topk)
        raise BufferTooSmallError(
            f"num_nvl_bytes={num_nvl_bytes} holds {t_max} tokens per rank at hidden={hidden}, "
            f"top-{num_topk}, {num_ranks} ranks; {num_tokens} need num_nvl_bytes >= {need} "
            f"(cupyep.nvl_size_hint)")
    return nvl_layout(num_ranks, hidden, max(num_topk, 1), t_max)


# --------------------------------------------------------------------------- #
# Inter-node (RDMA) buffer
# --------------------------------------------------------------------------- #
# Symmetric RDMA buffer of inter-node normal kernels, the same on every rank
# (N nodes, P ranks per node; u64 words are written with NVSHMEM signals)::
#
#     control   sync [R] u64 | node counts [2][N][C_MAX] u64 |
#               rank counts [2][R][C_MAX] u64 | expert counts [2][R][L_MAX] u64 |
#               dispatch tails [N][C_MAX] u64 | combine tails [N][C_MAX] u64 |
#               call tags [2][R] u64
#     data      recv [N][T_MAX] messages | send [N][T_MAX] messages
#
# A dispatch message is one token for one node: row | fp32 scales | src_idx
# i32 | is_token_in_rank bits [ceil(R/32)] u32 | top-k ids i32 [K] | weights
# f32 [K]; a combine message is a bf16 row | weights f32 [K]. Message n of
# source node s's channel c sits in recv region s, slot c * (T_MAX // C) + n.


@dataclass(frozen=True)
class RdmaLayout:
    """Offsets (bytes from the RDMA buffer start) for one (R, P, H, K, T_MAX)."""
    num_ranks: int
    num_nodes: int
    max_tokens: int
    message_stride: int
    sync: int
    node_counts: int
    rank_counts: int
    expert_counts: int
    dispatch_tail: int
    combine_tail: int
    call_tags: int
    recv: int
    send: int
    end: int


def rdma_message_bytes(num_ranks: int, hidden: int, num_topk: int) -> int:
    """Largest message (bf16 row): what one slot holds."""
    words = (num_ranks + 31) // 32
    raw = 2 * hidden + 4 * (hidden // 128) + 4 + 4 * words + 8 * num_topk
    return _align(raw, 16)


def rdma_control_bytes(num_ranks: int, num_nodes: int) -> int:
    words = num_ranks + 2 * num_nodes * MAX_CHANNELS + 2 * num_ranks * MAX_CHANNELS \
        + 2 * num_ranks * MAX_LOCAL_EXPERTS + 2 * num_nodes * MAX_CHANNELS + 2 * num_ranks
    return _align(8 * words)


def rdma_layout(num_ranks: int, num_nodes: int, hidden: int, num_topk: int, max_tokens: int) -> RdmaLayout:
    r, n = num_ranks, num_nodes
    sync = 0
    node_counts = sync + 8 * r
    rank_counts = node_counts + 8 * 2 * n * MAX_CHANNELS
    expert_counts = rank_counts + 8 * 2 * r * MAX_CHANNELS
    dispatch_tail = expert_counts + 8 * 2 * r * MAX_LOCAL_EXPERTS
    combine_tail = dispatch_tail + 8 * n * MAX_CHANNELS
    call_tags = combine_tail + 8 * n * MAX_CHANNELS
    stride = rdma_message_bytes(r, hidden, max(num_topk, 1))
    recv = rdma_control_bytes(r, n)
    send = _align(recv + n * max_tokens * stride)
    end = _align(send + n * max_tokens * stride)
    return RdmaLayout(r, n, max_tokens, stride, sync, node_counts, rank_counts, expert_counts,
                      dispatch_tail, combine_tail, call_tags, recv, send, end)


# RdmaLayout's fields as the kernels' struct (raw_kernels/cupyep/internode.cu)
# holds them, in order, as int64 (the last two are per call shape).
RDMA_LAYOUT_FIELDS = ("sync", "node_counts", "rank_counts", "expert_counts", "dispatch_tail", "combine_tail",
                      "call_tags", "recv", "send", "max_tokens", "slots_per_channel", "message_stride")


def rdma_layout_words(lay: RdmaLayout, slots_per_channel: int) -> list:
    """The kernels' RdmaLayout struct as a list of int64 values."""
    return [slots_per_channel if f == "slots_per_channel" else getattr(lay, f) for f in RDMA_LAYOUT_FIELDS]


def rdma_size_hint(hidden: int, num_max_tokens_per_rank: int, num_ranks: int, num_ranks_per_node: int,
                   num_topk: int = 8) -> int:
    """Bytes of ``num_rdma_bytes`` for inter-node normal kernels.

    Args:
        hidden: H. num_max_tokens_per_rank: the most tokens one rank sends.
        num_ranks: R. num_ranks_per_node: P (R // P nodes). num_topk: largest K.
    """
    nodes = num_ranks // num_ranks_per_node
    return rdma_layout(num_ranks, nodes, hidden, max(num_topk, 1), num_max_tokens_per_rank + MAX_CHANNELS).end


def rdma_max_tokens(num_rdma_bytes: int, num_ranks: int, num_nodes: int, hidden: int, num_topk: int) -> int:
    """The most tokens per rank an RDMA buffer of ``num_rdma_bytes`` can dispatch."""
    stride = rdma_message_bytes(num_ranks, hidden, max(num_topk, 1))
    t = max(0, (num_rdma_bytes - rdma_control_bytes(num_ranks, num_nodes) - 2 * ALIGN) // (2 * num_nodes * stride))
    while t > 0 and rdma_layout(num_ranks, num_nodes, hidden, num_topk, t).end > num_rdma_bytes:
        t -= 1
    return t


def check_normal_call_fits(num_nvl_bytes: int, num_rdma_bytes: int, num_ranks: int, ranks_per_node: int,
                           hidden: int, num_topk: int, num_channels: int, num_tokens: int) -> None:
    """What the GPU backend checks before a normal dispatch, from sizes alone:
    BufferTooSmallError with the bytes needed. The reference backend makes the
    same checks, so code developed on a CPU sizes its buffers for the GPU."""
    import math
    per_channel = math.ceil(num_tokens / num_channels)
    lay = check_fits(max(int(num_nvl_bytes), control_bytes(num_ranks)), num_ranks, hidden, num_topk, 0)
    if per_channel > lay.max_tokens // num_channels:
        raise BufferTooSmallError(
            f"num_nvl_bytes={num_nvl_bytes} holds {lay.max_tokens // num_channels * num_channels} tokens per "
            f"rank at hidden={hidden}, top-{num_topk}; {num_tokens} need num_nvl_bytes >= "
            f"{nvl_size_hint(hidden, num_tokens, num_ranks, num_topk)} (cupyep.nvl_size_hint)")
    num_nodes = num_ranks // ranks_per_node
    if num_nodes > 1:
        spc = rdma_max_tokens(int(num_rdma_bytes), num_ranks, num_nodes, hidden, num_topk) // num_channels
        if not num_rdma_bytes or per_channel > spc:
            raise BufferTooSmallError(
                f"num_rdma_bytes={num_rdma_bytes} holds {spc * num_channels} tokens per rank at hidden={hidden}, "
                f"top-{num_topk} across {num_nodes} nodes; {num_tokens} need num_rdma_bytes >= "
                f"{rdma_size_hint(hidden, num_tokens, num_ranks, ranks_per_node, num_topk)} (cupyep.rdma_size_hint)")
