// FP8 (e4m3) cast with one fp32 scale per 128 channels, bit-identical to
// cupyep/formats/fp8.py: scale = max(amax, 1e-4) / 448, optionally rounded up to a
// power of two; q = saturate(x * (1 / scale)) rounded to nearest even, the
// reciprocal and the product each rounded to nearest in fp32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>

namespace cupyep {

constexpr int kFp8Group = 128;
constexpr float kFp8Max = 448.0f;
constexpr float kAmaxFloor = 1e-4f;

// Smallest power of two >= s (s > 0, normal): exact, like frexp/ldexp.
__device__ __forceinline__ float round_scale_pow2(float s) {
    const unsigned bits = __float_as_uint(s);
    const unsigned exp = bits & 0x7f800000u;
    return __uint_as_float((bits & 0x007fffffu) ? exp + 0x00800000u : exp);
}

__device__ __forceinline__ float fp8_scale(float amax, bool round_scale) {
    const float s = __fdiv_rn(fmaxf(amax, kAmaxFloor), kFp8Max);
    return round_scale ? round_scale_pow2(s) : s;
}

// Four floats times inv_scale to four e4m3 bytes (little-endian in a word).
__device__ __forceinline__ unsigned fp8x4(float a, float b, float c, float d, float inv_scale) {
    auto q = [inv_scale](float v) -> unsigned {
        v = fminf(fmaxf(__fmul_rn(v, inv_scale), -kFp8Max), kFp8Max);
        return static_cast<unsigned>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
    };
    return q(a) | (q(b) << 8) | (q(c) << 16) | (q(d) << 24);
}

// UE8M0 byte of a power-of-two fp32 scale: its biased exponent.
__device__ __forceinline__ unsigned ue8m0_byte(float s) { return (__float_as_uint(s) >> 23) & 0xffu; }

}  // namespace cupyep
