"""The measured step peak of the user's own training step, the way `trady bench memory` measures it.

    from trady.memory import measure_step_peak

    def step():                              # one step of your loop
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    def inference():                         # the floor: the same forward without gradients
        with torch.no_grad():
            model(x)

    result = measure_step_peak(step, inference)
    result.step_peak_bytes, result.inference_peak_bytes

Each measured call runs between a reset of the resident high-water mark and its reading (PeakMeter:
VmHWM minus VmRSS before the call on CPU; max_memory_allocated minus memory_allocated on CUDA), after
`warmup` unmeasured calls of each (one-time allocations, lazy initialisation), `steps` times, inference
and step alternating; the figures are the highest over the calls. `control_allocator=True` (default)
has glibc return freed blocks during each measured call, so that the resident size follows the live
tensors: under glibc's defaults freed heap blocks are reused without raising it, and a step can read
below its inference, or negative (trady.memory.resident_peak says what stays changed in the process).

`measure_step_peak_fresh(make)` measures in a new process (multiprocessing "spawn", started with
ALLOCATOR_ENV): `make()` builds the model and data there and returns `(step, inference)`; `make` must
be a module-level function (spawn finds it by module and name). A fresh process has no allocator
history of earlier steps: the bench's figures are taken that way.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from trady.core.errors import TradyError
from trady.memory.resident_peak import ALLOCATOR_ENV, PeakMeter, peak_measure

Step = Callable[[], object]


@dataclass
class StepPeak:
    step_peak_bytes: int | None  # the measured step peak: highest over the measured calls
    inference_peak_bytes: int | None  # the same for `inference` (None when not given)
    step_samples: list[int | None] = field(default_factory=list)
    inference_samples: list[int | None] = field(default_factory=list)
    measure: str | None = None  # what the figure is (trady.memory.resident_peak.peak_measure)
    fresh_process: bool = False

    @property
    def step_over_inference(self) -> float | None:
        if not self.step_peak_bytes or not self.inference_peak_bytes:
            return None
        return self.step_peak_bytes / self.inference_peak_bytes

    def as_dict(self) -> dict:
        return asdict(self) | {"step_over_inference": self.step_over_inference}


def _highest(values: list[int | None]) -> int | None:
    got = [v for v in values if v is not None]
    return max(got) if got else None


def measure_step_peak(
    step: Step,
    inference: Step | None = None,
    *,
    steps: int = 3,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    control_allocator: bool = True,
) -> StepPeak:
    """The measured step peak of `step()` (and of `inference()` beside it) in this process."""
    if not callable(step) or (inference is not None and not callable(inference)):
        raise TradyError("step (and inference) must be callables that run one step; got "
                         f"{type(step).__name__}, {type(inference).__name__}")  # fmt: skip
    for name, value in (("steps", steps), ("warmup", warmup)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "steps" else 0):
            raise TradyError(f"{name} must be a whole number >= {1 if name == 'steps' else 0}, got {value!r}")
    device = torch.device(device)
    calls = [("inference", inference)] if inference is not None else []
    calls.append(("step", step))
    for _ in range(warmup):
        for _, fn in calls:
            fn()
    gc.collect()
    samples: dict[str, list[int | None]] = {"inference": [], "step": []}
    for _ in range(steps):
        for name, fn in calls:
            meter = PeakMeter(device, control_allocator=control_allocator)
            with meter:
                fn()
            samples[name].append(meter.peak_bytes)
    if all(v is None for v in samples["step"]):
        raise TradyError("the peak cannot be measured here (no writable /proc/self/clear_refs); accepted: Linux, "
                         "or a CUDA device")  # fmt: skip
    return StepPeak(
        step_peak_bytes=_highest(samples["step"]),
        inference_peak_bytes=_highest(samples["inference"]) if inference is not None else None,
        step_samples=samples["step"],
        inference_samples=samples["inference"],
        measure=peak_measure(device.type, control_allocator),
    )


def _child(make: Callable, kwargs: dict, queue) -> None:
    try:
        made = make()
        step, inference = made if isinstance(made, tuple) else (made, None)
        queue.put(("ok", measure_step_peak(step, inference, **kwargs).as_dict()))
    except BaseException as err:  # the parent raises it as one line
        queue.put(("error", f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"))


def measure_step_peak_fresh(
    make: Callable[[], tuple[Step, Step | None] | Step],
    *,
    steps: int = 3,
    warmup: int = 1,
    device: str = "cpu",
    control_allocator: bool = True,
    timeout_s: float = 600.0,
) -> StepPeak:
    """measure_step_peak in a new process: `make()` (a module-level function) returns `(step, inference)`
    or `step`; with control_allocator the process starts with ALLOCATOR_ENV (glibc reads it at start)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    kwargs = {"steps": steps, "warmup": warmup, "device": device, "control_allocator": control_allocator}
    saved = {k: os.environ.get(k) for k in ALLOCATOR_ENV}
    if control_allocator:
        os.environ.update(ALLOCATOR_ENV)  # the child inherits the environment at its start
    try:
        proc = ctx.Process(target=_child, args=(make, kwargs, queue))
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        status, payload = queue.get(timeout=timeout_s)
    except Exception:  # queue.Empty: the child died or hung
        proc.kill()
        raise TradyError(f"the measuring process gave no result within {timeout_s:.0f} s (exit code "
                         f"{proc.exitcode})") from None  # fmt: skip
    proc.join()
    if status != "ok":
        raise TradyError(f"measuring in a fresh process failed: {payload}")
    payload.pop("step_over_inference", None)
    return StepPeak(**{**payload, "fresh_process": True})
