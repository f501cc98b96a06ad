"""Call tags (cupyep.backends.gpu.call_tags) on the CPU: what the kernels compare must tell
calls apart, and what the host prints must say which calls they were."""
import numpy as np
import pytest

from cupyep.backends.gpu import call_tags as ct


def test_low_latency_tags_fit_beside_the_count_and_read_back():
    rng = np.random.default_rng(7)
    for _ in range(500):
        seq, combine, flag = int(rng.integers(0, 1000)), bool(rng.integers(2)), bool(rng.integers(2))
        hidden, k = 128 * int(rng.integers(1, 257)), int(rng.integers(1, 17))
        experts, m = int(rng.integers(1, 4097)), int(rng.integers(1, 65537))
        tag = ct.ll_call_tag(seq, combine, flag, hidden, k, experts, m)
        assert 0 <= tag < 1 << (63 - ct.LL_TAG_SHIFT)  # (tag << 17) | count stays a positive i64
        assert ct.with_call(ct.ll_call_tag(0, combine, flag, hidden, 1, experts, m), seq, k) == tag
        text = ct.describe(tag)
        assert text.startswith("low_latency_combine" if combine else "low_latency_dispatch")
        for part in (f"call #{seq % 16} ", f"hidden={hidden}", f"top-k={k}", f"experts={experts}", f"M={m}"):
            assert part in text, (part, text)


@pytest.mark.parametrize("field", ["seq", "combine", "flag", "hidden", "topk", "experts", "max_tokens"])
def test_low_latency_tags_differ_in_every_field(field):
    base = dict(seq=3, combine=False, fp8_or_logfmt=True, hidden=7168, topk=8, experts=288, max_tokens=128)
    other = dict(base)
    key = {"flag": "fp8_or_logfmt"}.get(field, field)
    other[key] = {"combine": True, "fp8_or_logfmt": False, "hidden": 4096}.get(key, base[key] + 1)
    assert ct.ll_call_tag(**base) != ct.ll_call_tag(**other)


def test_normal_tags_are_marked_and_name_their_call():
    d = ct.normal_call_tag(5, "dispatch", True, True, 7168, 8, 256)
    c = ct.normal_call_tag(5, "combine", False, True, 7168, 8)
    cached = ct.normal_call_tag(21, "cached_dispatch", False, False, 4096)
    assert all(t & ct.NORMAL_MARK for t in (d, c, cached)) and len({d, c, cached}) == 3
    assert ct.describe(d) == "dispatch call #5 (mod 16) (hidden=7168, top-k=8, experts=256, fp8=1, weights=1)"
    assert ct.describe(c) == "combine call #5 (mod 16) (hidden=7168, weights=1)"
    assert ct.describe(cached) == "cached_dispatch call #5 (mod 16) (hidden=4096, fp8=0)"
    assert ct.normal_call_tag(5, "dispatch", True, True, 7168, 8, 256) != ct.normal_call_tag(
        6, "dispatch", True, True, 7168, 8, 256)
