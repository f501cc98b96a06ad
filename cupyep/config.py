"""Kernel launch configuration for normal (high-throughput) kernels."""
from __future__ import annotations

import functools

from dataclasses import dataclass
from typing import Optional

from cupyep.errors import InvalidInputError
from cupyep.frozen import HashedOnce


@dataclass(frozen=True, eq=False)
class Config(HashedOnce):
    """How normal dispatch and combine use the GPU.

    Attributes:
        num_sms: SMs (thread blocks) the kernel occupies; even. Dispatch:
            half send, half receive, num_sms // 2 channels. Combine: see
            num_combine_senders (any channel count of the dispatch).
        num_warps: warps per dispatch block (even, at most 32).
        num_combine_warps: warps per combine block (even, at most 32).
        chunk_tokens: tokens each dispatch sender warp copies between two
            progress updates (a round is num_warps * chunk_tokens tokens);
            the inter-node combine's rounds too.
        own_rows_receiver_share: in intranode dispatch, the share (0 to 1)
            of the rows a rank sends itself that its receiver blocks copy
            from x into the outputs (those of each channel's first tokens);
            its sender blocks copy the rest. None: by rank count and SMs
            (see own_rows_receiver_share()).
        num_combine_senders: intranode combine blocks that send rows back
            to their source ranks; the other num_sms - num_combine_senders
            reduce this rank's tokens. None: by rank count and SMs (see
            combine_senders()).
        combine_chunk_rows: rows a combine sender warp copies to one peer
            before it flags them to the peer (one work item).
    """
    num_sms: int = 24
    num_warps: int = 16
    chunk_tokens: int = 1
    num_combine_warps: int = 32
    own_rows_receiver_share: Optional[float] = None
    num_combine_senders: Optional[int] = None
    combine_chunk_rows: int = 1

    def __post_init__(self):
        if self.num_sms < 2 or self.num_sms % 2:
            raise InvalidInputError(
                f"num_sms must be an even number >= 2 (senders and receivers pair up), got {self.num_sms}")
        for name in ("num_warps", "num_combine_warps"):
            w = getattr(self, name)
            if w < 2 or w > 32 or w % 2:
                raise InvalidInputError(f"{name} must be even and in [2, 32], got {w}")
        for name in ("chunk_tokens", "combine_chunk_rows"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"{name} must be >= 1, got {getattr(self, name)}")
        senders = self.num_combine_senders
        if senders is not None and not 1 <= senders < self.num_sms:
            raise InvalidInputError(
                f"num_combine_senders must be in [1, num_sms) (some blocks must reduce), got {senders} "
                f"with num_sms={self.num_sms}")
        share = self.own_rows_receiver_share
        if share is not None and not 0 <= share <= 1:
            raise InvalidInputError(f"own_rows_receiver_share must be in [0, 1], got {share}")
        self._freeze()  # hashed once: normal calls look their launch plans up by it

    @property
    def num_channels(self) -> int:
        return self.num_sms // 2


@functools.lru_cache(maxsize=None)
def default_config(num_ranks: int, num_nodes: int = 1) -> Config:
    """Defaults (measured on 2 and 4 H200s, benchmarks/RESULTS.md).

    Inside a node, dispatch was fastest with 1-token chunks (receivers
    start on a round as soon as senders publish it; 8-token chunks left the
    last 128-token round's copy after the senders finished), with 24 warps
    at 2 ranks (2-4% faster than 16 on 2 x H200) and 16 at 4
    (16 and 32 within 2% there); combine with 32 warps. Across nodes
    dispatch blocks hold senders and forwarders, half the warps each: 32
    warps (16 + 16) were 1.4x faster than 16 on 2 x 1 (chunks of 8, not yet
    tuned there).
    """
    if num_nodes > 1:
        return Config(num_sms=24, num_warps=32, chunk_tokens=8, num_combine_warps=32)
    return Config(num_sms=24, num_warps=24 if num_ranks <= 2 else 16, chunk_tokens=1, num_combine_warps=32)


def own_rows_receiver_share(config: Config, num_ranks: int) -> float:
    """Config.own_rows_receiver_share, or its default.

    At 2 ranks the rows for itself are half of what a sender would copy,
    while receivers holding only the peer's rows wait: the best share grew
    with the SMs on 2 x H200 (BF16 cached dispatch, benchmarks/RESULTS.md):
    0.6 at 12 SMs, 0.65 at 16 (363 us with none, 271 us), 0.9 at 24 (262 ->
    222 us). At 4 ranks senders keep them: receivers taking all of them was
    4-8% slower in an earlier version on 4 x H200, and no share between was
    measured there.
    """
    if config.own_rows_receiver_share is not None:
        return config.own_rows_receiver_share
    if num_ranks > 2:
        return 0.0
    return min(1.0, max(0.65, 0.65 + (config.num_sms - 16) * 0.03125))


def combine_senders(config: Config, num_ranks: int) -> int:
    """Config.num_combine_senders, or its default (0 with one rank: nothing
    to send).

    Senders store the peers' rows over NVLink, (R - 1) / R of the rows;
    receivers read every row and write one per token. On 4 x H200 (EP4,
    kernels only, benchmarks/RESULTS.md) half the SMs sending was within 1%
    of the best split at 16 and 24 SMs; on 2 x H200 (EP2) 7 of 16 and 10-11
    of 24 were best.
    """
    if num_ranks == 1:
        return 0
    if config.num_combine_senders is not None:
        return config.num_combine_senders
    share = 0.44 if num_ranks == 2 else 0.5
    return max(1, min(config.num_sms - 1, round(config.num_sms * share)))
