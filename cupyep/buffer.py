"""The user-facing communication buffer.

``Buffer`` validates arguments, meets the caller's framework through a
frontend (:mod:`cupyep.arrays.interop`: its current stream, its allocator, NumPy
views for the reference backend), runs the backend and hands results back in
that framework: torch in, torch out.
"""
from __future__ import annotations

import itertools
import weakref
from typing import Optional

import numpy as np

from cupyep import validation
from cupyep.arrays import interop
from cupyep.comm.group import Group, gpu_available, require_gpu
from cupyep.config import Config
from cupyep.errors import InvalidInputError
from cupyep.layouts.low_latency import LL_MAX_TOPK
from cupyep.layouts.sizing import MAX_NVL_RANKS, MAX_RANKS
from cupyep.types import (CombineResult, DispatchHandle, DispatchLayout, DispatchResult,
                          LowLatencyCombineResult, LowLatencyDispatchResult, LowLatencyHandle)

_buffer_ids = itertools.count(1)
_no_torch_modes = interop.outside_torch_function_modes  # on every call that takes arrays
_STATS_DTYPES = {"int32": np.dtype(np.int32), "int64": np.dtype(np.int64)}


def check_rank_limits(num_ranks: int, ranks_per_node: int) -> None:
    """The kernels' rank limits (cupyep.layouts.sizing), on both backends."""
    if num_ranks > MAX_RANKS:
        raise InvalidInputError(f"at most {MAX_RANKS} ranks take part in one Buffer, got {num_ranks}")
    if ranks_per_node > MAX_NVL_RANKS:
        raise InvalidInputError(
            f"at most {MAX_NVL_RANKS} ranks in one NVLink domain (the intranode kernels give each a lane of a "
            f"warp), got {ranks_per_node}: pass Group(num_ranks_per_node=...) to split them into nodes")


def _weak(a):
    """A weak reference to ``a``, or None where its type takes none."""
    try:
        return weakref.ref(a)
    except TypeError:
        return None


def _check_layout(layout: DispatchLayout, topk_idx, num_experts) -> None:
    """What can be checked of a layout without device work: its expert count,
    and the topk_idx it was computed from (while that array is alive)."""
    if not isinstance(layout, DispatchLayout):
        raise InvalidInputError(f"layout must be a DispatchLayout (from get_dispatch_layout), got "
                                f"{type(layout).__name__}")
    if num_experts is not None and num_experts != layout.num_experts:
        raise InvalidInputError(f"num_experts={num_experts}, but the layout was computed for "
                                f"{layout.num_experts} experts")
    n = tuple(layout.num_tokens_per_expert.shape)
    if n != (layout.num_experts,):
        raise InvalidInputError(f"layout.num_tokens_per_expert has shape {n}, expected ({layout.num_experts},)")
    source = layout.source() if layout.source is not None else None
    if source is not None and source is not topk_idx:
        raise InvalidInputError(
            "the layout was computed from another topk_idx array (still alive) than the one given: compute "
            "it from this topk_idx, or pass num_experts= instead of layout= to compute it in the call")


class Buffer:
    """Expert-parallel dispatch and combine over a :class:`Group`.

    Args:
        group: the ranks taking part (a :class:`Group` or an mpi4py
            communicator).
        num_nvl_bytes: symmetric bytes for normal kernels over NVLink.
        num_rdma_bytes: symmetric bytes for inter-node and low-latency kernels.
        low_latency_mode: reserve the low-latency layout in ``num_rdma_bytes``.
        backend: 'gpu', 'reference' or 'auto' (GPU when one is usable).
        enable_shrink: a low-latency wait that times out masks the late rank
            (see :meth:`low_latency_query_mask_buffer`) and the call goes on
            without it, instead of raising CommTimeoutError.
        max_nodes_per_token: group-limited routing: each token's experts
            must lie on at most this many nodes (None: no limit). A dispatch
            whose layout breaks it raises InvalidInputError on every rank.
        warmup: compile this buffer's kernels now instead of at first use,
            e.g. ``dict(hidden=7168, num_topk=8)`` (more keys: those of
            :func:`cupyep.warmup.warmup`; ranks and nodes are the group's).
            GPU backend only; the ranks of a host share the compiles.

    Across nodes (``group.num_nodes > 1``) normal kernels also use
    ``num_rdma_bytes`` (:func:`cupyep.rdma_size_hint`), the memory
    low-latency calls use: call :meth:`clean_low_latency_buffer` when
    switching between the two kinds of call.
    """

    def __init__(self, group=None, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, backend: str = "auto", enable_shrink: bool = False,
                 max_nodes_per_token: Optional[int] = None, warmup: Optional[dict] = None):
        self.group = group if isinstance(group, Group) else Group(group)
        check_rank_limits(self.group.size, self.group.num_ranks_per_node)
        if max_nodes_per_token is not None and not 1 <= int(max_nodes_per_token) <= self.group.num_nodes:
            raise InvalidInputError(f"max_nodes_per_token must be in [1, {self.group.num_nodes}] "
                                    f"(the number of nodes), got {max_nodes_per_token}")
        self.max_nodes_per_token = max_nodes_per_token
        self.buffer_id = next(_buffer_ids)
        if backend == "auto":
            backend = "gpu" if gpu_available() else "reference"
        if backend == "gpu":
            require_gpu()
            from cupyep.backends.gpu.backend import GpuBackend
            self._impl = GpuBackend(self.group, num_nvl_bytes, num_rdma_bytes, low_latency_mode,
                                    enable_shrink, max_nodes_per_token or 0)
            device_id = self._impl.rt.device_id
            self._make_frontend = lambda fw: interop.device_frontend(fw, device_id)  # noqa: E731
        elif backend == "reference":
            from cupyep.backends.reference.backend import ReferenceBackend
            self._impl = ReferenceBackend(self.group, max_nodes_per_token or 0, num_nvl_bytes, num_rdma_bytes)
            self._make_frontend = interop.HostFrontend
        else:
            raise InvalidInputError(f"backend must be 'auto', 'gpu' or 'reference', got {backend!r}")
        self.backend = backend
        if warmup and backend == "gpu":
            self._warmup(dict(warmup))
        self._frontends = {}  # framework name -> frontend
        self._combine_buffers = {}  # get_next_low_latency_combine_buffer: (backend's view, caller's)
        self._destroyed = False

    # ------------------------------------------------------------------ #
    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def num_ranks(self) -> int:
        return self.group.size

    @property
    def device_id(self) -> Optional[int]:
        """The CUDA device this buffer's kernels run on (None on the reference
        backend). torch users: ``torch.cuda.set_device(buf.device_id)``."""
        return self._impl.rt.device_id if self.backend == "gpu" else None

    def _check_alive(self):
        self.group.check_alive()
        if self._destroyed:
            from cupyep.errors import GroupDestroyedError
            raise GroupDestroyedError("this cupyep Buffer was destroyed")

    def _frontend(self, a, framework: Optional[str] = None):
        """The frontend of ``a``'s framework (or ``framework``'s), made the
        backend's for the call that starts."""
        fw = framework or interop.framework_of(a)
        fe = self._frontends.get(fw)
        if fe is None:
            fe = self._frontends[fw] = self._make_frontend(fw)
        if self.backend == "gpu":
            self._impl.enter_call(fe)
        return fe

    def _native(self, a, name: str, fe=None):
        if a is None:
            return None
        try:
            return (fe or self._frontend(a)).native(a)
        except InvalidInputError as e:
            raise InvalidInputError(f"{name}: {e}") from None

    def _split_x(self, x):
        """x or (x_fp8, scales) -> (data, scales or None, frontend)."""
        if isinstance(x, (tuple, list)):
            if len(x) != 2 or not all(hasattr(a, "shape") and hasattr(a, "dtype") for a in x):
                raise InvalidInputError(
                    f"x must be an array [T, H] bf16, or an FP8 pair of arrays (e4m3 [T, H], fp32 scales "
                    f"[T, H/128]); got a {type(x).__name__} of {len(x)} "
                    f"{type(x[0]).__name__ if len(x) else 'item'}s")
            fe = self._frontend(x[0])
            q, s = self._native(x[0], "x[0]", fe), self._native(x[1], "x[1]", fe)
            validation.check_fp8_pair(q, s)
            return q, s, fe
        fe = self._frontend(x)
        data = self._native(x, "x", fe)
        validation.check_bf16_rows(data)
        return data, None, fe

    def _warmup(self, options: dict) -> None:
        import os

        from cupyep.warmup import warmup
        g = self.group
        options.setdefault("jobs", max(1, (os.cpu_count() or 1) // g.local_size))
        options.setdefault("progress", None)
        warmup(num_ranks=g.size, ranks_per_node=g.num_ranks_per_node if g.num_nodes > 1 else None,
               nvshmem_low_latency=g.num_nodes > 1, **options)

    # ------------------------------------------------------------------ #
    @_no_torch_modes
    def get_dispatch_layout(self, topk_idx, num_experts: int) -> DispatchLayout:
        """Count tokens per rank, node and expert.

        Args:
            topk_idx: [T, K] int64 (or int32) expert ids, -1 for unused slots.
            num_experts: E, a multiple of the number of ranks.

        Returns:
            :class:`DispatchLayout` in the caller's framework.
        """
        self._check_alive()
        fe = self._frontend(topk_idx)
        idx = self._native(topk_idx, "topk_idx", fe)
        validation.check_topk(idx, None, idx.shape[0])
        validation.check_num_experts(num_experts, self.num_ranks)
        lay = self._impl.get_dispatch_layout(idx, num_experts)
        back = fe.back
        return DispatchLayout(back(lay.num_tokens_per_rank), back(lay.num_tokens_per_node),
                              back(lay.num_tokens_per_expert), back(lay.is_token_in_rank),
                              lay.num_experts, _weak(topk_idx))

    @_no_torch_modes
    def dispatch(self, x, topk_idx=None, topk_weights=None, *, layout: Optional[DispatchLayout] = None,
                 is_token_in_rank=None, num_experts: Optional[int] = None,
                 handle: Optional[DispatchHandle] = None, expert_alignment: int = 1,
                 num_worst_tokens: int = 0, config: Optional[Config] = None,
                 previous_event=None, async_finish: bool = False) -> DispatchResult:
        """Send each token to every rank that holds one of its experts.

        Args:
            x: [T, H] bf16, or a pair (e4m3 [T, H], fp32 scales [T, H/128]).
            topk_idx: [T, K] int64 global expert ids (-1 unused), optional.
            topk_weights: [T, K] fp32, optional.
            layout: from :meth:`get_dispatch_layout` (else it is computed
                from ``topk_idx`` and ``num_experts``).
            is_token_in_rank: [T, R] bool, for a top-k-less row all-to-all.
            handle: reuse the routing of an earlier dispatch (cached
                dispatch); then only ``x`` is sent.
            expert_alignment: pad each per-expert count to this multiple.
            num_worst_tokens: fixed output rows; no host synchronisation.
            config: :class:`Config` (SMs, warps, chunking).
            previous_event: an event to wait on before starting.
            async_finish: return an event instead of ordering on the
                caller's stream. With either, the call runs on the
                communication stream; without, on the caller's stream.

        Returns:
            :class:`DispatchResult` in the caller's framework.
        """
        self._check_alive()
        self._impl.next_call()  # counted even if it raises before communicating
        data, scales, fe = self._split_x(x)
        num_tokens, hidden = data.shape
        if expert_alignment < 1:
            raise InvalidInputError(f"expert_alignment must be >= 1, got {expert_alignment}")
        if num_worst_tokens < 0:
            raise InvalidInputError(f"num_worst_tokens must be >= 0, got {num_worst_tokens}")
        if handle is not None:
            return self._cached_dispatch(handle, data, scales, fe, config, previous_event, async_finish)

        idx = self._native(topk_idx, "topk_idx", fe)
        w = self._native(topk_weights, "topk_weights", fe)
        if w is not None and idx is None:
            raise InvalidInputError("topk_weights needs topk_idx")
        if idx is not None:
            validation.check_topk(idx, w, num_tokens)
            if layout is None:
                if num_experts is None:
                    raise InvalidInputError("dispatch with topk_idx needs layout= or num_experts=")
                validation.check_num_experts(num_experts, self.num_ranks)
                lay = self._impl.get_dispatch_layout(idx, num_experts)
            else:
                lay = layout
                _check_layout(layout, topk_idx, num_experts)
            num_experts = lay.num_experts
            in_rank = self._native(lay.is_token_in_rank, "layout.is_token_in_rank", fe)
            per_expert = self._native(lay.num_tokens_per_expert, "layout.num_tokens_per_expert", fe)
        else:
            if is_token_in_rank is None and layout is None:
                raise InvalidInputError("dispatch needs topk_idx, layout, is_token_in_rank or handle")
            per_expert = None
            in_rank = self._native(is_token_in_rank if is_token_in_rank is not None
                                   else layout.is_token_in_rank, "is_token_in_rank", fe)
        validation.check_is_token_in_rank(in_rank, num_tokens, self.num_ranks)

        out = self._impl.dispatch(data, scales, idx, w, in_rank, per_expert, num_experts, expert_alignment,
                                  num_worst_tokens, config, previous_event, async_finish,
                                  layout_in_call=idx is not None and layout is None)
        h = DispatchHandle(self.buffer_id, num_tokens, hidden, out.num_recv_tokens,
                           num_worst_tokens, 0 if idx is None else idx.shape[1], in_rank,
                           out.recv_src_idx, out.routing)
        counts = out.num_recv_tokens_per_expert
        if num_worst_tokens and counts is not None:
            counts = fe.back(counts)
        back = fe.back
        return DispatchResult(back(out.recv_x, fp8=scales is not None), back(out.recv_x_scales),
                              back(out.recv_topk_idx), back(out.recv_topk_weights), counts, h, out.event)

    def _cached_dispatch(self, handle, data, scales, fe, config, previous_event, async_finish):
        validation.check_handle(handle, DispatchHandle, self.buffer_id)
        if data.shape != (handle.num_tokens, handle.hidden):
            raise InvalidInputError(
                f"cached dispatch: x has shape {tuple(data.shape)}, the handle expects "
                f"{(handle.num_tokens, handle.hidden)}")
        out = self._impl.cached_dispatch(handle, data, scales, config, previous_event, async_finish)
        return DispatchResult(fe.back(out.recv_x, fp8=scales is not None), fe.back(out.recv_x_scales),
                              None, None, None, handle, out.event)

    @_no_torch_modes
    def combine(self, x, handle: DispatchHandle, topk_weights=None, bias=None, *,
                config: Optional[Config] = None, previous_event=None,
                async_finish: bool = False) -> CombineResult:
        """Send rows back to their origin and sum them there.

        Args:
            x: [N, H] bf16 aligned with the rows dispatch returned (N may be
                num_worst_tokens in worst-token mode).
            handle: the :class:`DispatchHandle` of that dispatch.
            topk_weights: [N, K] fp32 to sum back, optional.
            bias: None, one [T, H] bf16 array, or a pair of them.

        Returns:
            :class:`CombineResult` in the caller's framework.
        """
        self._check_alive()
        self._impl.next_call()  # counted even if it raises before communicating
        validation.check_handle(handle, DispatchHandle, self.buffer_id)
        fe = self._frontend(x)
        data = self._native(x, "x", fe)
        w = self._native(topk_weights, "topk_weights", fe)
        validation.check_normal_combine(data, w, handle.num_worst_tokens or handle.num_recv_tokens, handle.hidden,
                                        handle.num_topk)
        if bias is None:
            biases = ()
        elif isinstance(bias, (tuple, list)):
            biases = tuple(self._native(b, "bias", fe) for b in bias if b is not None)
        else:
            biases = (self._native(bias, "bias", fe),)
        if len(biases) > 2:
            raise InvalidInputError("combine takes at most two bias arrays")
        if biases:
            validation.check_bias(biases, handle.num_tokens, handle.hidden)
        out = self._impl.combine(handle, data, w, biases, config, previous_event, async_finish)
        return CombineResult(fe.back(out.combined_x), fe.back(out.combined_topk_weights), out.event)

    # ------------------------------------------------------------------ #
    @_no_torch_modes
    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, *, use_fp8: bool = True, round_scale: bool = False,
                             use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False,
                             cumulative_local_expert_recv_stats=None,
                             dispatch_wait_recv_cost_stats=None) -> LowLatencyDispatchResult:
        """Decode-time dispatch: one message per (token, expert), fixed shapes.

        Args:
            x: [T, H] bf16, T <= num_max_dispatch_tokens_per_rank (M).
            topk_idx: [T, K] int64 (or int32) global expert ids, -1 unused, K <= 16.
            num_max_dispatch_tokens_per_rank: M, the same on every rank and call.
            num_experts: E.
            use_fp8: cast to e4m3 with per-128 scales inside the kernel.
            round_scale: power-of-two scales; use_ue8m0: pack them as UE8M0.
            async_finish: run on the communication stream and return an event.
            return_recv_hook: launch only the send half; the result's
                ``hook`` launches the receive half.
            cumulative_local_expert_recv_stats: [L] int32, optional; each
                call adds the rows each local expert received.
            dispatch_wait_recv_cost_stats: [R] int64, optional (GPU); each
                call adds the nanoseconds spent waiting for each source rank.

        Returns:
            :class:`LowLatencyDispatchResult` in the caller's framework. torch
            callers may get tensors an earlier call returned, once every tensor
            of that call (and every view of them) has been dropped: the memory
            torch's allocator would hand out again (:mod:`cupyep.arrays.output_sets`;
            :meth:`drop_kept_outputs`).
        """
        self._check_alive()
        self._impl.next_call()  # counted even if it raises before communicating
        fe = self._frontend(x)
        data = self._native(x, "x", fe)
        idx = self._native(topk_idx, "topk_idx", fe)
        m, num_ranks = num_max_dispatch_tokens_per_rank, self.group.size
        t, hidden, k = validation.check_low_latency_dispatch(data, idx, m, num_experts, num_ranks, use_fp8,
                                                             use_ue8m0, LL_MAX_TOPK)
        stats = waits = None
        if cumulative_local_expert_recv_stats is not None:
            stats = self._stats(cumulative_local_expert_recv_stats, "cumulative_local_expert_recv_stats",
                                "int32", num_experts // num_ranks, fe)
        if dispatch_wait_recv_cost_stats is not None:
            waits = self._stats(dispatch_wait_recv_cost_stats, "dispatch_wait_recv_cost_stats", "int64",
                                num_ranks, fe)
        out = self._impl.low_latency_dispatch(data, idx, m, num_experts, use_fp8, round_scale, use_ue8m0,
                                              async_finish, return_recv_hook, stats, waits)
        h = LowLatencyHandle(self.buffer_id, out.call_id, m, hidden, num_experts, t, k, out.src_info,
                             out.layout_range, out.routing, fe.name)
        recv_x, scales, count = out.recv_x, out.recv_x_scales, out.recv_count
        if not fe.recycles_outputs:  # recycled ones come as they are (torch: e4m3 as float8_e4m3fn)
            back = fe.back
            recv_x, scales, count = back(recv_x, fp8=use_fp8), back(scales), back(count)
        return LowLatencyDispatchResult(recv_x, scales, count, h, out.event, out.hook)

    def _stats(self, a, name, dtype, length, fe):
        """An optional statistics array, updated in place (so no copy is allowed)."""
        if a is None:
            return None
        native = self._native(a, name, fe)
        # dtype objects compared, not their names: numpy's dtype.name is a Python-level property
        if interop.dtype_of(native) != _STATS_DTYPES[dtype] or tuple(native.shape) != (length,):
            raise InvalidInputError(f"{name} must be {dtype} [{length}], got {native.dtype} "
                                    f"{tuple(native.shape)}")
        validation.check_contiguous(native, name)
        return native

    @_no_torch_modes
    def low_latency_combine(self, x, topk_idx, topk_weights, handle: LowLatencyHandle, *,
                            out=None, async_finish: bool = False, return_recv_hook: bool = False,
                            use_logfmt: bool = False,
                            combine_wait_recv_cost_stats=None) -> LowLatencyCombineResult:
        """Decode-time combine: weighted sum in top-k order.

        Args:
            x: [L, R*M, H] bf16 expert outputs in the dispatched layout (it may
                be :meth:`get_next_low_latency_combine_buffer`, then nothing is
                copied before sending).
            topk_idx: [T, K] int64 and topk_weights: [T, K] fp32, those of
                the dispatch that made ``handle``.
            handle: the :class:`LowLatencyHandle`.
            out: optional [T, H] bf16 array for the result.
            use_logfmt: send the rows LogFMT-10 encoded (:mod:`cupyep.formats.logfmt`,
                88 bytes per 64 channels instead of 128; lossy, hidden
                divisible by 256).
            combine_wait_recv_cost_stats: [R] int64, optional (GPU); each call
                adds the nanoseconds its receive half waited for each rank's rows.

        Returns:
            :class:`LowLatencyCombineResult` in the caller's framework
            (torch: its tensor recycled as in :meth:`low_latency_dispatch`).
        """
        self._check_alive()
        self._impl.next_call()  # counted even if it raises before communicating
        validation.check_handle(handle, LowLatencyHandle, self.buffer_id)
        fe = self._frontend(x)
        data = self._native(x, "x", fe)
        idx = self._native(topk_idx, "topk_idx", fe)
        w = self._native(topk_weights, "topk_weights", fe)
        validation.check_low_latency_combine(data, idx, w, handle.combine_x_shape(self.group.size),
                                             handle.num_tokens, handle.num_topk)
        out_native = None
        if out is not None:
            out_native = self._native(out, "out", fe)
            validation.check_bf16_rows(out_native, "out", rows=handle.num_tokens)
            if out_native.shape[1] != handle.hidden:
                raise InvalidInputError(f"out must be [{handle.num_tokens}, {handle.hidden}], "
                                        f"got {tuple(out_native.shape)}")
        if use_logfmt and handle.hidden % 256:
            raise InvalidInputError(f"use_logfmt needs a hidden size divisible by 256, got {handle.hidden}")
        waits = None
        if combine_wait_recv_cost_stats is not None:
            waits = self._stats(combine_wait_recv_cost_stats, "combine_wait_recv_cost_stats", "int64",
                                self.num_ranks, fe)
        res = self._impl.low_latency_combine(data, idx, w, handle, out_native, async_finish,
                                             return_recv_hook, bool(use_logfmt), waits)
        combined = out if out is not None else res.combined_x if fe.recycles_outputs else fe.back(res.combined_x)
        return LowLatencyCombineResult(combined, res.event, res.hook)

    @_no_torch_modes
    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle):
        """[L, R*M, H] bf16 array that the next low-latency call reads in place.

        Write expert outputs here and pass it as ``x`` to the combine that
        follows ``handle``'s dispatch: nothing is copied before sending.
        Returned in the framework of that dispatch's inputs.
        """
        self._check_alive()
        validation.check_handle(handle, LowLatencyHandle, self.buffer_id)
        fe = self._frontend(None, handle.framework)
        view = self._impl.next_low_latency_combine_buffer(handle)
        if self.backend != "gpu":
            return fe.back(view)
        key = (id(view), fe.name)  # the GPU backend's view of a layout and half lives as long as the buffer
        found = self._combine_buffers.get(key)
        if found is None:
            found = self._combine_buffers[key] = (view, fe.back(view))
        return found[1]

    def clean_low_latency_buffer(self, *, blocking: bool = False, framework: Optional[str] = None) -> None:
        """Reset low-latency flags and counters (collective; after a timeout, or
        to restart the call sequence). The mask is kept.

        On the GPU it is ordered on the current stream of ``framework``
        ('torch' or 'cupy'; default: the framework of this buffer's last
        call): a barrier of the ranks, the zeroing, a second barrier. No host wait, so it can be captured in a CUDA
        graph. A rank that does not reach the barrier within
        ``CUPYEP_TIMEOUT_S`` is masked (``enable_shrink``) or named by a
        CommTimeoutError at the next call; it is then behind the others'
        count of barriers, so the recovery is ``blocking=True``: a host wait
        for the device and a host collective, which also zero the counts.
        """
        self._check_alive()
        self._enter_array_free_call(framework)
        self._impl.next_call()  # counted even if it raises before communicating
        self._impl.clean_low_latency_buffer(bool(blocking))

    def reset(self) -> None:
        """Bring every rank back in step after a failed call (collective, with
        a host wait): after CallMismatchError or CommTimeoutError from any
        call, or a rank that skipped one. GPU: waits for this device and the
        other ranks, then zeroes every flag, counter, call tag and call
        sequence of the buffer (NVLink and RDMA memory; the rank mask is
        kept). Reference: every rank continues from the highest call number
        reached. Not for use inside a CUDA graph."""
        self._check_alive()
        self._impl.reset()

    def check_errors(self) -> None:
        """Raise what this buffer's kernels reported (a timeout, a peer at
        another call, a dropped bad expert id, too many rows), after this
        device's queued work; GPU calls otherwise raise it at this rank's next
        call. The reference backend raises in the call itself: nothing here."""
        self._check_alive()
        if self.backend == "gpu":
            import cupy
            cupy.cuda.Device(self._impl.rt.device_id).synchronize()
            self._impl.check_errors()

    def _enter_array_free_call(self, framework: Optional[str]):
        """Calls that take no arrays run on the current stream of ``framework``
        ('torch', 'cupy'; default: that of this buffer's last call, CuPy's
        before any)."""
        if self.backend == "gpu":
            self._frontend(None, framework or self._impl.frontend.name)

    # ---- rank masking (low-latency calls) ------------------------------ #
    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False, *,
                                       framework: Optional[str] = None) -> None:
        """Leave ``rank_to_mask`` out of later low-latency calls (``mask=True``)
        or take it back in (``False``). Local to this rank, ordered on the
        caller's stream (see :meth:`clean_low_latency_buffer`).

        A masked rank's experts receive nothing and add nothing to combine;
        rows it sends are ignored. A rank that masks itself sends and waits
        for nothing (its results are empty). Ranks should agree on the mask.
        """
        self._check_alive()
        if not 0 <= int(rank_to_mask) < self.num_ranks:
            raise InvalidInputError(f"rank_to_mask must be in [0, {self.num_ranks}), got {rank_to_mask}")
        self._enter_array_free_call(framework)
        self._impl.update_mask(int(rank_to_mask), bool(mask))

    @_no_torch_modes
    def low_latency_query_mask_buffer(self, mask_status=None):
        """The mask, [R] int32, 1 = left out (``enable_shrink`` masks a rank
        whose wait timed out).

        With ``mask_status`` ([R] int32 of the backend's kind) the mask is
        copied into it, ordered on its framework's current stream after the
        calls queued there (no host wait; capturable), and it is returned.
        Without, a NumPy copy is returned after this device's queued calls.
        """
        self._check_alive()
        if mask_status is None:
            return self._impl.query_mask()
        fe = self._frontend(mask_status)
        native = self._native(mask_status, "mask_status", fe)
        if interop.dtype_of(native).name != "int32" or tuple(native.shape) != (self.num_ranks,):
            raise InvalidInputError(f"mask_status must be int32 [{self.num_ranks}], got "
                                    f"{native.dtype} {tuple(native.shape)}")
        validation.check_contiguous(native, "mask_status")
        self._impl.copy_mask(native)
        return mask_status

    def low_latency_clean_mask_buffer(self, *, framework: Optional[str] = None) -> None:
        """Take every rank back in (local, ordered like the update). Pair it
        with :meth:`clean_low_latency_buffer` (collective) after a rank recovers."""
        self._check_alive()
        self._enter_array_free_call(framework)
        self._impl.clean_mask()

    def set_low_latency_transport(self, transport: str) -> None:
        """'auto' (NVLink stores where peers are mapped, NVSHMEM puts elsewhere),
        'nvlink', or 'nvshmem' (puts to every peer, also on one host)."""
        self._check_alive()
        self._impl.set_low_latency_transport(transport)

    # ------------------------------------------------------------------ #
    def drop_kept_outputs(self) -> None:
        """Let go of the output sets kept for reuse (torch callers' low-latency
        outputs, see :mod:`cupyep.arrays.output_sets`): their memory returns to
        torch's allocator once the caller drops them. Local, no launch."""
        for fe in self._frontends.values():
            drop = getattr(fe, "drop_kept_outputs", None)
            if drop is not None:
                drop()

    def destroy(self):
        """Release the buffer's symmetric memory (collective)."""
        if not self._destroyed:
            self._destroyed = True
            self.drop_kept_outputs()
            self._combine_buffers.clear()
            self._impl.destroy()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.destroy()
        return False
