"""Output arrays handed out again once the caller has dropped them.

A low-latency call returns up to six arrays carved from one allocation. From
Python each costs a framework call of 1-3 us (the allocation itself 2-6 us):
more host time than the kernel launch, every decode step. So the torch and
CuPy frontends keep the last few sets they made, per kind, and hand a set out
again when nothing outside it refers to it any more: no Python reference to
any of its arrays (their reference counts are back to what they were when
the set was made) and no other array on its memory (torch: the storage's use
count; CuPy: references to the allocation and to each array's memory
pointer). That is the moment the framework's allocator could reuse the
memory too, and, as the allocator does, a set is reused only on the stream
it was made on, so the caller's work on that stream that read it is ordered
before the new writes. One difference: ``Tensor.record_stream`` on a returned
tensor is not seen; keep a tensor that another stream reads alive until that
work is done.

Outputs made while the stream is captured into a CUDA graph never come from
the kept sets (torch: fresh from the graph's pool; CuPy: cupyep.arrays.capture).
"""
from __future__ import annotations

import sys

_refcount = sys.getrefcount


def device_address(a) -> int:
    """Device address of a torch tensor or a CuPy array."""
    return a.data_ptr() if hasattr(a, "data_ptr") else a.data.ptr


def refcount_sum(objects) -> int:
    """Python reference counts of ``objects`` (no None), summed. A set holds
    each of its arrays (and each object its storage handle names), so no
    count falls below what it was when the set was made: the sum is back to
    that only when every count is."""
    return sum(map(_refcount, objects))


class OutputSets:
    """Up to ``depth`` sets of one kind of outputs, each on the stream it was made on.

    Args:
        make: () -> arrays (None allowed; torch tensors, or CuPy arrays)
            sharing one allocation.
        use_count: storage -> a count of what refers to it (torch:
            ``torch._C._storage_Use_Count`` of ``untyped_storage()._cdata``).
        storage_of: a set -> the handle ``use_count`` takes (it must hold no
            reference to the set's arrays).
        depth: sets kept. When every kept set is held, a new one takes the
            place of the kept set made longest ago (which the caller keeps
            as long as it likes; it is only no longer tracked), so sets the
            caller holds for good do not stop the reuse of later ones.
    """

    __slots__ = ("_make", "_use_count", "_storage_of", "depth", "_sets", "_oldest")

    def __init__(self, make, use_count, storage_of, depth: int = 2):
        self._make = make
        self._use_count = use_count
        self._storage_of = storage_of
        self.depth = depth
        # [arrays (a list), stream, storage handle, summed reference counts, use count, addresses,
        #  the arrays that are not None]
        self._sets = []
        self._oldest = 0  # where the next new set goes once depth sets are kept

    def take(self, stream: int):
        """(tensors, their addresses (None: 0)) for a call on ``stream`` (an
        address): a kept set if one made on that stream is free, else a new
        one, kept in place of the oldest when depth sets are kept."""
        use_count = self._use_count
        for s in self._sets:
            if s[1] == stream and use_count(s[2]) == s[4] and refcount_sum(s[6]) == s[3]:
                return tuple(s[0]), s[5]
        # Kept in a list of our own (the caller gets a new tuple each time, so
        # holding it counts as holding its tensors), measured once made.
        tensors = list(self._make())
        addresses = tuple(0 if t is None else device_address(t) for t in tensors)
        if self.depth > 0:
            storage = self._storage_of(tensors)
            live = [t for t in tensors if t is not None]
            entry = [tensors, stream, storage, refcount_sum(live), use_count(storage), addresses, live]
            if len(self._sets) < self.depth:
                self._sets.append(entry)
            else:
                self._sets[self._oldest] = entry
                self._oldest = (self._oldest + 1) % self.depth
        return tuple(tensors), addresses

    def clear(self) -> None:
        """Forget the kept sets (their memory goes back to the allocator once the caller drops them)."""
        self._sets.clear()
        self._oldest = 0

    def __len__(self):
        return len(self._sets)
