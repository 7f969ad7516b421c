"""Checkpoints of a run: what `checkpoint.pt` holds, and how a resume checks and restores it.

A checkpoint is written atomically after every epoch and holds the weights, the optimizer state
(full/classifier/bias keep one optimizer for the whole run), the schedule position, the tuner's state
(the strategy's static selection and MeDyate's norms, the measured gradient norms, the position and
the selection), the RNG states and the metrics so far; everything else is a pure function of
(seed, epoch, step): data order, augmentation, selections and the learning rate. An interrupted epoch
is run again from its start. Loading uses torch.load(weights_only=True): a pickle carrying code is refused.

Content checksum: `save_checkpoint` records the SHA-256 of the checkpoint's bytes in `checkpoint.sha256`
(the last three) before the file is replaced, and keeps the checkpoint it replaces as `checkpoint.prev.pt`
(a hard link, so that one exists at every moment); `load_checkpoint` refuses, in one line, a
checkpoint whose bytes match no recorded sum and names the previous good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trady.config import CHECKPOINT, NON_RESULT_SETTINGS
from trady.core.errors import TradyError
from trady.core.files import WriteFailed, load_torch, torch_bytes, write_bytes, write_json
from trady.core.formatting import one_line
from trady.models.weights import load_into
from trady.train.run_paths import absolute_settings
from trady.train.setup import Run

CHECKPOINT_FORMAT = "trady-checkpoint-2"
PREVIOUS = "checkpoint.prev.pt"  # the checkpoint before the last one (kept when the last is found corrupt)
CHECKSUMS = "checkpoint.sha256"  # JSON: the SHA-256 of the last checkpoints written
KEPT_SUMS = 3
RUN_FILES = (CHECKPOINT, "metrics.jsonl", "summary.json", PREVIOUS, CHECKSUMS)  # what a fresh start replaces
__all__ = [
    "CHECKPOINT", "CHECKPOINT_FORMAT", "CHECKSUMS", "PREVIOUS", "RUN_FILES", "checkpoint_state", "load_checkpoint",
    "restore", "save_checkpoint",
]  # fmt: skip


def rng_state() -> dict[str, Any]:
    """The global random states (training itself draws from (seed, epoch)-derived generators only)."""
    version, state, gauss = random.getstate()
    np_state = np.random.get_state(legacy=True)
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": list(state), "gauss": gauss},
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(
        ("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    )
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda"]])


def checkpoint_state(run: Run, epoch: int, rows: list[dict], elapsed: float) -> dict[str, Any]:
    tuner = run.tuner.state_dict()
    steps = len(run.train_loader)
    return {
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "model": run.model.state_dict(),  # syncs the trained slices into the weights first
        "optimizer": run.optimizer.state_dict() if run.optimizer is not None else None,
        "tuner": tuner,
        "strategy": tuner["strategy"],  # the strategy's own state, also at the top for readers
        "schedule": {
            "step": epoch * steps,
            "steps_per_epoch": steps,
            "total_steps": steps * run.config.epochs,
            "warmup_steps": steps * run.config.warmup_epochs,
            "base_lr": run.config.lr,
        },
        "rng": rng_state(),
        "world_size": run.world,
        "data": {"train_size": run.train_size, "test_size": run.test_size, "fingerprint": run.fingerprint},
        "metrics": rows,
        "elapsed_s": elapsed,
        "config": run.config.to_dict(),
    }


def _read_sums(folder: Path) -> list[dict[str, Any]] | None:
    try:
        data = json.loads((folder / CHECKSUMS).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise TradyError(f"cannot read {folder / CHECKSUMS}: {err}; accepted: the file trady finetune wrote") from None
    sums = data.get("checkpoints") if isinstance(data, dict) else None
    if not isinstance(sums, list):
        raise TradyError(f"{folder / CHECKSUMS} holds no list 'checkpoints'; accepted: the file trady finetune wrote")
    return [s for s in sums if isinstance(s, dict) and isinstance(s.get("sha256"), str)]


def save_checkpoint(folder: str | Path, state: dict[str, Any]) -> None:
    """Write `state` as folder/checkpoint.pt with its SHA-256 recorded first and the checkpoint it replaces
    kept as checkpoint.prev.pt. A failed write (disk full) raises WriteFailed and leaves the old
    checkpoint, its sum and the previous one as they were."""
    folder = Path(folder)
    data = torch_bytes(state)
    digest = hashlib.sha256(data).hexdigest()
    sums = [s for s in (_read_sums(folder) or []) if s["sha256"] != digest]
    newest = {"sha256": digest, "epoch": state.get("epoch")}
    write_json(folder / CHECKSUMS, {"checkpoints": [newest, *sums][:KEPT_SUMS]})
    current = folder / CHECKPOINT
    if current.is_file():  # keep it as the previous one: a hard link, then an atomic rename
        tmp = folder / f".{PREVIOUS}.link.tmp"
        try:
            tmp.unlink(missing_ok=True)
            try:
                os.link(current, tmp)
            except OSError:  # a file system without hard links
                shutil.copyfile(current, tmp)
            os.replace(tmp, folder / PREVIOUS)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise WriteFailed(f"cannot write {folder / PREVIOUS}: {err.strerror or err}") from None
    write_bytes(current, data)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_checkpoint(path: str | Path) -> None:
    """Refuse (one line) a checkpoint whose bytes match no SHA-256 recorded beside it. A folder written
    before checksums existed (no checkpoint.sha256) is not checked."""
    path = Path(path)
    sums = _read_sums(path.parent)
    if sums is None or not path.is_file():
        return
    digest = _sha256(path)
    if any(s["sha256"] == digest for s in sums):
        return
    previous = path.parent / PREVIOUS
    kept = "no good previous checkpoint is kept"
    if path.name != PREVIOUS and previous.is_file():
        prev = _sha256(previous)
        epoch = next((s.get("epoch") for s in sums if s["sha256"] == prev), None)
        if epoch is not None:
            kept = f"the previous good checkpoint (epoch {epoch}) is kept in {previous}: copy it to {path} to resume"
    raise TradyError(
        f"checkpoint {path} is corrupted: its SHA-256 {digest[:16]}... matches none recorded in "
        f"{path.parent / CHECKSUMS}; {kept}"
    )


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's dict, read with torch.load(weights_only=True): a pickle carrying code is refused;
    its bytes must match a SHA-256 recorded beside it (checkpoint.sha256)."""
    verify_checkpoint(path)
    state = load_torch(path, map_location="cpu")
    required = ("epoch", "model", "tuner", "metrics")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise TradyError(f"{path} is not a trady checkpoint (format {got!r}); accepted: a {CHECKPOINT} that "
                         f"trady finetune wrote ({CHECKPOINT_FORMAT})")  # fmt: skip
    missing = [k for k in required if k not in state]
    if missing:
        raise TradyError(f"checkpoint {path} lacks {', '.join(missing)}; accepted: a complete {CHECKPOINT_FORMAT}")
    return state


def check_compatible(run: Run, state: dict[str, Any], path: Path) -> int:
    """The checkpoint belongs to this run (same settings, data and process count); returns its epoch."""
    config = run.config
    theirs = state.get("config")
    if isinstance(theirs, dict):
        # both through the same paths rule: a run folder from before paths were stored absolute matches
        theirs, ours = absolute_settings(theirs), absolute_settings(config.to_dict())
        diff = [k for k in ours if k not in NON_RESULT_SETTINGS and k in theirs and theirs[k] != ours[k]]
        if diff:
            k = diff[0]
            raise TradyError(
                f"checkpoint {path} was written by a different run: {k} {theirs[k]!r} there vs {ours[k]!r} here"
                + (f" (and {len(diff) - 1} more settings)" if len(diff) > 1 else "")
                + "; resume with the run's own config.json, or start again without --resume"
            )
    epoch = state["epoch"]
    if not isinstance(epoch, int) or not 0 <= epoch <= config.epochs:
        raise TradyError(f"checkpoint {path} has epoch {epoch!r}; accepted: 0..{config.epochs}")
    if not isinstance(state["metrics"], list) or len(state["metrics"]) != epoch:
        raise TradyError(f"checkpoint {path} holds metrics of {len(state['metrics'])} epochs for epoch {epoch}")
    world = state.get("world_size", 1)
    if world != run.world:
        raise TradyError(
            f"checkpoint {path} was written by a run of {world} process(es), this one has {run.world}; "
            "resume with the same number of processes (torchrun --nproc-per-node): the batches depend on it"
        )
    data = state.get("data")
    if isinstance(data, dict):
        now = {"train_size": run.train_size, "test_size": run.test_size, "fingerprint": run.fingerprint}
        for k, v in now.items():
            if k in data and data[k] != v:
                raise TradyError(
                    f"the data of {config.data!r} changed since checkpoint {path} was written ({k} {data[k]} then, "
                    f"{v} now); resuming needs the same data"
                )
    schedule = state.get("schedule")
    if isinstance(schedule, dict) and schedule.get("steps_per_epoch") != len(run.train_loader):
        raise TradyError(
            f"checkpoint {path} has {schedule.get('steps_per_epoch')} steps per epoch, this run "
            f"{len(run.train_loader)}; resuming needs the same data and batch size"
        )
    return epoch


def restore(run: Run, state: dict[str, Any], path: str | Path = CHECKPOINT) -> tuple[int, list[dict], float]:
    """Put the checkpoint's weights, optimizer, tuner and RNG states into `run`; returns
    (epoch, metrics so far, elapsed seconds)."""
    path = Path(path)
    epoch = check_compatible(run, state, path)
    if not isinstance(state["model"], dict):
        raise TradyError(f"checkpoint {path}: 'model' is not a state dict")
    # one line naming the missing and unexpected keys and the shape mismatches
    load_into(run.model, state["model"], source=f"the weights in checkpoint {path}")
    if run.optimizer is not None:
        if state.get("optimizer") is None:
            raise TradyError(f"checkpoint {path} has no optimizer state for strategy {run.config.strategy!r}")
        try:
            run.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, TypeError, RuntimeError) as err:
            raise TradyError(f"checkpoint {path}: optimizer state does not fit the model: {one_line(err)}") from None
    try:
        run.tuner.load_state_dict(state["tuner"])
    except TradyError as err:
        raise TradyError(f"checkpoint {path}: {err}") from None
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as err:
        raise TradyError(f"checkpoint {path}: tuner state is malformed: {one_line(err)}") from None
    if isinstance(state.get("rng"), dict):
        try:
            set_rng_state(state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise TradyError(f"checkpoint {path}: malformed RNG state: {one_line(err)}") from None
    return epoch, list(state["metrics"]), float(state.get("elapsed_s", 0.0))


def clear_stale(out: Path, fresh: bool) -> None:
    """Remove temporary files an interrupted atomic write left; a fresh start also removes the files of an
    earlier run in the folder, so that the folder never mixes two runs."""
    for name in RUN_FILES + ("config.json",):
        for tmp in out.glob(f".{name}.*tmp"):
            tmp.unlink(missing_ok=True)
        if fresh and name != "config.json":
            (out / name).unlink(missing_ok=True)
