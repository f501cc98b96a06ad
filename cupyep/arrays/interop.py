"""Array interop: take arrays from any framework, give results back in kind.

The reference backend works on NumPy: host inputs are viewed without copies.
On the GPU a call meets its caller through a :class:`DeviceFrontend`, one per
framework: it names the stream the call runs on (the framework's current
stream), checks where inputs live, allocates outputs and hands them back.

- torch: tensors go to the kernels as they are (their addresses); outputs are
  allocated by torch's caching allocator on the caller's stream, so inside
  ``torch.cuda.graph`` they come from the graph's pool and stay valid across
  replays. No DLPack exchange, so no stream handshake on the hot path.
- CuPy: arrays as they are; CuPy's current stream.
- JAX: imported and exported through DLPack; the call runs on CuPy's current
  stream (JAX has no current-stream notion to follow).

bf16 travels as ml_dtypes' bfloat16 (or an int16 view where a framework lacks
it) and FP8 as uint8, since CuPy has no float8 dtype.
"""
from __future__ import annotations

import functools
import os
import sys

import numpy as np

from cupyep.arrays.capture import is_capturing
from cupyep.arrays.output_sets import OutputSets, device_address, refcount_sum
from cupyep.errors import InvalidInputError
from cupyep.formats.fp8 import bfloat16, float8_e4m3

_TORCH_TO_NUMPY = {}  # torch dtype -> NumPy dtype, filled on first use
_NUMPY_TO_TORCH = {}


def _torch_dtypes():
    if not _TORCH_TO_NUMPY:
        import torch
        pairs = [(torch.bfloat16, bfloat16), (torch.float8_e4m3fn, float8_e4m3), (torch.float32, np.float32),
                 (torch.float16, np.float16), (torch.float64, np.float64), (torch.int64, np.int64),
                 (torch.int32, np.int32), (torch.int16, np.int16), (torch.int8, np.int8),
                 (torch.uint8, np.uint8), (torch.bool, np.bool_)]
        for t, n in pairs:
            _TORCH_TO_NUMPY[t] = np.dtype(n)
            _NUMPY_TO_TORCH[np.dtype(n)] = t
    return _TORCH_TO_NUMPY, _NUMPY_TO_TORCH


_DTYPE_OF = {}  # an array's dtype object (NumPy's or torch's) -> NumPy dtype: one lookup on the hot path


def dtype_of(a) -> np.dtype:
    """NumPy dtype of a NumPy, CuPy or torch array (torch's mapped; fp8 as ml_dtypes')."""
    dt = a.dtype
    found = _DTYPE_OF.get(dt)
    if found is not None:
        return found
    if isinstance(dt, np.dtype):
        found = dt
    else:
        to_np = _TORCH_TO_NUMPY or _torch_dtypes()[0]
        try:
            found = to_np[dt]
        except KeyError:
            raise InvalidInputError(f"unsupported dtype {dt}") from None
    _DTYPE_OF[dt] = found
    return found


_IS_CONTIGUOUS = {}  # array type -> its C-contiguity test (a hot-path lookup)


def _flags_c_contiguous(a) -> bool:
    return a.flags.c_contiguous


def is_c_contiguous(a) -> bool:
    test = _IS_CONTIGUOUS.get(type(a))
    if test is None:  # torch's method, else NumPy's / CuPy's flags (no getattr miss: it raises inside)
        test = _IS_CONTIGUOUS[type(a)] = type(a).is_contiguous if framework_of(a) == "torch" else _flags_c_contiguous
    return test(a)


def strides_of(a) -> tuple:
    """Strides in bytes."""
    if hasattr(a, "flags"):
        return tuple(a.strides)
    return tuple(s * a.element_size() for s in a.stride())


_FRAMEWORK_OF_TYPE = {}  # array type -> framework name (a hot-path lookup)


def framework_of(a) -> str:
    """Return 'numpy', 'torch', 'cupy' or 'jax' for an array-like."""
    fw = _FRAMEWORK_OF_TYPE.get(type(a))
    if fw is not None:
        return fw
    mod = type(a).__module__.split(".")[0]
    if mod in ("numpy", "torch", "cupy"):
        fw = mod
    elif mod in ("jax", "jaxlib"):
        fw = "jax"
    else:
        raise InvalidInputError(
            f"unsupported array type {type(a).__qualname__} from '{mod}': pass a "
            "NumPy, CuPy, torch or JAX array")
    _FRAMEWORK_OF_TYPE[type(a)] = fw
    return fw


def outside_torch_function_modes(method):
    """Run ``method`` with torch's function modes off while one is on.

    A TorchFunctionMode (``torch.set_default_device``, a ``with
    torch.device(...)`` block, DeepEP's test programs) routes every tensor
    attribute read and method call through Python, ~1.2 us each instead of
    ~0.07: a low-latency pair makes some thirty. cupyep only reads its
    inputs' shapes and addresses and makes raw outputs on its own device,
    which no mode needs to see. Without torch imported, or with no mode on,
    the call goes straight through (the wrapper costs ~0.2 us)."""
    @functools.wraps(method)
    def call(*args, **kwargs):
        modes = _TORCH_MODES or _torch_modes()
        if modes and modes[0]():
            with modes[1]():
                return method(*args, **kwargs)
        return method(*args, **kwargs)
    return call


_TORCH_MODES = []  # torch's (mode test, DisableTorchFunction) once torch is imported


def _torch_modes() -> list:
    torch = sys.modules.get("torch")
    if torch is not None:
        _TORCH_MODES[:] = (torch._C._is_torch_function_mode_enabled, torch._C.DisableTorchFunction)
    return _TORCH_MODES


def _torch_dtype_name(t) -> str:
    return str(t.dtype).replace("torch.", "")


def is_device_array(a) -> bool:
    """True when the array lives in GPU memory."""
    fw = framework_of(a)
    if fw == "cupy":
        return True
    if fw == "torch":
        return a.is_cuda
    if fw == "jax":
        return any(d.platform == "gpu" for d in a.devices())
    return False


def to_numpy(a) -> np.ndarray:
    """A host array as NumPy, sharing memory; bf16/fp8 as ml_dtypes dtypes."""
    fw = framework_of(a)
    if fw == "numpy":
        return a
    if fw == "torch":
        if a.is_cuda:
            raise InvalidInputError("a CUDA tensor was given to the CPU reference backend")
        a = a.detach()  # same memory; autograd is the caller's business
        name = _torch_dtype_name(a)
        if name == "bfloat16":
            import torch
            return a.view(torch.int16).numpy().view(bfloat16)
        if name.startswith("float8_e4m3"):
            import torch
            return a.view(torch.uint8).numpy().view(float8_e4m3)
        return a.numpy()
    if fw == "jax":
        return np.asarray(a)
    raise InvalidInputError("a CuPy array was given to the CPU reference backend")


def to_cupy(a):
    """A device array as CuPy, zero-copy through DLPack; fp8 becomes uint8.
    (Off the hot path: calls take torch tensors through TorchFrontend.)"""
    import cupy
    fw = framework_of(a)
    if fw == "cupy":
        return a
    if fw == "torch":
        if not a.is_cuda:
            raise InvalidInputError("a CPU tensor was given to the GPU backend")
        import torch
        a = a.detach()  # same memory; autograd is the caller's business
        if _torch_dtype_name(a).startswith("float8_e4m3"):
            a = a.view(torch.uint8)
        elif a.dtype == torch.bool:
            return cupy.from_dlpack(a.view(torch.uint8)).view(cupy.bool_)
        return cupy.from_dlpack(a)
    if fw == "jax":
        return cupy.from_dlpack(a)
    raise InvalidInputError("a host (NumPy) array was given to the GPU backend; "
                            "move it to the GPU first")


def from_numpy(a, framework: str, fp8: bool = False):
    """Give a NumPy result back as ``framework`` (numpy, torch or jax)."""
    if a is None or framework == "numpy":
        return a
    if framework == "torch":
        import torch
        if a.dtype == bfloat16:
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        if a.dtype == float8_e4m3:
            return torch.from_numpy(a.view(np.uint8)).view(torch.float8_e4m3fn)
        return torch.from_numpy(a)
    if framework == "jax":
        import jax.numpy as jnp
        return jnp.asarray(a)
    raise InvalidInputError(f"cannot return host arrays as {framework}")


def from_cupy(a, framework: str, fp8: bool = False):
    """Give a CuPy result back as ``framework``, zero-copy.

    ``fp8`` marks a uint8 array that holds e4m3 values.
    """
    if a is None or framework == "cupy":
        return a
    if framework == "torch":
        import warnings

        import torch
        # A capsule carries no stream: torch.from_dlpack(a) would have the
        # current torch stream wait on CuPy's, which breaks graph capture.
        # (CuPy deprecates toDlpack with a VisibleDeprecationWarning, not the need.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if a.dtype == np.bool_:
                return torch.utils.dlpack.from_dlpack(a.view(np.uint8).toDlpack()).view(torch.bool)
            t = torch.utils.dlpack.from_dlpack(a.toDlpack())
        return t.view(torch.float8_e4m3fn) if fp8 else t
    if framework == "jax":
        import jax.dlpack
        return jax.dlpack.from_dlpack(a)
    raise InvalidInputError(f"cannot return device arrays as {framework}")


# ---- the GPU backend's callers ------------------------------------------- #
def _external_stream(ptr: int, device_id: int):
    import warnings

    import cupy
    with warnings.catch_warnings():  # CuPy 14 deprecates the class, not the need
        warnings.simplefilter("ignore", DeprecationWarning)
        return cupy.cuda.ExternalStream(ptr, device_id)


class DeviceFrontend:
    """How GPU calls meet arrays of one framework (CuPy; JAX through DLPack).

    Args:
        device_id: the buffer's CUDA device.
    """

    name = "cupy"
    keeps_outputs_in_capture = True  # CuPy has no graph pool: cupyep.arrays.capture keeps them
    recycles_outputs = True  # output sets handed out again once dropped (cupyep.arrays.output_sets)

    def __init__(self, device_id: int):
        self.device_id = device_id
        self._carvings = {}  # output specs -> carving()
        self._output_sets = {}  # (output specs, fp8) -> OutputSets
        self.kept_output_sets = int(os.environ.get("CUPYEP_KEPT_OUTPUT_SETS", "2"))

    def stream(self):
        """The caller's current stream, as a CuPy stream."""
        import cupy
        return cupy.cuda.get_current_stream()

    def stream_ptr(self) -> int:
        return self.stream().ptr

    def native(self, a):
        """An input the kernels can read; raises InvalidInputError for host arrays."""
        fw = framework_of(a)
        if fw == "cupy":
            # the pointer's device id: a.device builds a Device object each call
            if a.data.device_id != self.device_id:
                raise InvalidInputError(f"array on GPU {a.data.device_id}, the buffer is on GPU {self.device_id}")
            return a
        return to_cupy(a)

    def empty(self, shape, dtype):
        import cupy
        return cupy.empty(shape, dtype)

    def _carving(self, specs):
        plan = self._carvings.get(specs)
        if plan is None:
            plan = self._carvings[specs] = carving(specs)
        return plan

    def empty_many(self, specs, fp8: bool = False):
        """Arrays of ``specs`` ((shape, dtype) or None, a tuple) in one
        allocation, each on a memory pointer of its own (what
        :func:`_cupy_storage` counts). ``fp8`` is for torch (CuPy has no e4m3)."""
        import cupy
        total, parts = self._carving(specs)
        mem = cupy.cuda.alloc(4 * total)
        return [None if p is None else
                cupy.ndarray(sp[0], sp[1], cupy.cuda.MemoryPointer(mem.mem, 4 * p[2]))
                for sp, p in zip(specs, parts)]

    def output_sets(self, specs, fp8: bool = False):
        """The kept sets of one kind of outputs (made once per kind; callers
        keep it per launch plan), or None where outputs are not recycled."""
        if not self.recycles_outputs:
            return None
        sets = self._output_sets.get((specs, fp8))
        if sets is None:
            sets = self._output_sets[(specs, fp8)] = OutputSets(
                lambda: self.empty_many(specs, fp8), *self._storage_counting(), self.kept_output_sets)
        return sets

    def _storage_counting(self):
        """(use_count, storage_of) for OutputSets: references to a set's memory."""
        return refcount_sum, _cupy_storage

    def take_outputs(self, sets, stream):
        """(outputs, their addresses) from ``sets`` (:meth:`output_sets`) for
        a call on ``stream`` (the caller's, a CuPy stream); None while that
        stream is captured (the caller then makes them as capture needs)."""
        if is_capturing(stream):
            return None
        return sets.take(stream.ptr)

    def outputs(self, specs, fp8: bool = False):
        """(outputs of ``specs`` (as :meth:`empty_many`), their addresses) for a
        call on the current stream: a set made earlier on it once the caller
        has dropped it, new ones while it is captured (torch: from the graph's
        pool; CuPy callers keep arrays per call instead, cupyep.arrays.capture)."""
        got = self.take_outputs(self.output_sets(specs, fp8), self.stream())
        if got is None:
            out = self.empty_many(specs, fp8)
            got = out, tuple(0 if t is None else device_address(t) for t in out)
        return got

    def drop_kept_outputs(self) -> None:
        """Forget the kept output sets (cupyep.arrays.output_sets); their
        memory is freed once the caller drops them."""
        for sets in self._output_sets.values():
            sets.clear()

    def back(self, a, fp8: bool = False):
        """A result in the caller's framework (zero-copy)."""
        return from_cupy(a, self.name, fp8)


def _cupy_storage(arrays) -> tuple:
    """What refers to the memory of a set of CuPy arrays made by empty_many:
    its allocation and each array's memory pointer. A view of one either
    shares that pointer or makes a new one on the allocation; DLPack exports
    and ``base`` chains refer to the arrays, which OutputSets counts itself."""
    ptrs = tuple(a.data for a in arrays if a is not None)
    return (ptrs[0].mem,) + ptrs


class JaxFrontend(DeviceFrontend):
    name = "jax"
    recycles_outputs = False  # results leave as JAX arrays (DLPack): fresh each call


class TorchFrontend(DeviceFrontend):
    """torch tensors by address; outputs from torch's caching allocator."""

    name = "torch"
    keeps_outputs_in_capture = False  # torch.cuda.graph gives allocations its pool
    recycles_outputs = True

    def __init__(self, device_id: int):
        import torch
        super().__init__(device_id)
        self._torch = torch
        self._tensor = torch.Tensor
        self._device = torch.device("cuda", device_id)
        self._raw_stream = torch._C._cuda_getCurrentRawStream
        self._streams = {}  # raw stream -> CuPy ExternalStream
        self._f8 = torch.float8_e4m3fn
        self._dtypes = {}  # NumPy dtype (or type) -> torch dtype
        self._capturing = torch._C._cuda_isCurrentStreamCapturing
        _torch_dtypes()

    def stream_ptr(self) -> int:
        return self._raw_stream(self.device_id)

    def stream(self):
        ptr = self._raw_stream(self.device_id)
        s = self._streams.get(ptr)
        if s is None:
            s = self._streams[ptr] = _external_stream(ptr, self.device_id)
        return s

    def native(self, a):
        if type(a) is not self._tensor and framework_of(a) != "torch":  # a plain tensor: one identity test
            return super().native(a)
        dev = a.get_device()  # -1: CPU
        if dev != self.device_id:
            if dev < 0:
                raise InvalidInputError("a CPU tensor was given to the GPU backend; move it to "
                                        f"cuda:{self.device_id} first")
            raise InvalidInputError(f"tensor on cuda:{dev}, the buffer is on cuda:{self.device_id}")
        return a  # read by address: autograd is the caller's business, as with detach()

    def empty(self, shape, dtype):
        td = self._dtypes.get(dtype) or self._torch_dtype(dtype)  # (a method call costs as much as the lookup)
        if type(shape) is tuple and shape:
            # sizes as separate arguments: torch parses them ~0.5 us faster than one tuple
            return self._torch.empty(*shape, dtype=td, device=self._device)
        return self._torch.empty(shape, dtype=td, device=self._device)

    def empty_many(self, specs, fp8: bool = False):
        """Tensors of ``specs`` ((shape, dtype) or None, a tuple) carved from
        one allocation: torch's allocator costs microseconds a call, a view
        one. They share its memory, freed once every one of them is dropped.
        ``fp8``: the first spec is uint8 holding e4m3; it comes as float8_e4m3fn."""
        total, parts = self._carving(specs)
        flat = self._torch.empty(total, dtype=self._torch.int32, device=self._device)
        strided = self._torch.as_strided
        out = []
        for p in parts:
            if p is None:
                out.append(None)
            else:
                t = strided(flat, p[0], p[1], p[2])
                dtype = self._f8 if fp8 and not out else None if p[3] is None else self._torch_dtype(p[3])
                out.append(t if dtype is None else t.view(dtype))
        return out

    def _storage_counting(self):
        return self._torch._C._storage_Use_Count, _storage_handle

    def take_outputs(self, sets, stream):
        # torch's capture test (one call, ~0.3 us), not CuPy's on an external
        # stream; the legacy default stream (0) is never captured
        ptr = stream.ptr
        if ptr and self._capturing():
            return None
        return sets.take(ptr)

    def _torch_dtype(self, dtype):
        td = self._dtypes.get(dtype)
        if td is None:
            td = self._dtypes[dtype] = _NUMPY_TO_TORCH[np.dtype(dtype)]
        return td

    def record_stream(self, arrays, stream_ptr: int) -> None:
        """Mark tensors as used on another stream, so that torch's allocator
        does not hand their memory out before that stream's work is done."""
        s = self._torch.cuda.ExternalStream(stream_ptr, device=self._device)
        for a in arrays:
            if a is not None and framework_of(a) == "torch":
                a.record_stream(s)

    def back(self, a, fp8: bool = False):
        if type(a) is self._tensor and not fp8:  # a plain tensor of the call: one identity test
            return a
        if a is None or framework_of(a) == "torch":
            return a.view(self._f8) if fp8 and a is not None and a.dtype is not self._f8 else a
        return from_cupy(a, "torch", fp8)  # a view of cupyep's own memory


def _storage_handle(tensors) -> int:
    """What torch._C._storage_Use_Count takes for the memory of a set of tensors."""
    return next(t for t in tensors if t is not None).untyped_storage()._cdata


def carving(specs, align: int = 256):
    """How :meth:`TorchFrontend.empty_many` lays ``specs`` out in one int32
    array: (its length, per spec None or (shape, strides, offset) of an int32
    view and the dtype it is then viewed as, None for int32). Each part starts ``align``
    bytes after the array's start times a whole number; a part whose last
    dimension is not a whole number of int32 is refused (ValueError)."""
    parts, offset = [], 0
    for sp in specs:
        if sp is None:
            parts.append(None)
            continue
        shape, dtype = (tuple(sp[0]) if isinstance(sp[0], tuple) else (sp[0],)), np.dtype(sp[1])
        row_bytes = shape[-1] * dtype.itemsize
        if row_bytes % 4:
            raise ValueError(f"{shape} {dtype}: rows of {row_bytes} bytes are not whole int32s")
        shape32 = shape[:-1] + (row_bytes // 4,)
        strides, step = [], 1
        for n in reversed(shape32):
            strides.insert(0, step)
            step *= n
        parts.append((shape32, tuple(strides), offset, None if dtype == np.int32 else dtype))
        offset += -(-step * 4 // align) * align // 4
    return max(offset, 1), parts


def device_frontend(framework: str, device_id: int) -> DeviceFrontend:
    if framework == "torch":
        return TorchFrontend(device_id)
    if framework == "jax":
        return JaxFrontend(device_id)
    if framework == "cupy":
        return DeviceFrontend(device_id)
    raise InvalidInputError("a host (NumPy) array was given to the GPU backend; move it to the GPU first")


class HostFrontend:
    """How reference-backend calls meet arrays of one framework (NumPy views)."""

    keeps_outputs_in_capture = True
    recycles_outputs = False

    def __init__(self, framework: str):
        self.name = framework

    def native(self, a):
        return to_numpy(a)

    def back(self, a, fp8: bool = False):
        return from_numpy(a, self.name, fp8)
