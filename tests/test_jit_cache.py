"""The kernel cache on disk: one compile per entry across processes, corrupted
entries rebuilt, an unusable directory replaced, and cupyep.warmup (NVRTC, no
GPU needed)."""
import multiprocessing
import os
import re
import warnings

import pytest

from conftest import RANK

pytest.importorskip("cuda.core", reason="cuda-core is not installed")

from cupyep import jit
from cupyep.jit import specs as kernel_specs  # noqa: E402

SPEC = kernel_specs.intranode_barrier(2)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache directory. The skip on other ranks happens in the test
    body, not here: every rank must reach the test's collective verdict."""
    monkeypatch.setenv("CUPYEP_CACHE_DIR", str(tmp_path))
    return tmp_path


def _rank0_only():
    if RANK != 0:
        pytest.skip("cache checks run on rank 0 only")


def test_processes_sharing_a_cache_compile_an_entry_once(cache):
    _rank0_only()
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    from jit_child import compile_into
    procs = [ctx.Process(target=compile_into, args=(str(cache), queue)) for _ in range(4)]
    for p in procs:
        p.start()
    counts = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert sum(counts) == 1, f"compiles per process: {counts}"
    assert not [f for f in os.listdir(cache) if f.startswith(".tmp-")]


def test_corrupted_entry_is_detected_and_rebuilt(cache):
    _rank0_only()
    path, mangled = jit.compile_cubin(SPEC, "sm_90")
    good = open(path, "rb").read()
    with open(path, "r+b") as f:
        f.seek(len(good) // 2)
        f.write(b"\xff" * 16)
    before = jit.compiles
    with pytest.warns(RuntimeWarning, match="checksum does not match"):
        again, mangled_again = jit.compile_cubin(SPEC, "sm_90")
    assert jit.compiles == before + 1 and mangled_again == mangled
    mid = len(good) // 2
    assert open(again, "rb").read()[mid:mid + 16] != b"\xff" * 16  # rebuilt (NVRTC output is not byte-stable)
    with open(again + ".json", "w") as f:
        f.write("{not json")
    with pytest.warns(RuntimeWarning, match="cannot be read"):
        jit.compile_cubin(SPEC, "sm_90")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jit.compile_cubin(SPEC, "sm_90")  # intact again: no warning, no compile


def test_unusable_cache_directory_falls_back_with_a_warning(cache, monkeypatch):
    _rank0_only()
    blocker = cache / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("CUPYEP_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(jit, "_fallback", [])
    with pytest.warns(RuntimeWarning, match="cannot be created"):
        path, _ = jit.compile_cubin(SPEC, "sm_90")
    assert os.path.exists(path) and not path.startswith(str(blocker))


def test_warmup_compiles_what_a_model_launches(cache):
    _rank0_only()
    from cupyep.warmup import warmup
    lines = []
    out = warmup(2048, 4, 32, (2, 4), jobs=2, arch="sm_90", progress=lines.append)
    specs = kernel_specs.model_specs(2048, 4, 32, (2, 4))
    assert out["specs"] == len(specs) == out["compiled"] and out["cache_bytes"] > 0
    assert len(lines) == len(specs) + 1 and "cached" not in "".join(lines[:-1])
    again = warmup(2048, 4, 32, (2, 4), jobs=2, arch="sm_90", progress=None)
    assert again["compiled"] == 0


def test_model_specs_are_the_instantiations_the_backends_build():
    """The builders give the specs the backends launch (same names, template
    arguments and order as the kernels' declarations)."""
    from cupyep.jit import KernelSpec
    assert kernel_specs.intranode_dispatch(4, 14336, 0, 8, "long long") == KernelSpec(
        "cupyep/intranode.cu", "cupyep::dispatch",
        (("kNumRanks", 4), ("kHiddenInt4", 896), ("kNumScales", 0), ("kNumTopk", 8), ("IdxT", "long long")))
    assert kernel_specs.low_latency_dispatch(7168, True, False, True, "int", False).instantiation == \
        "cupyep::ll::dispatch<7168, true, true, true, int>"
    assert kernel_specs.internode_dispatch(4, 2, 7168, 56, 8, "long long").nvshmem
    names = {s.instantiation for s in kernel_specs.model_specs(7168, 8, 256, 4, ranks_per_node=2, logfmt=True)}
    assert "cupyep::notify_dispatch<4, 2>" in names and "cupyep::ll::combine<7168, true, long long>" in names
    assert "cupyep::dispatch<4, 2, 448, 56, 8, long long>" in names  # inter-node FP8


def test_prefetch_compiles_in_the_background_and_the_call_finds_it(cache):
    _rank0_only()
    spec = kernel_specs.intranode_notify(2)
    before = jit.compiles
    jit.prefetch([spec, spec], "sm_90")  # a spec is compiled once however often it is asked for
    jit._prefetching[(spec, "sm_90")].join(timeout=120)
    assert jit.compiles == before + 1
    path, _ = jit.compile_cubin(spec, "sm_90")  # the call's own lookup: no compile
    assert jit.compiles == before + 1 and os.path.getsize(path) > 0


def test_only_the_wrappers_parse_nvshmem_headers():
    """Parsing NVSHMEM's headers is most of a cold compile: kernels declare
    the wrappers of nvshmem_device.cuh instead (see jit.nvshmem_device_ltoir)."""
    root = os.path.join(jit.kernel_dir(), "cupyep")
    including = [f for f in os.listdir(root) if f.endswith((".cu", ".cuh"))
                 and "#include <nvshmem" in open(os.path.join(root, f)).read()]
    assert including == []
    for f in os.listdir(root):
        if f.endswith((".cu", ".cuh")) and f != "nvshmem_device.cu":
            code = re.sub(r"//[^\n]*", "", open(os.path.join(root, f)).read())  # comments may name them
            calls = set(re.findall(r"\b(nvshmemx?_\w+)\s*\(", code))
            assert not calls, f"{f} calls NVSHMEM directly: {sorted(calls)}"
