"""benchmarks/breakdown_normal.py: every kernel variant is built from the
current kernels (its text edits still find their anchors) and each removes
something. The timing itself needs GPUs."""
import importlib.util
import os

import pytest

_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "breakdown_normal.py")


@pytest.fixture(scope="module")
def breakdown():
    spec = importlib.util.spec_from_file_location("breakdown_normal", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_variant_applies_to_the_current_kernels(breakdown):
    texts = breakdown.variant_sources()
    assert set(texts) == {"full"} | set(breakdown.VARIANTS)
    full = texts["full"]
    assert '#include "cupyep/' not in full  # headers inlined
    assert "receive_channel" in full and "__global__ void __launch_bounds__(1024, 1)\ncombine(" in full
    for name in breakdown.VARIANTS:
        assert texts[name] != full, name


def test_a_stale_anchor_is_reported(breakdown, monkeypatch):
    monkeypatch.setitem(breakdown.VARIANTS, "stale", [("text no kernel contains", "")])
    with pytest.raises(ValueError, match="stale"):
        breakdown.variant_sources()
