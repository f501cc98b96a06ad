"""Byte layout of the low-latency symmetric buffer, shared by kernels and hints.

Low-latency call n (dispatch or combine) uses half n % 2, so a call's receive
side can still be read while the next call sends. With M tokens per rank, H
hidden, E experts (L = E / R local)::

    flags, at fixed places whatever the shapes (every flag is zero between
    calls, so calls of different shapes can follow each other):
        per half: dispatch flags [R] i64 + expert counts [R][L] i32 |
                  combine flags [E] i64 (8 * LL_MAX_EXPERTS bytes each)
    data, per half:
        dispatch area  [R][M] messages, one per (token, destination rank):
                       header (token, entries, an entry per expert there) +
                       bf16 or e4m3 row + scales
        combine area   [M][16][H] bf16 (slot [token][top-k index])
        send area      staging for NVSHMEM puts (messages [M][16], counts [E] i32);
                       [L][R*M][H] bf16 for zero-copy combine

Kernels: raw_kernels/cupyep/low_latency.cu.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from cupyep.errors import BufferTooSmallError, InvalidInputError
from cupyep.frozen import HashedOnce

LL_MAX_TOPK = 16
# A message entry holds the row's slot among its source's rows for an expert in 16 bits.
LL_MAX_TOKENS = 65536
_HEADER_BYTES = 16 + 4 * LL_MAX_TOPK  # kLLHeaderBytes
# How low-latency kernels reach peers: 'auto' (NVLink stores where mapped,
# NVSHMEM puts elsewhere), 'nvlink' (stores only), 'nvshmem' (puts only).
TRANSPORTS = ("auto", "nvlink", "nvshmem")
_ALIGN = 256


def _align(n: int, a: int = _ALIGN) -> int:
    return (n + a - 1) // a * a


def message_bytes(hidden: int, fp8: bool) -> int:
    """One dispatch message: header, row, and fp32 scales with FP8."""
    return _align(_HEADER_BYTES + (hidden + hidden // 32 if fp8 else 2 * hidden), 16)


LL_MAX_EXPERTS = 4096
_FLAGS_BYTES = 2 * 2 * 8 * LL_MAX_EXPERTS  # two halves, dispatch + combine

@dataclass(frozen=True, eq=False)
class LowLatencyLayout(HashedOnce):
    """Offsets in bytes; data halves are ``half_bytes`` apart after the flags."""
    max_tokens: int
    hidden: int
    num_ranks: int
    num_experts: int
    dispatch_area: int
    combine_area: int
    send_area: int
    half_bytes: int

    def __post_init__(self):
        self._freeze()  # hashed once: every low-latency combine looks its launch plan up by its layout

    def offsets(self, half: int) -> dict:
        """Kernel offsets for a call on ``half``."""
        flags = half * 2 * 8 * LL_MAX_EXPERTS
        base = _FLAGS_BYTES + half * self.half_bytes
        return {"dispatch_flags": flags, "combine_flags": flags + 8 * LL_MAX_EXPERTS,
                "dispatch_area": base + self.dispatch_area, "combine_area": base + self.combine_area,
                "send_area": base + self.send_area}

    @property
    def total_bytes(self) -> int:
        return _FLAGS_BYTES + 2 * self.half_bytes


@functools.lru_cache(maxsize=64)
def low_latency_layout(max_tokens: int, hidden: int, num_ranks: int, num_experts: int) -> LowLatencyLayout:
    m, h, e = max_tokens, hidden, num_experts
    dispatch_area = 0
    combine_area = _align(dispatch_area + num_ranks * m * message_bytes(h, False))
    send_area = _align(combine_area + m * LL_MAX_TOPK * h * 2)
    send_bytes = max(e * m * h * 2, m * LL_MAX_TOPK * message_bytes(h, False) + 4 * e)
    half = _align(send_area + send_bytes, 4096)
    return LowLatencyLayout(m, h, num_ranks, e, dispatch_area, combine_area, send_area, half)


def low_latency_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                          num_experts: int) -> int:
    """Bytes of ``num_rdma_bytes`` for low-latency calls with these shapes (K <= 16)."""
    return low_latency_layout(num_max_dispatch_tokens_per_rank, hidden, num_ranks,
                              num_experts).total_bytes


def check_low_latency_fits(num_rdma_bytes: int, max_tokens: int, hidden: int, num_ranks: int,
                           num_experts: int) -> LowLatencyLayout:
    if num_experts > LL_MAX_EXPERTS:
        raise InvalidInputError(f"low-latency calls take at most {LL_MAX_EXPERTS} experts, got {num_experts}")
    if max_tokens > LL_MAX_TOKENS:
        raise InvalidInputError(f"low-latency calls take at most {LL_MAX_TOKENS} tokens per rank, got {max_tokens}")
    lay = low_latency_layout(max_tokens, hidden, num_ranks, num_experts)
    if lay.total_bytes > num_rdma_bytes:
        raise BufferTooSmallError(
            f"num_rdma_bytes={num_rdma_bytes} is too small for low-latency calls with "
            f"M={max_tokens}, hidden={hidden}, {num_ranks} ranks, {num_experts} experts: they need "
            f"{lay.total_bytes} (cupyep.low_latency_size_hint)")
    return lay


def check_low_latency_buffer(num_rdma_bytes: int, max_tokens: int, hidden: int, num_ranks: int,
                             num_experts: int) -> LowLatencyLayout:
    """The layout of a low-latency call, or the error the GPU backend raises
    for a buffer without (enough) low-latency memory."""
    if not num_rdma_bytes:
        raise InvalidInputError("this Buffer has no low-latency memory: pass num_rdma_bytes="
                                "cupyep.low_latency_size_hint(M, hidden, ranks, experts)")
    return check_low_latency_fits(num_rdma_bytes, max_tokens, hidden, num_ranks, num_experts)
