"""Exception types raised by cupyep."""


class CupyepError(RuntimeError):
    """Base class of every cupyep error."""


class InvalidInputError(CupyepError, ValueError):
    """An argument was rejected before any work was launched."""


class BufferTooSmallError(InvalidInputError):
    """The buffer cannot hold what a call needs; the message says how much."""


class CallMismatchError(CupyepError):
    """Ranks met at different calls, or at one call with different parameters;
    the message names both ranks and both calls. Nothing was exchanged, and
    the next call made by every rank pairs correctly again."""


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
    """

    def __init__(self, rank: int, phase: str, peer: int, channel: int = -1):
        self.rank, self.phase, self.peer, self.channel = rank, phase, peer, channel
        where = f", channel {channel}" if channel >= 0 else ""
        super().__init__(
            f"rank {rank}: timed out in {phase} waiting for rank {peer}{where}")
