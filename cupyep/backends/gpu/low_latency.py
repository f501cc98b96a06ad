"""Low-latency dispatch and combine on the GPU (decoding).

Kernels: raw_kernels/cupyep/low_latency.cu; layout: cupyep/layouts/low_latency.py.
Calls launch on the caller's current stream (so they can be captured in a CUDA
graph) unless ``async_finish`` asks for the communication stream and an event.
With ``return_recv_hook`` the call launches only its send half and returns a
hook that launches the receive half; no SM spins in between.

Peers reachable over NVLink are written with plain stores. The NVSHMEM-linked
kernels put through NVSHMEM to peers without a mapping, or to every peer when
``transport='nvshmem'`` (or ``CUPYEP_LL_TRANSPORT=nvshmem``).

Outputs come from the caller's framework. torch and CuPy callers get a set
of arrays made earlier on the same stream once they have dropped every array
of it (cupyep.arrays.output_sets), else new ones from the framework's
allocator; JAX callers new ones. While the stream is captured into a CUDA
graph: torch callers' are new, from the graph's pool; CuPy callers get arrays
the buffer keeps per half, so a replayed graph writes memory that stays
valid (run each shape once outside capture first).
"""
from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass

import numpy as np

from cupyep import jit
from cupyep.backends.interface import LowLatencyCombineOut, LowLatencyDispatchOut
from cupyep.arrays.capture import KeptArrays, is_capturing
from cupyep.backends.gpu.call_tags import ll_call_tag, with_call
from cupyep.errors import CupyepError, InvalidInputError
from cupyep.formats.fp8 import FP8_GROUP, bfloat16
from cupyep.jit import ArgBlock, PackedKernel, address, index_type
from cupyep.jit import specs as kernel_specs
from cupyep.jit.args import PARAMS, kernel_args
from cupyep.layouts.low_latency import LL_MAX_EXPERTS, TRANSPORTS, LowLatencyLayout, check_low_latency_fits
from cupyep.layouts.sizing import MAX_RANKS

_THREADS = 512  # kLLThreads in low_latency.cu
# kLogFmtSendSmem: dynamic shared memory of a LogFMT combine, two 4 KB rounds a warp
_LOGFMT_SEND_SMEM = (_THREADS // 32) * 2 * 4096
DISPATCH_PARAMS, COMBINE_PARAMS = PARAMS["low_latency.dispatch"], PARAMS["low_latency.combine"]
# Slots a call sets (the rest are fixed per shape and half), written with
# struct (one pack per run of adjacent slots: a slot set from Python costs as
# much as a pack of eight). Dispatch: x, topk_idx, num_tokens, num_topk; its 8
# arrays from recv_x on. Combine: its 8 leading parameters; zero_copy; out and
# wait_stats. Both: phases, and the buffer's settings that may change between
# calls (shrink; timeout_ns with call_tag).
_D_X, _D_ARRAYS, _D_PHASES, _D_SHRINK, _D_TIMEOUT = (
    DISPATCH_PARAMS.index(n) for n in ("x", "recv_x", "phases", "shrink", "timeout_ns"))
_C_X, _C_ZERO_COPY, _C_OUT, _C_PHASES, _C_SHRINK, _C_TIMEOUT = (
    COMBINE_PARAMS.index(n) for n in ("x", "zero_copy", "out", "phases", "shrink", "timeout_ns"))
assert DISPATCH_PARAMS[_D_X:_D_X + 4] == ("x", "topk_idx", "num_tokens", "num_topk")
assert DISPATCH_PARAMS[_D_ARRAYS:_D_ARRAYS + 8][-1] == "wait_stats" and COMBINE_PARAMS[_C_OUT + 1] == "wait_stats"
assert COMBINE_PARAMS[_C_X:_C_X + 8][-1] == "num_topk"
assert DISPATCH_PARAMS[_D_TIMEOUT + 1] == COMBINE_PARAMS[_C_TIMEOUT + 1] == "call_tag"
_PACK2, _PACK4, _PACK8 = (struct.Struct(f"<{n}q").pack_into for n in (2, 4, 8))


def arg_block(kernel: str, **values) -> ArgBlock:
    """An argument block of ``kernel`` (a cupyep.jit.args name), every parameter by name."""
    return ArgBlock([int(v) for v in kernel_args(kernel, **values)])


@dataclass(eq=False, slots=True)
class GpuLowLatencyState:
    """Kept in a LowLatencyHandle: what combine needs from its dispatch.
    The addresses are those of recv_k and of the handle's src_info and
    layout_range (one output block: recv_k keeps it alive)."""
    recv_k: object          # [L, R*M] int32 top-k slot of each received row at its source
    layout: LowLatencyLayout
    src_info_ptr: int
    layout_range_ptr: int
    recv_k_ptr: int


class _Plan:
    """A low-latency call of one shape: its kernel, its argument blocks per
    half with all but the per-call slots set, its output kinds and, per
    caller framework, their kept sets (made once per shape: every decode
    step takes this path)."""

    __slots__ = ("fn", "layout", "args", "tag_base", "specs", "fp8", "sets", "send_areas")

    def __init__(self, fn, layout, args, tag_base, specs, fp8=False, send_areas=None):
        self.fn, self.layout, self.args, self.tag_base = fn, layout, args, tag_base
        self.specs, self.fp8, self.send_areas = specs, fp8, send_areas
        self.sets = {}  # frontend -> its OutputSets of these outputs (None: not recycled)


class GpuLowLatency:
    """Low-latency state of one GpuBackend: the symmetric buffer and call count."""

    def __init__(self, backend, num_rdma_bytes: int, transport: str = "auto", shrink: bool = False):
        import cupy
        self.be = backend
        self.num_rdma_bytes = int(num_rdma_bytes)
        self.sym = backend.rt.alloc(self.num_rdma_bytes) if self.num_rdma_bytes else None
        self.calls = 0
        self.user = None  # "low-latency" or "normal inter-node": see claim()
        self._kept = KeptArrays()
        # per destination rank: messages and counts this rank's dispatch has written for it
        self._finish = cupy.zeros(backend.num_ranks, np.int32)
        self._kernels = {}
        self._plans = {}  # per shape and transport: kernel and argument lists (see _dispatch_plan)
        self._send_views = {}  # (layout, half) -> next_combine_buffer()'s array
        self.source = "cupyep/low_latency.cu"  # the kernels' source (breakdown benchmarks swap variants in)
        self._blocks_done = cupy.zeros(2, np.int32)
        # per half: how many dispatch receive blocks are done reading the flags
        self._recv_done = cupy.zeros(2, np.int32)
        self._blocks_done_addr = [address(self._blocks_done[h:h + 1]) for h in range(2)]
        # per half and (local expert, destination): units of a LogFMT combine's send done
        self._pair_done = cupy.zeros((2, LL_MAX_EXPERTS), np.int32)
        self._recv_done_addr = [address(self._recv_done[h:h + 1]) for h in range(2)]
        # [R] int32, 1 = rank left out; with shrink a timed-out wait sets it.
        self.mask = cupy.zeros(backend.num_ranks, np.int32)
        self._mask_ptr, self._finish_ptr = self.mask.data.ptr, self._finish.data.ptr
        self._peers_ptr = self.sym.peers.data.ptr if self.sym is not None else 0
        self.shrink = bool(shrink)
        # clean()'s barrier: [MAX_RANKS] i64 slots in a symmetric allocation of
        # their own (the zeroing leaves them alone) and this rank's count of
        # barriers, on the device so that graph replays advance it.
        self._slots = backend.rt.alloc(8 * MAX_RANKS) if self.sym is not None else None
        self._barrier_seq = cupy.zeros(1, np.int64)
        self._one = cupy.ones(1, np.int32)  # copied into the mask to set an entry
        self.num_sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
        self.transport = "auto"
        self.set_transport(os.environ.get("CUPYEP_LL_TRANSPORT", transport))
        self.arch = jit.device_arch(backend.rt.device_id)
        jit.prefetch_compiler(self.arch)
        if self.sym is not None and (self._nvshmem_build or backend.group.num_nodes > 1):
            jit.prefetch_nvshmem_device(self.arch)  # the first NVSHMEM kernel's compile needs it

    def claim(self, user: str) -> None:
        """Low-latency and inter-node normal calls share the RDMA memory; a
        switch needs clean_low_latency_buffer() in between (flags differ)."""
        if self.user not in (None, user):
            raise InvalidInputError(
                f"this Buffer's RDMA memory last served {self.user} calls; call "
                f"clean_low_latency_buffer() (collective) before {user} calls")
        self.user = user

    def set_transport(self, transport: str) -> None:
        if transport not in TRANSPORTS:
            raise InvalidInputError(f"low-latency transport must be one of {TRANSPORTS}, got {transport!r}")
        if transport == "nvlink" and self.sym is not None and 0 in self.sym.peer_ptrs:
            raise InvalidInputError("transport='nvlink': some peers have no NVLink mapping here; "
                                    "use 'auto' or 'nvshmem'")
        self.transport = transport

    @property
    def _nvshmem_build(self) -> bool:
        """Kernels linked with NVSHMEM: forced puts, or a peer without an NVLink mapping."""
        return self.transport == "nvshmem" or (self.transport == "auto" and 0 in self.sym.peer_ptrs)

    # ------------------------------------------------------------------ #
    def _layout(self, m: int, hidden: int, num_experts: int) -> LowLatencyLayout:
        if self.sym is None:
            raise InvalidInputError("this Buffer has no low-latency memory: pass num_rdma_bytes="
                                    "cupyep.low_latency_size_hint(M, hidden, ranks, experts)")
        return check_low_latency_fits(self.num_rdma_bytes, m, hidden, self.be.num_ranks, num_experts)

    def _next_half(self):
        half = self.calls % 2
        self.calls += 1
        return half

    def _kernel(self, spec, num_args, shared_mem=0):
        """The loaded kernel (plans cache it: this runs once per shape)."""
        fn = self._kernels.get(spec)
        if fn is None:
            fn = self._kernels[spec] = PackedKernel(spec, num_args, shared_mem)
        return fn

    # ------------------------------------------------------------------ #
    def _dispatch_plan(self, key, m, hidden, num_experts, use_fp8, round_scale, use_ue8m0, idx_type):
        """The :class:`_Plan` of a dispatch of these shapes, kept under ``key``."""
        be, r = self.be, self.be.num_ranks
        lay = self._layout(m, hidden, num_experts)
        local, rows = num_experts // r, r * m
        # the combine that follows compiles while this dispatch's kernel does
        jit.prefetch([kernel_specs.low_latency_combine(hidden, False, idx_type, self._nvshmem_build, self.source)],
                     self.arch)
        fn = self._kernel(kernel_specs.low_latency_dispatch(hidden, use_fp8, round_scale, use_ue8m0, idx_type,
                                                            self._nvshmem_build, self.source), len(DISPATCH_PARAMS))
        scales = None
        if use_fp8:
            scales = ((local, rows, hidden // 512), np.int32) if use_ue8m0 else \
                ((local, rows, hidden // FP8_GROUP), np.float32)
        outputs = (((local, rows, hidden), np.uint8 if use_fp8 else bfloat16), scales, ((local,), np.int32),
                   ((local, rows), np.int32), ((local, r), np.int64), ((local, rows), np.int32))
        args = []
        for half in range(2):
            off = lay.offsets(half)
            per_call = dict.fromkeys(DISPATCH_PARAMS[_D_ARRAYS:_D_ARRAYS + 8], 0)
            args.append(arg_block(
                "low_latency.dispatch", x=0, topk_idx=0, num_tokens=0, num_topk=0, max_tokens=m,
                num_experts=num_experts, rank=be.rank, num_ranks=r, local_base=self.sym.ptr, peers=self._peers_ptr,
                force_put=self.transport == "nvshmem", off_flags=off["dispatch_flags"],
                off_area=off["dispatch_area"], off_send=off["send_area"], finish_count=self._finish_ptr,
                recv_done=self._recv_done_addr[half], **per_call, mask=self._mask_ptr, shrink=self.shrink,
                phases=0, err=be.err_ptr, timeout_ns=be.timeout_ns, call_tag=0))
        tag_base = ll_call_tag(0, False, use_fp8, hidden, 1, num_experts, m)
        plan = self._plans[key] = _Plan(fn, lay, args, tag_base, outputs, use_fp8)
        return plan

    def _outputs(self, plan: _Plan, key, stream):
        """(the call's outputs (None stays None), their addresses), from the
        caller's framework: a kept set once the caller dropped it
        (cupyep.arrays.output_sets), else new; while ``stream`` is captured,
        torch callers' from the graph's pool and CuPy callers' kept per
        ``key`` (cupyep.arrays.capture)."""
        fe = self.be.frontend
        sets = plan.sets.get(fe, plan)  # the plan itself: not looked up yet
        if sets is plan:
            sets = plan.sets[fe] = fe.output_sets(plan.specs, plan.fp8)
        if sets is not None:
            got = fe.take_outputs(sets, self.be.caller_stream)
            if got is not None:
                return got
        specs = plan.specs
        if fe.keeps_outputs_in_capture and is_capturing(stream):
            outs = [None if sp is None else self._kept.get(key + (i,), sp[0], sp[1], True, alloc=fe)
                    for i, sp in enumerate(specs)]
        elif fe.recycles_outputs:
            outs = fe.empty_many(specs, plan.fp8)
        else:
            outs = [None if sp is None else fe.empty(*sp) for sp in specs]
        return outs, tuple(address(a) for a in outs)

    def dispatch(self, x, topk_idx, m, num_experts, use_fp8, round_scale, use_ue8m0, async_finish,
                 return_recv_hook, cumulative_stats=None, wait_stats=None):
        be = self.be
        t, hidden = x.shape
        k = topk_idx.shape[1]
        if async_finish and return_recv_hook:
            raise InvalidInputError("async_finish and return_recv_hook cannot be combined")
        key = ("d", m, hidden, num_experts, use_fp8, round_scale or use_ue8m0, use_ue8m0, topk_idx.dtype,
               self.transport, self.source)
        plan = self._plans.get(key) or self._dispatch_plan(key, m, hidden, num_experts, use_fp8, round_scale,
                                                           use_ue8m0, index_type(topk_idx))
        if self.user != "low-latency":
            self.claim("low-latency")
        be.check_errors()
        stream, cur = be.streams.begin(be.caller_stream, None, async_finish)
        half = self._next_half()
        outs, addresses = self._outputs(plan, ("d", half, id(plan)), stream)
        args = plan.args[half]
        v = args.values
        _PACK4(v, 8 * _D_X, address(x), address(topk_idx), t, k)
        _PACK8(v, 8 * _D_ARRAYS, *addresses, 0 if cumulative_stats is None else address(cumulative_stats),
               0 if wait_stats is None else address(wait_stats))
        v[_D_SHRINK] = self.shrink
        _PACK2(v, 8 * _D_TIMEOUT, be.timeout_ns, with_call(plan.tag_base, be.seq, k))
        hook = self._send_then_receive(plan.fn, stream, return_recv_hook, args, _D_PHASES, outs)
        if stream is not cur:
            be.keep_for_stream(stream, cur, (x, topk_idx, *outs))
        recv_x, recv_s, recv_count, src_info, layout_range, recv_k = outs
        return LowLatencyDispatchOut(recv_x, recv_s, recv_count, src_info, layout_range,
                                     GpuLowLatencyState(recv_k, plan.layout, *addresses[3:]), self.calls,
                                     be.streams.end(stream, cur, async_finish, be.frontend.stream_ptr), hook)

    def _send_then_receive(self, fn, stream, return_recv_hook, args, phases, outputs):
        """Both halves in one launch, or the send half now and a hook for the
        other (with this call's arguments, whatever calls come in between).
        ``phases``: the index of the kernel's ``phases`` parameter. The hook
        holds ``outputs`` (what its half writes), so they are not handed out
        again before it has run, even if the caller drops them."""
        v = args.values
        smem = fn.shared_mem
        if not return_recv_hook:
            v[phases] = 3
            fn.launch_block(self.num_sms, _THREADS, args, stream.ptr, smem)
            return None
        v[phases] = 1
        fn.launch_block(self.num_sms, _THREADS, args, stream.ptr, smem)
        v[phases] = 2
        mine = bytes(v)

        def receive(s, outputs=outputs):
            ctypes.memmove(v, mine, len(mine))
            fn.launch_block(self.num_sms, _THREADS, args, s.ptr, smem)
        return self._hook(receive)

    def _hook(self, launch_recv):
        done = []
        frontend = self.be.frontend  # the caller's framework: its current stream at hook time

        def hook():
            """Launch the receive half on the caller's current stream (once)."""
            if done:
                raise CupyepError("this receive hook was already called")
            done.append(True)
            self.be.check_errors()
            launch_recv(frontend.stream())
        return hook

    def _combine_plan(self, key, lay, use_logfmt, idx_type):
        """The :class:`_Plan` of a combine on ``lay``, kept under ``key``."""
        be = self.be
        fn = self._kernel(kernel_specs.low_latency_combine(lay.hidden, use_logfmt, idx_type, self._nvshmem_build,
                                                           self.source), len(COMBINE_PARAMS),
                          _LOGFMT_SEND_SMEM if use_logfmt else 0)
        args = []
        for half in range(2):
            off = lay.offsets(half)
            args.append(arg_block(
                "low_latency.combine", x=0, src_info=0, recv_k=0, layout_range=0, topk_idx=0, topk_weights=0,
                num_tokens=0, num_topk=0, max_tokens=lay.max_tokens, num_experts=lay.num_experts, rank=be.rank,
                num_ranks=be.num_ranks, local_base=self.sym.ptr, peers=self._peers_ptr,
                force_put=self.transport == "nvshmem", zero_copy=0, off_flags=off["combine_flags"],
                off_area=off["combine_area"], off_send=off["send_area"],
                blocks_done=self._blocks_done_addr[half], pair_done=address(self._pair_done[half]), out=0,
                wait_stats=0, mask=self._mask_ptr, shrink=self.shrink, phases=0, err=be.err_ptr,
                timeout_ns=be.timeout_ns, call_tag=0))
        send_areas = [self.sym.ptr + lay.offsets(half)["send_area"] for half in range(2)]
        tag_base = ll_call_tag(0, True, use_logfmt, lay.hidden, 1, lay.num_experts, lay.max_tokens)
        # The output is made for M tokens and the call's T rows are a view of it: one
        # kind of output per layout, whatever T each decode step has (kept output
        # sets are per kind, cupyep.arrays.output_sets).
        out_specs = (((lay.max_tokens, lay.hidden), bfloat16),)
        plan = self._plans[key] = _Plan(fn, lay, args, tag_base, out_specs, send_areas=send_areas)
        return plan

    def combine(self, x, topk_idx, topk_weights, handle, out, async_finish, return_recv_hook,
                use_logfmt=False, wait_stats=None):
        if self.user != "low-latency":
            self.claim("low-latency")
        be = self.be
        st: GpuLowLatencyState = handle.state
        lay = st.layout
        t, k = topk_idx.shape
        if async_finish and return_recv_hook:
            raise InvalidInputError("async_finish and return_recv_hook cannot be combined")
        key = ("c", lay, use_logfmt, topk_idx.dtype, self.transport, self.source)
        plan = self._plans.get(key) or self._combine_plan(key, lay, use_logfmt, index_type(topk_idx))
        be.check_errors()
        stream, cur = be.streams.begin(be.caller_stream, None, async_finish)
        half = self._next_half()
        x_ptr = address(x)
        zero_copy = x_ptr == plan.send_areas[half]
        if not zero_copy and self.sym.ptr <= x_ptr < self.sym.ptr + self.num_rdma_bytes:
            self.calls -= 1  # nothing launched: the call sequence stays where it was
            raise InvalidInputError(
                "low_latency_combine: x is a view of the low-latency buffer, but not of the send "
                "area this call reads; take it from get_next_low_latency_combine_buffer() after the "
                "dispatch and before any other low-latency call")
        if out is None:
            (out,), (out_ptr,) = self._outputs(plan, ("c", half), stream)
            if t < lay.max_tokens:
                out = out[:t]
        else:
            out_ptr = address(out)
        args = plan.args[half]
        v = args.values
        _PACK8(v, 8 * _C_X, x_ptr, st.src_info_ptr, st.recv_k_ptr, st.layout_range_ptr,
               address(topk_idx), address(topk_weights), t, k)
        v[_C_ZERO_COPY] = zero_copy
        _PACK2(v, 8 * _C_OUT, out_ptr, 0 if wait_stats is None else address(wait_stats))
        v[_C_SHRINK] = self.shrink
        _PACK2(v, 8 * _C_TIMEOUT, be.timeout_ns, with_call(plan.tag_base, be.seq, k))
        hook = self._send_then_receive(plan.fn, stream, return_recv_hook, args, _C_PHASES, out)
        if stream is not cur:
            be.keep_for_stream(stream, cur, (x, topk_idx, topk_weights, out))
        return LowLatencyCombineOut(out, be.streams.end(stream, cur, async_finish, be.frontend.stream_ptr), hook)

    def next_combine_buffer(self, handle):
        """[L, R*M, H] bf16 view of the send area the next call (a combine)
        reads in place: one array per layout and half, made once."""
        lay: LowLatencyLayout = handle.state.layout
        key = (lay, self.calls % 2)
        view = self._send_views.get(key)
        if view is None:
            import cupy
            local = lay.num_experts // self.be.num_ranks
            shape = (local, self.be.num_ranks * lay.max_tokens, lay.hidden)
            ptr = self.sym.ptr + lay.offsets(key[1])["send_area"]
            mem = cupy.cuda.UnownedMemory(ptr, int(np.prod(shape)) * 2, self.sym)
            view = self._send_views[key] = cupy.ndarray(shape, bfloat16, cupy.cuda.MemoryPointer(mem, 0))
        return view

    def clean(self, stream, blocking: bool = False):
        """Zero flags and counters (collective), ordered on ``stream``: a
        barrier of the ranks, the zeroing, a second barrier. No host wait and
        no host collective, so it can be captured in a CUDA graph.

        ``blocking``: instead, wait for this device and the other ranks (host
        collective) and zero the barrier counts too. A rank that missed a
        clean is behind in those counts, so after a clean timed out only this
        brings the ranks back in step."""
        from cupy.cuda import runtime
        if blocking:
            self.be.rt.sync_barrier()
            for a in (self.sym, self._slots):
                if a is not None:
                    runtime.memset(a.ptr, 0, a.nbytes)
            for a in (self._finish, self._blocks_done, self._pair_done, self._recv_done, self._barrier_seq):
                a.fill(0)
            self.be.rt.sync_barrier()
        else:
            if self.sym is not None:
                self._barrier(stream)
                runtime.memsetAsync(self.sym.ptr, 0, self.num_rdma_bytes, stream.ptr)
            for a in (self._finish, self._blocks_done, self._pair_done, self._recv_done):
                runtime.memsetAsync(a.data.ptr, 0, a.nbytes, stream.ptr)
            if self.sym is not None:
                self._barrier(stream)
        self.calls = 0
        self.user = None

    def _barrier(self, stream):
        be = self.be
        fn = self._kernel(kernel_specs.low_latency_barrier(self._nvshmem_build, self.source),
                          len(PARAMS["low_latency.barrier"]))
        fn.launch_block(1, MAX_RANKS, arg_block(
            "low_latency.barrier", slots=self._slots.ptr, peers=self._slots.peers.data.ptr,
            force_put=self.transport == "nvshmem", rank=be.rank, num_ranks=be.num_ranks,
            seq=self._barrier_seq.data.ptr, mask=self._mask_ptr, shrink=self.shrink, err=be.err_ptr,
            timeout_ns=be.timeout_ns), stream.ptr)

    # ---- rank masking: each ordered on the caller's stream -------------- #
    def update_mask(self, rank: int, masked: bool, stream):
        """Calls launched after this on ``stream`` see the new entry."""
        from cupy.cuda import runtime
        entry = self._mask_ptr + 4 * rank
        if masked:
            runtime.memcpyAsync(entry, self._one.data.ptr, 4, runtime.memcpyDeviceToDevice, stream.ptr)
        else:
            runtime.memsetAsync(entry, 0, 4, stream.ptr)

    def query_mask(self):
        """Host copy, after this device's queued calls (which may set entries)."""
        import cupy
        cupy.cuda.Device().synchronize()
        return cupy.asnumpy(self.mask)

    def copy_mask(self, dst_ptr: int, stream):
        """The mask into [R] int32 device memory at ``dst_ptr``, after the calls queued on ``stream``."""
        from cupy.cuda import runtime
        runtime.memcpyAsync(dst_ptr, self._mask_ptr, self.mask.nbytes, runtime.memcpyDeviceToDevice, stream.ptr)

    def clean_mask(self, stream):
        from cupy.cuda import runtime
        runtime.memsetAsync(self._mask_ptr, 0, self.mask.nbytes, stream.ptr)

    def destroy(self):
        for name in ("sym", "_slots"):
            if getattr(self, name) is not None:
                self.be.rt.free(getattr(self, name))
                setattr(self, name, None)
