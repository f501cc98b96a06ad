"""Exception types raised by cupyep."""


class CupyepError(RuntimeError):
    """Base class of every cupyep error."""


class InvalidInputError(CupyepError, ValueError):
    """An argument was rejected before any work was launched."""


class BufferTooSmallError(InvalidInputError):
    """The buffer cannot hold what a call needs; the message says how much."""


class CallMismatchError(CupyepError):
    """Ranks met at different calls, or at one call with different parameters;
    the message names both ranks and both calls.

    Reference backend: raised by the call itself on every rank; nothing was
    exchanged, and the next call made by every rank pairs correctly again.
    GPU, low-latency calls: each flag carries its call's tag, and a rank
    whose kernel meets a peer's flag of another call ignores that peer's rows
    and reports it; the error is raised at the rank's next call (or
    ``check_errors``). Recover with ``clean_low_latency_buffer()`` on every
    rank, which restarts the call sequence."""


class GroupDestroyedError(CupyepError):
    """A call was made on a group or buffer after ``destroy()``."""


class BackendUnavailableError(CupyepError):
    """The GPU backend was requested but its dependencies or a GPU are missing."""


class CommTimeoutError(CupyepError, TimeoutError):
    """A wait on another rank expired.

    Attributes:
        rank: the rank that gave up waiting.
        phase: the kernel phase that waited (e.g. ``"dispatch.recv"``).
        peer: the rank it waited for.
        channel: the channel, expert or slot index of the wait (-1 if none).
        call: the call that waited, where known (e.g. ``"low_latency_dispatch
            call #3 (mod 16) (hidden=7168, ...)"``), else "".
    """

    def __init__(self, rank: int, phase: str, peer: int, channel: int = -1, call: str = ""):
        self.rank, self.phase, self.peer, self.channel, self.call = rank, phase, peer, channel, call
        where = f", channel {channel}" if channel >= 0 else ""
        of = f" of {call}" if call else ""
        super().__init__(
            f"rank {rank}: timed out in {phase}{of} waiting for rank {peer}{where}")
