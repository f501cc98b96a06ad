"""cupyep.arrays.output_sets: a set of outputs comes back only once nothing outside
it refers to it (on the CPU with torch tensors, and with stand-ins for CuPy
arrays; the GPU behaviour is in tests/test_torch_streams.py and
tests/test_low_latency.py)."""
import pytest

from cupyep.arrays import interop
from cupyep.arrays.output_sets import OutputSets, refcount_sum

try:
    import torch
except ImportError:
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")


def make_sets(depth=2):
    made = []

    def make():
        flat = torch.empty(64, dtype=torch.int32)
        out = (torch.as_strided(flat, (4, 8), (8, 1), 0), None, torch.as_strided(flat, (8,), (1,), 32).view(torch.float32))
        made.append(out[0].data_ptr())
        return out

    sets = OutputSets(make, torch._C._storage_Use_Count, lambda ts: ts[0].untyped_storage()._cdata, depth)
    return sets, made


@needs_torch
def test_a_dropped_set_comes_back():
    sets, made = make_sets()
    a, _ = sets.take(stream=1)
    ptr = a[0].data_ptr()
    del a
    b, addresses = sets.take(stream=1)
    assert b[0].data_ptr() == ptr and len(made) == 1
    assert addresses == (ptr, 0, b[2].data_ptr())
    assert b[1] is None and b[2].dtype == torch.float32


@needs_torch
@pytest.mark.parametrize("hold", ["the set", "one tensor", "a view", "a dtype view"])
def test_a_held_set_is_not_handed_out(hold):
    sets, made = make_sets()
    a, _ = sets.take(stream=1)
    if hold == "the set":
        kept = a
    elif hold == "one tensor":
        kept = a[2]
    elif hold == "a view":
        kept = a[0][1:]
    else:
        kept = a[0].view(torch.float32)
    a[0].fill_(7)
    ptr = a[0].data_ptr()
    del a
    b, _ = sets.take(stream=1)
    assert b[0].data_ptr() != ptr and len(made) == 2
    b[0].fill_(-1)
    held = kept if hold != "the set" else kept[0]
    if hold in ("the set", "a view"):
        assert (held == 7).all(), "a held set was written"
    del kept, held, b
    assert sets.take(stream=1)[0][0].data_ptr() in made[:2] and len(made) == 2


@needs_torch
def test_a_set_is_reused_only_on_its_stream():
    sets, made = make_sets()
    a, _ = sets.take(stream=1)
    del a
    sets.take(stream=2)
    assert len(made) == 2, "a set made on stream 1 went to stream 2"


@needs_torch
def test_depth_bounds_the_kept_sets():
    sets, made = make_sets(depth=2)
    held = [sets.take(stream=1) for _ in range(3)]
    assert len(made) == 3 and len(sets) == 2
    del held
    for _ in range(4):
        sets.take(stream=1)
    assert len(made) == 3, "free kept sets were not reused"
    sets.clear()
    assert len(sets) == 0
    sets.take(stream=1)
    assert len(made) == 4


@needs_torch
def test_depth_zero_keeps_nothing():
    sets, made = make_sets(depth=0)
    for _ in range(3):
        sets.take(stream=1)
    assert len(made) == 3 and len(sets) == 0


@needs_torch
def test_sets_held_for_good_do_not_stop_reuse():
    """Two sets the caller keeps forever (two results alive, say) fill the
    kept places; a later set takes the older one's place and is reused."""
    sets, made = make_sets(depth=2)
    held_for_good = [sets.take(stream=1) for _ in range(2)]
    for _ in range(5):
        sets.take(stream=1)  # dropped at once
    assert len(made) == 3, f"{len(made)} sets made: the later calls were not served by one kept set"
    assert all(t[0][0].data_ptr() in made[:2] for t in held_for_good)


class _Allocation:
    """Stands in for CuPy's pooled memory."""


class _Pointer:
    """Stands in for cupy.cuda.MemoryPointer: an allocation and an address in it."""

    def __init__(self, mem, offset):
        self.mem, self.ptr = mem, 4096 + offset


class _Array:
    """Stands in for a CuPy array: its memory pointer is ``data``."""

    def __init__(self, data):
        self.data = data


@pytest.mark.parametrize("hold", ["nothing", "the array", "its memory pointer (a view shares it)",
                                  "a new pointer on the allocation (a slice makes one)"])
def test_cupy_sets_come_back_only_once_nothing_refers_to_their_memory(hold):
    """The CuPy frontend's counting (interop._cupy_storage): arrays, their
    memory pointers and the allocation, each a way a view keeps the memory."""
    made = []

    def make():
        mem = _Allocation()
        made.append(mem)
        return [_Array(_Pointer(mem, 0)), None, _Array(_Pointer(mem, 256))]

    sets = OutputSets(make, refcount_sum, interop._cupy_storage, 2)
    a, addresses = sets.take(stream=1)
    assert addresses == (4096, 0, 4096 + 256) and a[1] is None
    held = {"nothing": None, "the array": a[2], "its memory pointer (a view shares it)": a[2].data,
            "a new pointer on the allocation (a slice makes one)": _Pointer(a[0].data.mem, 512)}[hold]
    del a
    b, _ = sets.take(stream=1)
    assert len(made) == (1 if hold == "nothing" else 2)
    del held, b
    sets.take(stream=1)
    assert len(made) == (1 if hold == "nothing" else 2), "a set nothing refers to was not handed out again"
