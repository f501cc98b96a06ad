"""A process of test_jit_cache's cache-sharing test: compiles one kernel into
the cache it is given. Kept apart from the test module so that the spawned
process does not import the MPI test plumbing (conftest)."""
import os


def compile_into(cache_dir, queue):
    os.environ["CUPYEP_CACHE_DIR"] = cache_dir
    from cupyep import jit
    from cupyep.jit import specs as kernel_specs
    jit.compile_cubin(kernel_specs.intranode_barrier(2), "sm_90")
    queue.put(jit.compiles)
