"""The reference backend behind :class:`cupyep.Buffer` (NumPy over MPI)."""
from __future__ import annotations

import itertools

import numpy as np

from cupyep import validation
from cupyep.backends.interface import (CachedDispatchOut, CombineOut, LowLatencyCombineOut,
                                       LowLatencyDispatchOut, NormalDispatchOut)
from cupyep.backends.reference import semantics as reference
from cupyep.backends.reference.call_check import CallAgreement
from cupyep.config import default_config
from cupyep.errors import InvalidInputError
from cupyep.formats.fp8 import bfloat16
from cupyep.layouts import sizing
from cupyep.layouts.low_latency import TRANSPORTS, check_low_latency_buffer


class ReferenceBackend:
    """Runs every Buffer call with :mod:`cupyep.backends.reference.semantics`; no GPU needed."""

    def __init__(self, group, max_nodes_per_token: int = 0, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0):
        self.group = group
        self.max_nodes_per_token = max_nodes_per_token
        # Sized as on the GPU: calls that would not fit there raise here too.
        self.num_nvl_bytes, self.num_rdma_bytes = int(num_nvl_bytes), int(num_rdma_bytes)
        # Ranks agree on each call before moving data (cupyep.backends.reference.call_check).
        self.calls = CallAgreement(group.comm)
        self._calls = itertools.count()
        self._next_combine = None
        self.mask = np.zeros(group.size, np.int32)  # 1 = rank left out of low-latency calls

    @property
    def comm(self):
        return self.group.comm

    def get_dispatch_layout(self, topk_idx, num_experts):
        validation.check_expert_range_host(topk_idx, num_experts)
        lay = reference.get_dispatch_layout(topk_idx, num_experts, self.group.size,
                                            self.group.num_ranks_per_node)
        if self.max_nodes_per_token:
            validation.check_node_limit(lay.is_token_in_rank, self.group.num_ranks_per_node,
                                        self.max_nodes_per_token)
        return lay

    def dispatch(self, x, scales, topk_idx, topk_weights, is_token_in_rank, per_expert,
                 num_experts, expert_alignment, num_worst_tokens, config, previous_event,
                 async_finish, layout_in_call=False):
        g = self.group
        cfg = config or default_config(g.size, g.num_nodes)
        sizing.check_normal_call_fits(self.num_nvl_bytes, self.num_rdma_bytes, g.size, g.num_ranks_per_node,
                                      x.shape[1], 0 if topk_idx is None else topk_idx.shape[1], cfg.num_channels,
                                      x.shape[0])
        if topk_idx is not None:
            validation.check_expert_range_host(topk_idx, num_experts)
        self.calls.check("dispatch", x.shape[1], 0 if topk_idx is None else topk_idx.shape[1], int(scales is not None),
                         num_experts or 0, int(topk_weights is not None))
        d = reference.dispatch(self.comm, x, scales, topk_idx, topk_weights, is_token_in_rank,
                               num_experts, expert_alignment, num_worst_tokens)
        return NormalDispatchOut(d["recv_x"], d.get("recv_x_scales"), d.get("recv_topk_idx"),
                                 d.get("recv_topk_weights"), d.get("num_recv_tokens_per_expert"),
                                 d["recv_src_idx"], d["num_recv_tokens"], d["routing"])

    def cached_dispatch(self, handle, x, scales, config, previous_event, async_finish):
        self.calls.check("cached_dispatch", x.shape[1], int(scales is not None))
        recv_x, recv_s = reference.cached_dispatch(self.comm, handle.state, x, scales,
                                                   handle.num_worst_tokens)
        return CachedDispatchOut(recv_x, recv_s)

    def combine(self, handle, x, topk_weights, bias, config, previous_event, async_finish):
        self.calls.check("combine", x.shape[1], int(topk_weights is not None))
        n = handle.num_recv_tokens
        w = None if topk_weights is None else topk_weights[:n]
        out, wout = reference.combine(self.comm, handle.state, handle.num_tokens, x[:n], w, bias)
        return CombineOut(out, wout)

    def low_latency_dispatch(self, x, topk_idx, m, num_experts, use_fp8, round_scale, use_ue8m0,
                             async_finish, return_recv_hook, cumulative_stats=None, wait_stats=None):
        check_low_latency_buffer(self.num_rdma_bytes, m, x.shape[1], self.group.size, num_experts)
        validation.check_expert_range_host(topk_idx, num_experts)
        self.calls.check("low_latency_dispatch", m, x.shape[1], num_experts, int(use_fp8), topk_idx.shape[1])
        out = reference.low_latency_dispatch(self.comm, x, topk_idx, m, num_experts, use_fp8,
                                             round_scale, use_ue8m0, mask=self.mask)
        if cumulative_stats is not None:
            cumulative_stats += out["recv_count"].astype(cumulative_stats.dtype)
        # wait_stats measure spin time inside GPU kernels; nothing spins here.
        # data has already arrived on this backend: the hook has nothing to do
        return LowLatencyDispatchOut(**out, call_id=next(self._calls),
                                     hook=(lambda: None) if return_recv_hook else None)

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, out, async_finish,
                            return_recv_hook, use_logfmt=False, wait_stats=None):
        self.calls.check("low_latency_combine", handle.num_max_dispatch_tokens_per_rank, handle.hidden,
                         handle.num_experts, int(use_logfmt), topk_idx.shape[1])
        res = reference.low_latency_combine(self.comm, x, topk_idx, topk_weights, handle.state,
                                            mask=self.mask, use_logfmt=use_logfmt)
        if out is not None:
            out[...] = res
            res = out
        return LowLatencyCombineOut(res, hook=(lambda: None) if return_recv_hook else None)

    def next_low_latency_combine_buffer(self, handle):
        """The same array for every request with one handle, so expert outputs
        written into it before the combine are still there."""
        if self._next_combine is None or self._next_combine[0] is not handle:
            local = handle.num_experts // self.comm.Get_size()
            shape = (local, self.comm.Get_size() * handle.num_max_dispatch_tokens_per_rank, handle.hidden)
            self._next_combine = (handle, np.zeros(shape, bfloat16))
        return self._next_combine[1]

    def set_low_latency_transport(self, transport: str):
        if transport not in TRANSPORTS:
            raise InvalidInputError(f"low-latency transport must be one of {TRANSPORTS}, got {transport!r}")

    def update_mask(self, rank: int, masked: bool):
        self.mask[rank] = int(masked)

    def query_mask(self):
        return self.mask.copy()

    def copy_mask(self, dst):
        dst[...] = self.mask

    def clean_mask(self):
        self.mask[:] = 0

    def reset(self):
        self.calls.reset()

    def clean_low_latency_buffer(self, blocking: bool = False):
        self.calls.check("clean_low_latency_buffer")
        self.comm.Barrier()  # no state to reset; collective like the GPU's

    def next_call(self):
        self.calls.next_call()

    def destroy(self):
        self.calls.free()
