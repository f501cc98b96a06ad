"""Low-latency dispatch and combine against loop-computed expectations."""
import numpy as np
import pytest

from cupyep import fp8

from conftest import RANK, SIZE
from helpers import assert_close_bf16, bits, gather, random_rows, random_topk, to_backend, to_host


def expert_scale(e):
    return np.float32((e % 7 + 1) * 0.25)


CASES = [  # (M, tokens, hidden, experts_per_rank, topk, use_fp8, round_scale, ue8m0, drop)
    (128, 100, 2048, 4, 4, False, False, False, 0.1),
    (128, 128, 7168, 8, 8, True, False, False, 0.0),
    (1, 1, 5120, 2, 1, True, True, False, 0.0),
    (256, 200, 2048, 9, 9, True, True, True, 0.2),
    (32, 0, 2048, 4, 8, False, False, False, 0.0),
]


@pytest.mark.parametrize("m,t,h,epr,k,use_fp8,round_scale,ue8m0,drop", CASES)
def test_low_latency(buffer, backend, rng, m, t, h, epr, k, use_fp8, round_scale, ue8m0, drop):
    if not getattr(buffer._impl, "supports_low_latency", True):
        pytest.skip("low-latency kernels are not implemented on the GPU backend yet")
    num_experts = epr * SIZE
    k = min(k, num_experts)
    x = random_rows(rng, t, h)
    idx = random_topk(rng, t, num_experts, k, drop=drop)
    w = rng.random(idx.shape).astype(np.float32)
    everyone = gather(x, idx)
    res = buffer.low_latency_dispatch(to_backend(x, backend), to_backend(idx, backend), m,
                                      num_experts, use_fp8=use_fp8, round_scale=round_scale,
                                      use_ue8m0=ue8m0)
    local = epr
    got_count = to_host(res.recv_count)
    got_x = to_host(res.recv_x, fp8.float8_e4m3 if use_fp8 else None)
    assert got_x.shape == (local, SIZE * m, h)
    got_src = to_host(res.handle.src_info)
    got_range = to_host(res.handle.layout_range)
    got_s = to_host(res.recv_x_scales)
    if ue8m0:
        got_s = fp8.unpack_ue8m0(got_s.reshape(-1, h // 512)).reshape(local, SIZE * m, h // 128)
    y = np.zeros((local, SIZE * m, h), fp8.bfloat16)
    for e in range(local):
        row = 0
        for s, (xs, idx_s) in enumerate(everyone):
            toks = np.flatnonzero((idx_s == RANK * local + e).any(axis=1))
            assert got_range[e, s] == (row << 32) | len(toks), f"layout_range[{e},{s}]"
            assert (got_src[e, row:row + len(toks)] == toks).all()
            if use_fp8:
                q, sc = fp8.per_token_cast_to_fp8(xs[toks], round_scale=round_scale or ue8m0)
                assert (bits(got_x[e, row:row + len(toks)]) == bits(q)).all()
                assert (got_s[e, row:row + len(toks)] == sc).all()
            else:
                assert (bits(got_x[e, row:row + len(toks)]) == bits(xs[toks])).all()
            # expert output: the original bf16 row times a per-expert constant
            y[e, row:row + len(toks)] = (xs[toks].astype(np.float32)
                                         * expert_scale(RANK * local + e)).astype(fp8.bfloat16)
            row += len(toks)
        assert got_count[e] == row

    out = buffer.low_latency_combine(to_backend(y, backend), to_backend(idx, backend),
                                     to_backend(w, backend), res.handle)
    want = np.zeros((t, h), np.float32)
    for kk in range(k):
        for tt in range(t):
            e = idx[tt, kk]
            if e >= 0:
                ye = (x[tt].astype(np.float32) * expert_scale(e)).astype(fp8.bfloat16)
                want[tt] += w[tt, kk] * ye.astype(np.float32)
    assert_close_bf16(to_host(out.combined_x), want, "low-latency combined_x")
