"""Run-time compilation of raw_kernels/ sources.

A :class:`KernelSpec` names one template instantiation. It is compiled with
NVRTC (through cuda.core) to a cubin, cached on disk under a key that covers
the source, every file in raw_kernels/ (headers included), the options, the
architecture, the compiler and package versions, then loaded with
``cupy.RawModule``. Kernels that call NVSHMEM device functions are compiled to
LTO IR and linked with ``libnvshmem_device.a`` by nvJitLink.

Set ``CUPYEP_JIT_DEBUG=1`` to print each compile and load, and
``CUPYEP_CACHE_DIR`` to move the cache (default ``~/.cache/cupyep``).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from importlib import resources
from typing import Tuple

from cupyep.arrays.interop import dtype_of
from cupyep.errors import BackendUnavailableError, CupyepError
from cupyep.frozen import HashedOnce

DEBUG = os.environ.get("CUPYEP_JIT_DEBUG", "") not in ("", "0")


@dataclass(frozen=True, eq=False)
class KernelSpec(HashedOnce):
    """One instantiation of a templated kernel.

    Attributes:
        source: path under raw_kernels/, e.g. ``"cupyep/intranode.cu"``.
        name: qualified kernel name, e.g. ``"cupyep::dispatch"``.
        template_args: (name, value) pairs in template order, e.g.
            ``(("kNumRanks", 4), ("kHiddenInt4", 896))``.
        nvshmem: link against NVSHMEM's device library.
    """
    source: str
    name: str
    template_args: Tuple[Tuple[str, object], ...] = ()
    nvshmem: bool = False

    def __post_init__(self):
        self._freeze()  # hashed once: the launch caches look specs up on every call

    @property
    def instantiation(self) -> str:
        if not self.template_args:
            return self.name
        return f"{self.name}<{', '.join(str(v) for _, v in self.template_args)}>"

    @property
    def readable_key(self) -> str:
        """Filename-safe, e.g. ``dispatch-kNumRanks4-kHiddenInt4896``, ``ll-dispatch-...``."""
        parts = [self.name.removeprefix("cupyep::").replace("::", "-")]
        parts += [f"{k}{re.sub(r'[^A-Za-z0-9]+', '', str(v))}" for k, v in self.template_args]
        return "-".join(parts)


def kernel_dir() -> str:
    """raw_kernels/ as installed (package data), or beside the package in a checkout."""
    try:
        return str(resources.files("cupyep.raw_kernels"))
    except ModuleNotFoundError:
        checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return os.path.join(checkout, "raw_kernels")


@functools.lru_cache(maxsize=None)
def sources_digest() -> str:
    """sha256 over every file in raw_kernels/ and the package version."""
    from cupyep import __version__
    h = hashlib.sha256(__version__.encode())
    root = kernel_dir()
    for dirpath, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            if f.endswith((".cu", ".cuh")):
                p = os.path.join(dirpath, f)
                h.update(os.path.relpath(p, root).encode())
                with open(p, "rb") as fh:
                    h.update(fh.read())
    return h.hexdigest()


def cache_dir() -> str:
    """``CUPYEP_CACHE_DIR``, default ``~/.cache/cupyep``. One that cannot be
    created or written gives a warning and a per-process temporary directory
    (kernels then compile again in every process)."""
    d = os.environ.get("CUPYEP_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "cupyep")
    try:
        os.makedirs(d, exist_ok=True)
        if os.access(d, os.W_OK | os.X_OK):
            return d
        problem = "is not writable"
    except OSError as e:
        problem = f"cannot be created ({e.strerror})"
    return _fallback_dir(f"the kernel cache {d} {problem}")


_fallback = []


def _fallback_dir(why: str) -> str:
    if not _fallback:
        _fallback.append(tempfile.mkdtemp(prefix="cupyep-jit-"))
        warnings.warn(f"{why}; compiling into {_fallback[0]} for this process only "
                      "(set CUPYEP_CACHE_DIR to a writable directory)", RuntimeWarning, stacklevel=3)
    return _fallback[0]


@contextlib.contextmanager
def _entry_lock(path: str):
    """Exclusive lock on one cache entry across processes (flock; NFSv4 and
    most shared file systems honour it), so that one rank compiles while the
    others wait for its file. No lock where the file cannot be created."""
    try:
        fd = os.open(path + ".lock", os.O_CREAT | os.O_RDWR, 0o666)
    except OSError:
        yield
        return
    try:
        import fcntl
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _read_entry(path: str, meta: str):
    """The metadata of a complete, intact entry; None when absent. A
    corrupted entry (checksum, size or JSON) is removed, with a warning."""
    if not (os.path.exists(path) and os.path.exists(meta)):
        return None
    try:
        with open(meta) as f:
            info = json.load(f)
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if info.get("sha256") == digest:
            return info
        problem = "its checksum does not match"
    except (OSError, ValueError, KeyError) as e:
        problem = f"it cannot be read ({e})"
    warnings.warn(f"kernel cache entry {path}: {problem}; compiling it again", RuntimeWarning, stacklevel=3)
    for p in (path, meta):
        try:
            os.unlink(p)
        except OSError:
            pass
    return None


def _cuda_include_dirs(nvshmem: bool):
    import cuda.pathfinder as pf
    dirs = [kernel_dir(), pf.find_nvidia_header_directory("cudart")]
    if nvshmem:
        dirs.append(pf.find_nvidia_header_directory("nvshmem"))
        cccl = pf.find_nvidia_header_directory("cccl")
        if cccl:
            dirs.append(cccl)
    return [d for d in dirs if d]


@functools.lru_cache(maxsize=None)
def _nvrtc_version() -> str:
    from cuda.bindings import nvrtc
    err, major, minor = nvrtc.nvrtcVersion()
    return f"{major}.{minor}"


def nvshmem_header_version(include_dir: str) -> str:
    """'major.minor.patch' from the NVSHMEM headers in ``include_dir``."""
    path = os.path.join(include_dir, "non_abi", "nvshmem_version.h")
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return "unknown"
    parts = [re.search(rf"#define\s+NVSHMEM_VENDOR_{p}_VERSION\s+(\d+)", text) for p in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(m.group(1) for m in parts) if all(parts) else "unknown"


def check_nvshmem_versions(header_version: str, library_version: str, include_dir: str = "") -> None:
    """Device code must be built from the headers of the host library loaded at run time."""
    if "unknown" in (header_version, library_version) or header_version == library_version:
        return
    raise BackendUnavailableError(
        f"NVSHMEM headers are version {header_version} ({include_dir}) but the host library "
        f"loaded is {library_version}: kernels linked against the headers' device library would "
        "fail to initialise. Install one NVSHMEM (nvidia-nvshmem-cu13 matching nvshmem4py's library).")


@functools.lru_cache(maxsize=None)
def _checked_nvshmem() -> None:
    import cuda.pathfinder as pf
    import nvshmem.core
    inc = pf.find_nvidia_header_directory("nvshmem") or ""
    check_nvshmem_versions(nvshmem_header_version(inc), str(nvshmem.core.get_version().libnvshmem_version), inc)


def _nvshmem_version() -> str:
    try:
        from importlib.metadata import version
        return version("nvidia-nvshmem-cu13")
    except Exception:
        return "unknown"


# NVSHMEM 3.4's headers use std:: traits that NVRTC lacks without libstdc++.
_NVSHMEM_PRELUDE = """
#include <cuda/std/type_traits>
#include <cuda/std/cstdint>
namespace std { using cuda::std::is_integral; using cuda::std::is_same; using cuda::std::enable_if;
using cuda::std::is_signed; using cuda::std::is_unsigned; using cuda::std::is_floating_point;
using cuda::std::remove_reference; using cuda::std::conditional; }
#include "non_abi/nvshmem_build_options.h"
#include "device/nvshmem_defines.h"
#include "device/nvshmemx_defines.h"
"""
# The one source that includes NVSHMEM's headers (see nvshmem_device.cuh).
NVSHMEM_DEVICE_SOURCE = "cupyep/nvshmem_device.cu"


def _source_text(spec: KernelSpec) -> str:
    with open(os.path.join(kernel_dir(), spec.source)) as f:
        body = f.read()
    # The digest makes the cache key (and CuPy's own, if used) see headers.
    head = f"// cupyep sources {sources_digest()}\n"
    if spec.nvshmem:
        head += '#define CUPYEP_NVSHMEM 1\n#include "cupyep/nvshmem_device.cuh"\n'
    return head + body


def _option_values(spec: KernelSpec, arch: str) -> dict:
    """The compile options but the include path (which depends on the machine,
    not on what is compiled: the headers' contents are in the key already)."""
    kw = dict(arch=arch, std="c++17", use_fast_math=False)
    if spec.nvshmem:
        kw.update(relocatable_device_code=True, link_time_optimization=True,
                  device_as_default_execution_space=True)
    return kw


def _options(spec: KernelSpec, arch: str):
    from cuda.core import ProgramOptions
    return ProgramOptions(include_path=_cuda_include_dirs(False), **_option_values(spec, arch))


def cache_key(spec: KernelSpec, arch: str) -> str:
    """Covers what changes the binary: source and headers (digest), package
    version, instantiation, architecture, NVRTC and NVSHMEM versions, options."""
    h = hashlib.sha256()
    for part in (spec.source, spec.instantiation, arch, _nvrtc_version(), sources_digest(),
                 str(spec.nvshmem), _nvshmem_version() if spec.nvshmem else "",
                 json.dumps(_option_values(spec, arch), sort_keys=True)):
        h.update(part.encode())
        h.update(b"\0")
    return f"{spec.readable_key[:120]}-{arch}-{h.hexdigest()[:20]}"


compiles = 0  # kernels this process compiled (not found in the cache)


def compile_cubin(spec: KernelSpec, arch: str = "sm_90") -> Tuple[str, str]:
    """Compile (or find in the cache) one instantiation.

    Ranks sharing the cache compile each entry once: one holds the entry's
    lock while it compiles, the others then find the file.

    Returns:
        (path of the cubin, mangled kernel name).
    """
    def build():
        code, mangled = _compile(spec, arch)
        return code, {"mangled": mangled, "instantiation": spec.instantiation}
    path, info = _cached(cache_key(spec, arch) + ".cubin", build)
    return path, info["mangled"]


def _cached(name: str, build) -> Tuple[str, dict]:
    """(path, metadata) of the cache entry ``name``, built by ``build() ->
    (bytes, metadata)`` under the entry's lock when absent or corrupted."""
    global compiles
    d = cache_dir()
    path = os.path.join(d, name)
    info = _read_entry(path, path + ".json")
    if info is not None:
        return path, info
    with _entry_lock(path):
        info = _read_entry(path, path + ".json")  # another process may have just written it
        if info is not None:
            return path, info
        code, info = build()
        compiles += 1
        info = dict(info, sha256=hashlib.sha256(code).hexdigest())
        try:
            _atomic_write(path, code)
            _atomic_write(path + ".json", json.dumps(info).encode())  # last: an entry without it is incomplete
        except OSError as e:  # e.g. a full disk
            path = os.path.join(_fallback_dir(f"cannot write the kernel cache in {d} ({e.strerror})"), name)
            _atomic_write(path, code)
            _atomic_write(path + ".json", json.dumps(info).encode())
    return path, info


def _compile(spec: KernelSpec, arch: str):
    """(cubin bytes, mangled name) of one instantiation, compiled now."""
    from cuda.core import Program
    if spec.nvshmem:
        _checked_nvshmem()
    if DEBUG:
        print(f"[cupyep.jit] compiling {spec.instantiation} from {spec.source} for {arch}", flush=True)
    prog = Program(_source_text(spec), "c++", _options(spec, arch))
    try:
        if spec.nvshmem:
            obj = prog.compile("ltoir", name_expressions=(spec.instantiation,))
            code = _link_nvshmem(obj, arch)
        else:
            obj = prog.compile("cubin", name_expressions=(spec.instantiation,))
            code = obj.code
    except Exception as e:  # NVRTC errors carry the log
        raise CupyepError(f"compiling {spec.instantiation} ({spec.source}) failed:\n{e}") from None
    mangled = obj.symbol_mapping[spec.instantiation]
    mangled = mangled.decode() if isinstance(mangled, bytes) else mangled
    return bytes(code), mangled


def nvshmem_device_ltoir(arch: str) -> str:
    """Path of nvshmem_device.cu compiled to LTO IR for ``arch`` (cached)."""
    from cuda.core import Program, ProgramOptions
    # Only the device API's headers (nvshmem.h adds the host API: 3x the parse
    # time) and no NVVM optimisation here (link-time optimisation does it
    # all): the linked kernels' SASS is the same, the compile ~3x shorter.
    opts = dict(arch=arch, std="c++17", relocatable_device_code=True, link_time_optimization=True,
                device_as_default_execution_space=True, device_code_optimize=False)
    with open(os.path.join(kernel_dir(), NVSHMEM_DEVICE_SOURCE)) as f:
        text = _NVSHMEM_PRELUDE + f.read()
    h = hashlib.sha256()
    for part in (text, arch, _nvrtc_version(), _nvshmem_version(), json.dumps(opts, sort_keys=True)):
        h.update(part.encode())
        h.update(b"\0")

    def build():
        _checked_nvshmem()
        if DEBUG:
            print(f"[cupyep.jit] compiling {NVSHMEM_DEVICE_SOURCE} for {arch}", flush=True)
        prog = Program(text, "c++", ProgramOptions(include_path=_cuda_include_dirs(True), **opts))
        try:
            return bytes(prog.compile("ltoir").code), {"source": NVSHMEM_DEVICE_SOURCE}
        except Exception as e:
            raise CupyepError(f"compiling {NVSHMEM_DEVICE_SOURCE} failed:\n{e}") from None
    return _cached(f"nvshmem-device-{arch}-{h.hexdigest()[:20]}.ltoir", build)[0]


def _link_nvshmem(ltoir, arch: str) -> bytes:
    from cuda.core import Linker, LinkerOptions, ObjectCode
    import nvshmem.core
    from nvshmem.core import DeviceLibLanguage  # type: ignore[attr-defined]
    lib = nvshmem.core.find_device_bitcode_library(language=DeviceLibLanguage.STATIC)
    with open(nvshmem_device_ltoir(arch), "rb") as f:
        wrappers = ObjectCode.from_ltoir(f.read())
    linker = Linker(ltoir, wrappers, ObjectCode.from_library(str(lib)),
                    options=LinkerOptions(arch=arch, link_time_optimization=True))
    return bytes(linker.link("cubin").code)


def _atomic_write(path: str, data: bytes) -> None:
    """Every rank may compile at once: write to a temp file, then rename."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


_prefetching = {}  # what background threads compile, once per process: key -> thread


def prefetch(specs, arch: str) -> None:
    """Start compiling ``specs`` for ``arch`` in background threads (NVRTC
    and nvJitLink release the GIL), so that a call's kernels compile at once
    rather than one after another as the call reaches them. A later
    :func:`compile_cubin` of a spec in flight waits for it (the entry's lock)
    and finds the file. Nothing here touches the GPU; errors are left for
    that later compile to raise."""
    for spec in specs:
        _in_background((spec, arch), compile_cubin, spec, arch)


def prefetch_nvshmem_device(arch: str) -> None:
    """Start building the NVSHMEM wrappers (the longest compile) in the background."""
    _in_background(("nvshmem-device", arch), nvshmem_device_ltoir, arch)


def prefetch_compiler(arch: str) -> None:
    """Load and initialise NVRTC in the background (a trivial compile): its
    first use in a process costs a few hundred milliseconds, better spent
    while a Buffer is set up than in its first call."""
    def touch():
        from cuda.core import Program, ProgramOptions
        Program("__global__ void cupyep_touch() {}", "c++", ProgramOptions(arch=arch)).compile("cubin")
    _in_background(("nvrtc", arch), touch)


def _in_background(key, fn, *args) -> None:
    import threading
    if key in _prefetching:
        return

    def run():
        try:
            fn(*args)
        except Exception:  # the caller's own compile raises it again where it is needed
            pass
    t = _prefetching[key] = threading.Thread(target=run, name="cupyep-jit", daemon=True)
    t.start()


@functools.lru_cache(maxsize=None)
def device_arch(device_id: int) -> str:
    """``"sm_90"`` for a compute capability 9.0 device."""
    import cupy
    return "sm_" + cupy.cuda.Device(device_id).compute_capability


_loaded = {}


def get_kernel(spec: KernelSpec):
    """The loaded ``cupy.RawKernel`` for ``spec`` on the current device."""
    import cupy
    dev = cupy.cuda.Device().id
    k = _loaded.get((spec, dev))
    if k is not None:
        return k
    arch = device_arch(dev)
    path, mangled = compile_cubin(spec, arch)
    module = cupy.RawModule(path=path)
    fn = module.get_function(mangled)
    if spec.nvshmem:
        from nvshmem import bindings
        status = bindings.cumodule_init(module.module.ptr)
        if status not in (None, 0):
            raise CupyepError(f"NVSHMEM module init failed for {spec.instantiation}: {status}")
    if DEBUG:
        print(f"[cupyep.jit] loaded {spec.instantiation} on device {dev} from {path}", flush=True)
    _loaded[(spec, dev)] = (fn, module)
    return _loaded[(spec, dev)]


def index_type(arr) -> str:
    """C++ type of an int64 or int32 index array (a template argument)."""
    return "long long" if arr is None or dtype_of(arr) == _INT64 else "int"


_packed = {}
_cupy = None  # the module, once launch() has imported it (an import statement costs a lookup a call)


def _import_cupy():
    global _cupy
    import cupy
    _cupy = cupy
    return cupy
_INT64 = __import__("numpy").dtype("int64")


def launch(spec: KernelSpec, grid, block, args, shared_mem: int = 0, stream=None):
    """Launch ``spec`` on ``stream`` (default: CuPy's current stream).

    ``args`` may hold arrays (CuPy or torch: passed by address), NumPy or
    Python integers; every kernel parameter is an integer or a pointer.
    """
    cupy = _cupy or _import_cupy()
    if stream is None:
        stream = cupy.cuda.get_current_stream()
    key = (spec, len(args), cupy.cuda.runtime.getDevice())
    fn = _packed.get(key)
    if fn is None:
        fn = _packed[key] = PackedKernel(spec, len(args))
    fn.launch(grid[0] if isinstance(grid, tuple) else grid, block[0] if isinstance(block, tuple) else block,
              [a if type(a) is int else _arg(a) for a in args], stream, shared_mem)


_ARG_CONVERTERS = {}  # argument type -> how it becomes a Python int (launch() passes ints as they are)


def _arg(a) -> int:
    convert = _ARG_CONVERTERS.get(type(a))
    if convert is None:
        if hasattr(a, "data_ptr"):  # torch tensor
            convert = _torch_address
        elif hasattr(a, "data") and hasattr(a, "shape") and a.shape != ():  # CuPy array
            convert = _cupy_address
        else:  # a NumPy scalar
            convert = int
        _ARG_CONVERTERS[type(a)] = convert
    return convert(a)


def _torch_address(a) -> int:
    return a.data_ptr()


def _cupy_address(a) -> int:
    return a.data.ptr


class ArgBlock:
    """A kernel's parameter block: one 8-byte slot per parameter, set by
    index (``block.values[i] = v``), and the array of pointers to the slots
    that cuLaunchKernel takes. A slot holds a little-endian int64: an ``int``
    parameter reads its low 4 bytes (the same value for anything in int32's
    range), a pointer or ``long long`` all 8. So slots hold Python ints only:
    device addresses, integers and flags; no float parameters. The driver
    copies the values during a launch, so a block may change right after."""

    __slots__ = ("values", "_params", "params_addr")

    def __init__(self, values):
        import ctypes
        n = len(values)
        self.values = (ctypes.c_int64 * n)(*values)
        base = ctypes.addressof(self.values)
        self._params = (ctypes.c_void_p * n)(*(base + 8 * i for i in range(n)))
        self.params_addr = ctypes.addressof(self._params)

    def __len__(self):
        return len(self.values)


_DEFAULT_SHARED_MEM = 48 << 10  # a kernel's limit unless allowed more
_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES


class PackedKernel:
    """A kernel launched with cuLaunchKernel from an :class:`ArgBlock`:
    CuPy's generic call converts each argument (~15 us of host time for the
    low-latency kernels' ~28 parameters)."""

    def __init__(self, spec: KernelSpec, num_args: int, shared_mem: int = 0):
        """``shared_mem``: the dynamic shared memory its launches take (the
        caller passes it); above the default 48 KB the kernel is allowed it."""
        from cupy.cuda import driver
        fn, _ = get_kernel(spec)
        self.spec = spec
        self.num_args = num_args
        self.shared_mem = shared_mem
        self._fn = fn.kernel.ptr
        self._launch = driver.launchKernel
        self._block = ArgBlock([0] * num_args)
        if shared_mem > _DEFAULT_SHARED_MEM:
            driver.funcSetAttribute(self._fn, _MAX_DYNAMIC_SHARED_SIZE_BYTES, shared_mem)

    def launch(self, grid: int, block: int, values, stream, shared_mem: int = 0) -> None:
        """One launch of grid x block threads on ``stream`` (a CuPy stream),
        with ``values`` (Python ints, one per parameter)."""
        if len(values) != self.num_args:
            raise CupyepError(f"{self.spec.instantiation}: {len(values)} arguments, "
                              f"the kernel takes {self.num_args}")
        self._block.values[:] = values
        self.launch_block(grid, block, self._block, stream.ptr, shared_mem)

    def launch_block(self, grid: int, block: int, args: ArgBlock, stream_ptr: int, shared_mem: int = 0) -> None:
        """One launch with the parameters in ``args`` (built for this kernel)."""
        if DEBUG:
            print(f"[cupyep.jit] launch {self.spec.instantiation} grid={grid} block={block} "
                  f"smem={shared_mem} stream={stream_ptr:#x}", flush=True)
        self._launch(self._fn, grid, 1, 1, block, 1, 1, shared_mem, stream_ptr, args.params_addr, 0)


class ArgPlan:
    """One kernel's launch with its arguments kept between calls: built once,
    every parameter by name (cupyep.jit.args), the ones that change per call
    named in ``per_call`` and passed by position to :meth:`launch` (Python
    ints: addresses, counts, tags). Saves what a launch by name costs each
    call: the arguments looked up and converted, the block filled again."""

    __slots__ = ("_fn", "_block", "_slots", "grid", "threads", "shared_mem")

    def __init__(self, kernel: str, spec: KernelSpec, grid: int, threads: int, per_call: Tuple[str, ...],
                 shared_mem: int = 0, **fixed):
        from cupyep.jit.args import PARAMS, kernel_args
        params = PARAMS[kernel]
        values = kernel_args(kernel, **dict.fromkeys(per_call, 0), **fixed)  # every name, once
        self._fn = PackedKernel(spec, len(params))
        self._block = ArgBlock([a if type(a) is int else _arg(a) for a in values])
        self._slots = tuple(params.index(p) for p in per_call)
        self.grid, self.threads, self.shared_mem = grid, threads, shared_mem

    def launch(self, stream_ptr: int, *values) -> None:
        """Launch with ``values`` for the ``per_call`` parameters, in that order."""
        v = self._block.values
        for i, a in zip(self._slots, values):
            v[i] = a
        self._fn.launch_block(self.grid, self.threads, self._block, stream_ptr, self.shared_mem)


_ADDRESS_OF = {}  # array type -> its address getter (hot path: one lookup)


def address(a) -> int:
    """Device address of a CuPy array or torch tensor (a Python int), 0 for None."""
    if a is None:  # absent optional arrays (scales, biases, weights): no lookup
        return 0
    get = _ADDRESS_OF.get(type(a))
    if get is None:
        get = _ADDRESS_OF[type(a)] = type(a).data_ptr if hasattr(a, "data_ptr") else _cupy_address
    return get(a)
