"""The GPU backend: layout and normal calls over NVLink (backend.py), across
nodes (internode.py), low-latency calls (low_latency.py), and the call tags
the kernels exchange (call_tags.py). Kernels: raw_kernels/cupyep/.
"""
