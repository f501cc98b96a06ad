"""Multi-rank pytest plumbing.

Run as ``mpiexec -n N python -m mpi4py -m pytest tests``. Every test ends with
a collective verdict: if any rank failed, every rank fails (naming the ranks),
so no rank races ahead into a collective that a failed rank never joins.
Only rank 0 prints pytest's report.
"""
import os

import numpy as np
import pytest

from mpi4py import MPI

import cupyep

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()
BACKENDS = ["reference", "gpu"]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs the GPU backend")
    if config.option.basetemp is None:
        # Ranks must not clean each other's temp dirs, nor two test sessions
        # of one user each other's: named by the session (rank 0's pid) and rank.
        import tempfile
        session = COMM.bcast(os.getpid(), root=0)
        config.option.basetemp = os.path.join(tempfile.gettempdir(),
                                              f"cupyep-pytest-{os.getuid()}-{session}-rank{RANK}")
        config._cupyep_basetemp = config.option.basetemp
    if RANK > 0:
        reporter = config.pluginmanager.getplugin("terminalreporter")
        if reporter is not None:
            config.pluginmanager.unregister(reporter)


def pytest_unconfigure(config):
    """The session's own temp dir goes with it (unique names are not reused)."""
    path = getattr(config, "_cupyep_basetemp", None)
    if path:
        import shutil
        shutil.rmtree(path, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_pyfunc_call(pyfuncitem):
    outcome = yield
    err = outcome.excinfo
    skipped = err is not None and issubclass(err[0], pytest.skip.Exception)
    failed = err is not None and not skipped
    verdicts = COMM.allgather((failed, skipped))
    bad = [r for r, (f, _) in enumerate(verdicts) if f]
    if bad and not failed:
        outcome.force_exception(AssertionError(f"failed on rank(s) {bad}"))


@pytest.fixture(scope="session")
def group():
    g = cupyep.Group()
    yield g
    g.destroy()


_BUFFERS = {}


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "gpu" and not cupyep.gpu_available():
        pytest.skip("GPU backend unavailable (no CUDA device, cupy or nvshmem4py)")
    return request.param


@pytest.fixture
def buffer(group, backend):
    """One buffer per backend for the whole session (allocation is collective)."""
    if backend not in _BUFFERS:
        nvl = int(os.environ.get("CUPYEP_TEST_NVL_BYTES", 256 << 20))
        ll = int(os.environ.get("CUPYEP_TEST_RDMA_BYTES", 512 << 20))
        _BUFFERS[backend] = cupyep.Buffer(group, num_nvl_bytes=nvl, num_rdma_bytes=ll,
                                          low_latency_mode=True, backend=backend)
    return _BUFFERS[backend]


INTERNODE_RANKS_PER_NODE = max(1, SIZE // 2)  # 2 ranks as 2 x 1, 4 as 2 x 2, 8 as 2 x 4


@pytest.fixture(scope="session")
def internode_group():
    """The same ranks split into two emulated nodes (shares NVSHMEM with `group`)."""
    if SIZE < 2 or SIZE % 2:
        pytest.skip("the inter-node path needs an even number of ranks (two nodes)")
    g = cupyep.Group(num_ranks_per_node=INTERNODE_RANKS_PER_NODE)
    yield g
    g.destroy()


@pytest.fixture
def internode_buffer(internode_group, backend, group):
    """One inter-node buffer per backend for the session (`group` first: it
    owns NVSHMEM, so it must outlive this one)."""
    key = ("internode", backend)
    if key not in _BUFFERS:
        nvl = int(os.environ.get("CUPYEP_TEST_NVL_BYTES", 256 << 20))
        rdma = int(os.environ.get("CUPYEP_TEST_INTERNODE_RDMA_BYTES", 256 << 20))
        _BUFFERS[key] = cupyep.Buffer(internode_group, num_nvl_bytes=nvl, num_rdma_bytes=rdma,
                                      backend=backend)
    return _BUFFERS[key]


def pytest_sessionfinish(session, exitstatus):
    # A failed kernel can leave the device unusable; report it here without
    # hiding the test summary that pytest prints after this hook.
    for b in _BUFFERS.values():
        try:
            b.destroy()
        except Exception as e:  # noqa: BLE001
            print(f"rank {RANK}: buffer teardown failed: {e!r}")
    _BUFFERS.clear()
    # tests/run_mpi.py reads rank 0's counts here: the ranks' printed summaries
    # interleave. Verdicts are collective, so rank 0 sees every rank's failures.
    path = os.environ.get("CUPYEP_TEST_SUMMARY")
    if RANK == 0 and path:
        import json
        stats = session.config.pluginmanager.getplugin("terminalreporter").stats
        counts = {k: len([r for r in stats.get(k, []) if getattr(r, "when", "call") in ("call", "setup")])
                  for k in ("passed", "failed", "skipped", "error")}
        with open(path, "w") as f:
            json.dump(counts, f)


@pytest.fixture
def rng(request):
    """Fresh random inputs: a seed drawn per test, different on every rank."""
    seed = COMM.bcast(int(np.random.SeedSequence().entropy % 2 ** 31) if RANK == 0 else None)
    return np.random.default_rng([seed, RANK, hash(request.node.nodeid) % 2 ** 31])


@pytest.fixture(scope="session")
def torch_world():
    """torch.distributed over gloo on the same ranks (started once per session)."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from cupyep.comm.torch_comm import init_torch_distributed
    started = init_torch_distributed(COMM, "gloo", port_base=29700)
    yield dist.group.WORLD
    if started:
        dist.destroy_process_group()
