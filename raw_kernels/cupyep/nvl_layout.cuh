// Byte offsets of the symmetric NVLink buffer (see cupyep/sizing.py, which
// builds this struct as an int64 array in the same field order).
#pragma once

namespace cupyep {

constexpr int kMaxChannels = 64;
constexpr int kMaxLocalExperts = 512;

struct NvlLayout {
    long long sync;            // u32 [R]: barrier sequence written by each peer
    long long channel_counts;  // i32 [2][R][kMaxChannels]: tokens from (source, channel)
    long long expert_counts;   // i32 [2][R][kMaxLocalExperts]: tokens per local expert
    long long dispatch_tail;   // i32 [R][kMaxChannels]: rows published by (source, channel)
    long long combine_tail;    // i32 [R][kMaxChannels]
    long long rows;            // [R][max_tokens][row bytes]
    long long scales;          // f32 [R][max_tokens][H/128]
    long long src_idx;         // i32 [R][max_tokens]
    long long topk_idx;        // i32 [R][max_tokens][K]
    long long topk_weights;    // f32 [R][max_tokens][K]
    long long max_tokens;      // slots per source region
    long long slots_per_channel;
};

template <typename T>
__device__ __forceinline__ T* at(char* base, long long offset) {
    return reinterpret_cast<T*>(base + offset);
}

}  // namespace cupyep
