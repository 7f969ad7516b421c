"""Time cost of the functional-call mode (trady.engine.functional_calls) on a ReLU-family model, which needs none.

    PYTHONPATH=src python benchmarks/architectures/mode_overhead.py

Two engine-prepared copies of mobilenet_v2 (random weights, 128 px, batch 16, 1 thread, the upper 20
layers' first 3 channels selected): one as SparseEngine prepares it, one prepared without the mode's
hooks (layer_kinds.install patched out, for this measurement only). Forward + cross-entropy + backward,
alternating rounds (which copy goes first alternates), medians. Writes results/mode_overhead.json.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

from trady import models
from trady.core.files import write_json
from trady.engine import SparseEngine, layer_kinds
from trady.experiments.bench.engine_bench import environment

HERE = Path(__file__).resolve().parent
COMMAND = "PYTHONPATH=src python benchmarks/architectures/mode_overhead.py"


def main(rounds: int = 15) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = models.create("mobilenet_v2", num_classes=10)
    x, y = torch.randn(16, 3, 128, 128), torch.randint(0, 10, (16,))
    with_mode, without_mode = copy.deepcopy(base), copy.deepcopy(base)
    engines = {"with_mode": SparseEngine(with_mode, x)}
    with mock.patch.object(layer_kinds, "install", lambda engine: []):
        engines["without_mode"] = SparseEngine(without_mode, x)
    nets = {"with_mode": with_mode, "without_mode": without_mode}
    for name, engine in engines.items():
        engine.select({n: [0, 1, 2] for n in engine.costs.names[-20:]})
        nets[name].eval()

    def step(model) -> float:
        t = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        return time.perf_counter() - t

    times = {k: [] for k in nets}
    for name in nets:
        step(nets[name])  # warm-up
    for r in range(rounds):
        order = list(nets) if r % 2 == 0 else list(reversed(nets))
        for name in order:
            times[name].append(step(nets[name]))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"command": COMMAND, "environment": environment(1), "rounds": rounds, "median_step_s": med,
              "overhead": med["with_mode"] / med["without_mode"] - 1, "times_s": times}  # fmt: skip
    write_json(HERE / "results" / "mode_overhead.json", result)
    print(f"median step: with mode {med['with_mode'] * 1e3:.1f} ms, without {med['without_mode'] * 1e3:.1f} ms, "
          f"overhead {100 * result['overhead']:+.1f} %")  # fmt: skip


if __name__ == "__main__":
    main()
