"""Number formats on the wire: FP8 (e4m3 with per-128 scales) and LogFMT-10.
"""
