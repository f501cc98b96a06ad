"""The two implementations behind cupyep.Buffer: reference (NumPy, the oracle)
and gpu (CUDA kernels).
"""
