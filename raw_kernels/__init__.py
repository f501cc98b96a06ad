"""CUDA sources of cupyep, compiled at run time (see cupyep.jit)."""
