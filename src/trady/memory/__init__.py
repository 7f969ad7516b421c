"""Measuring memory: bytes kept for backward (`kept_bytes`), the process's resident peak and the
allocator settings it is measured under (`resident_peak`), live bytes per layer of one step (`timeline`),
the measured step peak of a user's own step (`step_peak`: `trady.memory.measure_step_peak`).

Imports only `trady.core`.
"""

__all__ = ["StepPeak", "measure_step_peak", "measure_step_peak_fresh"]


def __getattr__(name: str):
    """`trady.memory.measure_step_peak` and friends, from step_peak (loaded on first use)."""
    if name in __all__:
        from trady.memory import step_peak

        return getattr(step_peak, name)
    raise AttributeError(f"module 'trady.memory' has no attribute {name!r}")
