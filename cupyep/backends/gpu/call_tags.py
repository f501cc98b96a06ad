"""Call tags: what a GPU call tells its peers about itself, in words its
kernels already exchange.

Every collective call of a buffer has a sequence number on each rank (a call
that raises before communicating still takes its number; a clean of the
low-latency buffer restarts it on every rank). A call's tag packs that number
(modulo 16), the kind of call and its shape parameters. A kernel that meets a
peer's tag other than its own call's reports it (ErrorKind kErrCallMismatch,
both tags in the error record) instead of reading the peer's data, and the
host raises :class:`cupyep.CallMismatchError` naming both calls.

- Low-latency calls carry their tag in every flag they set, above its count:
  ``(tag << LL_TAG_SHIFT) | count`` (kLLTagShift in low_latency.cu), 46 bits.
- Normal calls write theirs into the peers' call-tag slots of the NVLink (or
  RDMA) buffer right before each barrier arrival, and read the peers' after
  the barrier (``call_tags`` of NvlLayout / RdmaLayout): bit 62 marks them.

Each field holds its value minus its offset, modulo 2^bits, low bits first.
The whole protocol: docs/protocol.md.
"""
from __future__ import annotations

import functools

LL_TAG_SHIFT = 17
_LL_FIELDS = (("call", 4, 0), ("combine", 1, 0), ("fp8_or_logfmt", 1, 0), ("hidden/128", 8, 1),
              ("top-k", 4, 1), ("experts", 12, 1), ("M", 16, 1))
assert sum(b for _, b, _ in _LL_FIELDS) + LL_TAG_SHIFT == 63  # a positive i64 flag

NORMAL_MARK = 1 << 62
NORMAL_KINDS = ("dispatch", "cached_dispatch", "combine")
_NORMAL_FIELDS = (("call", 4, 0), ("kind", 2, 0), ("fp8", 1, 0), ("weights", 1, 0), ("hidden/128", 8, 1),
                  ("top-k", 6, 0), ("experts", 12, 1))


def _pack(fields, values) -> int:
    tag, shift = 0, 0
    for (_, bits, offset), v in zip(fields, values):
        tag |= ((int(v) - offset) % (1 << bits)) << shift
        shift += bits
    return tag


def _unpack(fields, tag: int) -> dict:
    values, shift = {}, 0
    for name, bits, offset in fields:
        values[name] = ((tag >> shift) & ((1 << bits) - 1)) + offset
        shift += bits
    return values


def ll_call_tag(seq: int, combine: bool, fp8_or_logfmt: bool, hidden: int, topk: int, experts: int,
                max_tokens: int) -> int:
    """The tag of low-latency call number ``seq``."""
    return _pack(_LL_FIELDS, (seq, combine, fp8_or_logfmt, hidden // 128, topk, experts, max_tokens))


_CALL_MASK = (1 << _LL_FIELDS[0][1]) - 1
assert _LL_FIELDS[0] == _NORMAL_FIELDS[0] == ("call", 4, 0)  # with_call / normal_call_tag OR it in
_LL_TOPK_SHIFT = sum(b for _, b, _ in _LL_FIELDS[:4])


def with_call(base: int, seq: int, topk: int) -> int:
    """ll_call_tag(seq, ..., topk, ...) from ``base`` = ll_call_tag(0, ..., 1, ...),
    without the loop (every low-latency call computes one)."""
    return base | (seq & _CALL_MASK) | (((topk - 1) & 15) << _LL_TOPK_SHIFT)


def normal_call_tag(seq: int, kind: str, fp8: bool, weights: bool, hidden: int, topk: int = 0,
                    experts: int = 1) -> int:
    """The tag of normal call number ``seq``; ``kind`` one of NORMAL_KINDS."""
    return _normal_base(kind, fp8, weights, hidden, topk, experts) | (seq & _CALL_MASK)


@functools.lru_cache(maxsize=256)
def _normal_base(kind: str, fp8: bool, weights: bool, hidden: int, topk: int, experts: int) -> int:
    """normal_call_tag of call number 0 (the call field is the lowest)."""
    return NORMAL_MARK | _pack(_NORMAL_FIELDS, (0, NORMAL_KINDS.index(kind), fp8, weights, hidden // 128,
                                                topk, experts))


def describe(tag: int) -> str:
    """'low_latency_dispatch call #3 (mod 16) (hidden=7168, ...)' from a tag of either kind."""
    if tag & NORMAL_MARK:
        v = _unpack(_NORMAL_FIELDS, tag & ~NORMAL_MARK)
        kind = NORMAL_KINDS[v["kind"]] if v["kind"] < len(NORMAL_KINDS) else f"call kind {v['kind']}"
        params = f"hidden={v['hidden/128'] * 128}"
        if kind == "dispatch":
            params += f", top-k={v['top-k']}, experts={v['experts']}"
        if kind != "combine":
            params += f", fp8={v['fp8']}"
        if kind != "cached_dispatch":
            params += f", weights={v['weights']}"
        return f"{kind} call #{v['call']} (mod 16) ({params})"
    v = _unpack(_LL_FIELDS, tag)
    kind = "low_latency_combine" if v["combine"] else "low_latency_dispatch"
    flag = "logfmt" if v["combine"] else "fp8"
    return (f"{kind} call #{v['call']} (mod 16) (hidden={v['hidden/128'] * 128}, top-k={v['top-k']}, "
            f"experts={v['experts']}, M={v['M']}, {flag}={v['fp8_or_logfmt']})")
