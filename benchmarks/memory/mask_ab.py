"""Step time of the ReLU-family masks, chunked (this tree) vs. whole-tensor (a given older ops.py).

    python benchmarks/memory/mask_ab.py OLD_OPS_PY [--rounds 9]

One process, 1 thread, alternating rounds, medians: forward (clamp + mask) and backward (unpack +
multiply) of ClampMaskFn on mobilenet_v2-sized activations (batch 32, 128 px: 96 x 64 x 64 and
144 x 32 x 32, ReLU6 and ReLU, 1-bit masks); then whole engine steps of mobilenet_v2 and mcunet-in1
(128 px, batch 32, 2.2%), the engine's ClampMaskFn swapped for the old one every other step. Prints
the table and writes results/mask_ab.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

from trady.core.files import write_json
from trady.engine import functions

SHAPES = [(32, 96, 64, 64), (32, 144, 32, 32)]
BOUNDS = [(0.0, 6.0), (0.0, None)]


def _load(path: str):
    spec = importlib.util.spec_from_file_location("old_ops", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _once(ops, x, grad, lo, hi) -> float:
    a = x.detach().requires_grad_(True)
    t0 = time.perf_counter()
    y = ops.ClampMaskFn.apply(a, lo, hi, 1)
    y.backward(grad)
    return time.perf_counter() - t0


def engine_steps(old, model: str, rounds: int) -> dict:
    """Engine steps alternating the old and this tree's ClampMaskFn (one engine, one process)."""
    from trady.experiments.bench.memory_bench import MemoryBenchConfig, step_inputs
    from trady.experiments.bench.variants import build

    torch.set_flush_denormal(True)
    inp, _ = step_inputs(MemoryBenchConfig(model=model))
    v = build("engine", inp)
    impls = {"old": old.ClampMaskFn, "new": functions.ClampMaskFn}
    t = {"old": [], "new": []}
    try:
        for name in impls:
            functions.ClampMaskFn = impls[name]
            v.step()  # warm-up
        for r in range(rounds):
            for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
                functions.ClampMaskFn = impls[name]
                v.clear()
                t0 = time.perf_counter()
                v.step()
                t[name].append(time.perf_counter() - t0)
    finally:
        functions.ClampMaskFn = impls["new"]
    o, n = statistics.median(t["old"]), statistics.median(t["new"])
    print(f"{model:<20} engine step  old {o * 1e3:7.1f} ms  new {n * 1e3:7.1f} ms  {n / o:.2f}x", flush=True)
    return {"model": model, "old_s": o, "new_s": n, "new_over_old": n / o}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("old_ops")
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(1)
    old = _load(args.old_ops)
    g = torch.Generator().manual_seed(0)
    rows = []
    for shape in SHAPES:
        x = torch.randn(shape, generator=g) * 4
        grad = torch.randn(shape, generator=g)
        for lo, hi in BOUNDS:
            t = {"old": [], "new": []}
            for impl in (old, functions):
                _once(impl, x, grad, lo, hi)  # warm-up
            for r in range(args.rounds):
                order = [("old", old), ("new", functions)]
                for name, impl in order if r % 2 == 0 else order[::-1]:
                    t[name].append(_once(impl, x, grad, lo, hi))
            o, n = statistics.median(t["old"]), statistics.median(t["new"])
            rows.append({"shape": list(shape), "lo": lo, "hi": hi, "old_s": o, "new_s": n, "new_over_old": n / o})
            print(f"{str(shape):<20} {'ReLU6' if hi else 'ReLU':<6} old {o * 1e3:7.1f} ms  new {n * 1e3:7.1f} ms  "
                  f"{n / o:.2f}x", flush=True)  # fmt: skip
    steps = [engine_steps(old, m, args.rounds) for m in ("mobilenet_v2", "mcunet-in1")]
    write_json(Path(__file__).resolve().parent / "results" / "mask_ab.json",
               {"command": "python benchmarks/memory/mask_ab.py " + " ".join(sys.argv[1:]), "rows": rows,
                "engine_steps": steps})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
