"""cupyep.formats.logfmt: the LogFMT-10 definition the reference backend and the GPU kernels follow."""
import numpy as np

from cupyep.formats import fp8
from cupyep.formats import logfmt


def test_row_bytes_and_zeros():
    assert logfmt.encoded_bytes(7168) == 112 * 88 and logfmt.GROUP_BYTES == 88
    assert not logfmt.quantize(np.zeros((3, 256), np.float32)).any()


def test_error_within_half_a_step_and_signs_kept(rng=np.random.default_rng(7)):
    x = (rng.standard_normal((16, 512)) * np.exp2(rng.integers(-20, 20, (16, 1)))).astype(np.float32)
    x[0, :64] = 0  # an all-zero group
    x[1, 64:128] = 0
    x[1, 70] = -3.5  # a group with one non-zero value
    q = logfmt.quantize(x)
    assert (np.sign(q) == np.sign(x)).all()
    g = np.abs(x).reshape(16, -1, 64)
    amax = g.max(-1, keepdims=True)
    amin = np.where(g > 0, g, np.inf).min(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        step = (np.log2(amax) - np.maximum(np.log2(amin), np.log2(amax) - 32)) / 510
    bound = np.where(amax > 0, np.exp2(step / 2) - 1, 0) + 1e-6  # fp32 rounding of log2/exp2
    rel = np.abs(q - x).reshape(16, -1, 64) / np.where(g > 0, g, 1)
    assert (rel <= bound).all()
    assert q[1, 70] == np.float32(-3.5)  # amax == amin: decoded exactly


def test_bf16_input_and_relative_error_on_normal_rows(rng=np.random.default_rng(11)):
    y = rng.standard_normal((64, 7168)).astype(fp8.bfloat16)
    q = logfmt.quantize(y)
    yf = y.astype(np.float32)
    assert q.dtype == np.float32 and q.shape == y.shape
    assert np.abs(q - yf).max() / np.abs(yf).max() < 1e-2


def test_magnitudes_under_a_clipped_range_flush_to_zero():
    x = np.zeros((1, 64), np.float32)
    x[0, 0] = 1.0
    x[0, 1] = -2.0 ** -40  # below log_amax - 32 by 8 octaves: code 0
    x[0, 2] = 2.0 ** -31.99  # inside the range: kept, within half a step
    x[0, 3] = -2.0 ** -32  # log_amin itself: code 1
    q = logfmt.quantize(x)
    assert q[0, 0] == 1.0 and q[0, 1] == 0.0
    step = 32 / 510
    assert abs(q[0, 2] / x[0, 2] - 1) <= 2 ** (step / 2) - 1 + 1e-6
    assert q[0, 3] == np.float32(-2.0 ** -32)
