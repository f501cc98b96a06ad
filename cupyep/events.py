"""Events that let communication overlap with the caller's compute."""
from __future__ import annotations

from .capture import is_capturing


class EventOverlap:
    """A CUDA event recorded on cupyep's communication stream.

    ``current_stream_wait()`` makes the caller's current stream (CuPy's, or
    torch's through ``torch.cuda.current_stream()``) wait for it; used as a
    context manager, it waits on exit. ``event`` None stands for work that
    is already ordered on the caller's stream: waiting on it does nothing.
    """

    def __init__(self, event=None):
        self.event = event

    def current_stream_wait(self) -> None:
        if self.event is not None:
            import cupy
            cupy.cuda.get_current_stream().wait_event(self.event)

    def synchronize(self) -> None:
        """Block the host until the event completes."""
        if self.event is not None:
            self.event.synchronize()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.current_stream_wait()
        return False


def as_cupy_event(event):
    """Accept an EventOverlap, a cupy Event or a torch.cuda.Event."""
    import cupy
    if event is None or isinstance(event, cupy.cuda.Event):
        return event
    if isinstance(event, EventOverlap):
        return event.event
    if type(event).__module__.startswith("torch"):
        return cupy.cuda.ExternalEvent(event.cuda_event) if hasattr(cupy.cuda, "ExternalEvent") else _torch_event(event)
    raise TypeError(f"cannot wait on {type(event).__name__}")


def _torch_event(event):
    """Wait for a torch event by recording a CuPy event behind it on torch's stream."""
    import cupy
    import torch
    s = torch.cuda.current_stream()
    s.wait_event(event)
    ext = cupy.cuda.ExternalStream(s.cuda_stream)
    return ext.record()


class CallStreams:
    """Which stream a call's kernels run on, keeping the calls on one buffer in order.

    A call that neither waits on an event nor finishes asynchronously runs
    on the caller's current stream: nothing to hand over, so no event
    round trip between streams (~6 us a call). Otherwise it runs on the
    communication stream, after ``previous_event`` (or after the caller's
    stream). Calls share the buffer, so a call whose stream differs from the
    previous call's first waits for that call (not inside a graph capture,
    where waiting on work outside the capture is not allowed).
    """

    def __init__(self):
        import cupy
        self.comm = cupy.cuda.Stream(non_blocking=True)
        self._last = None  # the stream of the previous call

    def begin(self, previous_event=None, async_finish: bool = False):
        """(stream to launch on, the caller's stream)."""
        import cupy
        cur = cupy.cuda.get_current_stream()
        ev = as_cupy_event(previous_event)
        if ev is None and not async_finish:
            launch = cur
        else:
            launch = self.comm
            launch.wait_event(ev if ev is not None else cur.record())
        follows = (launch.ptr,) if ev is not None else (launch.ptr, cur.ptr)  # already ordered after
        last = self._last
        if last is not None and last.ptr not in follows and is_capturing(last) == is_capturing(launch):
            launch.wait_event(last.record())
        self._last = launch
        return launch, cur

    def end(self, launch, cur, async_finish: bool):
        """The call's event for the caller (async_finish), or None once the
        caller's stream is ordered after it."""
        if async_finish:
            return EventOverlap(launch.record())
        if launch.ptr != cur.ptr:  # a previous_event put it on the communication stream
            cur.wait_event(launch.record())
        return None
