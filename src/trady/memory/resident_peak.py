"""The measured step peak: what the machine sees while a step runs (`PeakMeter`), and the allocator.

On CPU the kernel's resident high-water mark of the process (VmHWM, reset by writing "5" to
/proc/self/clear_refs) minus the resident size right before the measured region; on CUDA
torch.cuda.max_memory_allocated minus memory_allocated before. The CPU figure includes everything the
process touches during the region: live tensors (activations, kept tensors, backward temporaries,
gradients, optimizer state), kernel workspaces, and whatever the C allocator keeps instead of returning
it (see ALLOCATOR_ENV). The other memory, bytes kept for backward, is `trady.memory.kept_bytes`.
"""

from __future__ import annotations

import os

import torch

# glibc malloc settings under which the resident size follows the live tensors: every block of 64 KiB
# or more is its own mmap, returned to the kernel when freed (a fixed threshold also switches off
# glibc's dynamic threshold, which otherwise rises to the largest freed block and keeps later frees of
# that size in the heap), and the heap top is trimmed above 128 KiB. Read by glibc when a process
# starts: the memory bench sets them for its child processes.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}

# ---------------------------------------------------------------------------------------------
# Measured peak: resident high-water mark (CPU), max_memory_allocated (CUDA)
# ---------------------------------------------------------------------------------------------


def _status_bytes(field_name: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field_name):
                return int(line.split()[1]) * 1024  # reported in kB
    raise OSError(f"/proc/self/status has no {field_name}")


def resident_bytes() -> int:
    """The process's resident size now (VmRSS)."""
    return _status_bytes("VmRSS:")


# The highest VmHWM seen before any reset: resets (the measured step's) must not lose the whole run's.
_HWM_BEFORE_RESETS = 0


def reset_resident_peak() -> bool:
    """Reset the kernel's resident high-water mark to the current resident size; False where impossible.
    The mark before the reset is kept for process_peak_bytes()."""
    global _HWM_BEFORE_RESETS
    try:
        _HWM_BEFORE_RESETS = max(_HWM_BEFORE_RESETS, resident_peak_bytes())
    except OSError:
        return False
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def resident_peak_bytes() -> int:
    """The process's resident high-water mark (VmHWM) since the last reset."""
    return _status_bytes("VmHWM:")


def process_peak_bytes() -> int | None:
    """The whole process's resident high-water mark since it started (VmHWM, across the resets of
    reset_resident_peak); None where /proc/self/status has none (not Linux)."""
    try:
        return max(_HWM_BEFORE_RESETS, resident_peak_bytes())
    except OSError:
        return None


def allocator_in_use() -> str:
    """The malloc this process runs on: "tcmalloc" / "jemalloc" where one is loaded (LD_PRELOAD), else
    "glibc" (with its MALLOC_* environment settings, if any)."""
    try:
        with open("/proc/self/maps") as fh:
            maps = fh.read()
    except OSError:
        maps = ""
    for name in ("tcmalloc", "jemalloc", "mimalloc"):
        if f"lib{name}" in maps:
            return name
    env = ", ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_") and k.endswith("_"))
    return f"glibc ({env})" if env else "glibc"


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_LIBC = None


def _glibc():
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC = lib if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else False
        except OSError:
            _LIBC = False
    return _LIBC or None


def set_allocator_for_measurement() -> bool:
    """ALLOCATOR_ENV's settings from now on, and the heap's free pages given back (malloc_trim).

    Freed blocks that glibc keeps are resident without being live: reused, they would not raise the
    resident size; kept after a free, they would keep it up. False where there is no glibc.
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt(_M_MMAP_THRESHOLD, int(ALLOCATOR_ENV["MALLOC_MMAP_THRESHOLD_"]))
    libc.mallopt(_M_TRIM_THRESHOLD, int(ALLOCATOR_ENV["MALLOC_TRIM_THRESHOLD_"]))
    libc.malloc_trim(0)
    release_preloaded_free_memory()
    return True


def release_preloaded_free_memory() -> bool:
    """A preloaded allocator (jemalloc, the CLI's default, or tcmalloc) gives its free pages back to the
    kernel, so that a measured step's resident growth starts from the live bytes (glibc's mallopt does
    not reach them). Within the step the allocator reuses what it frees. False where neither is loaded."""
    import ctypes

    try:
        lib = ctypes.CDLL(None)
    except OSError:
        return False
    if hasattr(lib, "MallocExtension_ReleaseFreeMemory"):  # tcmalloc
        lib.MallocExtension_ReleaseFreeMemory.restype = None
        lib.MallocExtension_ReleaseFreeMemory()
        return True
    if allocator_in_use() == "jemalloc" and hasattr(lib, "mallctl"):  # every arena (MALLCTL_ARENAS_ALL)
        lib.mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        return lib.mallctl(b"arena.4096.purge", None, None, None, 0) == 0
    return False


def set_allocator_for_speed() -> None:
    """Back to fast settings: blocks up to 32 MiB from the heap, trimmed above 64 MiB (where glibc's own
    dynamic threshold ends up after a few steps). A fresh mmap per block costs page faults: measured
    here, a mobilenet_v2 engine step took about 2x as long with the 64 KiB threshold.

    What cannot be restored: glibc has no call that reads the thresholds, and the first mallopt of
    M_MMAP_THRESHOLD or M_TRIM_THRESHOLD switches its dynamic threshold off for the rest of the process
    (there is no call that switches it back on). These fixed values are the dynamic threshold's upper
    end (32 MiB on 64-bit) and glibc's trim rule (twice the mmap threshold); a process that started
    with MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ set gets these instead of its own values. Hence
    PeakMeter's control is opt-in (FinetuneConfig.control_allocator, on in the CLI)."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 * 2**20)


def cpu_peak_supported() -> bool:
    try:
        resident_bytes()
    except OSError:
        return False
    return reset_resident_peak()


# What PeakMeter's figure is, per device type (run summaries quote it beside the number).
PEAK_MEASURE = {
    "cpu": "resident high-water mark of a step above the resident size before it (VmHWM - VmRSS; the "
    "epoch's second step)",
    "cuda": "torch.cuda.max_memory_allocated of the step above memory_allocated before it",
}
# What the CPU figure means depends on the allocator: said beside it in every summary.
CPU_ALLOCATOR_NOTE = {
    True: "glibc returning freed blocks during the step, so the resident size follows the live tensors",
    False: "glibc's default settings: freed heap blocks are reused without raising the resident size, so "
    "the figure can read low (down to 0); control_allocator=True (the CLI's default) measures it",
}


PRELOADED_NOTE = {
    True: "{name} (preloaded): its free pages given back before the step, freed blocks reused within it",
    False: "{name} (preloaded) keeps freed pages: the figure can read low (down to 0); control_allocator=True "
    "(the CLI's default) gives them back before the step",
}


def peak_measure(device_type: str, control_allocator: bool) -> str | None:
    """The summary's `peak_memory_measure`: what the measured step peak is, on this device and setting."""
    what = PEAK_MEASURE.get(device_type)
    if what is None or device_type != "cpu":
        return what
    allocator = allocator_in_use()
    if allocator in ("tcmalloc", "jemalloc"):
        return f"{what}; {PRELOADED_NOTE[bool(control_allocator)].format(name=allocator)}"
    if not allocator.startswith("glibc"):
        return f"{what}; {allocator} (preloaded): freed pages it keeps can make the figure read low"
    return f"{what}; {CPU_ALLOCATOR_NOTE[bool(control_allocator)]}"


class PeakMeter:
    """The peak memory of a region above what was in use when it started.

    with PeakMeter(device) as m: step()   ->   m.peak_bytes
    CPU: VmHWM after the region minus VmRSS at its start (the high-water mark reset at the start).
    `control_allocator`: for the region, glibc returns freed blocks to the kernel and the heap's free
    pages are given back first (`set_allocator_for_measurement`), so that the figure follows the live
    tensors; afterwards the fast settings (`set_allocator_for_speed`: process-wide, and glibc's dynamic
    threshold stays off, see there). False (the default): glibc as it is, mallopt never called. A region
    left by an exception: `close()` (or the `with` block) sets the fast settings back.
    CUDA: torch.cuda.max_memory_allocated minus memory_allocated at the start (peak stats reset).
    `peak_bytes` is None where the platform offers neither (no /proc, clear_refs not writable).
    """

    def __init__(self, device: torch.device | str = "cpu", control_allocator: bool = False) -> None:
        self.device = torch.device(device)
        self.control_allocator = control_allocator and self.device.type == "cpu"
        self.base: int | None = None
        self.peak_bytes: int | None = None
        self._allocator_set = False  # measurement settings in force (start() without stop() yet)

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            if self.control_allocator:
                self._allocator_set = set_allocator_for_measurement()
            self.base = resident_bytes() if reset_resident_peak() else None

    def stop(self) -> int | None:
        if self.base is None:
            self.close()
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = int(torch.cuda.max_memory_allocated(self.device)) - self.base
        else:
            peak = resident_peak_bytes() - self.base
            self.close()
        self.peak_bytes = max(peak, 0) if self.peak_bytes is None else max(self.peak_bytes, peak, 0)
        return self.peak_bytes

    def close(self) -> None:
        """The fast allocator settings back if start() set the measurement ones (no figure taken)."""
        if self._allocator_set:
            self._allocator_set = False
            set_allocator_for_speed()

    def __enter__(self) -> PeakMeter:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            self.close()
        else:
            self.stop()


def allocator_env_active() -> bool:
    """Whether this process started with ALLOCATOR_ENV (the settings under which RSS follows live tensors)."""
    return all(os.environ.get(k) == v for k, v in ALLOCATOR_ENV.items())
