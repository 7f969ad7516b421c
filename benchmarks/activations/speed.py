"""Time of a few-bit activation (forward + backward) against stock autograd's.

    PYTHONPATH=src python benchmarks/activations/speed.py

SiLU, GELU and Hardswish on a [16, 64, 56, 56] float32 tensor, 1 thread: stock F.* vs
trady.engine.activations.few_bit at 1..4 bits; rounds alternate the variants, medians of 9 rounds.
Writes results/speed.json and results/speed.md.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from trady.core.files import write_json, write_text
from trady.engine import activations
from trady.experiments.bench.engine_bench import environment

HERE = Path(__file__).resolve().parent
COMMAND = "PYTHONPATH=src python benchmarks/activations/speed.py"
KINDS = {"silu": (activations.SILU, F.silu), "gelu": (activations.GELU, F.gelu),
         "hardswish": (activations.HARDSWISH, F.hardswish)}  # fmt: skip


def main(rounds: int = 9) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, 56, 56, generator=g).requires_grad_(True)
    grad = torch.randn(x.shape, generator=g)
    rows = {}
    for name, (kind, stock) in KINDS.items():
        variants = {"stock": lambda s=stock: s(x)}
        for bits in activations.BITS_ACCEPTED:
            variants[f"{bits} bits"] = lambda b=bits, k=kind: activations.few_bit(x, k, b)
        times = {v: [] for v in variants}
        for f in variants.values():  # warm-up
            f().backward(grad)
        for r in range(rounds):
            order = list(variants)[r % len(variants):] + list(variants)[: r % len(variants)]
            for v in order:
                t = time.perf_counter()
                variants[v]().backward(grad)
                times[v].append(time.perf_counter() - t)
            x.grad = None
        rows[name] = {v: statistics.median(ts) for v, ts in times.items()}
    env = environment(1)
    write_json(HERE / "results" / "speed.json", {"command": COMMAND, "environment": env, "median_s": rows})
    head = list(next(iter(rows.values())))
    lines = [f"Forward + backward, ms (median of {rounds} alternating rounds, [16, 64, 56, 56], 1 thread). "
             f"`{COMMAND}` ({env['date']}).", "", "| activation | " + " | ".join(head) + " |",
             "|---" * (len(head) + 1) + "|"]  # fmt: skip
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[v] * 1e3:.1f}" for v in head) + " |")
    write_text(HERE / "results" / "speed.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
