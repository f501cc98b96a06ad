// get_dispatch_layout: per-rank, per-node and per-expert token counts and the
// is_token_in_rank mask, from topk_idx. One launch, no host synchronisation.
#include "cupyep/common.cuh"

namespace cupyep {

// Grid: enough blocks to cover the tokens; shared memory: (E + R + nodes) ints.
// scratch: [E + R + nodes + 1] int32, zero between launches (the last word is
// the blocks' arrival ticket): blocks add their counts there, and the last
// block to arrive writes the count outputs and zeroes scratch again, so the
// outputs need no zeroing before the launch (and a CUDA graph replays it as
// it is). A bad expert id sets error[0] to 2, a token whose experts span more
// than max_nodes_per_token nodes (when > 0: group-limited routing) to 3; the
// next dispatch reports it.
template <typename IdxT, int kNumTopk>
__global__ void get_dispatch_layout(const IdxT* __restrict__ topk_idx, int num_tokens,
                                    int num_experts, int num_ranks, int num_ranks_per_node,
                                    int* num_tokens_per_rank, int* num_tokens_per_node,
                                    int* num_tokens_per_expert, bool* is_token_in_rank,
                                    int max_nodes_per_token, int* error, int* scratch) {
    extern __shared__ int smem_counts[];
    const int num_nodes = num_ranks / num_ranks_per_node;
    int* s_expert = smem_counts;
    int* s_rank = s_expert + num_experts;
    int* s_node = s_rank + num_ranks;
    for (int i = threadIdx.x; i < num_experts + num_ranks + num_nodes; i += blockDim.x)
        smem_counts[i] = 0;
    __syncthreads();

    const int experts_per_rank = num_experts / num_ranks;
    for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < num_tokens; t += gridDim.x * blockDim.x) {
        unsigned long long rank_mask = 0;  // at most 64 ranks in one buffer
#pragma unroll
        for (int k = 0; k < kNumTopk; ++k) {
            const long long e = static_cast<long long>(topk_idx[t * kNumTopk + k]);
            if (e < -1 || e >= num_experts) {
                atomicExch(error, 2);
                continue;
            }
            if (e < 0) continue;
            atomicAdd(s_expert + e, 1);
            rank_mask |= 1ull << (e / experts_per_rank);
        }
        unsigned long long node_mask = 0;
        for (int r = 0; r < num_ranks; ++r) {
            const bool in = (rank_mask >> r) & 1ull;
            is_token_in_rank[(long long)t * num_ranks + r] = in;
            if (in) {
                atomicAdd(s_rank + r, 1);
                node_mask |= 1ull << (r / num_ranks_per_node);
            }
        }
        if (num_tokens_per_node != nullptr)
            for (int n = 0; n < num_nodes; ++n)
                if ((node_mask >> n) & 1ull) atomicAdd(s_node + n, 1);
        if (max_nodes_per_token > 0 && __popcll(node_mask) > max_nodes_per_token) atomicExch(error, 3);
    }
    __syncthreads();
    // Shared counts into scratch (same order: experts, ranks, nodes).
    const int num_counts = num_experts + num_ranks + num_nodes;
    for (int i = threadIdx.x; i < num_counts; i += blockDim.x)
        if (smem_counts[i]) atomicAdd(scratch + i, smem_counts[i]);
    // The ticket's fence orders this block's adds before its arrival; the
    // last block's acquire (in last_block_to_arrive) orders them before its
    // reads, which go to L2 (__ldcg), where the adds were made.
    if (!last_block_to_arrive<Arrival::kGpuWrites>(scratch + num_counts)) return;
    for (int i = threadIdx.x; i < num_counts; i += blockDim.x) {
        const int v = __ldcg(scratch + i);
        scratch[i] = 0;
        if (i < num_experts)
            num_tokens_per_expert[i] = v;
        else if (i < num_experts + num_ranks)
            num_tokens_per_rank[i - num_experts] = v;
        else if (num_tokens_per_node != nullptr)
            num_tokens_per_node[i - num_experts - num_ranks] = v;
    }
}

}  // namespace cupyep
