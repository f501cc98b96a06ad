"""cupyep.frozen: the launch caches' keys (kernel specs, Config, the low-latency layout) hashed once."""
import dataclasses
import os
import pickle
import subprocess
import sys

import pytest

from cupyep.config import Config
from cupyep.jit import KernelSpec
from cupyep.jit import specs


def test_equal_fields_equal_hash_and_frozen():
    a = specs.intranode_dispatch(4, 14336, 56, 8, "long long")
    b = KernelSpec(a.source, a.name, a.template_args, a.nvshmem)
    assert a is not b and a == b and not a != b and hash(a) == hash(b) and {a: 1}[b] == 1
    assert a != specs.intranode_dispatch(4, 14336, 56, 4, "long long") and a != a.name
    assert Config(num_sms=20) == Config(num_sms=20) and Config(num_sms=20) != Config(num_sms=22)
    assert dataclasses.replace(Config(), num_warps=8) == Config(num_warps=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().num_sms = 4


def test_a_pickled_spec_hashes_as_the_receiving_process_does():
    """String hashes differ between processes: a pickle carries the fields
    and the receiver hashes them again (cupyep.warmup sends specs to workers)."""
    spec = specs.intranode_dispatch(2, 14336, 0, 8, "long long")
    code = ("import pickle, sys; from cupyep.jit import specs; "
            "got = pickle.loads(sys.stdin.buffer.read()); "
            "mine = specs.intranode_dispatch(2, 14336, 0, 8, 'long long'); "
            "print({mine: 'found'}.get(got), hash(got) == hash(mine))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(spec), capture_output=True, env=env,
                         check=True).stdout.decode().split()
    assert out == ["found", "True"]
