"""Where a step's memory goes: live bytes per layer and phase, from the allocator's own accounting.

`profile_step(model, step)` runs `step()` under torch.profiler with profile_memory=True. Every
allocation and free of PyTorch's allocator is an event; their running sum is the live bytes of the
step (above what was live when it started). Forward hooks mark each leaf module's forward
("fwd <name>"), hooks on its output's gradient mark the start of its backward ("bwd <name>"); each
segment reports the live bytes at its end and its highest point. `top_ops` names the operators that
allocated the most (per operator name, summed over calls), which is how the allocations that lift a
step above inference are named. This is allocator accounting (no resident pages, no C-allocator
retention, no code pages): trady.memory.resident_peak.PeakMeter measures the process's real peak.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

_MARK = "trady:"
# Kineto (the profiler's backend) writes "USDT: ... profiler_start/stop" lines to the C-level stderr at
# every profile; its log level is read from the environment when the profiler starts, and 6 is above
# all of its levels (its errors surface as Python exceptions anyway). A value the user set is kept.
KINETO_QUIET = {"KINETO_LOG_LEVEL": "6"}


@dataclass
class Segment:
    label: str  # "fwd <module>", "bwd <module>", "start", "optimizer"
    peak_bytes: int  # highest live bytes inside the segment
    end_bytes: int  # live bytes when the segment ends


@dataclass
class StepProfile:
    segments: list[Segment]
    peak_bytes: int
    curve: list[tuple[float, int]]  # (milliseconds since start, live bytes)
    top_ops: list[dict] = field(default_factory=list)  # {name, allocated_bytes, calls}

    def as_dict(self) -> dict:
        return {
            "peak_bytes": self.peak_bytes,
            "segments": [s.__dict__ for s in self.segments],
            "top_ops": self.top_ops,
        }


def _leaf_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n and next(m.children(), None) is None]


def _mark(label: str) -> None:
    with record_function(_MARK + label):
        pass


def profile_step(model: nn.Module, step: Callable[[], None], top: int = 12) -> StepProfile:
    """Run `step()` once under the profiler; the live-bytes timeline per layer and phase."""
    handles = []

    def fwd_hook(name):
        def hook(module, args, out):
            _mark(f"fwd {name}")
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(lambda g: _mark(f"bwd {name}"))

        return hook

    for name, module in _leaf_modules(model):
        handles.append(module.register_forward_hook(fwd_hook(name)))
    for key, value in KINETO_QUIET.items():
        os.environ.setdefault(key, value)
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            _mark("start")
            step()
            _mark("end")
    finally:
        for h in handles:
            h.remove()
    events = prof.profiler.kineto_results.events()
    mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    marks = sorted((e.start_ns(), e.name()[len(_MARK) :]) for e in events if e.name().startswith(_MARK))
    # Segments: a forward mark closes the module's forward; a backward mark opens the module's backward.
    t0 = marks[0][0] if marks else (mem[0][0] if mem else 0)
    live, peak, curve = 0, 0, [(0.0, 0)]
    segments: list[Segment] = []
    label, seg_peak = "start", 0
    mi = 0
    for t, label_next in marks + [(float("inf"), None)]:
        while mi < len(mem) and mem[mi][0] <= t:
            live += mem[mi][1]
            seg_peak = max(seg_peak, live)
            peak = max(peak, live)
            curve.append(((mem[mi][0] - t0) / 1e6, live))
            mi += 1
        if label_next is None:
            break
        if label_next.startswith("fwd "):
            segments.append(Segment(label_next, seg_peak, live))
        elif label != label_next:
            segments.append(Segment(label, seg_peak, live))
        label, seg_peak = label_next, live
    ops = {}
    for e in prof.key_averages():
        if e.key.startswith(_MARK) or e.key == "[memory]" or e.cpu_memory_usage <= 0:
            continue
        ops[e.key] = {"name": e.key, "allocated_bytes": int(e.cpu_memory_usage), "calls": int(e.count)}
    top_ops = sorted(ops.values(), key=lambda d: -d["allocated_bytes"])[:top]
    kept = [s for s in segments if s.label != "end"]
    return StepProfile(segments=kept, peak_bytes=peak, curve=curve, top_ops=top_ops)


def plot_timelines(profiles: dict[str, StepProfile], path: str, title: str) -> None:
    """One line per profiled step: live MiB over the step's events (time axis normalised to 0-1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trady.core.files import atomic_write

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, p in profiles.items():
        if not p.curve:
            continue
        end = p.curve[-1][0] or 1.0
        label = f"{name} (peak {p.peak_bytes / 2**20:.1f} MiB)"
        ax.step([t / end for t, _ in p.curve], [b / 2**20 for _, b in p.curve], where="post", label=label, lw=1)
    ax.set_xlabel("progress through the step (share of its wall time)")
    ax.set_ylabel("live bytes above the start, MiB (PyTorch allocator)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=120))
    plt.close(fig)
