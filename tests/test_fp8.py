"""FP8 helpers: round-trip error within e4m3's bound, power-of-two scales, UE8M0."""
import numpy as np

from cupyep.formats import fp8

from helpers import random_rows


def test_round_trip_error_bound(rng):
    x = random_rows(rng, 64, 1024)
    x[3, :128] = 0  # an all-zero group takes the amax floor
    q, s = fp8.per_token_cast_to_fp8(x)
    back = fp8.dequantize(q, s)
    xf = x.astype(np.float32)
    # e4m3: 3 mantissa bits, so half an ulp is 2^-4 relative; subnormal step 2^-9.
    bound = np.maximum(np.abs(xf) * 2.0 ** -4, np.repeat(s, 128, axis=1) * 2.0 ** -10)
    assert (np.abs(back - xf) <= bound * 1.0001).all()
    assert s[3, 0] == np.float32(1e-4) / np.float32(448)


def test_pow2_scales_and_ue8m0(rng):
    x = random_rows(rng, 16, 512)
    q, s = fp8.per_token_cast_to_fp8(x, round_scale=True)
    mant, _ = np.frexp(s)
    assert (mant == 0.5).all(), "scales must be powers of two"
    amax = np.abs(x.astype(np.float32)).reshape(16, 4, 128).max(-1)
    assert (s >= amax / 448).all() and (s < 2 * amax / 448).all()
    packed = fp8.pack_ue8m0(s)
    assert packed.shape == (16, 1) and packed.dtype == np.int32
    assert (fp8.unpack_ue8m0(packed) == s).all()
