"""Events that let communication overlap with the caller's compute."""
from __future__ import annotations


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
