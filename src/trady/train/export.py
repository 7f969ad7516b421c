"""The fine-tuned model out of a run folder: stock weights (safetensors) and a JSON of what they are.

`export_run(run_dir, out)` reads the run's last checkpoint (weights_only) and writes
- `out` (`.safetensors`): the model's state dict, the stock keys of the model the run built (the
  engine keeps parameter names), loadable with `trady.models.load_into` into a fresh model;
- `out` with `.json` (also in the safetensors metadata under "trady"): `format`, `model` (zoo name or
  builder `file.py:fn`), `builder` (bool), `num_classes`, `classes` (names; null when the run's data
  cannot be read here), `resolution`, `mean`, `std` (the input normalisation), `strategy`, `budget`,
  `budget_units`, `epoch` (of the checkpoint), `epochs`, `finished`, `test_acc` (that epoch's),
  `seed`, `dataset`, `run` (the run folder), `trady_version`.
`load_exported(path)` builds the model again (zoo or builder) and loads the weights into it.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from trady import models
from trady.config import CHECKPOINT, FinetuneConfig
from trady.core.errors import TradyError
from trady.core.files import atomic_write, write_json
from trady.data import load_dataset
from trady.models import entry
from trady.train.checkpoint import load_checkpoint

EXPORT_FORMAT = "trady-export-1"


def _trady_version() -> str:
    try:
        return version("trady")
    except PackageNotFoundError:  # run from a source tree without installing
        return "unknown"


def info_path(weights_path: str | Path) -> Path:
    """The JSON beside an exported weights file."""
    return Path(weights_path).with_suffix(".json")


def _class_names(config: FinetuneConfig) -> list[str] | None:
    try:
        return list(load_dataset(config.data, data_dir=config.data_dir, seed=config.seed).classes)
    except (TradyError, OSError):  # the user's own Dataset, or data no longer here
        return None


def export_run(run_dir: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the run's fine-tuned weights to `out` (.safetensors) and their description beside it
    (`out` with .json); returns the description."""
    run_dir, out = Path(run_dir), Path(out)
    if out.suffix != ".safetensors":
        raise TradyError(f"export file {str(out)!r} does not end in .safetensors; accepted: FILE.safetensors")
    if not (run_dir / "config.json").is_file() or not (run_dir / CHECKPOINT).is_file():
        raise TradyError(f"{str(run_dir)!r} holds no config.json and {CHECKPOINT}; accepted: a run folder of "
                         "trady finetune with at least one finished epoch")  # fmt: skip
    config = FinetuneConfig.load(run_dir / "config.json")
    state = load_checkpoint(run_dir / CHECKPOINT)
    weights = {k: v.detach().cpu().contiguous().clone() for k, v in state["model"].items()}
    rows = state["metrics"]
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    builder = entry.is_entry_point(config.model)
    zoo = not builder and config.model in models.available()
    spec = models.spec(config.model) if zoo else None
    head = weights.get("classifier.weight")
    info = {
        "format": EXPORT_FORMAT,
        "model": config.model,
        "builder": builder,
        "zoo": zoo,
        "num_classes": summary.get("classes") or (int(head.shape[0]) if head is not None else None),
        "classes": _class_names(config),
        "resolution": summary.get("resolution") or config.resolution or (spec.resolution if spec else None),
        "mean": list(spec.mean if spec else entry.MEAN),
        "std": list(spec.std if spec else entry.STD),
        "strategy": config.strategy,
        "budget": config.budget,
        "budget_units": summary.get("budget_units"),
        "epoch": state["epoch"],
        "epochs": config.epochs,
        "finished": state["epoch"] == config.epochs and summary.get("status") == "ok",
        "test_acc": rows[-1]["test_acc"] if rows else None,
        "seed": config.seed,
        "dataset": config.data,
        "run": str(run_dir.resolve()),
        "trady_version": _trady_version(),
    }
    if info["classes"] is not None:
        info["num_classes"] = len(info["classes"])
    data = save(weights, metadata={"trady": json.dumps(info)})
    atomic_write(out, lambda fh: fh.write(data))
    write_json(info_path(out), info)
    return info


def load_exported(path: str | Path, mcu_dir: str | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A fresh model (zoo or builder, from the JSON beside `path`) holding the exported weights, in
    eval mode, and the JSON. A model given as an nn.Module in Python: build it yourself, then
    `trady.models.load_into(model, safetensors.torch.load_file(path))`."""
    path = Path(path)
    if not path.is_file() or not info_path(path).is_file():
        raise TradyError(f"{str(path)!r} is not an export of trady (no {info_path(path).name} beside it); accepted: "
                         "a FILE.safetensors written by `trady export`")  # fmt: skip
    info = json.loads(info_path(path).read_text())
    if info.get("builder"):
        model = entry.build(info["model"], num_classes=info["num_classes"])
    elif info.get("zoo"):
        model = models.create(info["model"], pretrained=False, num_classes=info["num_classes"], mcu_dir=mcu_dir)
    else:
        raise TradyError(f"{str(path)!r} holds the weights of your own model {info['model']!r}: build it, then "
                         "trady.models.load_into(model, safetensors.torch.load_file(path))")  # fmt: skip
    models.load_into(model, load_file(str(path)), source=str(path))
    return model.eval(), info
