"""Arrays come back in the caller's framework, sharing memory where possible."""
import pytest

from cupyep.arrays import interop
from cupyep.errors import InvalidInputError
from cupyep.formats.fp8 import bfloat16, float8_e4m3

from helpers import agree_all, random_rows


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
    buf = cupyep.Buffer(group, num_nvl_bytes=cupyep.nvl_size_hint(256, 8, SIZE, 1), backend="reference")
    x = torch.randn(8, 256).to(torch.bfloat16)
    idx = torch.zeros(8, 1, dtype=torch.int64)
    d = buf.dispatch(x, idx, num_experts=SIZE)
    assert isinstance(d.recv_x, torch.Tensor) and d.recv_x.dtype == torch.bfloat16
    out = buf.combine(d.recv_x, d.handle)
    assert isinstance(out.combined_x, torch.Tensor)
    assert torch.equal(out.combined_x, x)
    buf.destroy()


def recording_torch_mode(torch):
    """A TorchFunctionMode that logs every torch call it sees and runs it."""
    class Recording(torch.overrides.TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.calls.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))
    return Recording()


def test_calls_run_outside_torch_function_modes(group, rng):
    """A TorchFunctionMode (torch.set_default_device installs one) sees none
    of a call's tensor reads (each would cost ~1 us of Python), and the call
    returns what it returns without the mode."""
    torch = pytest.importorskip("torch")
    import cupyep
    from conftest import SIZE
    buf = cupyep.Buffer(group, num_nvl_bytes=cupyep.nvl_size_hint(256, 8, SIZE, 2), backend="reference")
    x = torch.from_numpy(random_rows(rng, 8, 256).view("int16")).view(torch.bfloat16)
    idx = torch.from_numpy(rng.integers(0, 2 * SIZE, (8, 2)))
    w = torch.rand(8, 2)
    plain = buf.combine(buf.dispatch(x, idx, w, num_experts=2 * SIZE).recv_x,
                        buf.dispatch(x, idx, w, num_experts=2 * SIZE).handle)
    mode = recording_torch_mode(torch)
    with mode:
        d = buf.dispatch(x, idx, w, num_experts=2 * SIZE)
        c = buf.combine(d.recv_x, d.handle)
    buf.destroy()

    def check():
        assert mode.calls == [], mode.calls
        assert torch.equal(c.combined_x.view(torch.int16), plain.combined_x.view(torch.int16))
    agree_all(check)


@pytest.mark.gpu
def test_jax_arrays_on_the_gpu(buffer, backend, rng):
    """JAX arrays in, JAX arrays out (through DLPack); the calls run on CuPy's
    current stream (JAX exposes none to follow), results exact."""
    import os
    if backend != "gpu":
        pytest.skip("JAX on the GPU backend")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    jax = pytest.importorskip("jax")
    try:
        device = [d for d in jax.devices() if d.platform == "gpu"][buffer.device_id]
    except (RuntimeError, IndexError):
        pytest.skip("JAX has no GPU here")
    from conftest import SIZE
    from helpers import agree_all, gather, random_rows, random_topk
    from test_low_latency import check_dispatch
    m, h, num_experts = 16, 512, 4 * SIZE
    x = random_rows(rng, m, h)
    idx = random_topk(rng, m, num_experts, 2)
    xj = jax.device_put(x, device)
    d = buffer.low_latency_dispatch(xj, jax.device_put(idx, device), m, num_experts, use_fp8=False)
    everyone = gather(x, idx)
    agree_all(lambda: (type(d.recv_x).__module__.startswith("jax") or
                       pytest.fail(f"recv_x came back as {type(d.recv_x)}"),
                       check_dispatch(d, everyone, m, h, num_experts // SIZE, False, False, False)))
    buffer.clean_low_latency_buffer()


def test_outputs_carved_from_one_allocation_do_not_overlap():
    """interop.carving: the layout of TorchFrontend.empty_many (torch callers'
    low-latency dispatch outputs), checked on CPU tensors."""
    torch = pytest.importorskip("torch")
    import numpy as np
    specs = (((3, 40, 512), np.uint8), None, ((3, 40, 4), np.float32), ((3,), np.int32),
             ((3, 2), np.int64), ((3, 40, 256), bfloat16), ((0, 5), np.int32))
    total, parts = interop.carving(specs)
    flat = torch.zeros(total, dtype=torch.int32)
    torch_of = {np.dtype(np.uint8): torch.uint8, np.dtype(np.float32): torch.float32,
                np.dtype(np.int64): torch.int64, np.dtype(bfloat16): torch.bfloat16}
    out = []
    for sp, p in zip(specs, parts):
        if sp is None:
            assert p is None
            out.append(None)
            continue
        t = torch.as_strided(flat, p[0], p[1], p[2])
        t = t if p[3] is None else t.view(torch_of[np.dtype(p[3])])
        assert tuple(t.shape) == sp[0] and t.is_contiguous()
        assert t.numel() == 0 or (t.data_ptr() - flat.data_ptr()) % 256 == 0
        out.append(t)
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in out if t is not None and t.numel())
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    assert spans[-1][1] <= flat.data_ptr() + total * 4
    for i, t in enumerate(out):  # each part keeps what is written into it
        if t is not None and t.numel():
            t.view(torch.uint8).fill_(i + 1)
    for i, t in enumerate(out):
        if t is not None and t.numel():
            assert bool((t.view(torch.uint8) == i + 1).all())
    with pytest.raises(ValueError, match="whole int32"):
        interop.carving((((4, 3), np.uint8),))
