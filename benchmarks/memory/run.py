"""Memory benchmark grid: `trady bench memory` for each setting below, written to results/.

    python benchmarks/memory/run.py                 # the committed grid (about 30 min on 2 busy cores)
    python benchmarks/memory/run.py --quick         # one repeat, mcunet-in1 only

Writes results/memory.json (every result with its configuration and the command), results/memory.md
(the tables the README quotes) and results/timeline-<model>[-micro<m>].png (one engine step beside
one inference forward, from the allocator's accounting).
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import sys
from dataclasses import fields, replace
from pathlib import Path

from trady.core.files import write_json, write_text
from trady.core.formatting import mib
from trady.experiments.bench.engine_bench import environment
from trady.experiments.bench.memory_bench import (
    MemoryBenchConfig,
    bench_memory,
    format_memory_bench,
    time_micro_batches,
)
from trady.experiments.bench.timeline_table import format_timeline, timeline_for

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from targets import check_targets, format_targets, load_targets  # noqa: E402  (benchmarks/targets.py)

TARGETS = load_targets(HERE)


def grid(quick: bool) -> list[MemoryBenchConfig]:
    repeats = 1 if quick else 3
    models = ["mcunet-in1"] if quick else ["mobilenet_v2", "mcunet-in1"]
    out = []
    for m in models:
        base = MemoryBenchConfig(model=m, resolution=128, batch_size=32, budget="2.2%", repeats=repeats)
        out.append(base)
        out.append(replace(base, allocator_control=False))  # the spread under glibc's defaults
    if not quick:
        out.append(MemoryBenchConfig(model="mobilenet_v2", batch_size=32, micro_batch_size=4, repeats=repeats))
    return out


_mib = functools.partial(mib, digits=1, unit="")  # MiB cells of the table (trady.core.formatting)


def _range(r: dict, v: str) -> str:
    lo, hi = r[f"{v}_peak_range_bytes"]
    return f"{_mib(r[f'{v}_peak_bytes'])} [{_mib(lo)}-{_mib(hi)}]"


def markdown(results: list[dict], env: dict, command: str) -> str:
    head = (
        "| model | micro-batch | allocator control | inference (no-grad forward) | engine | stock freeze "
        "(same layers + head) | full fine-tuning | engine / inference | engine / freeze | kept for backward "
        "(engine) | predicted engine peak (/ measured) |"
    )
    lines = [
        f"Memory benchmark, `{command}`",
        "",
        f"{env['date']}, torch {env['torch']}, 1 thread per process, {env['cpu']} ({env['cpu_count']} CPUs). "
        "128 px, batch 32, a TraDy draw at 2.2% in the shipped top-K layers. Measured step peak, MiB: the "
        "resident high-water mark (VmHWM, reset through /proc/self/clear_refs) over 3 steps minus the resident "
        "size with model, input and variant ready; median of 3 fresh processes per variant [range]. Allocator "
        "control: the child processes start with MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=131072.",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for r in results:
        s, q = r["setup"], r["ratios"]
        lines.append(
            f"| {s['model']} | {s['micro_batch_size'] or '-'} | {'on' if s['allocator_control'] else 'off'} | "
            f"{_range(r, 'inference')} | {_range(r, 'engine')} | {_range(r, 'freeze')} | {_range(r, 'full')} | "
            f"{q['engine_over_inference_peak']:.2f}x | {q['engine_over_freeze_peak']:.2f}x | "
            f"{_mib(r['engine_saved_bytes'])} | {_mib(r['predicted_engine_peak_bytes'])} "
            f"({q['predicted_over_measured_engine_peak']:.2f}x) |"
        )
    lines.append("")
    lines.append("With micro-batches the inference column is a forward of one micro-batch (batch 4).")
    for r in results:
        if "micro_timing" in r:
            t = r["micro_timing"]
            lines.append(
                f"Time cost of micro-batches ({r['setup']['model']}, batch {t['batch_size']} in micro-batches of "
                f"{t['micro_batch_size']}, engine, one process, {t['rounds']} alternating rounds, medians): "
                f"{t['whole_batch_step_s'] * 1e3:.0f} ms whole vs {t['micro_batch_step_s'] * 1e3:.0f} ms split = "
                f"{t['micro_over_whole_step']:.2f}x."
            )
    for r in results:
        if "timeline" in r:
            micro = r["setup"]["micro_batch_size"]
            title = f"### Timeline: {r['setup']['model']}" + (f", micro-batches of {micro}" if micro else "")
            lines += ["", title, "", "```", format_timeline(r["timeline"]), "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--markdown-only", action="store_true", help="rewrite memory.md from an existing memory.json")
    ap.add_argument("--timelines-only", action="store_true", help="profile the timelines of memory.json again")
    args = ap.parse_args()
    out = Path(args.out)
    if args.markdown_only or args.timelines_only:
        data = json.loads((out / "memory.json").read_text())
        for r in data["results"] if args.timelines_only else ():  # the allocator timelines again
            if "timeline" in r:
                known = {f.name for f in fields(MemoryBenchConfig)}
                cfg = MemoryBenchConfig(**{k: v for k, v in r["setup"].items() if k in known})
                cfg.variants = tuple(cfg.variants)
                png = r["timeline"]["png"]
                r["timeline"] = timeline_for(cfg, str(out / png))
                r["timeline"]["png"] = png
        write_json(out / "memory.json", data)
        write_text(out / "memory.md", markdown(data["results"], data["environment"], data["command"]))
        return 0
    command = "python benchmarks/memory/run.py" + "".join(" " + shlex.quote(a) for a in sys.argv[1:])
    results = []
    for cfg in grid(args.quick):
        print(f"== {cfg.model} micro={cfg.micro_batch_size} allocator_control={cfg.allocator_control}", flush=True)
        r = bench_memory(cfg, progress=lambda m: print("  " + m, flush=True))
        r["targets"] = check_targets(r["ratios"], TARGETS["micro_batch_targets" if cfg.micro_batch_size else "targets"])
        if cfg.allocator_control:
            name = f"timeline-{cfg.model}" + (f"-micro{cfg.micro_batch_size}" if cfg.micro_batch_size else "")
            r["timeline"] = timeline_for(cfg, str(out / f"{name}.png"))
            r["timeline"]["png"] = f"{name}.png"
        if cfg.micro_batch_size:
            r["micro_timing"] = time_micro_batches(cfg)
        print(format_memory_bench(r) + "\n" + format_targets(r["targets"]), flush=True)
        results.append(r)
        env = environment(1)
        write_json(out / "memory.json", {"command": command, "environment": env, "results": results})
        write_text(out / "memory.md", markdown(results, env, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
