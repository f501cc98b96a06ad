"""Byte layout of the symmetric NVLink buffer, shared by kernels and hints.

One buffer per rank, the same layout on every rank::

    control   sync counters [R] u32 | channel counts [2][R][C_MAX] i32 |
              expert counts [2][R][L_MAX] i32 | dispatch tails [R][C_MAX] i32 |
              combine tails [R][C_MAX] i32
    data      per source rank s, per slot t < T_MAX:
              rows [R][T_MAX][H] (bf16 bytes, e4m3 use half) |
              scales [R][T_MAX][H/128] f32 | src_idx [R][T_MAX] i32 |
              topk_idx [R][T_MAX][K] i32 | topk_weights [R][T_MAX][K] f32

A token of source rank s lands in slot ``channel_start + n`` of region s, its
n-th among its channel's tokens for that destination, so regions never overlap
and no ring (head/tail flow control) is needed.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import BufferTooSmallError

MAX_CHANNELS = 64
MAX_LOCAL_EXPERTS = 512
ALIGN = 256


def _align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def control_bytes(num_ranks: int) -> int:
    words = (num_ranks + 2 * num_ranks * MAX_CHANNELS + 2 * num_ranks * MAX_LOCAL_EXPERTS
             + 2 * num_ranks * MAX_CHANNELS)
    return _align(4 * words)


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
    rows: int
    scales: int
    src_idx: int
    topk_idx: int
    topk_weights: int
    end: int


def _data_bytes_per_token(num_ranks: int, hidden: int, num_topk: int) -> int:
    return num_ranks * (2 * hidden + hidden // 32 + 4 + 8 * num_topk)


def nvl_layout(num_ranks: int, hidden: int, num_topk: int, max_tokens: int) -> NvlLayout:
    r = num_ranks
    sync = 0
    channel_counts = sync + 4 * r
    expert_counts = channel_counts + 4 * 2 * r * MAX_CHANNELS
    dispatch_tail = expert_counts + 4 * 2 * r * MAX_LOCAL_EXPERTS
    combine_tail = dispatch_tail + 4 * r * MAX_CHANNELS
    rows = control_bytes(r)
    scales = _align(rows + r * max_tokens * 2 * hidden)
    src_idx = _align(scales + r * max_tokens * (hidden // 128) * 4)
    topk_idx = _align(src_idx + r * max_tokens * 4)
    topk_weights = _align(topk_idx + r * max_tokens * num_topk * 4)
    end = _align(topk_weights + r * max_tokens * num_topk * 4)
    return NvlLayout(r, hidden, num_topk, max_tokens, sync, channel_counts, expert_counts,
                     dispatch_tail, combine_tail, rows, scales, src_idx, topk_idx, topk_weights, end)


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
