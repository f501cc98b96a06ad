"""Byte layouts and sizes of the communication buffers, shared with the kernels
(raw_kernels/cupyep/*.cuh): normal (NVLink, RDMA) and low-latency.
"""
