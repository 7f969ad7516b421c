"""One time table: inference, trady, stock freeze, full fine-tuning, the simulation and plan's floor.

    PYTHONPATH=src nice -n 5 python benchmarks/speed/run.py [--rounds 3] [--warmup 1] [--models a,b]

Every zoo model (mobilenet_v2, mcunet-in1, mbv2-w0.35, proxyless-w0.3, efficientnet_lite0) and two
constructed modern ones (trady.models.constructed: efficientnet_b0_like, SiLU + squeeze-excitation;
vit_like, attention), 1 thread, 128 px, batch 32, budget 2.2%, TraDy's draw (the shipped profile's
top-K; top half by execution order where none ships). Each model is one `trady bench engine` run
(trady.experiments.bench.engine_bench): the variants alternate round-robin in one process, medians.
Writes results/speed.json, results/speed.md and results/speed.png; targets in targets.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from trady.core.files import write_json, write_text
from trady.experiments.bench.engine_bench import EngineBenchConfig, environment, run_engine_bench

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from targets import check_targets, format_targets, load_targets  # noqa: E402

COMMAND = "PYTHONPATH=src nice -n 5 python benchmarks/speed/run.py"
ZOO = ("mobilenet_v2", "mcunet-in1", "mbv2-w0.35", "proxyless-w0.3", "efficientnet_lite0")
CONSTRUCTED = ("efficientnet_b0_like", "vit_like")
COLUMNS = ("forward", "engine", "freeze", "full", "simulation")
LABELS = {"forward": "inference", "engine": "trady", "freeze": "stock freeze", "full": "full",
          "simulation": "simulation"}  # fmt: skip


def constructed(name: str) -> tuple[torch.nn.Module, dict]:
    """The two modern networks at a size a 128 px input suits (sizes recorded in the results)."""
    from trady.models import constructed as c

    if name == "efficientnet_b0_like":
        size = {"width": 0.5, "depth": 0.5}
        model = c.efficientnet_b0_like(num_classes=10, **size)
    else:
        size = {"image": 128, "patch": 16, "dim": 192, "depth": 6, "heads": 3}
        model = c.ViTLike(10, size["image"], size["patch"], size["dim"], size["depth"], heads=size["heads"])
    c.calibrate_batchnorm(model, 128)
    return model.eval(), size


def run(models: list[str], rounds: int, warmup: int) -> dict:
    rows = {}
    for name in models:
        config = EngineBenchConfig(model=name, resolution=128, batch_size=32, budget="2.2%", threads=1,
                                   rounds=rounds, warmup=warmup)  # fmt: skip
        model, size = (None, None) if name in ZOO else constructed(name)
        if model is not None:
            config.pretrained = False
        r = run_engine_bench(config, model=model)
        rows[name] = {
            "step_s": {c: r[f"{c}_step_s"] for c in COLUMNS},
            "floor_forwards": r["floor_forwards"],
            "ratios": r["ratios"],
            "setup": r["setup"],
            "size": size,
        }
        print(f"{name}: " + ", ".join(f"{LABELS[c]} {r[f'{c}_step_s'] / r['forward_step_s']:.2f}x" for c in COLUMNS)
              + f", floor {r['floor_forwards']:.2f}x", flush=True)  # fmt: skip
    return rows


def table(rows: dict) -> list[str]:
    head = ["model", *(LABELS[c] for c in COLUMNS), "plan's floor", "trady / freeze", "trady / floor"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, r in rows.items():
        fwd = r["step_s"]["forward"]
        cells = [f"{r['step_s'][c] / fwd:.2f}x" for c in COLUMNS]
        ratios = r["ratios"]
        cells += [f"{r['floor_forwards']:.2f}x", f"{ratios['engine_over_freeze_step']:.2f}",
                  f"{ratios['engine_over_floor_step']:.2f}"]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def plot(rows: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.5))
    ax = fig.add_subplot()
    names = list(rows)
    width = 0.8 / (len(COLUMNS) - 1)
    for i, c in enumerate(COLUMNS[1:]):
        vals = [rows[n]["step_s"][c] / rows[n]["step_s"]["forward"] for n in names]
        ax.bar([k + i * width for k in range(len(names))], vals, width, label=LABELS[c])
    for k, n in enumerate(names):
        ax.hlines(rows[n]["floor_forwards"], k - width / 2, k + width * (len(COLUMNS) - 1.5), colors="k",
                  linestyles="--", label="plan's floor" if k == 0 else None)  # fmt: skip
    ax.set_xticks([k + width * (len(COLUMNS) - 2) / 2 for k in range(len(names))], names, rotation=15)
    ax.set_ylabel("step time / inference (forward + loss)")
    ax.set_title("One training step, 1 thread, 128 px, batch 32, budget 2.2% (medians, alternating rounds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(str(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--models", default=",".join(ZOO + CONSTRUCTED))
    args = ap.parse_args()
    rows = run(args.models.split(","), args.rounds, args.warmup)
    ratios = {}
    for name, r in rows.items():
        ratios[f"{name}_trady_over_freeze"] = r["ratios"]["engine_over_freeze_step"]
        ratios[f"{name}_trady_over_floor"] = r["ratios"]["engine_over_floor_step"]
    targets = check_targets(ratios, load_targets(HERE)["targets"])
    env = environment(1)
    command = f"{COMMAND} --rounds {args.rounds} --warmup {args.warmup}"
    write_json(HERE / "results" / "speed.json", {"command": command, "environment": env, "models": rows,
                                                  "ratios": ratios, "targets": targets})  # fmt: skip
    plot(rows, HERE / "results" / "speed.png")
    lines = [f"Step time / inference per model (1 thread, 128 px, batch 32, budget 2.2%, TraDy's draw; medians of "
             f"{args.rounds} alternating rounds after {args.warmup} warm-up). `{command}` ({env['date']}, "
             f"{env['cpu']}, {env['cpu_count']} cores shared with other users' jobs).", "", *table(rows), "", "```",
             format_targets(targets), "```"]  # fmt: skip
    write_text(HERE / "results" / "speed.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
