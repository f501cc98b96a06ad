"""Normal dispatch and combine across nodes on the GPU.

Kernels: raw_kernels/cupyep/internode.cu (always linked with NVSHMEM). A token
crosses to each node that needs it once, by an NVSHMEM put to the rank with
the same local index there, which forwards it over NVLink; combine reduces
inside the node first and sends one row back per node. The RDMA buffer is the
Buffer's ``num_rdma_bytes`` allocation (shared with low-latency calls: clean
it with ``clean_low_latency_buffer`` when switching); the NVLink buffer is the
one intranode kernels use.
"""
from __future__ import annotations

import math

import numpy as np

from cupyep.arrays.interop import dtype_of
from cupyep.backends.gpu.backend import NOTIFY_THREADS
from cupyep.errors import BufferTooSmallError, InvalidInputError
from cupyep.jit import address as _ptr, index_type, launch
from cupyep.jit import specs as kernel_specs
from cupyep.jit.args import kernel_args
from cupyep.layouts import sizing



class GpuInternode:
    """Inter-node state of one GpuBackend: RDMA layouts."""

    def __init__(self, backend):
        be = backend
        self.be = be
        self.num_nodes = be.group.num_nodes
        self.ranks_per_node = be.group.num_ranks_per_node
        if self.ranks_per_node > 32:
            raise InvalidInputError("inter-node kernels support at most 32 ranks per node")
        self._layouts = {}

    def _spec(self, name, *targs):
        return kernel_specs.internode_spec(name, self.be.num_ranks, *targs)

    def _sym(self):
        ll = self.be.ll
        if ll.sym is None:
            raise BufferTooSmallError(
                "inter-node dispatch needs num_rdma_bytes (cupyep.rdma_size_hint(hidden, tokens, "
                f"ranks={self.be.num_ranks}, ranks_per_node={self.ranks_per_node}))")
        return ll.sym

    def layout(self, hidden: int, num_topk: int, num_channels: int, num_tokens: int):
        """(RdmaLayout, its device array) for a call, or BufferTooSmallError."""
        r, n = self.be.num_ranks, self.num_nodes
        key = (hidden, num_topk, num_channels)
        hit = self._layouts.get(key)
        if hit is None:
            import cupy
            nbytes = self.be.ll.num_rdma_bytes
            t_max = sizing.rdma_max_tokens(nbytes, r, n, hidden, num_topk)
            lay = sizing.rdma_layout(r, n, hidden, max(num_topk, 1), t_max)
            spc = t_max // num_channels
            arr = np.array(sizing.rdma_layout_words(lay, spc), np.int64)
            with self.be.caller_stream:  # as GpuBackend._layout
                hit = (lay, cupy.asarray(arr), spc)
            self._layouts[key] = hit
        lay, dev, spc = hit
        self._sym()
        if math.ceil(num_tokens / num_channels) > spc:
            need = sizing.rdma_size_hint(hidden, num_tokens, r, self.ranks_per_node, num_topk)
            raise BufferTooSmallError(
                f"num_rdma_bytes={self.be.ll.num_rdma_bytes} holds {spc * num_channels} tokens per rank "
                f"at hidden={hidden}, top-{num_topk}; {num_tokens} need num_rdma_bytes >= {need} "
                "(cupyep.rdma_size_hint)")
        return lay, dev

    def claim(self):
        """The RDMA memory serves normal calls until the next clean."""
        self.be.ll.claim("normal inter-node")

    def notify(self, is_token_in_rank, num_tokens, num_channels, per_expert, num_local_experts,
               expert_alignment, nvl_dev, rdma_dev, offsets, expert_counts, call_tag):
        """Launch notify_dispatch; returns (send_pos [T, R], rdma_pos [T, N], rdma_recv_count [N*C])."""
        be = self.be
        send_pos = be.call_array("send_pos", (num_tokens, be.num_ranks), np.int32)
        rdma_pos = be.call_array("rdma_pos", (num_tokens, self.num_nodes), np.int32)
        rdma_recv_count = be.call_array("rdma_recv_count", self.num_nodes * num_channels, np.int32)
        spec = self._spec("notify_dispatch", ("kRanksPerNode", self.ranks_per_node))
        launch(spec, (num_channels + 1,), (NOTIFY_THREADS,), kernel_args(
            "internode.notify_dispatch", is_token_in_rank=is_token_in_rank, num_tokens=num_tokens,
            num_channels=num_channels, num_tokens_per_expert=_ptr(per_expert), num_local_experts=num_local_experts,
            expert_alignment=expert_alignment, send_pos=send_pos, rdma_pos=rdma_pos, nvl_layout=nvl_dev,
            rdma=self._sym().ptr, rdma_layout=rdma_dev, rank=be.rank, counters=be.counters,
            blocks_done=be.blocks_done, recv_channel_offset=offsets, rdma_recv_count=rdma_recv_count,
            recv_expert_counts=expert_counts, host_info=be.info_ptr, layout_error=be.layout_error,
            err=be.err_ptr, timeout_ns=be.timeout_ns, call_tag=call_tag), stream=be.stream)
        return send_pos, rdma_pos, rdma_recv_count

    def dispatch(self, cfg, routing, x, scales, topk_idx, topk_weights, is_token_in_rank, num_tokens,
                 local, n_rows, recv_x, recv_s, recv_idx, recv_w, recv_src, record_slots: bool):
        """Launch the dispatch kernel (2 * C blocks) on the communication stream."""
        be = self.be
        k = 0 if topk_idx is None else topk_idx.shape[1]
        spec = self._spec("dispatch", ("kRanksPerNode", self.ranks_per_node),
                          ("kHiddenInt4", x.shape[1] * dtype_of(x).itemsize // 16),
                          ("kNumScales", 0 if scales is None else scales.shape[1]),
                          ("kNumTopk", k), ("IdxT", index_type(topk_idx)))
        launch(spec, (2 * routing.num_channels,), (32 * cfg.num_warps,), kernel_args(
            "internode.dispatch", x=x, x_scales=_ptr(scales), topk_idx=_ptr(topk_idx),
            topk_weights=_ptr(topk_weights), is_token_in_rank=is_token_in_rank, rdma_pos=routing.rdma_pos,
            num_tokens=num_tokens, num_channels=routing.num_channels, peers=be.nvl.peers,
            nvl_layout=routing.layout_dev, rdma=self._sym().ptr, rdma_layout=routing.rdma_layout_dev,
            recv_channel_offset=routing.recv_channel_offset, rdma_recv_count=routing.rdma_recv_count,
            fwd_slots=routing.fwd_slots if record_slots else 0, rank=be.rank, num_local_experts=local,
            num_recv_capacity=n_rows, chunk_tokens=cfg.chunk_tokens, recv_x=recv_x, recv_x_scales=_ptr(recv_s),
            recv_topk_idx=_ptr(recv_idx), recv_topk_weights=_ptr(recv_w), recv_src_idx=_ptr(recv_src),
            err=be.err_ptr, timeout_ns=be.timeout_ns), stream=be.stream)

    def barrier(self, rdma_dev, call_tag):
        be = self.be
        threads = max(32, (be.num_ranks + 31) // 32 * 32)
        launch(self._spec("rdma_barrier"), (1,), (threads,), kernel_args(
            "internode.rdma_barrier", rdma=self._sym().ptr, layout=rdma_dev, rank=be.rank, counters=be.counters,
            err=be.err_ptr, timeout_ns=be.timeout_ns, call_tag=call_tag), stream=be.stream)

    def combine(self, cfg, routing, x, topk_weights, num_tokens, b0, b1, out, out_w):
        be = self.be
        k = 0 if topk_weights is None else topk_weights.shape[1]
        spec = self._spec("combine", ("kRanksPerNode", self.ranks_per_node),
                          ("kHiddenInt4", x.shape[1] * 2 // 16), ("kNumTopk", k))
        launch(spec, (2 * routing.num_channels,), (32 * cfg.num_combine_warps,), kernel_args(
            "internode.combine", x=x, topk_weights=_ptr(topk_weights), rdma_pos=routing.rdma_pos,
            recv_channel_offset=routing.recv_channel_offset, rdma_recv_count=routing.rdma_recv_count,
            fwd_slots=routing.fwd_slots, num_tokens=num_tokens, num_channels=routing.num_channels,
            chunk_tokens=cfg.chunk_tokens, peers=be.nvl.peers, nvl_layout=routing.layout_dev,
            rdma=self._sym().ptr, rdma_layout=routing.rdma_layout_dev, rank=be.rank, bias0=_ptr(b0),
            bias1=_ptr(b1), out=out, out_weights=_ptr(out_w), err=be.err_ptr, timeout_ns=be.timeout_ns),
            stream=be.stream)
