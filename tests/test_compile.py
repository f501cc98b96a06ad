"""Every kernel the library launches compiles for sm_90 (NVRTC, no GPU needed)."""
import os

import pytest

from conftest import RANK

cuda_core = pytest.importorskip("cuda.core", reason="cuda-core is not installed")

from cupyep import jit  # noqa: E402
from cupyep.jit.specs import nvshmem_specs, representative_specs  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """Compile from scratch, in a cache of this test's own (one rank compiles)."""
    old = os.environ.get("CUPYEP_CACHE_DIR")
    os.environ["CUPYEP_CACHE_DIR"] = str(tmp_path_factory.mktemp(f"jit{RANK}"))
    yield
    if old is None:
        os.environ.pop("CUPYEP_CACHE_DIR")
    else:
        os.environ["CUPYEP_CACHE_DIR"] = old


def _skip_other_ranks():
    if RANK != 0:
        pytest.skip("compile checks run on rank 0 only")


@pytest.mark.parametrize("spec", representative_specs(), ids=lambda s: s.readable_key)
def test_kernel_compiles_for_sm90(spec):
    _skip_other_ranks()
    path, mangled = jit.compile_cubin(spec, "sm_90")
    assert os.path.getsize(path) > 0 and mangled.startswith("_Z")


def test_cache_hit_and_key_sees_headers(monkeypatch):
    _skip_other_ranks()
    spec = representative_specs()[0]
    first = jit.compile_cubin(spec, "sm_90")
    assert jit.compile_cubin(spec, "sm_90") == first  # cached, same file
    key = jit.cache_key(spec, "sm_90")
    jit.sources_digest.cache_clear()
    monkeypatch.setattr(jit, "sources_digest", lambda: "a header changed")
    assert jit.cache_key(spec, "sm_90") != key
    changed = jit.cache_key(spec, "sm_90")
    options = jit._option_values
    monkeypatch.setattr(jit, "_option_values", lambda s, a: dict(options(s, a), use_fast_math=True))
    assert jit.cache_key(spec, "sm_90") != changed  # the options are in the key too


@pytest.mark.parametrize("spec", nvshmem_specs(), ids=lambda s: s.readable_key)
def test_nvshmem_kernel_links(spec):
    _skip_other_ranks()
    pytest.importorskip("nvshmem.core", reason="nvshmem4py is not installed")
    path, mangled = jit.compile_cubin(spec, "sm_90")
    assert os.path.getsize(path) > 0


def test_nvshmem_version_mismatch_names_both(tmp_path):
    _skip_other_ranks()
    import cupyep
    (tmp_path / "non_abi").mkdir()
    (tmp_path / "non_abi" / "nvshmem_version.h").write_text(
        "#define NVSHMEM_VENDOR_MAJOR_VERSION 3\n#define NVSHMEM_VENDOR_MINOR_VERSION 4\n"
        "#define NVSHMEM_VENDOR_PATCH_VERSION 5\n")
    assert jit.nvshmem_header_version(str(tmp_path)) == "3.4.5"
    jit.check_nvshmem_versions("3.4.5", "3.4.5")
    with pytest.raises(cupyep.BackendUnavailableError, match=r"3\.4\.5.*3\.3\.9"):
        jit.check_nvshmem_versions("3.4.5", "3.3.9", str(tmp_path))


def test_installed_nvshmem_headers_match_library():
    _skip_other_ranks()
    pytest.importorskip("nvshmem.core", reason="nvshmem4py is not installed")
    jit._checked_nvshmem()
