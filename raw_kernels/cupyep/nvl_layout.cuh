// Byte offsets of the symmetric NVLink buffer (see cupyep/layouts/sizing.py, which
// builds this struct as an int64 array in the same field order).
#pragma once

namespace cupyep {

constexpr int kMaxChannels = 64;
constexpr int kMaxLocalExperts = 512;
// Combine work-item flags per source rank (sizing.COMBINE_FLAGS).
constexpr int kCombineFlags = 65536;

struct NvlLayout {
    long long sync;            // u32 [R]: barrier sequence written by each peer
    long long channel_counts;  // i32 [2][R][kMaxChannels]: tokens from (source, channel)
    long long expert_counts;   // i32 [2][R][kMaxLocalExperts]: tokens per local expert
    long long dispatch_tail;   // i32 [R][kMaxChannels]: rows published by (source, channel)
    long long combine_tail;    // i32 [R][kMaxChannels] (inter-node combine)
    long long combine_flags;   // i32 [R][kCombineFlags]: call sequence of each work item
    long long call_tags;       // i64 [2][R]: call tag of each peer's barrier arrival, by its parity
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

// The metadata of one row in a warp's registers, loaded with independent
// loads before the row is copied so that their latencies overlap the copy's:
// FP8 scales (lane i holds scales i, i + 32, ...), the source token index
// (lane 0) and top-k id and weight (lane k < kNumTopk).
template <int kNumScales, int kNumTopk>
struct RowMeta {
    static constexpr int kScaleSteps = (kNumScales + 31) / 32;
    float scale[kScaleSteps > 0 ? kScaleSteps : 1];
    int src;
    int topk;
    float weight;

    // Token t of the caller's inputs (x_scales / topk_idx / topk_weights may
    // be null where the call has none).
    template <typename IdxT>
    static __device__ __forceinline__ RowMeta load_input(const float* x_scales, const IdxT* topk_idx,
                                                         const float* topk_weights, int t, int lane) {
        RowMeta m;
#pragma unroll
        for (int j = 0; j < kScaleSteps; ++j) {
            const int i = lane + 32 * j;
            m.scale[j] = i < kNumScales ? x_scales[(long long)t * kNumScales + i] : 0.f;
        }
        m.src = t;
        m.topk = -1;
        m.weight = 0.f;
        if (lane < kNumTopk) {
            m.topk = static_cast<int>(topk_idx[(long long)t * kNumTopk + lane]);
            if (topk_weights != nullptr) m.weight = topk_weights[(long long)t * kNumTopk + lane];
        }
        return m;
    }

    // Row `row` of a buffer (coherent loads: a peer wrote it).
    static __device__ __forceinline__ RowMeta load_slot(char* base, const NvlLayout& lay, long long row,
                                                        int lane) {
        RowMeta m;
#pragma unroll
        for (int j = 0; j < kScaleSteps; ++j) {
            const int i = lane + 32 * j;
            m.scale[j] = i < kNumScales ? at<float>(base, lay.scales)[row * kNumScales + i] : 0.f;
        }
        m.src = lane == 0 ? at<int>(base, lay.src_idx)[row] : 0;
        m.topk = -1;
        m.weight = 0.f;
        if (lane < kNumTopk) {
            m.topk = at<int>(base, lay.topk_idx)[row * kNumTopk + lane];
            m.weight = at<float>(base, lay.topk_weights)[row * kNumTopk + lane];
        }
        return m;
    }

    // Into row `out` of dispatch's outputs: top-k ids become ids local to
    // this rank (experts [lo, lo + num_local_experts)), -1 elsewhere with
    // weight 0.
    __device__ __forceinline__ void store_output(long long out, int lo, int num_local_experts,
                                                 float* recv_x_scales, long long* recv_topk_idx,
                                                 float* recv_topk_weights, int* recv_src_idx,
                                                 int lane) const {
#pragma unroll
        for (int j = 0; j < kScaleSteps; ++j) {
            const int i = lane + 32 * j;
            if (i < kNumScales) recv_x_scales[out * kNumScales + i] = scale[j];
        }
        if (lane == 0 && recv_src_idx != nullptr) recv_src_idx[out] = src;  // null: a cached dispatch
        if (lane < kNumTopk) {
            const bool mine = topk >= lo && topk < lo + num_local_experts;
            recv_topk_idx[out * kNumTopk + lane] = mine ? topk - lo : -1;
            recv_topk_weights[out * kNumTopk + lane] = mine ? weight : 0.f;
        }
    }

    // Into row `row` of a buffer (a peer's, through its NVLink mapping).
    __device__ __forceinline__ void store(char* base, const NvlLayout& lay, long long row, int lane) const {
#pragma unroll
        for (int j = 0; j < kScaleSteps; ++j) {
            const int i = lane + 32 * j;
            if (i < kNumScales) at<float>(base, lay.scales)[row * kNumScales + i] = scale[j];
        }
        if (lane == 0) at<int>(base, lay.src_idx)[row] = src;
        if (lane < kNumTopk) {
            at<int>(base, lay.topk_idx)[row * kNumTopk + lane] = topk;
            at<float>(base, lay.topk_weights)[row * kNumTopk + lane] = weight;
        }
    }
};

}  // namespace cupyep
