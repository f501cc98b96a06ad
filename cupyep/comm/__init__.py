"""Who takes part and how memory is shared: the rank group (MPI or torch.distributed),
the torch bootstrap, and the NVSHMEM runtime with its symmetric allocations.
"""
