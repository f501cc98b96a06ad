"""How arrays of each framework come in and go out: frontends (streams,
allocation, DLPack), torch output sets handed out again, and outputs kept
across CUDA graph capture.
"""
