"""The folded conv's no-grad path: a `weight * scale` copy per forward (this tree) vs. the scale on the output.

    python benchmarks/memory/fold_ab.py [--repeats 3]

A SparseConv2d with a folded BatchNorm runs its frozen (no-graph) forward either as
conv(x, weight * scale) + shift (what sparse_modules.py does) or as conv(x, weight) then, in place,
out * scale + shift (no weight copy). Each way in its own fresh processes (ALLOCATOR_ENV, 1 thread):
the measured step peak (trady.memory.resident_peak.PeakMeter, VmHWM - VmRSS) of (a) an engine training step and
(b) a no-grad forward of the engine-prepared model, mobilenet_v2 at 128 px, batch 32, 2.2%; medians
over --repeats processes of the max over 3 steps. Then the no-grad forward's time, both ways side by
side in one process (alternating rounds, medians). Prints the table, writes results/fold_ab.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

WAYS = ("weight-copy", "output-scale")
RESULTS = Path(__file__).parent / "results" / "fold_ab.json"


def _use(way: str) -> None:
    """Patch SparseConv2d's no-grad path to `way` (weight-copy: the tree as it is)."""
    from trady.engine import modules
    if way == "weight-copy" or getattr(modules.SparseConv2d, "_fold_ab_orig", None):
        modules.SparseConv2d.forward = getattr(modules.SparseConv2d, "_fold_ab_orig", modules.SparseConv2d.forward)
        if way == "weight-copy":
            return
    orig = modules.SparseConv2d._fold_ab_orig = modules.SparseConv2d.forward

    def forward(self, x):
        st = self.trady
        w_slice = modules.current_slice(self)
        frozen = not torch.is_grad_enabled() or not (x.requires_grad or w_slice is not None)
        if st.fold is None or not frozen or (self.bias is not None and self.bias.requires_grad):
            return orig(self, x)
        scale, shift = st.fold.trady_affine()
        bias = shift if self.bias is None else shift + self.bias * scale
        out = F.conv2d(x, self.weight, None, self.stride, self.padding, self.dilation, self.groups)
        return out.mul_(scale.view(1, -1, 1, 1)).add_(bias.view(1, -1, 1, 1))

    modules.SparseConv2d.forward = forward


def child(way: str) -> dict:
    from trady.experiments.bench.memory_bench import MemoryBenchConfig, step_inputs
    from trady.experiments.bench.variants import build
    from trady.memory.resident_peak import PeakMeter

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    _use(way)
    inp, _ = step_inputs(MemoryBenchConfig(model="mobilenet_v2"))
    v = build("engine", inp)
    v.step()
    v.clear()
    meter = PeakMeter("cpu")
    step = []
    for _ in range(3):
        v.clear()
        meter.start()
        v.step()
        step.append(meter.stop())
    v.clear()
    fwd = []
    with torch.no_grad():
        v.model(inp.x)
        for _ in range(3):
            meter = PeakMeter("cpu")
            meter.start()
            v.model(inp.x)
            fwd.append(meter.stop())
    return {"way": way, "engine_step_peak_bytes": max(step), "nograd_forward_peak_bytes": max(fwd)}


def timing(rounds: int) -> dict:
    from trady.experiments.bench.memory_bench import MemoryBenchConfig, step_inputs
    from trady.experiments.bench.variants import build

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    inp, _ = step_inputs(MemoryBenchConfig(model="mobilenet_v2"))
    v = build("engine", inp)
    t = {w: [] for w in WAYS}
    with torch.no_grad():
        for w in WAYS:
            _use(w)
            v.model(inp.x)
        for r in range(rounds):
            for w in WAYS if r % 2 == 0 else WAYS[::-1]:
                _use(w)
                t0 = time.perf_counter()
                v.model(inp.x)
                t[w].append(time.perf_counter() - t0)
        _use("weight-copy")
        ref = v.model(inp.x)
        _use("output-scale")
        diff = float((v.model(inp.x) - ref).abs().max())
    _use("weight-copy")
    return {"nograd_forward_s": {w: statistics.median(ts) for w, ts in t.items()}, "max_abs_logit_diff": diff}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--child", choices=WAYS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    from trady.core.files import write_json
    from trady.core.formatting import mib
    from trady.memory.resident_peak import ALLOCATOR_ENV

    env = {**os.environ, **ALLOCATOR_ENV, "OMP_NUM_THREADS": "1"}
    runs = {w: [] for w in WAYS}
    for _ in range(args.repeats):
        for w in WAYS:
            out = subprocess.run([sys.executable, __file__, "--child", w], env=env, check=True, capture_output=True,
                                 text=True).stdout  # fmt: skip
            runs[w].append(json.loads(out.strip().splitlines()[-1]))
    rows = []
    for w in WAYS:
        rows.append({"way": w, **{k: statistics.median(r[k] for r in runs[w])
                                  for k in ("engine_step_peak_bytes", "nograd_forward_peak_bytes")}})  # fmt: skip
    result = {"command": "python benchmarks/memory/fold_ab.py " + " ".join(sys.argv[1:]), "model": "mobilenet_v2",
              "resolution": 128, "batch_size": 32, "budget": "2.2%", "rows": rows, "runs": runs,
              **timing(args.rounds)}  # fmt: skip
    write_json(RESULTS, result)
    print(f"{'way':<14} {'engine step peak':>17} {'no-grad forward peak':>21} {'no-grad forward s':>18}")
    for r in rows:
        print(f"{r['way']:<14} {mib(r['engine_step_peak_bytes']):>17} {mib(r['nograd_forward_peak_bytes']):>21} "
              f"{result['nograd_forward_s'][r['way']]:>18.3f}")  # fmt: skip
    print(f"max |logit difference| {result['max_abs_logit_diff']:.2e}; written {RESULTS}")


if __name__ == "__main__":
    main()
