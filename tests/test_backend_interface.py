"""Both backends implement cupyep.backends.interface.Backend: every method,
with its parameters in the same order and with the same names."""
import inspect

import pytest

from cupyep.backends.gpu.backend import GpuBackend
from cupyep.backends.interface import Backend
from cupyep.backends.reference.backend import ReferenceBackend

METHODS = [name for name, member in vars(Backend).items() if inspect.isfunction(member) and not name.startswith("_")]


def test_the_interface_names_every_call_buffer_makes():
    assert len(METHODS) == 16
    with open(inspect.getsourcefile(__import__("cupyep.buffer").buffer)) as f:
        source = f.read()
    for name in METHODS:
        assert f"_impl.{name}(" in source, f"Buffer never calls {name}"


@pytest.mark.parametrize("backend", [ReferenceBackend, GpuBackend])
@pytest.mark.parametrize("name", METHODS)
def test_backend_implements(backend, name):
    want = list(inspect.signature(getattr(Backend, name)).parameters)
    got = list(inspect.signature(getattr(backend, name)).parameters)
    assert got == want, f"{backend.__name__}.{name}{got} differs from the interface's {want}"
