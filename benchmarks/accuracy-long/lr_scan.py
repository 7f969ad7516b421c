"""Full fine-tuning's own learning rate, chosen on a held-out split (issue 14 item 3).

For each model: full fine-tuning with the accuracy-long grid's settings (grid.json base) and seed 0,
trained on 80% of the grid's training subset and scored on the other 20% (a stratified split; the
test set is never seen), for each lr of the scan. The lr with the best held-out accuracy after the
last epoch (ties: the smaller lr) is written to results/lr_scan.json, which run.sh passes to the full
fine-tuning sweep (`--set lr=...`). The runs use trady's own pieces (train.setup, train_epoch,
evaluate); only the loaders are rebuilt on the split.

    PYTHONPATH=src OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python benchmarks/accuracy-long/lr_scan.py
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from trady import models
from trady.config import FinetuneConfig
from trady.core.files import write_json
from trady.data import BatchLoader, load_dataset, stratified_split
from trady.data.transforms import ImageTransform
from trady.train import loop as train

HERE = Path(__file__).resolve().parent
LRS = [0.01, 0.005, 0.002]  # 0.0156 and above collapse full fine-tuning (benchmarks/lr-recipe)


def held_out_run(model: str, lr: float, base: dict, epochs: int) -> dict:
    config = FinetuneConfig.from_dict({**base, "model": model, "strategy": "full", "lr": lr, "epochs": epochs,
                                       "seed": 0, "progress": False, "measure_memory": False})  # fmt: skip
    run = train.setup(config)
    # the same training subset the grid's runs get (load_dataset is seeded), split 80 / 20
    data = load_dataset(config.data, data_dir=config.data_dir, train_size=config.train_size,
                        test_size=config.test_size, seed=config.seed)  # fmt: skip
    fit_idx, val_idx = stratified_split(data.train.labels, 0.2, seed=config.seed)
    spec = models.spec(model)
    tf_train = ImageTransform(run.resolution, spec.mean, spec.std, train=True)
    tf_test = ImageTransform(run.resolution, spec.mean, spec.std, train=False)
    run.train_loader = BatchLoader(data.train.subset(fit_idx), config.batch_size, tf_train, shuffle=True,
                                   seed=config.seed, drop_last=True)  # fmt: skip
    run.test_loader = BatchLoader(data.train.subset(val_idx), 64, tf_test, shuffle=False, seed=config.seed)
    curve, status = [], "ok"
    t0 = time.perf_counter()
    try:
        for epoch in range(1, epochs + 1):
            stats = train.train_epoch(run, epoch, run.optimizer, measure=False)
            loss, acc = train.evaluate(run)
            curve.append({"epoch": epoch, "train_loss": stats["train_loss"], "val_loss": loss, "val_acc": acc})
            if not math.isfinite(loss):
                raise train.NonFiniteLoss(epoch, what="held-out loss")
    except train.NonFiniteLoss as err:
        status = f"diverged: {err}"
    return {"model": model, "lr": lr, "status": status, "val_acc": curve[-1]["val_acc"] if status == "ok" else None,
            "fit_size": len(fit_idx), "val_size": len(val_idx), "epochs": epochs, "curve": curve,
            "wall_time_s": time.perf_counter() - t0}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", default=str(HERE / "grid.json"))
    ap.add_argument("--lrs", nargs="+", type=float, default=LRS)
    ap.add_argument("--epochs", type=int, default=None, help="default: the grid's epochs")
    args = ap.parse_args()
    torch.set_num_threads(1)
    grid = json.loads(Path(args.grid).read_text())
    base = grid["base"]
    epochs = args.epochs or base["epochs"]
    path = HERE / "results" / "lr_scan.json"
    out = json.loads(path.read_text()) if path.is_file() else {"runs": [], "chosen": {}}
    done = {(r["model"], r["lr"], r["epochs"]) for r in out["runs"]}
    for model in grid["models"]:
        for lr in args.lrs:
            if (model, lr, epochs) in done:
                continue
            r = held_out_run(model, lr, base, epochs)
            took = r["wall_time_s"]
            print(f"{model:<11} lr {lr:<6} {r['status']:<8} val_acc {r['val_acc']}  ({took:.0f} s)", flush=True)
            out["runs"].append(r)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, out)
        ok = [r for r in out["runs"] if r["model"] == model and r["epochs"] == epochs and r["val_acc"] is not None]
        if ok:
            best = max(ok, key=lambda r: (r["val_acc"], -r["lr"]))
            out["chosen"][model] = best["lr"]
            print(f"{model}: full fine-tuning lr {best['lr']} (held-out acc {best['val_acc']:.4f})")
    write_json(path, out)


if __name__ == "__main__":
    main()
