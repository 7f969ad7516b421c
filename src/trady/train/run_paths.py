"""The paths in a run's settings, made absolute: a run folder resumes from any working folder.

config.json stores what a run reads (its image folder, model file, weights, profile, data and MCU
folders, its own folder). Stored as typed, a relative path means something else once `trady finetune
--resume /abs/run` runs from another folder ("unknown dataset 'digits_png'"). `absolute_paths` makes
them absolute against the current folder when the run starts; settings that are names (a zoo model,
a dataset name, a `package.module:fn` builder) stay as they are. Comparisons of stored settings with
new ones (resume checks, sweeps) pass both through `absolute_settings`, so a run folder written before
(relative paths) still matches when it is resumed from the folder it was started in.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from trady.config import FinetuneConfig
from trady.data.loaders import dataset_key
from trady.models import entry

PATH_SETTINGS = ("weights", "profile", "data_dir", "mcu_dir", "out")  # always file or folder paths


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _is_folder_path(data: str) -> bool:
    """`--data` names a folder (not a dataset): load_dataset's rule (a mistyped name stays a name, so
    that its error suggests the closest dataset)."""
    if not data or dataset_key(data) is not None:
        return False
    return any(c in data for c in ("/", "\\", "~")) or os.path.exists(os.path.expanduser(data))


def absolute_model(model: str) -> str:
    """A builder `path/to/file.py:fn` with its file made absolute; zoo and module names unchanged."""
    if not entry.is_entry_point(model):
        return model
    where, fn = model.split(":")
    return f"{_absolute(where)}:{fn}" if where.endswith(".py") else model


def absolute_settings(settings: dict[str, Any], *, data: bool = True, model: bool = True) -> dict[str, Any]:
    """A config dict (config.json's keys) with its paths absolute against the current folder; `data`,
    `model`: whether those settings name what is read (False: they only name the user's own objects)."""
    out = dict(settings)
    for key in PATH_SETTINGS:
        if isinstance(out.get(key), str) and out[key]:
            out[key] = _absolute(out[key])
    if model and isinstance(out.get("model"), str):
        out["model"] = absolute_model(out["model"])
    if data and isinstance(out.get("data"), str) and _is_folder_path(out["data"]):
        out["data"] = _absolute(out["data"])
    return out


def absolute_paths(config: FinetuneConfig, *, data: bool = True, model: bool = True) -> FinetuneConfig:
    """A copy of `config` whose paths are absolute (the run folder stores these)."""
    settings = absolute_settings(config.to_dict(), data=data, model=model)
    changed = {k: v for k, v in settings.items() if v != getattr(config, k)}
    return dataclasses.replace(config, **changed) if changed else config
