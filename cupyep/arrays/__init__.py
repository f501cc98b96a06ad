"""How arrays of each framework come in and go out: frontends (streams,
allocation, DLPack), output sets handed out again (torch, CuPy), and outputs kept
across CUDA graph capture.
"""
