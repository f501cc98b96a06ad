"""Array interop: take arrays from any framework, give results back in kind.

The reference backend works on NumPy; the GPU backend works on CuPy. Inputs are
converted without copies where the memory allows it (DLPack on the GPU, buffer
views on the CPU). bf16 travels as ml_dtypes' bfloat16 (or an int16 view where a
framework lacks it) and FP8 as uint8 views, since CuPy has no float8 dtype.
"""
from __future__ import annotations

import numpy as np

from .errors import InvalidInputError
from .fp8 import bfloat16, float8_e4m3


def framework_of(a) -> str:
    """Return 'numpy', 'torch', 'cupy' or 'jax' for an array-like."""
    mod = type(a).__module__.split(".")[0]
    if mod in ("numpy", "torch", "cupy"):
        return mod
    if mod in ("jax", "jaxlib"):
        return "jax"
    raise InvalidInputError(
        f"unsupported array type {type(a).__qualname__} from '{mod}': pass a "
        "NumPy, CuPy, torch or JAX array")


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
    """A device array as CuPy, zero-copy through DLPack; fp8 becomes uint8."""
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
        import torch
        if a.dtype == np.bool_:
            return torch.from_dlpack(a.view(np.uint8)).view(torch.bool)
        t = torch.from_dlpack(a)
        return t.view(torch.float8_e4m3fn) if fp8 else t
    if framework == "jax":
        import jax.dlpack
        return jax.dlpack.from_dlpack(a)
    raise InvalidInputError(f"cannot return device arrays as {framework}")
