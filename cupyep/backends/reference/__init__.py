"""The NumPy reference backend: the semantics of every call (semantics.py),
run over MPI (backend.py), with the call handshake that catches ranks that
disagree (call_check.py).
"""
