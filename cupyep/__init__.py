"""cupyep: expert-parallel dispatch and combine for Mixture-of-Experts models.

Quick start (run under ``mpiexec -n N``)::

    import cupyep
    buf = cupyep.Buffer(cupyep.Group(), num_nvl_bytes=cupyep.nvl_size_hint(...))
    layout = buf.get_dispatch_layout(topk_idx, num_experts)
    d = buf.dispatch(x, topk_idx, topk_weights, layout=layout)
    y = experts(d.recv_x, d.recv_topk_idx, d.recv_topk_weights)
    out = buf.combine(y, d.handle).combined_x
"""
from cupyep.buffer import Buffer
from cupyep.config import Config, default_config
from cupyep.errors import (BackendUnavailableError, BufferTooSmallError, CallMismatchError, CommTimeoutError,
                           CupyepError, GroupDestroyedError, InvalidInputError)
from cupyep.comm.group import Group, gpu_available
from cupyep.layouts.low_latency import low_latency_size_hint
from cupyep.layouts.sizing import nvl_size_hint, rdma_size_hint
from cupyep.types import (CombineResult, DispatchHandle, DispatchLayout, DispatchResult,
                          LowLatencyCombineResult, LowLatencyDispatchResult, LowLatencyHandle)

__version__ = "0.1.0"

__all__ = [
    "Buffer", "Config", "default_config", "Group", "gpu_available",
    "nvl_size_hint", "rdma_size_hint", "low_latency_size_hint",
    "CupyepError", "InvalidInputError", "BufferTooSmallError", "CommTimeoutError", "CallMismatchError",
    "GroupDestroyedError", "BackendUnavailableError",
    "DispatchLayout", "DispatchHandle", "DispatchResult", "CombineResult",
    "LowLatencyHandle", "LowLatencyDispatchResult", "LowLatencyCombineResult",
]
