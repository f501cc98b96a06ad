"""Arrays come back in the caller's framework, sharing memory where possible."""
import pytest

from cupyep import interop
from cupyep.errors import InvalidInputError
from cupyep.fp8 import bfloat16, float8_e4m3

from helpers import random_rows


def test_numpy_is_passed_through(rng):
    x = random_rows(rng, 4, 128)
    assert interop.to_numpy(x) is x
    assert interop.from_numpy(x, "numpy") is x


def test_torch_cpu_round_trip_shares_memory(rng):
    torch = pytest.importorskip("torch")
    x = torch.randn(4, 128).to(torch.bfloat16)
    a = interop.to_numpy(x)
    assert a.dtype == bfloat16 and a.ctypes.data == x.data_ptr()
    back = interop.from_numpy(a, "torch")
    assert back.dtype == torch.bfloat16 and back.data_ptr() == x.data_ptr()
    q = x.float().to(torch.float8_e4m3fn)
    qa = interop.to_numpy(q)
    assert qa.dtype == float8_e4m3
    assert interop.from_numpy(qa, "torch").dtype == torch.float8_e4m3fn


def test_unknown_array_type_is_rejected():
    with pytest.raises(InvalidInputError, match="unsupported array type"):
        interop.framework_of([1, 2, 3])


def test_buffer_returns_callers_framework(group, rng):
    torch = pytest.importorskip("torch")
    import cupyep
    from conftest import SIZE
    buf = cupyep.Buffer(group, backend="reference")
    x = torch.randn(8, 256).to(torch.bfloat16)
    idx = torch.zeros(8, 1, dtype=torch.int64)
    d = buf.dispatch(x, idx, num_experts=SIZE)
    assert isinstance(d.recv_x, torch.Tensor) and d.recv_x.dtype == torch.bfloat16
    out = buf.combine(d.recv_x, d.handle)
    assert isinstance(out.combined_x, torch.Tensor)
    assert torch.equal(out.combined_x, x)
    buf.destroy()
