"""DeepEP V1's Python API over cupyep, for torch code: switch by changing an import.

    import cupyep.deep_ep as deep_ep        # instead of: import deep_ep
    buffer = deep_ep.Buffer(group, num_nvl_bytes, num_rdma_bytes)

``Buffer``, ``Config`` and ``EventOverlap`` take DeepEP's constructor
arguments and method signatures and return what DeepEP returns, as torch
tensors. Handles are tuples in DeepEP's order (:class:`Handle`, carrying
cupyep's own handle). Differences (README, "DeepEP compatibility"):
``Config`` keeps only the SM count (chunk sizes belong to DeepEP's ring
buffers, which cupyep does not use); a group spanning several nodes runs
cupyep's inter-node kernels (not yet tested through this facade);
low-latency receive tensors follow cupyep's contract (rows ordered by source
rank and token).
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from cupyep import config as _config
from cupyep.arrays import interop as _interop
from cupyep.buffer import Buffer as _Buffer
from cupyep.comm.group import Group
from cupyep.errors import InvalidInputError
from cupyep.events import EventOverlap as _EventOverlap
from cupyep.layouts.low_latency import low_latency_size_hint
from cupyep.types import DispatchLayout

# torch function modes off in the calls that take tensors: the facade's own torch ops and cupyep's
_no_torch_modes = _interop.outside_torch_function_modes

try:
    import torch as _torch
    topk_idx_t = _torch.int64
except ImportError:  # the facade is for torch users; the rest of cupyep is not
    _torch = None
    topk_idx_t = None


class EventOverlap(_EventOverlap):
    """DeepEP's event wrapper: ``current_stream_wait()`` and ``with``; the event
    is None for a synchronous call. ``extra_tensors`` as in DeepEP."""

    def __init__(self, event=None, extra_tensors: Optional[Tuple] = None, stream_ptr=None):
        super().__init__(event, stream_ptr or _torch_stream_ptr)
        self.extra_tensors = extra_tensors


def _torch_stream_ptr() -> int:
    """torch's current stream on the current device (raw handle)."""
    return _torch._C._cuda_getCurrentRawStream(_torch.cuda.current_device())


_NO_EVENT = EventOverlap()  # see _event


def _event(result_event) -> EventOverlap:
    """A cupyep result's event (an EventOverlap or None) as DeepEP's. Calls
    ordered on the caller's stream share one without an event (waiting on it
    does nothing): made once, not on every decode step."""
    if result_event is None:
        return _NO_EVENT
    return EventOverlap(result_event.event, stream_ptr=result_event._stream_ptr)


class Handle(tuple):
    """A DeepEP handle: a tuple of DeepEP's elements in DeepEP's order (user
    code indexes it, e.g. ``handle[0]``), carrying cupyep's own handle.

    Intranode dispatch: (rank_prefix_matrix [R, R] int32, channel_prefix_matrix
    [R, C] int32, recv_channel_prefix_matrix [R, C] int32, recv_src_idx [N]
    int32, is_token_in_rank [T, R] bool, send_head [T, R] int32), C = num_sms/2
    channels of the dispatch's config. Low latency: (src_info [L, R*M] int32,
    layout_range [L, R] int64, M, hidden, num_experts).
    """

    def __new__(cls, items, native, buffer_id: int):
        h = super().__new__(cls, items)
        h.cupyep_handle, h.buffer_id = native, buffer_id
        return h


class Config:
    """DeepEP's ``Config``. Only ``num_sms`` reaches cupyep's kernels."""

    def __init__(self, num_sms: int = 20, num_max_nvl_chunked_send_tokens: int = 6,
                 num_max_nvl_chunked_recv_tokens: int = 256, num_max_rdma_chunked_send_tokens: int = 6,
                 num_max_rdma_chunked_recv_tokens: int = 256):
        self.num_sms = num_sms
        self.num_max_nvl_chunked_send_tokens = num_max_nvl_chunked_send_tokens
        self.num_max_nvl_chunked_recv_tokens = num_max_nvl_chunked_recv_tokens
        self.num_max_rdma_chunked_send_tokens = num_max_rdma_chunked_send_tokens
        self.num_max_rdma_chunked_recv_tokens = num_max_rdma_chunked_recv_tokens

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """NVLink bytes for dispatch/combine of ``hidden_bytes``-wide rows at
        up to num_max_nvl_chunked_recv_tokens tokens per rank (as cupyep sizes it)."""
        from cupyep.layouts.sizing import nvl_size_hint
        return nvl_size_hint(max(128, hidden_bytes // 2 // 128 * 128), self.num_max_nvl_chunked_recv_tokens,
                             num_ranks, 8)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """RDMA bytes for the inter-node path (8 ranks per node, as DeepEP assumes)."""
        from cupyep.layouts.sizing import rdma_size_hint
        per_node = min(8, num_ranks)
        return rdma_size_hint(max(128, hidden_bytes // 2 // 128 * 128), self.num_max_rdma_chunked_recv_tokens,
                              num_ranks, per_node, 8)

    def to_cupyep(self, num_ranks: int, num_nodes: int = 1) -> _config.Config:
        base = _config.default_config(num_ranks, num_nodes)
        return _config.Config(num_sms=self.num_sms, num_warps=base.num_warps,
                              chunk_tokens=base.chunk_tokens, num_combine_warps=base.num_combine_warps)


class Buffer:
    """DeepEP V1 ``deep_ep.Buffer`` on cupyep.

    Args:
        group: a torch.distributed ProcessGroup (or an mpi4py communicator).
        num_nvl_bytes, num_rdma_bytes, low_latency_mode: as in DeepEP.
        The other DeepEP arguments (queue pairs, NVLink use in low-latency
        mode, MNNVL, fabric, shrink) are accepted. ``explicitly_destroy``:
        as in DeepEP, :meth:`destroy` is allowed only with it (and then
        expected before exit); without it the buffer is freed at exit.
    """

    num_sms: int = 20

    def __init__(self, group, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 use_fabric: bool = False, explicitly_destroy: bool = False, enable_shrink: bool = False,
                 comm=None, backend: str = "auto"):
        self._group = Group(comm if comm is not None else group)
        self.group = group  # the caller's process group, as DeepEP's Buffer.group
        self.rank, self.group_size = self._group.rank, self._group.size
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        self._buffer = _Buffer(self._group, num_nvl_bytes=num_nvl_bytes, num_rdma_bytes=num_rdma_bytes,
                               low_latency_mode=low_latency_mode, backend=backend,
                               enable_shrink=enable_shrink)
        # The caller's process group (DeepEP's Buffer.group); NCCL ones carry the
        # handles' all-gather on the device.
        self._torch_group = group if type(group).__module__.startswith("torch") else None
        self._nccl = (self._torch_group is not None and
                      _torch.distributed.get_backend(self._torch_group) == "nccl")

    # ---- static helpers ------------------------------------------------------ #
    @staticmethod
    def is_sm90_compiled() -> bool:
        """Kernels are compiled at run time for the GPU present, SM90 included."""
        return True

    @classmethod
    def set_num_sms(cls, new_num_sms: int) -> None:
        if new_num_sms < 2 or new_num_sms % 2:
            raise InvalidInputError(f"the SM count must be even and >= 2, got {new_num_sms}")
        cls.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        """An event recorded now on torch's current stream."""
        import cupy
        ev = cupy.cuda.Event(disable_timing=True)
        cupy.cuda.runtime.eventRecord(ev.ptr, _torch_stream_ptr())
        return EventOverlap(ev)

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int,
                                       num_ranks: int, num_experts: int) -> int:
        return low_latency_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        return Config(Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        return Config(Buffer.num_sms)

    def get_comm_stream(self):
        """The communication stream, as a torch stream (GPU backend)."""
        if self._buffer.backend != "gpu":
            raise InvalidInputError("the reference backend has no communication stream")
        return _torch.cuda.ExternalStream(self._buffer._impl.streams.comm.ptr)

    def get_local_buffer_tensor(self, dtype, size=None, offset: int = 0, use_rdma_buffer: bool = False):
        """A torch view of this rank's NVLink (or RDMA) symmetric buffer,
        ``dtype`` elements from byte ``offset`` (GPU backend)."""
        if self._buffer.backend != "gpu":
            raise InvalidInputError("the reference backend has no symmetric buffer")
        import cupy
        impl = self._buffer._impl
        sym = impl.ll.sym if use_rdma_buffer else impl.nvl
        if sym is None:
            raise InvalidInputError("this buffer has no RDMA memory (num_rdma_bytes=0)")
        item = _torch.empty((), dtype=dtype).element_size()
        count = (sym.nbytes - offset) // item
        if offset < 0 or count <= 0:
            raise InvalidInputError(f"offset {offset} is outside the {sym.nbytes}-byte buffer")
        mem = cupy.cuda.UnownedMemory(sym.ptr + offset, count * item, sym, impl.rt.device_id)
        raw = cupy.ndarray((count * item,), cupy.uint8, cupy.cuda.MemoryPointer(mem, 0))
        t = _interop.from_cupy(raw, "torch").view(dtype)
        return t if size is None else t[:int(np.prod(size))].view(size)

    def destroy(self) -> None:
        """Frees the buffer and the Group this facade made (collective). As in
        DeepEP, only for a buffer made with ``explicitly_destroy=True``; others
        are freed at exit."""
        if not self.explicitly_destroy:
            raise InvalidInputError("`explicitly_destroy` flag must be set (as in DeepEP): "
                                    "Buffer(..., explicitly_destroy=True) to call destroy()")
        self._buffer.destroy()
        self._group.destroy()

    # ---- normal kernels ------------------------------------------------------ #
    def _config(self, config: Optional[Config]):
        return (config or Config(Buffer.num_sms)).to_cupyep(self.group_size, self._group.num_nodes)

    @_no_torch_modes
    def get_dispatch_layout(self, topk_idx, num_experts: int, previous_event=None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Returns (num_tokens_per_rank, num_tokens_per_rdma_rank (None inside one
        node), num_tokens_per_expert, is_token_in_rank, event)."""
        lay = self._buffer.get_dispatch_layout(topk_idx, num_experts)
        return (lay.num_tokens_per_rank, lay.num_tokens_per_node, lay.num_tokens_per_expert,
                lay.is_token_in_rank, _NO_EVENT)

    def _native_handle(self, handle, what: str):
        """cupyep's handle inside a facade handle, with clear errors for anything else."""
        if not isinstance(handle, Handle):
            raise InvalidInputError(
                f"{what}: expected the handle tuple this facade's dispatch returned, got {type(handle).__name__}"
                " (handles of cupyep.Buffer go to cupyep.Buffer's own methods)")
        if handle.buffer_id != self._buffer.buffer_id:
            raise InvalidInputError(f"{what}: the handle was made by another buffer")
        return handle.cupyep_handle

    def _all_gather(self, row):
        """[R, n] int64: every rank's ``row`` ([n] integer tensor), in rank order.
        Over NCCL on the device (stream-ordered, no host wait) when the group is
        an NCCL process group, else through the host."""
        torch = _torch
        row = row.to(torch.int64)
        if self._nccl and row.is_cuda:
            out = torch.empty((self.group_size, row.numel()), dtype=torch.int64, device=row.device)
            torch.distributed.all_gather_into_tensor(out, row, group=self._torch_group)
            return out
        rows = self._group.comm.allgather(row.cpu().numpy())
        return torch.from_numpy(np.stack(rows)).to(row.device)

    def _intranode_handle(self, native, in_rank, num_tokens_per_rank, num_tokens_per_expert, num_channels,
                          expert_alignment):
        """DeepEP's intranode handle tuple from the layout every rank has (one
        all-gather of [R + R*C + E] counts), and the per-expert receive counts
        when ``num_tokens_per_expert`` is given (a device tensor [L])."""
        torch = _torch
        t, r = in_rank.shape
        c = max(1, num_channels)
        per = -(-t // c) if t else 1  # DeepEP's channels: contiguous token ranges
        sent = torch.zeros((c * per, r), dtype=torch.int32, device=in_rank.device)
        sent[:t] = in_rank
        channel_prefix = sent.view(c, per, r).sum(1).cumsum(0).T.contiguous().to(torch.int32)  # [R, C] inclusive
        if num_tokens_per_rank is None:
            num_tokens_per_rank = in_rank.sum(0)
        parts = [num_tokens_per_rank.reshape(-1).to(torch.int64), channel_prefix.reshape(-1).to(torch.int64)]
        if num_tokens_per_expert is not None:
            parts.append(num_tokens_per_expert.reshape(-1).to(torch.int64))
        everyone = self._all_gather(torch.cat(parts))
        sends = everyone[:, :r]  # sends[i][j]: tokens rank i sends to rank j
        rank_prefix = sends.cumsum(0).to(torch.int32)
        mine = everyone[:, r:r + r * c].view(r, r, c)[:, self.rank, :]  # [src, C] inclusive, to this rank
        start = (rank_prefix[:, self.rank] - sends[:, self.rank]).to(torch.int64)
        recv_channel_prefix = (start[:, None] + torch.cat([torch.zeros_like(mine[:, :1]), mine[:, :-1]], 1))
        send_head = torch.where(in_rank, in_rank.to(torch.int32).cumsum(0) - 1, -1).to(torch.int32)
        items = (rank_prefix, channel_prefix, recv_channel_prefix.to(torch.int32), native.recv_src_idx, in_rank,
                 send_head)
        counts = None
        if num_tokens_per_expert is not None:
            local = num_tokens_per_expert.numel() // r
            got = everyone[:, r + r * c:].sum(0)[self.rank * local:(self.rank + 1) * local]
            counts = (got + expert_alignment - 1) // expert_alignment * expert_alignment
        return Handle(items, native, self._buffer.buffer_id), counts

    @_no_torch_modes
    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config: Optional[Config] = None,
                 previous_event=None, async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Returns (recv_x, recv_topk_idx, recv_topk_weights,
        num_recv_tokens_per_expert_list, handle, event); recv_x is a pair for FP8 input
        (scales accepted in any layout, e.g. the column-major views DeepEP's tests build)."""
        fp8 = isinstance(x, (tuple, list))
        if fp8 and len(x) == 2 and isinstance(x[1], _torch.Tensor) and not x[1].is_contiguous():
            x = (x[0], x[1].contiguous())
        kw = dict(config=self._config(config), previous_event=previous_event,
                  async_finish=async_finish)
        if handle is not None:
            res = self._buffer.dispatch(x, handle=self._native_handle(handle, "cached dispatch"), **kw)
            recv_x = (res.recv_x, res.recv_x_scales) if fp8 else res.recv_x
            return recv_x, None, None, None, handle, _event(res.event)
        layout = None
        if topk_idx is not None and num_tokens_per_expert is not None and is_token_in_rank is not None:
            layout = DispatchLayout(num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert,
                                    is_token_in_rank, int(num_tokens_per_expert.shape[0]))
        elif topk_idx is not None:
            raise InvalidInputError("dispatch with topk_idx needs num_tokens_per_expert and is_token_in_rank "
                                    "(from get_dispatch_layout)")
        if is_token_in_rank is None:
            raise InvalidInputError("dispatch needs is_token_in_rank (from get_dispatch_layout) or a handle")
        res = self._buffer.dispatch(x, topk_idx, topk_weights, layout=layout,
                                    is_token_in_rank=None if layout is not None else is_token_in_rank,
                                    expert_alignment=expert_alignment, num_worst_tokens=num_worst_tokens, **kw)
        recv_x = (res.recv_x, res.recv_x_scales) if fp8 else res.recv_x
        cfg = self._config(config)
        facade_handle, counts = self._intranode_handle(
            res.handle, is_token_in_rank, num_tokens_per_rank,
            num_tokens_per_expert if topk_idx is None else None, cfg.num_channels, expert_alignment)
        if num_worst_tokens:
            counts = []  # as DeepEP: no host wait, so no list
        elif topk_idx is not None:
            counts = list(res.num_recv_tokens_per_expert)
        else:
            counts = [] if counts is None else counts.tolist()
        recv_idx = res.recv_topk_idx
        if recv_idx is not None and topk_idx is not None and recv_idx.dtype != topk_idx.dtype:
            recv_idx = recv_idx.to(topk_idx.dtype)
        return (recv_x, recv_idx, res.recv_topk_weights, counts, facade_handle, _event(res.event))

    @_no_torch_modes
    def combine(self, x, handle, topk_weights=None, bias=None, config: Optional[Config] = None,
                previous_event=None, async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Returns (combined_x, combined_topk_weights, event)."""
        res = self._buffer.combine(x, self._native_handle(handle, "combine"), topk_weights, bias,
                                   config=self._config(config), previous_event=previous_event,
                                   async_finish=async_finish)
        return res.combined_x, res.combined_topk_weights, _event(res.event)

    # ---- low-latency kernels ------------------------------------------------- #
    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int,
                                 num_experts: int) -> None:
        self._buffer.clean_low_latency_buffer(framework="torch")

    @_no_torch_modes
    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank: int, num_experts: int,
                             cumulative_local_expert_recv_stats=None, dispatch_wait_recv_cost_stats=None,
                             use_fp8: bool = True, round_scale: bool = False, use_ue8m0: bool = False,
                             async_finish: bool = False, return_recv_hook: bool = False):
        """Returns (recv_x, recv_count, handle, event, hook); recv_x is
        (e4m3 [L, R*M, H], scales) with FP8, else bf16 [L, R*M, H]."""
        res = self._buffer.low_latency_dispatch(
            x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8=use_fp8,
            round_scale=round_scale, use_ue8m0=use_ue8m0, async_finish=async_finish,
            return_recv_hook=return_recv_hook,
            cumulative_local_expert_recv_stats=cumulative_local_expert_recv_stats,
            dispatch_wait_recv_cost_stats=dispatch_wait_recv_cost_stats)
        recv_x = (res.recv_x, res.recv_x_scales) if use_fp8 else res.recv_x
        h = res.handle
        handle = Handle((h.src_info, h.layout_range, num_max_dispatch_tokens_per_rank, h.hidden, num_experts), h,
                        self._buffer.buffer_id)
        return recv_x, res.recv_count, handle, _event(res.event), res.hook

    @_no_torch_modes
    def low_latency_combine(self, x, topk_idx, topk_weights, handle, use_logfmt: bool = False,
                            zero_copy: bool = False, async_finish: bool = False,
                            return_recv_hook: bool = False, out=None, combine_wait_recv_cost_stats=None):
        """Returns (combined_x, event, hook)."""
        handle = self._native_handle(handle, "low_latency_combine")
        if zero_copy:  # the expert outputs are already in the send buffer
            x = self._buffer.get_next_low_latency_combine_buffer(handle)
        res = self._buffer.low_latency_combine(x, topk_idx, topk_weights, handle, out=out,
                                               async_finish=async_finish, return_recv_hook=return_recv_hook,
                                               use_logfmt=use_logfmt,
                                               combine_wait_recv_cost_stats=combine_wait_recv_cost_stats)
        return res.combined_x, _event(res.event), res.hook

    # ---- rank masking -------------------------------------------------------- #
    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        self._buffer.low_latency_update_mask_buffer(rank_to_mask, mask, framework="torch")

    def low_latency_query_mask_buffer(self, mask_status) -> None:
        """Writes the mask ([R] int32 tensor, 1 = masked) into ``mask_status``,
        ordered on torch's current stream (no host wait)."""
        self._buffer.low_latency_query_mask_buffer(mask_status)

    def low_latency_clean_mask_buffer(self) -> None:
        self._buffer.low_latency_clean_mask_buffer(framework="torch")

    def get_next_low_latency_combine_buffer(self, handle):
        """[L, R*M, H] bf16 tensor that the next combine sends from in place."""
        return self._buffer.get_next_low_latency_combine_buffer(
            self._native_handle(handle, "get_next_low_latency_combine_buffer"))
