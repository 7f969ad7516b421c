"""The fine-tuning loop: per-epoch channel re-selection, plain SGD, cosine schedule, eval, checkpoints.

One call, `finetune(config)`, runs a whole fine-tune and writes its run folder:
config.json, metrics.jsonl (one line per epoch), summary.json, checkpoint.pt (every epoch, atomic).
`finetune(config, model=net, train_data=ds, test_data=ds)` does the same for the user's own nn.Module
and torch Datasets or DataLoaders. The run is built by `trady.train.setup.setup`; the strategy reaches
the model through one `trady.Tuner` (sparse strategies and `bias` through its SparseEngine, `full`
and `classifier` through requires_grad flags): `tuner.start_epoch(epoch)` draws the epoch's selection
and hands the optimizer its param groups.

Resuming (`finetune(config, resume=True)`) continues from the last checkpoint (trady.train.checkpoint) and
ends with the same metrics and weights as an uninterrupted run.

Data parallel (torchrun, see `trady.core.distributed`): every rank trains on its shard of each global
batch, the selection is the same on every rank, the gradients of the trained tensors (selected
slices, classifier, biases) are averaged over the ranks each step, and only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trady.config import FinetuneConfig
from trady.core import distributed, run_lock
from trady.core.errors import TradyError
from trady.core.files import WriteFailed, write_json, write_jsonl
from trady.core.formatting import one_line
from trady.core.schedule import lr_at
from trady.engine.batchnorm import batchnorm_training
from trady.engine.costs import Selection
from trady.memory.resident_peak import allocator_in_use, peak_measure, process_peak_bytes
from trady.train.checkpoint import CHECKPOINT, checkpoint_state, clear_stale, load_checkpoint, restore, save_checkpoint
from trady.train.microbatch import accumulate_gradients
from trady.train.setup import Run, make_optimizer, setup
from trady.train.step_meter import StepMeter

__all__ = ["CHECKPOINT", "Diverged", "NonFiniteLoss", "Run", "finetune", "load_checkpoint", "setup"]

# A loss above this many times the run's first loss (or 1, when the first is below 1) is a divergence.
EXPLODING_FACTOR = 100.0


def choose_selection(run: Run, epoch: int) -> Selection:
    """Draw the selection of `epoch` through the tuner (which puts it into the engine)."""
    run.tuner.start_epoch(epoch)
    return run.tuner.selection


# --------------------------------------------------------------------------------------------------
# One epoch
# --------------------------------------------------------------------------------------------------


def _grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients of `params` (zeros where a tensor got none): the same list on every rank."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


STEM_LOSS_FACTOR = 10.0  # a loss this many times the first step's, with the stem trained, is worth a line


def _watch_stem(run: Run, loss: float, epoch: int, step: int) -> None:
    """One line (and a summary note) the first time the loss passes STEM_LOSS_FACTOR x the first step's
    while the draw trains the stem (the first layer): its input is the raw image, where an lr that suits
    the deeper layers can blow the features up. Called after _check_finite, which records the first loss."""
    if run.stem_warned or not loss > STEM_LOSS_FACTOR * run.first_loss or not run.costs.layers:
        return
    stem = run.costs.layers[0].name
    if run.mode != "full" and stem not in run.tuner.selection:
        return
    run.stem_warned = True
    note = (f"loss {loss:.3g} at epoch {epoch}, step {step + 1} is over {STEM_LOSS_FACTOR:g}x the first step's "
            f"({run.first_loss:.3g}) while the stem {stem!r} trains; a lower --lr may help")  # fmt: skip
    run.notes.append(note)
    if run.rank == 0:
        print(f"warning: {note}", file=sys.stderr, flush=True)


def train_epoch(run: Run, epoch: int, optimizer: torch.optim.Optimizer, measure: bool) -> dict[str, Any]:
    """One epoch: forward, loss, backward, optimizer step, tuner step; the StepMeter measures two steps.
    Its `lr` is the mean of the steps' learning rates (the last step's is 0 at the end of the cosine)."""
    config, loader = run.config, run.train_loader
    loader.set_epoch(epoch)
    steps = len(loader)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    loss_sum, correct, seen, lr_sum = 0.0, 0, 0, 0.0
    bar = _progress(loader, config, f"epoch {epoch}/{config.epochs}", run.rank)
    started = time.perf_counter()
    # batchnorm="train": batch statistics in the training steps (running statistics updated), dropout stays off
    train_bn = batchnorm_training(run.model) if config.batchnorm == "train" else contextlib.nullcontext()
    with train_bn, StepMeter(run, steps, enabled=measure) as meter:
        for i, (x, y) in enumerate(bar):
            x, y = x.to(run.device), y.to(run.device)
            lr_sum += _set_lr(run, optimizer, epoch, i, steps)
            optimizer.zero_grad(set_to_none=True)
            with meter.step(i):
                logits, loss = accumulate_gradients(meter.forward_loss(i), x, y, config.micro_batch_size)
                _watch_stem(run, _check_finite(run, loss, epoch, i, steps), epoch, i)
                if run.world > 1:  # data parallel: average the trained tensors' gradients over the ranks
                    run.comm_elements = distributed.all_reduce_mean_(_grads(params))
                optimizer.step()  # the tuner's optimizer pre-hook records MeDyate's gradient norms first
                run.tuner.step()  # resample_every: the next forward trains a new draw (same slice tensors)
            loss_sum, seen = loss_sum + loss.item() * len(y), seen + len(y)
            correct += int((logits.argmax(1) == y).sum())
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
    step_time = (time.perf_counter() - started) / max(steps, 1)
    if run.engine is not None:
        run.engine.sync()
    with torch.no_grad():
        if not all(bool(torch.isfinite(p).all()) for p in params):
            raise NonFiniteLoss(epoch, what="weights", where="at the end of")
    if run.world > 1:  # the epoch's metrics over the global batches
        loss_sum, correct, seen = distributed.all_reduce_sum([loss_sum, correct, seen], run.device)
    lr = lr_sum / steps if steps else _set_lr(run, optimizer, epoch, 0, 1)
    return {"lr": lr, "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
            "step_time_s": step_time, "trainable_parameters": sum(p.numel() for p in params), **meter.results()}


def _set_lr(run: Run, optimizer: torch.optim.Optimizer, epoch: int, i: int, steps: int) -> float:
    """Warm-up + cosine for step i of `epoch`; each param group scales its own base LR (the fresh head's)."""
    config = run.config
    scale = lr_at((epoch - 1) * steps + i, steps * config.epochs, steps * config.warmup_epochs, 1.0)
    for g in optimizer.param_groups:
        g["lr"] = scale * g.get("base_lr", config.lr)
    return scale * config.lr


def _check_finite(run: Run, loss: torch.Tensor, epoch: int, i: int, steps: int) -> float:
    """The step's loss as a float (the mean over the ranks), once; raises when it is not finite or exploding."""
    value = loss
    if run.world > 1:  # every rank stops at the same step when any rank's loss is not finite
        value = value.clone()
        torch.distributed.all_reduce(value)
    if not torch.isfinite(value):
        raise NonFiniteLoss(epoch, i + 1, steps, value=float(value))
    loss_value = float(value) / run.world
    if run.first_loss is None:
        run.first_loss = loss_value
    limit = EXPLODING_FACTOR * max(run.first_loss, 1.0)
    if loss_value > limit:
        raise NonFiniteLoss(epoch, i + 1, steps, value=loss_value, what="training loss",
                            limit=f"over {EXPLODING_FACTOR:g}x the first loss {run.first_loss:.4g}")  # fmt: skip
    return loss_value


@torch.no_grad()
def evaluate(run: Run) -> tuple[float, float]:
    loss_sum, correct, seen = 0.0, 0, 0
    run.test_loader.set_epoch(0)
    for x, y in run.test_loader:
        x, y = x.to(run.device), y.to(run.device)
        logits = run.model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
    return loss_sum / max(seen, 1), correct / max(seen, 1)


class NonFiniteLoss(TradyError):
    """Training diverged: a NaN/inf loss (or weights), or a loss exploding past EXPLODING_FACTOR times the
    first one. The run stops with status "diverged"; the last good checkpoint stays. The CLI exits 3."""

    exit_code = 3

    def __init__(
        self, epoch: int, step: int | None = None, steps: int | None = None, *, value: float | None = None,
        what: str = "training loss", where: str = "at", kept: str = "", limit: str = "",
    ) -> None:  # fmt: skip
        at = f"{where} epoch {epoch}" + (f", step {step} of {steps}" if step is not None else "")
        shown = f" ({value:.4g}{', ' + limit if limit else ''})" if value is not None else ""
        tail = f"; stopped: {kept}" if kept else ""
        kind = "exploding" if limit else "non-finite"
        super().__init__(f"{kind} {what}{shown} {at}{tail}; lower --lr")
        self.epoch, self.step, self.steps, self.value, self.what, self.where = epoch, step, steps, value, what, where
        self.limit = limit

    def with_kept(self, kept: str) -> NonFiniteLoss:
        return NonFiniteLoss(
            self.epoch, self.step, self.steps, value=self.value, what=self.what, where=self.where, kept=kept,
            limit=self.limit,
        )


Diverged = NonFiniteLoss  # the name says what it is: a non-finite or exploding loss


def _progress(loader, config: FinetuneConfig, desc: str, rank: int):
    if not config.progress or rank != 0:
        return loader
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return loader
    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)


def _sync_start(run: Run) -> None:
    """Data parallel: all ranks start from rank 0's weights and optimizer state."""
    if run.world == 1:
        return
    tensors = list(run.model.state_dict().values())
    if run.optimizer is not None:
        for st in run.optimizer.state.values():
            tensors += [v for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    distributed.broadcast_([t for t in tensors if t.is_floating_point() or t.dtype == torch.int64])


# --------------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------------


def finetune(
    config: FinetuneConfig, model: nn.Module | None = None, train_data: Any = None, test_data: Any = None,
    resume: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Run one fine-tune; write the run folder at `config.out` (if set); return the summary.

    model: the user's nn.Module (config.model then only names it; default: its class name) instead of
    config.model's zoo model or builder (`file.py:fn`); it is prepared in place and trained.
    train_data, test_data: torch Datasets or DataLoaders of (input, target) instead of config.data
    (trady.data.torch_inputs says how they are batched).
    resume: continue from `config.out`/checkpoint.pt when there is one (from the start otherwise).
    Bad input raises TradyError before anything is written; a failure during training writes
    summary.json with status "failed" ("diverged" and `diverged_epoch` for a non-finite or exploding
    loss: NonFiniteLoss) and keeps the metrics and the last checkpoint; summary.json and metrics.jsonl
    never hold more epochs than the checkpoint. The run folder is locked for this process
    (trady.core.run_lock).
    """
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _finetune(setup(config, model, train_data, test_data), resume)
    finally:
        torch.set_num_threads(threads)


def _finetune(run: Run, resume: bool) -> dict[str, Any]:
    config = run.config
    out = Path(config.out) if config.out else None
    lock = None
    if out is not None and run.rank == 0:  # one process owns the folder (before anything is written)
        lock = run_lock.acquire(out)
        if lock.took_over:
            print(f"trady: note: took over the lock of {out} left by process {lock.took_over}, which is no "
                  "longer running", file=sys.stderr, flush=True)  # fmt: skip
    try:
        return _run_epochs(run, resume, out)
    finally:
        if lock is not None:
            lock.release()


def _run_epochs(run: Run, resume: bool, out: Path | None) -> dict[str, Any]:
    config = run.config
    is_main = run.rank == 0
    start_epoch, rows, elapsed = 0, [], 0.0
    if out is not None and resume and (out / CHECKPOINT).is_file():
        path = out / CHECKPOINT
        state = load_checkpoint(path)
        start_epoch, rows, elapsed = restore(run, state, path)
        run.first_loss = state.get("first_loss")
        run.log(f"resuming {out} after epoch {start_epoch} of {config.epochs}")
        if is_main:
            clear_stale(out, fresh=False)
            write_jsonl(out / "metrics.jsonl", rows)  # agrees with the checkpoint, whatever the kill left
    elif out is not None:
        if resume:
            run.log(f"no {CHECKPOINT} in {out}: starting from the first epoch")
        if is_main:
            out.mkdir(parents=True, exist_ok=True)
            clear_stale(out, fresh=True)
            write_json(out / "config.json", config.to_dict())
    if run.world > 1 and not distributed.all_equal(start_epoch, run.device):
        raise TradyError(
            f"the processes found different checkpoints in {out}; every process must see the same run folder"
        )
    _sync_start(run)
    saved = len(rows)  # epochs in the checkpoint on disk: summary.json never claims more
    t0 = time.perf_counter() - elapsed
    try:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            t_epoch = time.perf_counter()
            selection = choose_selection(run, epoch)
            optimizer = run.optimizer or make_optimizer(run)
            stats = train_epoch(run, epoch, optimizer, measure=config.measure_memory)
            test_loss, test_acc = evaluate(run)
            if not math.isfinite(test_loss):
                raise NonFiniteLoss(epoch, value=test_loss, what="test loss", where="after")
            row = {
                "epoch": epoch,
                **{k: stats[k] for k in ("lr", "train_loss", "train_acc")},
                "test_loss": test_loss,
                "test_acc": test_acc,
                **_selection_stats(run, run.tuner.epoch_selections or [selection]),
                "measured_saved_bytes": stats.get("measured_saved_bytes"),
                "measured_budgeted_bytes": stats.get("measured_budgeted_bytes"),
                "batchnorm_kept_bytes": stats.get("batchnorm_kept_bytes"),  # part of measured_saved_bytes
                "peak_memory_bytes": stats.get("peak_memory_bytes"),  # of this machine and process, like the time
                "trainable_parameters": stats.get("trainable_parameters"),
                "step_time_s": stats.get("step_time_s"),
                "epoch_time_s": time.perf_counter() - t_epoch,
            }
            rows.append(row)
            run.log(f"epoch {epoch}/{config.epochs}  train_loss {row['train_loss']:.4f}  "
                    f"train_acc {row['train_acc']:.4f}  test_acc {test_acc:.4f}  "
                    f"channels {row['selected_channels']}  ({row['epoch_time_s']:.1f}s)")  # fmt: skip
            if out is not None and is_main:
                # checkpoint first: metrics.jsonl never shows an epoch that a resume would not start after
                state = checkpoint_state(run, epoch, rows, time.perf_counter() - t0)
                state["first_loss"] = run.first_loss
                save_checkpoint(out, state)
                saved = len(rows)
                write_jsonl(out / "metrics.jsonl", rows)
            else:
                saved = len(rows)
    except Exception as err:
        diverged = isinstance(err, NonFiniteLoss)
        if diverged:
            err = err.with_kept(_kept_note(out, rows[:saved]))
        if out is not None and is_main:
            error = str(err) if isinstance(err, TradyError) else f"{type(err).__name__}: {one_line(err)}"
            summary = _summary(run, rows[:saved], time.perf_counter() - t0, error=error,
                               status="diverged" if diverged else "failed")  # fmt: skip
            if diverged:
                summary["diverged_epoch"] = err.epoch
            try:
                write_json(out / "summary.json", summary)
            except WriteFailed:
                pass  # the disk is full: the error that stopped the run is the one to report
        if diverged:
            raise err from None
        raise
    summary = _summary(run, rows, time.perf_counter() - t0)
    if summary["at_chance"]:
        print(f"trady: warning: test accuracy {summary['test_acc']:.4f} is at chance (1/{summary['classes']} "
              f"classes, {summary['test_size']} test samples): the run learned nothing measurable",
              file=sys.stderr, flush=True)  # fmt: skip
    if out is not None and is_main:
        write_json(out / "summary.json", summary)
    return summary


def _kept_note(out: Path | None, rows: list[dict]) -> str:
    if not rows:
        return "no epoch finished, so there is no checkpoint"
    if out is None:
        return f"the last good epoch is {len(rows)}"
    return f"the last good checkpoint (epoch {len(rows)}) is kept in {out / CHECKPOINT}"


def _selection_stats(run: Run, selections: list[Selection]) -> dict[str, float]:
    """Channels, units and sparsities of the epoch's selection (the mean over its draws with resample_every)."""
    rows = [
        {"selected_channels": sum(len(v) for v in sel.values()), "selected_units": run.costs.selection_units(sel),
         **_sparsity(run, sel)}
        for sel in selections
    ]  # fmt: skip
    if len(rows) == 1:
        return rows[0]
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]} | {"draws": len(rows)}


def _sparsity(run: Run, selection: Selection) -> dict[str, float]:
    if run.mode == "sparse":
        return run.costs.sparsity(selection)
    if run.mode == "full":
        return {"activation_sparsity": 0.0, "weight_sparsity": 0.0, "flops_reduction": 0.0}
    return {"activation_sparsity": 1.0, "weight_sparsity": 1.0, "flops_reduction": 1.0}


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def _max(rows: list[dict], key: str) -> int | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return max(vals) if vals else None


def _summary(run: Run, rows: list[dict], wall: float, status: str = "ok", error: str | None = None) -> dict:
    c = run.config
    return {
        "model": c.model,
        "dataset": run.dataset,
        "strategy": c.strategy,
        "mode": run.mode,
        "budget": c.budget,
        "budget_units": run.budget_units,
        "budget_fraction": run.budget_units / run.costs.full_units if run.budget_units else None,
        "full_units": run.costs.full_units,
        "seed": c.seed,
        "epochs": c.epochs,
        "epochs_done": len(rows),
        "test_acc": rows[-1]["test_acc"] if rows else None,
        "best_test_acc": max(r["test_acc"] for r in rows) if rows else None,
        "wall_time_s": wall,
        "activation_sparsity": _mean(rows, "activation_sparsity"),
        "weight_sparsity": _mean(rows, "weight_sparsity"),
        "flops_reduction": _mean(rows, "flops_reduction"),
        "selected_units": _mean(rows, "selected_units"),
        "measured_budgeted_bytes": _max(rows, "measured_budgeted_bytes"),
        "measured_saved_bytes": _max(rows, "measured_saved_bytes"),
        "batchnorm": c.batchnorm,
        "batchnorm_kept_bytes": _max(rows, "batchnorm_kept_bytes"),  # outside the budget, inside measured_saved_bytes
        "peak_memory_bytes": _max(rows, "peak_memory_bytes"),  # measured step peak, highest epoch row
        "trainable_parameters": _max(rows, "trainable_parameters"),  # elements the optimizer held (slices: sized)
        "step_time_s": _mean(rows, "step_time_s"),  # mean wall time of a training step (data loading included)
        "peak_memory_measure": peak_measure(run.device.type, c.control_allocator),
        # the whole process's resident high-water mark at the end of the run (VmHWM), and the malloc
        "process_peak_bytes": process_peak_bytes(),
        "process_peak_allocator": allocator_in_use(),
        "micro_batch_size": c.micro_batch_size,
        "train_size": run.train_size,
        "test_size": run.test_size,
        "resolution": run.resolution,
        "sequence_length": c.sequence_length,
        "batch_size": c.batch_size,  # per process; data parallel: global batch = batch_size * world_size
        "world_size": run.world,
        "classes": run.classes,
        "notes": run.notes,
        "at_chance": at_chance(rows[-1]["test_acc"] if rows else None, run.classes, run.test_size),
        "status": status,
        "error": error,
    }


def at_chance(test_acc: float | None, classes: int, test_size: int | None) -> bool | None:
    """Whether the test accuracy is no better than guessing: within two binomial standard deviations of
    1/classes on test_size samples (None when unknown)."""
    if test_acc is None or not classes or classes < 2 or not test_size:
        return None
    chance = 1.0 / classes
    return test_acc <= chance + 2.0 * math.sqrt(chance * (1.0 - chance) / test_size)
