"""Fit the few-bit derivative tables the library ships and report their error.

    PYTHONPATH=src python benchmarks/activations/fit.py

For every smooth activation at its default parameters and every bits = 1..4: a Lloyd-Max quantiser of
d = f'(X), X ~ N(0, 1) (trady.engine.activations.fit_table: deterministic quadrature, no sampling). Writes
src/trady/activation_tables.json (the tables trady.engine.activations loads) and results/fit.json +
results/fit.md (relative RMS error of the derivative: rms(f' - q(f')) / rms(f')).
"""

from __future__ import annotations

import sys
from pathlib import Path

from trady.core.files import write_json, write_text
from trady.engine import activations

HERE = Path(__file__).resolve().parent
COMMAND = "PYTHONPATH=src python benchmarks/activations/fit.py"


def main() -> None:
    tables: dict[str, dict] = {}
    rows = []
    for kind in activations.DEFAULT_KINDS:
        tables[kind.key] = {}
        for bits in activations.BITS_ACCEPTED:
            t = activations.fit_table(kind, bits)
            tables[kind.key][str(bits)] = {
                "borders": list(t.borders),
                "levels": list(t.levels),
                "rms_error": t.rms_error,
                "rms_derivative": t.rms_derivative,
            }
            rows.append({"activation": kind.key, "bits": bits, "relative_rms_error": t.rms_error / t.rms_derivative})
    write_json(activations.TABLES_PATH, {"distribution": "N(0, 1)", "command": COMMAND, "tables": tables})
    write_json(HERE / "results" / "fit.json", {"command": COMMAND, "rows": rows})
    lines = [
        f"Relative RMS error of the b-bit derivative, rms(f'(X) - q(f'(X))) / rms(f'(X)), X ~ N(0, 1). `{COMMAND}`",
        "LeakyReLU and Hardsigmoid are exact with 1 bit (their derivative takes two values).",
        "",
        "| activation | 1 bit | 2 bits | 3 bits | 4 bits |",
        "|---|---|---|---|---|",
    ]
    for key in tables:
        errs = [f"{r['relative_rms_error']:.3f}" for r in rows if r["activation"] == key]
        lines.append(f"| {key} | " + " | ".join(errs) + " |")
    write_text(HERE / "results" / "fit.md", "\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
