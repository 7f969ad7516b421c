"""The engine's live bytes per block with this tree's ops.py vs. another one (e.g. before a change).

    python benchmarks/memory/ops_timelines.py OLD_OPS_PY [--micro-batch 4]

Copies this tree's src/ to a temporary folder with OLD_OPS_PY as trady/ops.py, profiles one engine
step of mobilenet_v2 (128 px, batch 32, 2.2%) in each tree in a fresh process (trady.experiments.bench.timeline_table,
the allocator's accounting), and writes results/ops_timelines.json and prints, per block, the
highest live MiB of the engine's forward and backward: old -> new.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from trady.core.files import write_json

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "src"
CHILD = """
import json, sys
from trady.experiments.bench.memory_bench import MemoryBenchConfig
from trady.experiments.bench.timeline_table import timeline_for
micro = int(sys.argv[1]) or None
t = timeline_for(MemoryBenchConfig(model="mobilenet_v2", micro_batch_size=micro), sys.argv[2])
print(json.dumps({k: t[k] for k in ("inference_peak_live_bytes", "engine_peak_live_bytes", "per_block")}))
"""


def profile(src: Path, micro: int, png: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(micro), png], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr.strip().splitlines()[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("old_ops")
    ap.add_argument("--micro-batch", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old_src = Path(tmp) / "src"
        shutil.copytree(SRC, old_src)
        shutil.copy(args.old_ops, old_src / "trady" / "ops.py")
        old = profile(old_src, args.micro_batch, str(Path(tmp) / "old.png"))
        new = profile(SRC, args.micro_batch, str(Path(tmp) / "new.png"))
    rows = []
    for a, b in zip(old["per_block"], new["per_block"]):
        row = {"block": a["block"]}
        for k in ("engine_forward_peak_bytes", "engine_backward_peak_bytes"):
            row[f"old_{k}"], row[f"new_{k}"] = a.get(k), b.get(k)
        rows.append(row)
        mib = lambda v: f"{v / 2**20:6.1f}" if v is not None else "     -"  # noqa: E731
        print(f"{a['block']:<14} forward {mib(a.get('engine_forward_peak_bytes'))} -> "
              f"{mib(b.get('engine_forward_peak_bytes'))}   backward {mib(a.get('engine_backward_peak_bytes'))} -> "
              f"{mib(b.get('engine_backward_peak_bytes'))}")  # fmt: skip
    o, n = old["engine_peak_live_bytes"] / 2**20, new["engine_peak_live_bytes"] / 2**20
    print(f"step peak (live): old {o:.1f} MiB, new {n:.1f} MiB")
    name = "ops_timelines" + (f"-micro{args.micro_batch}" if args.micro_batch else "") + ".json"
    write_json(HERE / "results" / name, {
        "command": "python benchmarks/memory/ops_timelines.py " + " ".join(sys.argv[1:]),
        "old_engine_peak_live_bytes": old["engine_peak_live_bytes"],
        "new_engine_peak_live_bytes": new["engine_peak_live_bytes"],
        "per_block": rows,
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
