"""GPU backend: layout and normal (intranode) dispatch/combine over NVLink.

Kernels live in raw_kernels/cupyep/{layout,intranode}.cu. A call runs on the
caller's stream, or on the buffer's communication stream when it waits on
``previous_event`` or returns an event (``async_finish``); see
:class:`cupyep.events.CallStreams`. Every launch and copy names its stream;
the few CuPy calls that follow CuPy's current stream (a shape's first upload
of its layout) run with the caller's stream made current, so that nothing
goes to the legacy stream while a torch stream is captured.
"""
from __future__ import annotations

import ctypes
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from cupyep import jit
from cupyep.arrays.capture import KeptArrays, is_capturing
from cupyep.arrays.interop import DeviceFrontend, dtype_of
from cupyep.backends.gpu.call_tags import NORMAL_MARK, describe as describe_call_tag, normal_call_tag
from cupyep.backends.interface import CachedDispatchOut, CombineOut, NormalDispatchOut
from cupyep.comm.runtime import mapped_host_ints
from cupyep.config import Config, combine_senders, default_config, own_rows_receiver_share
from cupyep.errors import BufferTooSmallError, CallMismatchError, CommTimeoutError, InvalidInputError
from cupyep.events import CallStreams
from cupyep.formats.fp8 import FP8_GROUP, bfloat16
from cupyep.jit import ArgPlan, address as _ptr, index_type
from cupyep.jit import specs as kernel_specs
from cupyep.layouts import sizing

PHASES = {1: "barrier", 2: "dispatch.recv", 3: "combine.recv",
          4: "low_latency_dispatch.recv", 5: "low_latency_combine.recv", 6: "low_latency.send",
          7: "clean_low_latency_buffer"}
NOTIFY_THREADS = 256  # per block of the notify kernels
# What each call passes to the launch plans of the layout, notify and dispatch
# kernels (in this order; the other parameters are fixed per plan, _plan).
_LAYOUT_PER_CALL = ("topk_idx", "num_tokens", "num_experts", "num_tokens_per_rank", "num_tokens_per_node",
                    "num_tokens_per_expert", "is_token_in_rank", "scratch")
_NOTIFY_PER_CALL = ("is_token_in_rank", "num_tokens", "num_tokens_per_expert", "num_local_experts",
                    "expert_alignment", "send_pos", "layout", "recv_channel_offset", "recv_expert_counts",
                    "timeout_ns", "call_tag")
_DISPATCH_PER_CALL = ("x", "x_scales", "topk_idx", "topk_weights", "send_pos", "num_tokens", "layout",
                      "recv_channel_offset", "num_local_experts", "num_recv_capacity", "recv_x", "recv_x_scales",
                      "recv_topk_idx", "recv_topk_weights", "recv_src_idx", "timeout_ns")
# The kernels' error record, by int index (ErrorWord / ErrorKind in common.cuh;
# tests/test_shared_constants.py checks them). 64-bit fields take two ints.
ERR_FLAG, ERR_PHASE, ERR_PEER, ERR_CHANNEL, ERR_KIND, ERR_BAD_ITEM, ERR_MIRROR = range(7)
ERR_PEER_TAG, ERR_CALL_TAG, ERR_BAD_VALUE, ERR_RUNNING_TAG, ERR_WORDS = 8, 10, 12, 14, 16
ERR_TIMEOUT, ERR_TOO_MANY_ROWS, ERR_CALL_MISMATCH = 1, 2, 3


def _table_words(n: int) -> int:
    """int32 words a routing table of ``n`` takes in a dispatch's shared
    allocation: whole 256-byte blocks, so that the next one starts aligned."""
    return -(-n // 64) * 64


@dataclass(eq=False, slots=True)
class GpuRouting:
    """GPU routing tables kept in a DispatchHandle.

    send_pos: address of [T, R] int32, the slot of each token in each
    destination, -1 if not sent.
    recv_channel_offset: address of [R * C + 1] int32, the prefix of rows
    per (source, channel).
    tables: the arrays those addresses lie in (kept alive with the handle).
    num_channels, num_warps: the launch shape the slots were laid out for.
    layout: the NvlLayout in use (host copy) and its device array.
    Across nodes also: rdma_pos [T, N] int32 slot of each token in each
    node's RDMA region (-1 if not sent), rdma_recv_count [N * C] int32
    messages this rank forwarded per (source node, channel), fwd_slots
    [N * T_MAX * P] int32 where each went, rdma_layout_dev.
    plans: the launches of the calls that reuse the handle (cached
    dispatch, combine), made once (jit.ArgPlan: the arguments but the
    per-call ones kept).
    """
    send_pos: int
    recv_channel_offset: int
    tables: tuple
    num_channels: int
    num_warps: int
    layout: sizing.NvlLayout
    layout_dev: object
    rdma_pos: object = None
    rdma_recv_count: object = None
    fwd_slots: object = None
    rdma_layout_dev: object = None
    plans: dict = field(default_factory=dict)  # by kernel and launch shape


class GpuBackend:
    """Runs :class:`cupyep.Buffer` calls with CUDA kernels on one GPU per rank."""

    def __init__(self, group, num_nvl_bytes: int, num_rdma_bytes: int, low_latency_mode: bool,
                 enable_shrink: bool = False, max_nodes_per_token: int = 0):
        import cupy
        self.group = group
        self.num_ranks = group.size
        self.rank = group.rank
        self.max_nodes_per_token = int(max_nodes_per_token or 0)
        self.num_nvl_bytes = max(int(num_nvl_bytes), sizing.control_bytes(self.num_ranks))
        self.rt = group.gpu_runtime(self.num_nvl_bytes + int(num_rdma_bytes) + (64 << 20))
        self.nvl = self.rt.alloc(self.num_nvl_bytes)
        # Kernels poll a device error word and mirror failures to host memory.
        self.err_host, err_host_ptr, self._err_mem = mapped_host_ints(ERR_WORDS)
        # the same words for check_errors' test on every call (a ctypes read: a third of NumPy's)
        self._err_words = (ctypes.c_int32 * ERR_WORDS).from_address(err_host_ptr)
        self.err_dev = cupy.zeros(ERR_WORDS, np.int32)
        self.err_dev[ERR_MIRROR:ERR_MIRROR + 2] = cupy.asarray(np.array([err_host_ptr], np.uint64).view(np.int32))
        self.err_ptr = self.err_dev.data.ptr
        self.info_host, self.info_ptr, self._info_mem = mapped_host_ints(sizing.MAX_LOCAL_EXPERTS + 3)
        # [0] blocks of a kernel done, [1] combine senders' work ticket.
        self.blocks_done = cupy.zeros(2, np.int32)
        self.layout_error = cupy.zeros(1, np.int32)
        # Normal kernels spin on each other's blocks: all must be resident.
        self.device_sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
        self.streams = CallStreams()
        # Of the call in progress (set by enter_call / _begin): the caller's
        # framework, its current stream, and the stream the kernels run on.
        self.frontend = DeviceFrontend(self.rt.device_id)
        self.caller_stream = self.stream = self.streams.comm
        self.timeout_ns = int(float(os.environ.get("CUPYEP_TIMEOUT_S", "20")) * 1e9)
        # Barrier sequence and notify parity, advanced by the kernels themselves
        # so that CUDA graph replays count as calls.
        self.counters = cupy.zeros(2, np.int32)
        self.seq = 0  # this buffer's collective calls (next_call)
        self._kept = KeptArrays()
        self._capturing = False  # of the call in progress (set by _begin / get_dispatch_layout)
        self.counts_wait_s = 0.0  # host seconds the last dispatch without num_worst_tokens waited for its counts
        self._layouts = {}
        self._layout_state = {}  # get_dispatch_layout's output specs and scratch, per number of experts
        self._cached_configs = {}  # cached_dispatch's Config per handle shape and given chunking
        from cupyep.backends.gpu.low_latency import GpuLowLatency
        self._prefetched = set()  # normal-call shapes whose kernels were prefetched
        self._launch_plans = {}  # the layout, notify and dispatch launches by kernel and shape (_plan)
        # intranode.cu under raw_kernels/cupyep (benchmarks/breakdown_normal.py times variants of it);
        # a handle's launch plans keep the kernels they were made with
        self.intranode_source = "intranode.cu"
        self.ll = GpuLowLatency(self, num_rdma_bytes, shrink=enable_shrink)
        self.inter = None
        if group.num_nodes > 1:
            from cupyep.backends.gpu.internode import GpuInternode
            self.inter = GpuInternode(self)
        self.rt.sync_barrier()

    # ------------------------------------------------------------------ #
    def next_call(self):
        """A collective call starts (counted even if it raises before
        communicating). Low-latency calls carry the number in their flags'
        call tags; clean_low_latency_buffer restarts it on every rank."""
        self.seq += 1

    def enter_call(self, frontend):
        """Start a call from ``frontend``'s framework; returns the caller's stream."""
        self.frontend = frontend
        self.caller_stream = frontend.stream()
        return self.caller_stream

    def call_array(self, key, shape, dtype, zero=False):
        """An array of the call in progress (an output or a routing table; the
        backend's low-latency and inter-node parts make theirs here too), from
        the caller's framework (cupyep.arrays.capture: CuPy callers' are kept
        while capturing)."""
        if not (self._capturing or zero):  # every call's case: straight from the framework's allocator
            return self.frontend.empty(shape, dtype)
        return self._kept.get(key, shape, dtype, self._capturing, zero, alloc=self.frontend, stream=self.stream)

    def _kept_outputs(self, key, specs):
        """Outputs of a call on the caller's stream whose shapes repeat call after
        call ((shape, dtype) specs, None stays None; few kinds, so few sets are
        kept): torch and CuPy callers' from the frontend's kept sets (handed out again
        once dropped, cupyep.arrays.output_sets), else as :meth:`call_array` makes them."""
        fe = self.frontend
        if fe.recycles_outputs and not self._capturing:
            return fe.outputs(specs)[0]
        return [None if sp is None else self.call_array((key, i), *sp) for i, sp in enumerate(specs)]

    def keep_for_stream(self, stream, cur, arrays):
        """torch arrays used on the communication stream: tell torch's allocator
        not to reuse them before that stream's work is done."""
        if stream.ptr != cur.ptr:
            record = getattr(self.frontend, "record_stream", None)
            if record is not None:
                record(arrays, stream.ptr)

    def check_errors(self):
        """Raise what a kernel reported (timeouts, overflow, a peer at another
        call, dropped bad input) and clear it."""
        w = self._err_words
        if not (w[ERR_FLAG] | w[ERR_BAD_ITEM]):
            return
        h = self.err_host
        import cupy
        cupy.cuda.Device().synchronize()  # the failed kernels have exited: the record is final
        phase, peer, channel, kind, bad_item = (int(v) for v in h[ERR_PHASE:ERR_BAD_ITEM + 1])
        peer_tag, call_tag, bad_value = (int(h[i:i + 2].view(np.int64)[0])
                                         for i in (ERR_PEER_TAG, ERR_CALL_TAG, ERR_BAD_VALUE))
        h[:] = 0
        self.err_dev[:ERR_MIRROR] = 0
        self.err_dev[ERR_PEER_TAG:ERR_RUNNING_TAG] = 0
        phase_name = PHASES.get(phase, str(phase))
        call = describe_call_tag(call_tag) if call_tag else ""
        if kind == ERR_TIMEOUT:
            raise CommTimeoutError(self.rank, phase_name, peer, channel, call)
        if kind == ERR_CALL_MISMATCH:
            low_latency = not call_tag & NORMAL_MARK
            what = ("its rows were not used. Call clean_low_latency_buffer() on every rank (it restarts the "
                    "call sequence)" if low_latency else
                    "that call's results are not valid. Call reset() on every rank")
            raise CallMismatchError(
                f"rank {self.rank}: in {phase_name}, rank {peer} was at {describe_call_tag(peer_tag)}, this rank "
                f"at {describe_call_tag(call_tag)}; {what}, then go on")
        if bad_item and not kind:
            of = f" of {call}" if call else ""
            raise InvalidInputError(
                f"rank {self.rank}: topk_idx of token {bad_item - 1}{of} holds expert id {bad_value}, outside "
                "[-1, num_experts); the entry was dropped (reported at the next call)")
        of = f" of {call}" if call else ""
        raise InvalidInputError(
            f"rank {self.rank}: more rows arrived in {phase_name}{of} than the output holds "
            f"(from rank {peer}, channel {channel}); raise num_worst_tokens")

    def _layout(self, hidden: int, num_topk: int, num_channels: int, num_tokens: int):
        key = (hidden, num_topk, num_channels)
        hit = self._layouts.get(key)
        if hit is None:
            import cupy
            lay = sizing.check_fits(self.num_nvl_bytes, self.num_ranks, hidden, num_topk, 0)
            spc = lay.max_tokens // num_channels
            arr = np.array(sizing.nvl_layout_words(lay, spc), np.int64)
            with self.caller_stream:  # its copy, like all of a call's work, on the caller's stream
                dev = cupy.asarray(arr)
            hit = self._layouts[key] = (lay, dev, dev.data.ptr, spc)
        lay, dev, dev_ptr, spc = hit
        if math.ceil(num_tokens / num_channels) > spc:
            need = sizing.nvl_size_hint(hidden, num_tokens, self.num_ranks, num_topk)
            raise BufferTooSmallError(
                f"num_nvl_bytes={self.num_nvl_bytes} holds {spc * num_channels} tokens per rank at "
                f"hidden={hidden}, top-{num_topk}; {num_tokens} need num_nvl_bytes >= {need} "
                "(cupyep.nvl_size_hint)")
        return lay, dev, dev_ptr

    def _config(self, config):
        cfg = config or default_config(self.num_ranks, self.group.num_nodes)
        if cfg.num_channels > sizing.MAX_CHANNELS - 1:
            raise InvalidInputError(f"num_sms={cfg.num_sms} is above the {2 * (sizing.MAX_CHANNELS - 1)} "
                                    "the kernels can use")
        self._check_sms(cfg)
        if self.inter is None and cfg.num_warps < self.num_ranks:
            raise InvalidInputError(f"num_warps={cfg.num_warps} must be at least the number of ranks "
                                    f"({self.num_ranks})")
        return cfg

    def _begin(self, previous_event, async_finish, after_caller=False):
        """Pick the call's stream (self.stream); returns the caller's.
        ``after_caller``: also order it after the caller's stream."""
        self.check_errors()
        self.stream, cur = self.streams.begin(self.caller_stream, previous_event, async_finish, after_caller)
        self._capturing = is_capturing(self.stream)
        return cur

    def _end(self, cur, async_finish, arrays=()):
        if self.stream is not cur:  # the call ran on the communication stream
            self.keep_for_stream(self.stream, cur, arrays)
        return self.streams.end(self.stream, cur, async_finish, self.frontend.stream_ptr)

    # ------------------------------------------------------------------ #
    def _plan(self, key, kernel, spec, grid, threads, per_call, shared_mem=0, **fixed):
        """Make the launch plan (jit.ArgPlan) of ``spec`` and keep it under
        ``key`` (what decides the spec and ``fixed``: the shapes, the config,
        the source): ``fixed`` are the buffer's own arrays and the config's
        values, ``per_call`` the rest, passed at each launch. Callers look the
        key up first (``self._launch_plans.get(key) or self._plan(key, ...)``),
        so that a call whose plan exists builds no spec and no arguments."""
        plan = self._launch_plans[key] = ArgPlan(kernel, spec, grid, threads, per_call, shared_mem, **fixed)
        return plan

    def get_dispatch_layout(self, topk_idx, num_experts):
        from cupyep.types import DispatchLayout
        t, k = topk_idx.shape
        r, nodes = self.num_ranks, self.group.num_nodes
        # After this buffer's previous call: the kernel's scratch is the buffer's.
        self.stream = self.streams.begin(self.caller_stream)[0]
        self._capturing = is_capturing(self.stream)
        found = self._layout_state.get(num_experts)
        if found is None:
            import cupy
            specs = (((r,), np.int32), ((num_experts,), np.int32), ((nodes,), np.int32) if nodes > 1 else None)
            # counts by expert, rank, node, then the blocks' arrival ticket; zero between launches
            with self.caller_stream:
                found = self._layout_state[num_experts] = (specs, cupy.zeros(num_experts + r + nodes + 1, np.int32))
        specs, scratch = found
        per_rank, per_expert, per_node = self._kept_outputs("layout", specs)
        in_rank = self.call_array("in_rank", (t, r), np.bool_)
        grid, smem = min(max(1, (t + 255) // 256), 132), 4 * (num_experts + r + nodes)
        key = ("layout", topk_idx.dtype, k, grid, smem)
        plan = self._launch_plans.get(key) or self._plan(
            key, "layout.get_dispatch_layout", kernel_specs.layout_spec(index_type(topk_idx), k), grid, 256,
            _LAYOUT_PER_CALL, smem, num_ranks=r, num_ranks_per_node=self.group.num_ranks_per_node,
            max_nodes_per_token=self.max_nodes_per_token, error=self.layout_error)
        plan.launch(self.stream.ptr, _ptr(topk_idx), t, num_experts, _ptr(per_rank), _ptr(per_node), _ptr(per_expert),
                    _ptr(in_rank), _ptr(scratch))
        return DispatchLayout(per_rank, per_node, per_expert, in_rank, num_experts)

    def dispatch(self, x, scales, topk_idx, topk_weights, is_token_in_rank, per_expert,
                 num_experts, expert_alignment, num_worst_tokens, config, previous_event,
                 async_finish, layout_in_call=False):
        """``layout_in_call``: the layout was just computed on the caller's
        stream, so a call moved to the communication stream waits for it too."""
        cfg = self._config(config)
        r, c = self.num_ranks, cfg.num_channels
        t, hidden = x.shape
        k = 0 if topk_idx is None else topk_idx.shape[1]
        local = 0 if topk_idx is None else num_experts // r
        if local > sizing.MAX_LOCAL_EXPERTS:
            raise InvalidInputError(f"at most {sizing.MAX_LOCAL_EXPERTS} experts per rank")
        shape = (hidden, dtype_of(x).itemsize, k, index_type(topk_idx))
        if shape not in self._prefetched:  # a new shape: compile its kernels side by side
            self._prefetched.add(shape)
            jit.prefetch(kernel_specs.normal_call_specs(
                r, self.group.num_ranks_per_node, hidden * shape[1], 0 if scales is None else scales.shape[1],
                k, shape[3], hidden), jit.device_arch(self.rt.device_id))
        lay, lay_dev, lay_ptr = self._layout(hidden, k, c, t)
        rdma_lay = rdma_dev = None
        if self.inter is not None:
            rdma_lay, rdma_dev = self.inter.layout(hidden, k, c, t)
            self.inter.claim()
        if topk_idx is None:
            per_expert = None
        cur = self._begin(previous_event, async_finish, layout_in_call)

        call_tag = normal_call_tag(self.seq, "dispatch", scales is not None, topk_weights is not None, hidden, k,
                                   num_experts if topk_idx is not None else 1)
        # The routing tables the kernels read by address share one allocation (one
        # costs the host ~3 us, an address an addition): send_pos [T, R] (inside a
        # node), offsets [R * C + 1] and, unless handed back on the device
        # (num_worst_tokens) or zeroed (no per-expert counts), expert_counts [L]. The
        # notify kernel writes all L counts when it has per-expert counts.
        own_counts = per_expert is not None and not num_worst_tokens
        n_send = 0 if self.inter is not None else _table_words(t * r)
        n_offsets = _table_words(r * c + 1)
        tables = self.call_array("tables", n_send + n_offsets + (local if own_counts else 0), np.int32)
        send_pos_ptr = _ptr(tables)
        offsets_ptr = send_pos_ptr + 4 * n_send
        if own_counts:
            expert_counts, counts_ptr = None, offsets_ptr + 4 * n_offsets
        else:
            expert_counts = self.call_array("expert_counts", max(local, 1), np.int32, zero=per_expert is None)
            counts_ptr = _ptr(expert_counts)
        rdma_pos = rdma_recv_count = None
        if self.inter is not None:
            send_pos, rdma_pos, rdma_recv_count = self.inter.notify(
                is_token_in_rank, t, c, per_expert, local, expert_alignment, lay_dev, rdma_dev,
                offsets_ptr, counts_ptr, call_tag)
            send_pos_ptr, tables = _ptr(send_pos), (tables, send_pos)
        else:
            key = ("notify", c, self.intranode_source)
            plan = self._launch_plans.get(key) or self._plan(
                key, "intranode.notify_dispatch", kernel_specs.intranode_notify(r, self.intranode_source), c + 1,
                NOTIFY_THREADS, _NOTIFY_PER_CALL, num_channels=c, peers=self.nvl.peers, rank=self.rank,
                counters=self.counters, blocks_done=self.blocks_done, host_info=self.info_ptr,
                layout_error=self.layout_error, err=self.err_ptr)
            plan.launch(self.stream.ptr, _ptr(is_token_in_rank), t, _ptr(per_expert), local, expert_alignment,
                        send_pos_ptr, lay_ptr, offsets_ptr, counts_ptr, self.timeout_ns, call_tag)
            tables = (tables,)
        if num_worst_tokens:
            n_rows, num_recv = num_worst_tokens, -1
            counts = expert_counts[:local] if topk_idx is not None else None
        else:
            waited = time.perf_counter()
            self.stream.synchronize()
            self.counts_wait_s = time.perf_counter() - waited
            self.check_errors()
            bad, code = int(self.info_host[1 + local]), int(self.info_host[2 + local])
            if bad and code == 3:
                raise InvalidInputError(
                    f"rank {bad - 1}: a token's experts span more than max_nodes_per_token="
                    f"{self.max_nodes_per_token} nodes (group-limited routing)")
            if bad:
                raise InvalidInputError(
                    f"expert id outside [-1, {num_experts}) in topk_idx on rank {bad - 1}")
            num_recv = n_rows = int(self.info_host[0])
            counts = self.info_host[1:1 + local].tolist() if topk_idx is not None else None

        fp8 = scales is not None
        recv_x = self.call_array("recv_x", (n_rows, hidden), np.uint8 if fp8 else bfloat16)
        recv_s = self.call_array("recv_s", (n_rows, hidden // FP8_GROUP), np.float32) if fp8 else None
        recv_idx = self.call_array("recv_idx", (n_rows, k), np.int64) if k else None
        recv_w = self.call_array("recv_w", (n_rows, k), np.float32) if k else None
        recv_src = self.call_array("recv_src", n_rows, np.int32)
        if self.inter is None:
            routing = GpuRouting(send_pos_ptr, offsets_ptr, tables, c, cfg.num_warps, lay, lay_dev)
            self._launch_dispatch(cfg, x, scales, topk_idx, topk_weights, send_pos_ptr, t, lay_ptr,
                                  offsets_ptr, local, n_rows, recv_x, recv_s, recv_idx, recv_w, recv_src)
        else:
            fwd_slots = self.call_array("fwd_slots", self.group.num_nodes * rdma_lay.max_tokens *
                                        self.group.num_ranks_per_node, np.int32)
            routing = GpuRouting(send_pos_ptr, offsets_ptr, tables, c, cfg.num_warps, lay, lay_dev, rdma_pos,
                                 rdma_recv_count, fwd_slots, rdma_dev)
            self.inter.dispatch(cfg, routing, x, scales, topk_idx, topk_weights, is_token_in_rank, t,
                                local, n_rows, recv_x, recv_s, recv_idx, recv_w, recv_src, True)
        event = self._end(cur, async_finish, (x, scales, topk_idx, topk_weights, is_token_in_rank, recv_x,
                                                recv_s, recv_idx, recv_w, recv_src, *tables, expert_counts))
        return NormalDispatchOut(recv_x, recv_s, recv_idx, recv_w, counts, recv_src, num_recv, routing, event)

    def _launch_dispatch(self, cfg, x, scales, topk_idx, topk_weights, send_pos_ptr, num_tokens,
                         lay_ptr, offsets_ptr, local, n_rows, recv_x, recv_s, recv_idx, recv_w,
                         recv_src):
        """The dispatch kernel; the routing tables by address."""
        hidden_bytes = x.shape[1] * dtype_of(x).itemsize
        k = 0 if topk_idx is None else topk_idx.shape[1]
        num_scales = 0 if scales is None else scales.shape[1]
        key = ("dispatch", hidden_bytes, num_scales, k, None if topk_idx is None else topk_idx.dtype, cfg,
               self.intranode_source)
        plan = self._launch_plans.get(key) or self._plan(
            key, "intranode.dispatch", kernel_specs.intranode_dispatch(
                self.num_ranks, hidden_bytes, num_scales, k, index_type(topk_idx), self.intranode_source),
            2 * cfg.num_channels, 32 * cfg.num_warps, _DISPATCH_PER_CALL, num_channels=cfg.num_channels,
            peers=self.nvl.peers, rank=self.rank, chunk_tokens=cfg.chunk_tokens,
            own_share_1024=round(1024 * own_rows_receiver_share(cfg, self.num_ranks)), err=self.err_ptr)
        plan.launch(self.stream.ptr, _ptr(x), _ptr(scales), _ptr(topk_idx), _ptr(topk_weights), send_pos_ptr,
                    num_tokens, lay_ptr, offsets_ptr, local, n_rows, _ptr(recv_x), _ptr(recv_s),
                    _ptr(recv_idx), _ptr(recv_w), _ptr(recv_src), self.timeout_ns)

    def _barrier(self, g: GpuRouting, call_tag):
        plan = g.plans.get("barrier")
        if plan is None:
            plan = g.plans["barrier"] = ArgPlan(
                "intranode.barrier", kernel_specs.intranode_barrier(self.num_ranks, self.intranode_source), 1, 32,
                ("timeout_ns", "call_tag"), peers=self.nvl.peers, layout=g.layout_dev, rank=self.rank,
                counters=self.counters, err=self.err_ptr)
        plan.launch(self.stream.ptr, self.timeout_ns, call_tag)

    def _cached_dispatch_plan(self, g: GpuRouting, cfg, hidden_bytes, num_scales, n_rows, num_tokens):
        key = ("dispatch", cfg, hidden_bytes, num_scales, n_rows)
        plan = g.plans.get(key)
        if plan is None:
            spec = kernel_specs.intranode_dispatch(self.num_ranks, hidden_bytes, num_scales, 0, index_type(None),
                                                   self.intranode_source)
            plan = g.plans[key] = ArgPlan(
                "intranode.dispatch", spec, 2 * cfg.num_channels, 32 * cfg.num_warps,
                ("x", "x_scales", "recv_x", "recv_x_scales", "timeout_ns"),
                topk_idx=0, topk_weights=0, recv_src_idx=0, send_pos=g.send_pos, num_tokens=num_tokens,
                num_channels=cfg.num_channels, peers=self.nvl.peers, layout=g.layout_dev,
                recv_channel_offset=g.recv_channel_offset, rank=self.rank, num_local_experts=0,
                num_recv_capacity=n_rows, chunk_tokens=cfg.chunk_tokens,
                own_share_1024=round(1024 * own_rows_receiver_share(cfg, self.num_ranks)),
                recv_topk_idx=0, recv_topk_weights=0, err=self.err_ptr)
        return plan

    def cached_dispatch(self, handle, x, scales, config, previous_event, async_finish):
        g: GpuRouting = handle.state
        given = config or default_config(self.num_ranks, self.group.num_nodes)
        key = (g.num_channels, g.num_warps, given.chunk_tokens, given.own_rows_receiver_share)
        cfg = self._cached_configs.get(key)
        if cfg is None:  # the handle's launch shape with the given chunking (Config checks on creation)
            cfg = self._cached_configs[key] = Config(
                num_sms=2 * g.num_channels, num_warps=g.num_warps, chunk_tokens=given.chunk_tokens,
                own_rows_receiver_share=given.own_rows_receiver_share)
        if self.inter is not None:
            self.inter.claim()
        cur = self._begin(previous_event, async_finish)
        n_rows = handle.num_worst_tokens or handle.num_recv_tokens
        fp8 = scales is not None
        hidden = x.shape[1]
        # Fresh outputs (not kept sets as in low-latency calls): their shapes change with every
        # dispatch's counts, and sets kept per shape would pin memory for shapes never seen again.
        recv_x = self.call_array("cached_x", (n_rows, hidden), np.uint8 if fp8 else bfloat16)
        recv_s = self.call_array("cached_s", (n_rows, hidden // FP8_GROUP), np.float32) if fp8 else None
        call_tag = normal_call_tag(self.seq, "cached_dispatch", fp8, False, x.shape[1])
        used = (x, scales, recv_x, recv_s)  # kept alive for the communication stream (async_finish)
        # No recv_src_idx (a null pointer): the handle has the rows' sources already.
        if self.inter is not None:
            self.inter.barrier(g.rdma_layout_dev, call_tag)
            self.inter.dispatch(cfg, g, x, scales, None, None, handle.is_token_in_rank, handle.num_tokens,
                                0, n_rows, recv_x, recv_s, None, None, None, False)
            return CachedDispatchOut(recv_x, recv_s, self._end(cur, async_finish, used))
        self._barrier(g, call_tag)
        plan = self._cached_dispatch_plan(g, cfg, hidden * dtype_of(x).itemsize,
                                          0 if scales is None else scales.shape[1], n_rows, handle.num_tokens)
        plan.launch(self.stream.ptr, _ptr(x), _ptr(scales), _ptr(recv_x), _ptr(recv_s), self.timeout_ns)
        return CachedDispatchOut(recv_x, recv_s, self._end(cur, async_finish, used))

    def _check_sms(self, cfg):
        if cfg.num_sms > self.device_sms:
            raise InvalidInputError(f"num_sms={cfg.num_sms} is above this GPU's {self.device_sms} SMs (the "
                                    "kernels' blocks wait for each other, so all must run at once)")

    def combine(self, handle, x, topk_weights, bias, config, previous_event, async_finish):
        g: GpuRouting = handle.state
        cfg = config or default_config(self.num_ranks, self.group.num_nodes)
        self._check_sms(cfg)
        t, hidden = handle.num_tokens, handle.hidden
        k = 0 if topk_weights is None else topk_weights.shape[1]
        if self.inter is not None:
            self.inter.claim()
        cur = self._begin(previous_event, async_finish)
        # Fresh, one allocation each: views carved from one allocation cost the host as
        # much as the allocations they replace (benchmarks/RESULTS.md, ninth pass)
        out = self.call_array("out", (t, hidden), bfloat16)
        out_w = self.call_array("out_w", (t, k), np.float32) if k else None
        b0 = bias[0] if len(bias) > 0 else None
        b1 = bias[1] if len(bias) > 1 else None
        call_tag = normal_call_tag(self.seq, "combine", False, k > 0, hidden, k)
        if self.inter is not None:
            self.inter.barrier(g.rdma_layout_dev, call_tag)
            self.inter.combine(cfg, g, x, topk_weights, t, b0, b1, out, out_w)
            return CombineOut(out, out_w, self._end(cur, async_finish, (x, topk_weights, *bias, out, out_w)))
        key = ("combine", cfg, k)
        plan = g.plans.get(key)
        if plan is None:
            plan = g.plans[key] = ArgPlan(
                "intranode.combine", kernel_specs.intranode_combine(self.num_ranks, hidden, k, self.intranode_source),
                cfg.num_sms,
                32 * cfg.num_combine_warps,
                ("x", "topk_weights", "bias0", "bias1", "out", "out_weights", "timeout_ns", "call_tag"),
                send_pos=g.send_pos, recv_channel_offset=g.recv_channel_offset, num_tokens=t,
                num_channels=g.num_channels, num_senders=combine_senders(cfg, self.num_ranks),
                chunk_rows=cfg.combine_chunk_rows, peers=self.nvl.peers, layout=g.layout_dev, rank=self.rank,
                counters=self.counters, scratch=self.blocks_done, err=self.err_ptr)
        plan.launch(self.stream.ptr, _ptr(x), _ptr(topk_weights), _ptr(b0), _ptr(b1), _ptr(out), _ptr(out_w),
                    self.timeout_ns, call_tag)
        return CombineOut(out, out_w, self._end(cur, async_finish, (x, topk_weights, *bias, out, out_w)))

    # ------------------------------------------------------------------ #
    def low_latency_dispatch(self, x, topk_idx, m, num_experts, use_fp8, round_scale, use_ue8m0,
                             async_finish, return_recv_hook, cumulative_stats=None, wait_stats=None):
        return self.ll.dispatch(x, topk_idx, m, num_experts, use_fp8, round_scale, use_ue8m0,
                                async_finish, return_recv_hook, cumulative_stats, wait_stats)

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, out, async_finish,
                            return_recv_hook, use_logfmt=False, wait_stats=None):
        return self.ll.combine(x, topk_idx, topk_weights, handle, out, async_finish, return_recv_hook,
                               use_logfmt, wait_stats)

    def next_low_latency_combine_buffer(self, handle):
        return self.ll.next_combine_buffer(handle)

    def set_low_latency_transport(self, transport: str):
        self.ll.set_transport(transport)

    def reset(self):
        """Collective and blocking: after this device's work and every rank's,
        zero every flag, counter, call tag and sequence of the buffer."""
        import cupy
        self.rt.sync_barrier()
        cupy.cuda.runtime.memset(self.nvl.ptr, 0, sizing.control_bytes(self.num_ranks))
        for a in (self.counters, self.blocks_done, self.layout_error, *(sc for _, sc in self._layout_state.values())):
            a.fill(0)
        self.err_dev[:ERR_MIRROR] = 0
        self.err_dev[ERR_PEER_TAG:] = 0
        self.err_host[:] = 0
        self.ll.clean(None, blocking=True)  # the RDMA memory (low-latency and inter-node), with a barrier
        self.seq = 0

    def _ordered_caller_stream(self):
        """The stream enter_call named (the caller's), ordered after this
        buffer's previous call (which may have run on the communication stream)."""
        return self.streams.begin(self.caller_stream)[0]

    def clean_low_latency_buffer(self, blocking: bool = False):
        self.ll.clean(self._ordered_caller_stream(), blocking)
        self.seq = 0  # every rank restarts its call sequence here

    def update_mask(self, rank: int, masked: bool):
        self.ll.update_mask(rank, masked, self._ordered_caller_stream())

    def query_mask(self):
        return self.ll.query_mask()

    def copy_mask(self, dst):
        """The mask into ``dst`` ([R] int32 on this device), on the caller's stream."""
        self.ll.copy_mask(_ptr(dst), self._ordered_caller_stream())

    def clean_mask(self):
        self.ll.clean_mask(self._ordered_caller_stream())

    def destroy(self):
        import cupy
        cupy.cuda.Device().synchronize()
        self.ll.destroy()
        self.rt.free(self.nvl)
