"""Measuring memory: bytes kept for backward (`kept_bytes`), the process's resident peak and the
allocator settings it is measured under (`resident_peak`), live bytes per layer of one step (`timeline`).

Imports only `trady.core`.
"""
