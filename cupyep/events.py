"""Events that let communication overlap with the caller's compute, and the
choice of stream for each call.

Streams and events cross frameworks by their raw CUDA handles: a call from
torch runs on torch's current stream, a torch.cuda.Event can be waited on,
and an EventOverlap makes the current stream of the framework that made the
call wait (torch's for torch callers, CuPy's otherwise).
"""
from __future__ import annotations

from cupyep.arrays.capture import is_capturing


def _cupy_stream_ptr() -> int:
    import cupy
    return cupy.cuda.get_current_stream().ptr


class EventOverlap:
    """A CUDA event recorded on cupyep's communication stream.

    ``current_stream_wait()`` makes the caller's current stream wait for it
    (torch's current stream for calls made with torch tensors, CuPy's
    otherwise); used as a context manager, it waits on exit. ``event`` None
    stands for work that is already ordered on the caller's stream: waiting on
    it does nothing.

    Args:
        event: a ``cupy.cuda.Event`` or None.
        stream_ptr: returns the raw handle of the stream that waits
            (default: CuPy's current stream).
    """

    def __init__(self, event=None, stream_ptr=None):
        self.event = event
        self._stream_ptr = stream_ptr or _cupy_stream_ptr

    def current_stream_wait(self) -> None:
        if self.event is not None:
            import cupy
            cupy.cuda.runtime.streamWaitEvent(self._stream_ptr(), self.event.ptr, 0)

    def synchronize(self) -> None:
        """Block the host until the event completes."""
        if self.event is not None:
            self.event.synchronize()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.current_stream_wait()
        return False


def event_ptr(event) -> int:
    """Raw cudaEvent_t of an EventOverlap, a CuPy event or a torch.cuda.Event
    (0 for None, or a torch event never recorded: nothing to wait for)."""
    import cupy
    if event is None:
        return 0
    if isinstance(event, EventOverlap):
        return 0 if event.event is None else event.event.ptr
    if isinstance(event, cupy.cuda.Event):
        return event.ptr
    if type(event).__module__.startswith("torch"):
        return int(event.cuda_event)
    raise TypeError(f"cannot wait on {type(event).__name__}")


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

    def begin(self, cur, previous_event=None, async_finish: bool = False, after_cur: bool = False):
        """(stream to launch on, the caller's stream ``cur``), CuPy streams.
        ``after_cur``: order the call after ``cur`` even when it waits on an
        event (work the call itself queued there, e.g. its layout)."""
        last = self._last
        if previous_event is None and not async_finish:  # the common case, on every decode step
            if last is not None and last is not cur and last.ptr != cur.ptr \
                    and is_capturing(last) == is_capturing(cur):
                cur.wait_event(last.record())
            self._last = cur
            return cur, cur
        import cupy
        ev = event_ptr(previous_event)
        launch = self.comm
        if ev:
            cupy.cuda.runtime.streamWaitEvent(launch.ptr, ev, 0)
        if not ev or after_cur:  # no event (or one that stands for the caller's stream)
            launch.wait_event(cur.record())
        follows = (launch.ptr,) if ev and not after_cur else (launch.ptr, cur.ptr)  # ordered after these
        if last is not None and last.ptr not in follows and is_capturing(last) == is_capturing(launch):
            launch.wait_event(last.record())
        self._last = launch
        return launch, cur

    def end(self, launch, cur, async_finish: bool, stream_ptr=None):
        """The call's event for the caller (async_finish), or None once the
        caller's stream is ordered after it. ``stream_ptr``: the caller's
        framework's current-stream getter, for EventOverlap."""
        if async_finish:
            return EventOverlap(launch.record(), stream_ptr)
        if launch is not cur and launch.ptr != cur.ptr:  # a previous_event put it on the communication stream
            cur.wait_event(launch.record())
        return None
