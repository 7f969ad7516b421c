"""The allocator chosen by measurement: whole-run high-water mark and step time of small CLI runs.

    PYTHONPATH=src nice -n 5 python benchmarks/allocator/run.py [--models mcunet-in1,mobilenet_v2] [--repeats 1]

For glibc's defaults, glibc with fixed thresholds (trady.memory.resident_peak.ALLOCATOR_ENV, the whole
run), jemalloc and tcmalloc (preloaded by the CLI launcher, trady.cli.allocator), each model runs
`trady finetune` twice in fresh processes: TraDy at 2.2% and classifier-only. Fashion-MNIST, 192
training and 64 test images, 128 px, batch 32, 2 epochs, 1 thread. Read back: summary.json's
process_peak_bytes (VmHWM at the end of the run) and peak_memory_bytes (the measured step), and the
second epoch's time (6 steps + evaluation of 64 images) from metrics.jsonl. Runs alternate the
allocators (round-robin per model and repeat). Writes results/allocator.json and .md; targets.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from trady.cli.allocator import find_library
from trady.core.files import write_json, write_text
from trady.experiments.bench.engine_bench import environment
from trady.memory.resident_peak import ALLOCATOR_ENV

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from targets import check_targets, format_targets, load_targets  # noqa: E402

COMMAND = "PYTHONPATH=src nice -n 5 python benchmarks/allocator/run.py"
ALLOCATORS = {
    "glibc defaults": {"TRADY_ALLOCATOR": "glibc"},
    "glibc fixed thresholds": {"TRADY_ALLOCATOR": "glibc", **ALLOCATOR_ENV},
    "jemalloc": {"TRADY_ALLOCATOR": "jemalloc"},
    "tcmalloc": {"TRADY_ALLOCATOR": "tcmalloc"},
}
STRATEGIES = {"trady": ["--strategy", "trady", "--budget", "2.2%"], "classifier": ["--strategy", "classifier"]}


def one_run(model: str, strategy: str, allocator: str, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    env.update(ALLOCATORS[allocator])
    cmd = [sys.executable, "-m", "trady", "finetune", "--model", model, "--data", "fashion-mnist",
           "--train-size", "192", "--test-size", "64", "--resolution", "128", "--batch-size", "32",
           "--epochs", "2", "--threads", "1", "--seed", "0", "--no-progress", "--out", str(out),
           *STRATEGIES[strategy]]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        "process_peak_bytes": summary["process_peak_bytes"],
        "process_peak_allocator": summary["process_peak_allocator"],
        "step_peak_bytes": summary["peak_memory_bytes"],
        "epoch2_time_s": rows[-1]["epoch_time_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mcunet-in1,mobilenet_v2")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--recheck", action="store_true", help="no runs: tables and targets from results/allocator.json")
    args = ap.parse_args()
    missing = [a for a in ("jemalloc", "tcmalloc") if find_library(a) is None]
    allocators = [a for a in ALLOCATORS if a not in missing]
    results: dict = {}
    if args.recheck:
        saved = json.loads((HERE / "results" / "allocator.json").read_text())
        results, missing = saved["runs"], saved["missing"]
    with tempfile.TemporaryDirectory() as tmp:
        for model in [] if args.recheck else args.models.split(","):
            for rep in range(args.repeats):
                order = allocators[rep % len(allocators):] + allocators[: rep % len(allocators)]
                for allocator in order:
                    for strategy in STRATEGIES:
                        r = one_run(model, strategy, allocator, Path(tmp) / f"{model}-{allocator}-{strategy}-{rep}")
                        results.setdefault(model, {}).setdefault(allocator, {}).setdefault(strategy, []).append(r)
                        print(model, allocator, strategy, r, flush=True)
    table, ratios = [], {}
    head = ["model", "allocator", "trady HWM MiB", "classifier HWM MiB", "trady / classifier HWM",
            "trady step peak MiB", "trady epoch-2 s", "x glibc defaults", "classifier epoch-2 s", "x glibc defaults"]
    table += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for model, per in results.items():
        base = {s: statistics.median(x["epoch2_time_s"] for x in per["glibc defaults"][s]) for s in STRATEGIES}
        for allocator, runs in per.items():
            keys = ("process_peak_bytes", "step_peak_bytes", "epoch2_time_s")
            med = {s: {k: statistics.median(x[k] for x in runs[s]) for k in keys} for s in STRATEGIES}
            hwm_ratio = med["trady"]["process_peak_bytes"] / med["classifier"]["process_peak_bytes"]
            time_ratio = med["trady"]["epoch2_time_s"] / base["trady"]
            key = allocator.replace(" ", "_")
            ratios[f"{model}_{key}_trady_over_classifier_hwm"] = hwm_ratio
            ratios[f"{model}_{key}_trady_time_over_glibc_defaults"] = time_ratio
            table.append(f"| {model} | {allocator} | {med['trady']['process_peak_bytes'] / 2**20:.0f} | "
                         f"{med['classifier']['process_peak_bytes'] / 2**20:.0f} | {hwm_ratio:.2f} | "
                         f"{med['trady']['step_peak_bytes'] / 2**20:.0f} | {med['trady']['epoch2_time_s']:.1f} | "
                         f"{time_ratio:.2f} | {med['classifier']['epoch2_time_s']:.1f} | "
                         f"{med['classifier']['epoch2_time_s'] / base['classifier']:.2f} |")  # fmt: skip
    targets = check_targets(ratios, load_targets(HERE)["targets"])
    env = saved["environment"] if args.recheck else environment(1)
    command = saved["command"] if args.recheck else f"{COMMAND} --models {args.models} --repeats {args.repeats}"
    record = {"command": command, "environment": env, "missing": missing, "runs": results, "ratios": ratios,
              "targets": targets}  # fmt: skip
    write_json(HERE / "results" / "allocator.json", record)
    lines = [f"Whole-run high-water mark (VmHWM at the end, summary.json process_peak_bytes) and the second "
             f"epoch's time, fresh `trady finetune` processes, medians of {args.repeats} repeat(s). `{command}` "
             f"({env['date']}, {env['cpu']}, {env['cpu_count']} cores shared with other users' jobs: times "
             "are across processes, so noisier than the in-process ratios of the other benchmarks).",
             "", *table, "", "```", format_targets(targets), "```"]  # fmt: skip
    write_text(HERE / "results" / "allocator.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
