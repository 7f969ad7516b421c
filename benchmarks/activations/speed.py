"""Time of a few-bit activation (forward + backward) against stock autograd's.

    PYTHONPATH=src nice -n 5 python benchmarks/activations/speed.py

SiLU, GELU and Hardswish on a [16, 64, 56, 56] float32 tensor, 1 thread, in one process: stock F.*,
trady's few_bit at 1..4 bits (compiled code loops, trady.engine.native_codes, where a C compiler
exists), and 4 bits on the reference paths (TRADY_NATIVE_CODES=0 with the one-position-at-a-time pack
and the row-gather decode: what trady did before issue 22). Rounds alternate the variants; medians of the rounds.
Writes results/speed.json and results/speed.md; targets (targets.json) on `<kind>_4bit_over_stock`.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

from trady.core.files import write_json, write_text
from trady.engine import activations, native_codes, packed_codes
from trady.experiments.bench.engine_bench import environment

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from targets import check_targets, format_targets, load_targets  # noqa: E402

COMMAND = "PYTHONPATH=src nice -n 5 python benchmarks/activations/speed.py"
KINDS = {"silu": (activations.SILU, F.silu), "gelu": (activations.GELU, F.gelu),
         "hardswish": (activations.HARDSWISH, F.hardswish)}  # fmt: skip


def _reference_paths():
    """The eager reference: no compiled codes, one-position pack, row-gather decode (pre-issue-22)."""

    def levels(packed, bits, lv, numel):
        if len(packed) == 1:
            return F.embedding(packed[0].to(torch.int32), packed_codes._byte_table(bits, lv)).view(-1)[:numel]
        return orig_levels(packed, bits, lv, numel)

    orig_levels = packed_codes.code_levels
    return [
        mock.patch.dict("os.environ", {"TRADY_NATIVE_CODES": "0"}),
        mock.patch.object(activations, "pack_code", packed_codes.pack_code_reference),
        mock.patch.object(activations, "code_levels", levels),
    ]


def _run_reference(x, kind, grad):
    patches = _reference_paths()
    for p in patches:
        p.start()
    try:
        activations.few_bit(x, kind, 4).backward(grad)
    finally:
        for p in reversed(patches):
            p.stop()


def main(rounds: int = 15) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, 56, 56, generator=g).requires_grad_(True)
    grad = torch.randn(x.shape, generator=g)
    t0 = time.perf_counter()
    activations.few_bit(x, activations.SILU, 4).backward(grad)  # builds the code loops once (cached)
    compile_s = time.perf_counter() - t0
    rows = {}
    for name, (kind, stock) in KINDS.items():
        variants = {"stock": lambda s=stock: s(x).backward(grad)}
        for bits in activations.BITS_ACCEPTED:
            variants[f"{bits} bits"] = lambda b=bits, k=kind: activations.few_bit(x, k, b).backward(grad)
        variants["4 bits reference"] = lambda k=kind: _run_reference(x, k, grad)
        times = {v: [] for v in variants}
        for f in variants.values():  # warm-up
            f()
        for r in range(rounds):
            order = list(variants)[r % len(variants):] + list(variants)[: r % len(variants)]
            for v in order:
                t = time.perf_counter()
                variants[v]()
                times[v].append(time.perf_counter() - t)
                x.grad = None
        rows[name] = {v: statistics.median(ts) for v, ts in times.items()}
    ratios = {}
    for name, r in rows.items():
        ratios[f"{name}_4bit_over_stock"] = r["4 bits"] / r["stock"]
        ratios[f"{name}_4bit_reference_over_stock"] = r["4 bits reference"] / r["stock"]
    targets = check_targets(ratios, load_targets(HERE)["targets"])
    env = environment(1)
    env["compiled_codes"] = native_codes.available()
    env["first_call_with_compile_s"] = round(compile_s, 1)
    write_json(HERE / "results" / "speed.json", {"command": COMMAND, "environment": env, "rounds": rounds,
                                                  "median_s": rows, "ratios": ratios, "targets": targets})  # fmt: skip
    head = list(next(iter(rows.values())))
    lines = [f"Forward + backward, ms and x stock (median of {rounds} alternating rounds, [16, 64, 56, 56] float32, "
             f"1 thread, compiled codes: {env['compiled_codes']}). `{COMMAND}` ({env['date']}).", "",
             "| activation | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]  # fmt: skip
    for name, r in rows.items():
        cells = [f"{r[v] * 1e3:.1f} ({r[v] / r['stock']:.2f}x)" for v in head]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "```", format_targets(targets), "```"]
    write_text(HERE / "results" / "speed.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
