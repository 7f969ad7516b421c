"""Where a training step's time goes: torch.profiler over trady's step and the stock freeze's.

    PYTHONPATH=src nice -n 5 python benchmarks/speed/profile_step.py [--model mcunet-in1] [--steps 2]

1 thread, 128 px, batch 32, budget 2.2%, TraDy's draw (as benchmarks/speed/run.py). Each variant
(trady, stock freeze, inference) runs one warm-up step, then `steps` profiled steps. Reported per
variant: self CPU time by operator (top 15) and by phase (forward, backward, optimizer: the autograd
engine's evaluate_function events are the backward; per layer kind via the operator names:
mkldnn_convolution = forward convolutions, convolution_backward = backward ones).
Writes results/profile-<model>.json and prints the tables.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from trady import models
from trady.core.files import write_json
from trady.engine.costs import analyze, parse_budget
from trady.experiments.bench.engine_bench import candidate_layers, environment, random_selection
from trady.experiments.bench.variants import StepInputs, build

HERE = Path(__file__).resolve().parent


def profiled(variant, steps: int) -> dict:
    variant.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            variant.step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / steps / 1e3
    ops = sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]
    return {
        "total_ms": total,
        "top_ops": [{"name": e.key, "self_ms": e.self_cpu_time_total / steps / 1e3, "calls": e.count // steps}
                    for e in ops],  # fmt: skip
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mcunet-in1")
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    model = models.create(args.model, pretrained=False, num_classes=10).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 128, 128, generator=gen)
    y = torch.randint(0, 10, (32,), generator=gen)
    costs = analyze(model, example_input=x[:1])
    names, _ = candidate_layers(costs, "auto", args.model)
    selection = costs.check_selection(random_selection(costs, names, parse_budget("2.2%", costs), gen))
    inp = StepInputs(model, costs, selection, x, y)
    out = {}
    for name, builder in (("trady", "engine"), ("stock freeze", "freeze"), ("inference", "inference")):
        out[name] = profiled(build(builder, inp), args.steps)
        print(f"\n{name}: {out[name]['total_ms']:.0f} ms self CPU per step")
        for op in out[name]["top_ops"]:
            print(f"  {op['self_ms']:8.1f} ms  {op['calls']:5d}x  {op['name']}")
    write_json(HERE / "results" / f"profile-{args.model}.json",
               {"model": args.model, "environment": environment(1), "steps": args.steps, "variants": out})  # fmt: skip


if __name__ == "__main__":
    main()
