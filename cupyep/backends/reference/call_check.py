"""Ranks agree on each call before the reference backend moves data.

Every collective call of a Buffer has a sequence number on each rank (a call
that raises before communicating still takes its number). Before a reference
call exchanges data, each rank sends its (sequence number, kind of call, shape
parameters) to every peer and waits, with the ``CUPYEP_TIMEOUT_S`` deadline,
for theirs; then each sends a verdict (go, or the problem it found) and waits
for every peer's. Only when every verdict is "go" does the data exchange start,
so a rank never enters a collective that a peer will not join:

- a peer that passed other parameters, or meets this call with another of its
  calls (one raised before communicating, or skipped a call): every rank
  raises CallMismatchError naming both ranks and both calls;
- a peer that never arrives: CommTimeoutError naming the rank, the call and
  the peer, on every rank that waited.

Sequence numbers are never skipped or rewound, so after such an error the
next call made by every rank pairs correctly: messages of a call a rank
never met (it raised before communicating) arrive with a smaller number and
are dropped; messages of a peer already at a later call are kept for that
call. The headers travel on a duplicate of the group's communicator, apart
from the data.
"""
from __future__ import annotations

import os
import time

import numpy as np

from cupyep.errors import CallMismatchError, CommTimeoutError

_KINDS = ("dispatch", "cached_dispatch", "combine", "low_latency_dispatch", "low_latency_combine",
          "clean_low_latency_buffer")
# The parameters each kind of call sends, in order (for messages).
_PARAMS = {"dispatch": ("hidden", "top-k", "fp8", "experts", "weights"), "cached_dispatch": ("hidden", "fp8"),
           "combine": ("hidden", "weights"), "low_latency_dispatch": ("M", "hidden", "experts", "fp8", "top-k"),
           "low_latency_combine": ("M", "hidden", "experts", "logfmt", "top-k"), "clean_low_latency_buffer": ()}
_HEADER, _VERDICT = 0x4E1, 0x4E2  # message tags
_WORDS = 8  # seq, kind, 6 parameters
_GO, _MISMATCH, _TIMEOUT = 1, 2, 3


def _describe(words) -> str:
    """'dispatch call #5 (hidden=256, top-k=2, ...)' from a header."""
    kind = _KINDS[int(words[1])] if 0 <= int(words[1]) < len(_KINDS) else f"call kind {int(words[1])}"
    names = _PARAMS.get(kind, ())
    params = ", ".join(f"{names[i] if i < len(names) else i}={int(v)}" for i, v in enumerate(words[2:]) if v != -1)
    return f"{kind} call #{int(words[0])} ({params})"


class CallAgreement:
    """Per buffer: the call sequence and the pre-call handshake (mpi4py
    communicators; ``comm`` None turns it off, e.g. for torch.distributed groups).

    Args:
        comm: the group's mpi4py communicator (duplicated here; collective).
    """

    def __init__(self, comm):
        self.seq = 0
        self.comm = comm.Dup() if comm is not None and hasattr(comm, "Isend") else None
        self._pending = []
        self._early = {}  # (peer, tag) -> a message of a later call, kept for it
        self.timeout_s = float(os.environ.get("CUPYEP_TIMEOUT_S", "20"))

    def next_call(self) -> None:
        """A collective call starts (counted even if it raises before communicating)."""
        self.seq += 1

    def check(self, kind: str, *params: int) -> None:
        """Agree with every peer on this call, or raise on every rank."""
        comm = self.comm
        if comm is None or comm.Get_size() == 1:
            return
        rank, seq = comm.Get_rank(), self.seq
        peers = [p for p in range(comm.Get_size()) if p != rank]
        mine = np.full(_WORDS, -1, np.int64)
        mine[0], mine[1] = seq, _KINDS.index(kind)
        mine[2:2 + len(params)] = [int(v) for v in params]
        deadline = time.monotonic() + self.timeout_s
        sends = [comm.Isend(mine, dest=p, tag=_HEADER) for p in peers]
        # Per peer and channel (header, verdict): a message already here, or a posted receive.
        bufs = {(p, c): np.empty(_WORDS if c == _HEADER else 4, np.int64) for p in peers for c in (_HEADER, _VERDICT)}
        reqs, got = {}, {}
        for key in bufs:
            early = self._early.pop(key, None)
            if early is not None:
                got[key] = early
            else:
                reqs[key] = comm.Irecv(bufs[key], source=key[0], tag=key[1])
        problem = None  # (code, peer, its words)
        sent_verdict = False
        try:
            while True:
                progressed = False
                for key in list(reqs):
                    if reqs[key].Test():
                        progressed = True
                        words = bufs[key].copy()
                        if words[0] < seq:  # from a call this rank never met (it ended early): drop
                            reqs[key] = comm.Irecv(bufs[key], source=key[0], tag=key[1])
                            continue
                        del reqs[key]
                        got[key] = words
                for (p, c), words in list(got.items()):
                    if words[0] > seq:  # the peer is at a later call: keep it for that call
                        self._early[(p, c)] = got.pop((p, c))
                        if problem is None:
                            problem = (_MISMATCH, p, words)
                    elif problem is None and c == _HEADER and (words[1:] != mine[1:]).any():
                        problem = (_MISMATCH, p, words)
                    elif problem is None and c == _VERDICT and words[1] != _GO:
                        problem = (int(words[1]), p, words)
                headers_in = all((p, _HEADER) in got for p in peers)
                if not sent_verdict and (problem is not None or headers_in):
                    word = np.array([seq, _GO if problem is None else problem[0],
                                     -1 if problem is None else problem[1], rank], np.int64)
                    sends += [comm.Isend(word, dest=p, tag=_VERDICT) for p in peers]
                    sent_verdict = True
                if problem is not None or (headers_in and all((p, _VERDICT) in got for p in peers)):
                    break
                if time.monotonic() > deadline:
                    missing = ([p for p in peers if (p, _HEADER) not in got]
                               or [p for p in peers if (p, _VERDICT) not in got])
                    problem = (_TIMEOUT, missing[0], None)
                    if not sent_verdict:  # (one that said "go" already cannot take it back)
                        word = np.array([seq, _TIMEOUT, missing[0], rank], np.int64)
                        sends += [comm.Isend(word, dest=p, tag=_VERDICT) for p in peers]
                    break
                if not progressed:
                    time.sleep(20e-6)
        finally:
            self._close(reqs, bufs, seq)
            # Sends complete once peers receive (in this call or a later one, as
            # a dropped message): keep them, and so their buffers, until then.
            self._pending = [req for req in self._pending + sends if not req.Test()]
        if problem is not None:
            self._raise(rank, mine, problem)

    def _close(self, reqs, bufs, seq) -> None:
        """Cancel the receives still posted; one that matched meanwhile keeps a
        message for a later call, or drops one for this or an earlier call."""
        from mpi4py import MPI
        for key, req in reqs.items():
            req.Cancel()
            status = MPI.Status()
            req.Wait(status)
            if not status.Is_cancelled() and bufs[key][0] > seq:
                self._early[key] = bufs[key].copy()

    @staticmethod
    def _raise(rank, mine, problem) -> None:
        code, peer, words = problem
        here = _describe(mine)
        if code == _TIMEOUT and words is None:
            raise CommTimeoutError(rank, f"the handshake of {here}", peer)
        if code == _MISMATCH and words.shape[0] == _WORDS:
            if words[0] > mine[0]:
                raise CallMismatchError(
                    f"rank {rank}'s {here} met rank {peer} already at its {_describe(words)} (its call "
                    f"#{int(mine[0])} ended before communicating, or was skipped); nothing was exchanged")
            raise CallMismatchError(f"rank {rank}'s {here} met rank {peer}'s {_describe(words)}: the ranks "
                                    "disagree on the call or its parameters; nothing was exchanged")
        if words[0] > mine[0]:
            raise CallMismatchError(f"rank {rank}'s {here} met rank {peer} already at its call #{int(words[0])}; "
                                    "nothing was exchanged")
        what = (f"timed out waiting for rank {int(words[2])}" if code == _TIMEOUT
                else f"met a differing call of rank {int(words[2])}")
        raise CallMismatchError(f"rank {rank}'s {here} did not run: rank {peer} {what} in this call; "
                                "nothing was exchanged")

    def reset(self) -> None:
        """Collective: every rank continues from the highest sequence number
        any rank reached, and messages kept for later calls are dropped (they
        belong to calls before the reset)."""
        if self.comm is not None:
            from mpi4py import MPI
            self.seq = self.comm.allreduce(self.seq, op=MPI.MAX)
        self._early.clear()

    def free(self) -> None:
        if self.comm is not None:
            self.comm.Free()
            self.comm = None
