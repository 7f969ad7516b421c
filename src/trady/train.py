"""The fine-tuning loop: per-epoch channel re-selection, plain SGD, cosine schedule, eval, checkpoints.

One call, `finetune(config)`, runs a whole fine-tune and writes its run folder:
config.json, metrics.jsonl (one line per epoch), summary.json, checkpoint.pt (every epoch, atomic).
Sparse strategies train through the SparseEngine; `full` and `classifier` train the stock model;
`bias` trains biases plus the classifier through the engine (bias gradients keep no activations).

Resuming (`finetune(config, resume=True)`) continues from the last checkpoint and ends with the same
metrics and weights as an uninterrupted run: the checkpoint holds the weights, the optimizer state
(full/classifier/bias keep one optimizer for the whole run), the schedule position, the strategy
state (static selection, MeDyate's norms), the running gradient norms, the RNG states and the
metrics so far; everything else is a pure function of (seed, epoch, step): data order, augmentation,
selections and the learning rate. An interrupted epoch is run again from its start.

Data parallel (torchrun, see `trady.distributed`): every rank trains on its shard of each global
batch, the selection is the same on every rank, the gradients of the trained tensors (selected
slices, classifier, biases) are averaged over the ranks each step, and only rank 0 writes files.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trady import distributed, models, ranking, strategies
from trady.config import FinetuneConfig
from trady.costs import CostTable, Selection, analyze, parse_budget
from trady.data import BatchLoader, DatasetPair, load_dataset
from trady.engine import EngineConfig, SparseEngine, measure_saved_bytes
from trady.errors import TradyError
from trady.io import load_torch, save_torch, write_json, write_jsonl
from trady.models.weights import load_into
from trady.schedule import lr_at
from trady.transforms import ImageTransform

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "trady-checkpoint-1"
RUN_FILES = (CHECKPOINT, "metrics.jsonl", "summary.json")  # what a fresh start replaces
# Config fields that may differ between a checkpoint and the run resuming it.
RESUME_MAY_CHANGE = ("out", "progress", "threads", "device")
FULL_GRAD_BATCHES = 8  # batches of the full-gradient pass that det-rgn strategies rank channels by


def epoch_generator(seed: int, epoch: int, salt: int = 0) -> torch.Generator:
    """A generator that depends only on (seed, epoch): selections replay exactly after a resume."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7_919 + salt) % (2**63))


@dataclass
class Run:
    """Everything a fine-tune holds while it runs (built by `setup`, used by the loop)."""

    config: FinetuneConfig
    model: nn.Module
    data: DatasetPair
    train_loader: BatchLoader
    test_loader: BatchLoader
    strategy: strategies.Strategy
    costs: CostTable
    mode: str
    resolution: int
    budget_units: int | None = None
    engine: SparseEngine | None = None
    profile: ranking.RankingProfile | None = None
    device: torch.device = torch.device("cpu")
    notes: list[str] = field(default_factory=list)
    running_norms: dict[str, torch.Tensor] = field(default_factory=dict)  # medyate's measured norms
    optimizer: torch.optim.Optimizer | None = None  # persistent optimizer of full/classifier/bias
    comm_elements: int = 0  # data parallel: gradient elements all-reduced per step (last step)


def _log(config: FinetuneConfig, msg: str) -> None:
    if config.progress and distributed.rank_world()[0] == 0:
        print(msg, flush=True)


def setup(config: FinetuneConfig) -> Run:
    config.validate()
    strategy = strategies.get(config.strategy, **config.strategy_options)
    spec = models.spec(config.model)
    resolution = config.resolution or spec.resolution
    device = distributed.resolve_device(config.device)
    data = load_dataset(
        config.data, data_dir=config.data_dir, train_size=config.train_size, test_size=config.test_size,
        seed=config.seed,
    )  # fmt: skip
    torch.manual_seed(config.seed)  # the fresh classifier's initialisation
    model = models.create(
        config.model, pretrained=config.pretrained, num_classes=len(data.classes), weights=config.weights,
        mcu_dir=config.mcu_dir,
    ).to(device)  # fmt: skip
    model.eval()  # the paper's recipe: BatchNorm frozen (running statistics), no dropout
    if config.classifier_init == "zeros" and config.weights is None:
        # Zero logits at the start: the backbone gets no gradient from a random head's noise.
        with torch.no_grad():
            for p in model.classifier.parameters():
                p.zero_()
    example = torch.zeros(1, 3, resolution, resolution, device=device)
    costs = analyze(model, example_input=example, classifier="classifier")
    mean, std = spec.mean, spec.std
    train_tf = ImageTransform(resolution, mean, std, train=True)
    test_tf = ImageTransform(resolution, mean, std, train=False)
    rank, world = distributed.rank_world()
    train_loader = BatchLoader(
        data.train, config.batch_size, train_tf, shuffle=True, seed=config.seed, drop_last=True, rank=rank,
        world_size=world,
    )  # fmt: skip
    test_loader = BatchLoader(data.test, max(config.batch_size, 64), test_tf, shuffle=False, seed=config.seed)
    if len(train_loader) == 0:
        raise TradyError(
            f"train_size {len(data.train)} is smaller than one batch of {config.batch_size * world}; "
            "accepted: a train set of at least one batch"
        )
    run = Run(
        config=config, model=model, data=data, train_loader=train_loader, test_loader=test_loader,
        strategy=strategy, costs=costs, mode=strategy.mode, resolution=resolution, device=device,
    )  # fmt: skip
    if run.mode == "sparse":
        if config.budget is None:
            raise TradyError(
                f"strategy {config.strategy!r} needs --budget (units like 27946, bytes like 256KB, or 2.2%)"
            )
        run.budget_units = parse_budget(config.budget, costs)
        if run.budget_units >= costs.full_units:
            run.notes.append(
                f"budget {run.budget_units} units >= full fine-tuning ({costs.full_units} units): "
                "running full fine-tuning instead"
            )
            _log(config, "note: " + run.notes[-1])
            run.mode = "full"
        elif run.budget_units < costs.min_channel_units:
            raise TradyError(
                f"budget {config.budget!r} = {run.budget_units} units fits no channel: the cheapest channel "
                f"of {config.model} at {resolution} px costs {costs.min_channel_units} units; accepted: a budget of "
                f"at least {costs.min_channel_units} units"
            )
    if run.mode == "sparse":
        run.profile = _load_profile(config, costs)
        run.engine = SparseEngine(
            model, example, EngineConfig(classifier="classifier", train_bias=config.train_bias,
                                         mask_bits=config.mask_bits),
        )  # fmt: skip
    elif run.mode == "bias":
        run.engine = SparseEngine(
            model, example, EngineConfig(classifier="classifier", train_bias=True, mask_bits=config.mask_bits)
        )
        run.engine.select({})
    elif run.mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:  # classifier only
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.classifier.parameters():
            p.requires_grad_(True)
    if run.mode != "sparse":
        run.optimizer = _make_optimizer(run)
    return run


def _load_profile(config: FinetuneConfig, costs: CostTable) -> ranking.RankingProfile | None:
    if config.profile:
        path = Path(config.profile)
        if not path.is_file():
            raise TradyError(f"profile file {str(path)!r} not found; accepted: a JSON file written by `trady rank`")
        return ranking.RankingProfile.load(path)
    try:
        return ranking.load_profile(config.model)
    except TradyError:
        return None  # strategies that need one say so when they select


def _trainable(run: Run) -> list[torch.Tensor]:
    if run.engine is not None:
        return run.engine.parameters()
    return [p for p in run.model.parameters() if p.requires_grad]


def _make_optimizer(run: Run) -> torch.optim.Optimizer:
    """Plain SGD; the classifier gets its own base learning rate when `classifier_lr` is set.

    Each group carries `base_lr`; the schedule scales it every step.
    """
    config = run.config
    head = {id(p) for p in run.model.classifier.parameters()}
    params = _trainable(run)
    body = [p for p in params if id(p) not in head]
    clf = [p for p in params if id(p) in head]
    clf_lr = config.classifier_lr if config.classifier_lr is not None else config.lr
    groups = [{"params": ps, "lr": lr, "base_lr": lr} for ps, lr in ((body, config.lr), (clf, clf_lr)) if ps]
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


# --------------------------------------------------------------------------------------------------
# One epoch
# --------------------------------------------------------------------------------------------------


def _full_gradient_norms(run: Run) -> dict[str, torch.Tensor]:
    """Per-channel weight-gradient norms of every layer from a few batches, without an update."""
    engine = run.engine
    engine.select(run.costs.all_channels())
    params = engine.parameters()
    for p in params:
        p.grad = None
    loader = run.train_loader
    loader.set_epoch(0)  # a fixed set of batches, independent of the epoch's own order
    for i, (x, y) in enumerate(loader):
        if i >= FULL_GRAD_BATCHES:
            break
        F.cross_entropy(run.model(x.to(run.device)), y.to(run.device)).backward()
    if distributed.rank_world()[1] > 1:  # the gradient of the global batches, the same on every rank
        distributed.all_reduce_mean_(_grads(params))
    norms = {name: n.detach().clone() for name, (_, n) in engine.slice_grad_norms().items()}
    for p in params:
        p.grad = None
    engine.select({})
    return norms


def choose_selection(run: Run, epoch: int) -> Selection:
    grad_stats = None
    if run.strategy.needs_full_gradient():
        grad_stats = _full_gradient_norms(run)
    elif run.strategy.grad_source == "running" and run.running_norms:
        grad_stats = run.running_norms
    ctx = strategies.SelectionContext(
        epoch=epoch, costs=run.costs, budget_units=run.budget_units, generator=epoch_generator(run.config.seed, epoch),
        profile=run.profile, grad_stats=grad_stats, model=run.model,
    )  # fmt: skip
    selection = run.strategy.select(ctx)
    if distributed.rank_world()[1] > 1:
        selection = _broadcast_selection(run, selection)
    return run.engine.select(selection)


def _broadcast_selection(run: Run, selection: Selection) -> Selection:
    """Data parallel: every rank trains rank 0's selection (the ranks draw the same one anyway)."""
    offsets, total = {}, 0
    for lay in run.costs.layers:
        offsets[lay.name] = total
        total += lay.in_channels
    mask = torch.zeros(total, dtype=torch.uint8)
    for name, idx in run.costs.check_selection(selection).items():
        mask[offsets[name] + idx] = 1
    mask = mask.to(run.device)
    distributed.broadcast_([mask])
    mask = mask.cpu()
    out: Selection = {}
    for lay in run.costs.layers:
        idx = torch.nonzero(mask[offsets[lay.name] : offsets[lay.name] + lay.in_channels]).flatten()
        if idx.numel():
            out[lay.name] = idx.to(torch.int64)
    return out


def _grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients of `params` (zeros where a tensor got none): the same list on every rank."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


def _all_reduce_grads(params: list[torch.Tensor]) -> int:
    """Data parallel: average the gradients of the trained tensors (selected slices, classifier, biases)
    over the ranks in one flat all-reduce; nothing of the frozen weights travels. Returns the elements."""
    return distributed.all_reduce_mean_(_grads(params))


def train_epoch(run: Run, epoch: int, optimizer: torch.optim.Optimizer, measure: bool) -> dict[str, Any]:
    config, model, loader = run.config, run.model, run.train_loader
    loader.set_epoch(epoch)
    steps = len(loader)
    total_steps = steps * config.epochs
    warmup_steps = steps * config.warmup_epochs
    params = [p for g in optimizer.param_groups for p in g["params"]]
    distributed_run = distributed.rank_world()[1] > 1
    track_norms = run.strategy.grad_source == "running" and run.engine is not None
    norm_sums: dict[str, torch.Tensor] = {}
    norm_counts: dict[str, torch.Tensor] = {}
    loss_sum, correct, seen = 0.0, 0, 0
    memory: dict[str, Any] = {}
    lr = lr_at((epoch - 1) * steps, total_steps, warmup_steps, config.lr)
    bar = _progress(loader, config, f"epoch {epoch}/{config.epochs}")
    for i, (x, y) in enumerate(bar):
        x, y = x.to(run.device), y.to(run.device)
        scale = lr_at((epoch - 1) * steps + i, total_steps, warmup_steps, 1.0)
        lr = scale * config.lr
        for g in optimizer.param_groups:
            g["lr"] = scale * g.get("base_lr", config.lr)
        for p in params:
            p.grad = None
        if measure and i == 0:
            logits, loss, memory = _measured_forward(run, x, y)
        else:
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        value = loss.detach()
        if distributed_run:  # every rank stops at the same step when any rank's loss is not finite
            value = value.clone()
            torch.distributed.all_reduce(value)
        if not torch.isfinite(value):
            raise NonFiniteLoss(epoch, i + 1, steps, value=float(value))
        loss.backward()
        if distributed_run:
            run.comm_elements = _all_reduce_grads(params)
        if track_norms:
            for name, (idx, n) in run.engine.slice_grad_norms().items():
                c = run.costs.by_name[name].in_channels
                norm_sums.setdefault(name, torch.zeros(c, dtype=torch.float64)).index_add_(
                    0, idx.cpu(), n.double().cpu()
                )
                norm_counts.setdefault(name, torch.zeros(c, dtype=torch.float64)).index_add_(
                    0, idx.cpu(), torch.ones(len(idx), dtype=torch.float64)
                )
        optimizer.step()
        loss_sum += loss.item() * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
    if run.engine is not None:
        run.engine.sync()
    with torch.no_grad():
        if not all(bool(torch.isfinite(p).all()) for p in params):
            raise NonFiniteLoss(epoch, what="weights", where="at the end of")
    if track_norms:
        # MeDyate: the last measured raw gradient norm of each channel (mean over this epoch's steps)
        for name, s in norm_sums.items():
            cur = run.running_norms.setdefault(name, torch.full_like(s, math.nan))
            hit = norm_counts[name] > 0
            cur[hit] = s[hit] / norm_counts[name][hit]
    if distributed_run:  # the epoch's metrics over the global batches
        loss_sum, correct, seen = distributed.all_reduce_sum([loss_sum, correct, seen], run.device)
    return {"lr": lr, "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1), **memory}


def _measured_forward(run: Run, x: torch.Tensor, y: torch.Tensor):
    """The epoch's first forward, with every tensor kept for backward counted (no extra step).

    The saved-tensor hooks return each tensor unchanged: the step computes exactly what an unmeasured
    one does (tests/test_train.py checks it bit for bit)."""
    holder: dict[str, torch.Tensor] = {}

    def step():
        holder["logits"] = run.model(x)
        return F.cross_entropy(holder["logits"], y)

    if run.engine is not None:
        saved, act = run.engine.measure_saved(step)
        grad = sum(p.numel() * p.element_size() for p in run.engine.slice_parameters())
        budgeted = act + grad
    else:
        saved = measure_saved_bytes(run.model, step)
        budgeted = None
    return holder["logits"], saved.loss, {"measured_saved_bytes": saved.total, "measured_budgeted_bytes": budgeted}


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
    """Training produced a NaN/inf loss (or weights): the run stops; the last good checkpoint stays."""

    def __init__(
        self, epoch: int, step: int | None = None, steps: int | None = None, *, value: float | None = None,
        what: str = "training loss", where: str = "at", kept: str = "",
    ) -> None:  # fmt: skip
        at = f"{where} epoch {epoch}" + (f", step {step} of {steps}" if step is not None else "")
        shown = f" ({value})" if value is not None else ""
        tail = f"; stopped: {kept}" if kept else ""
        super().__init__(f"non-finite {what}{shown} {at}{tail}; lower --lr")
        self.epoch, self.step, self.steps, self.value, self.what, self.where = epoch, step, steps, value, what, where

    def with_kept(self, kept: str) -> NonFiniteLoss:
        return NonFiniteLoss(
            self.epoch, self.step, self.steps, value=self.value, what=self.what, where=self.where, kept=kept
        )


def _progress(loader, config: FinetuneConfig, desc: str):
    if not config.progress or distributed.rank_world()[0] != 0:
        return loader
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return loader
    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def _data_fingerprint(run: Run) -> str:
    """Identifies the training and test data (sizes, labels, classes): a resumed run must see the same."""
    h = hashlib.sha256()
    for labels in (run.data.train.labels, run.data.test.labels):
        h.update(labels.to(torch.int64).cpu().numpy().tobytes())
        h.update(b"|")
    h.update("\n".join(run.data.classes).encode())
    return h.hexdigest()[:16]


def _rng_state() -> dict[str, Any]:
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


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(
        ("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    )
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda"]])


def _checkpoint_state(run: Run, epoch: int, rows: list[dict], elapsed: float) -> dict[str, Any]:
    if run.engine is not None:
        run.engine.sync()
    steps = len(run.train_loader)
    return {
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict() if run.optimizer is not None else None,
        "strategy": run.strategy.state_dict(),
        "running_norms": dict(run.running_norms),
        "schedule": {
            "step": epoch * steps,
            "steps_per_epoch": steps,
            "total_steps": steps * run.config.epochs,
            "warmup_steps": steps * run.config.warmup_epochs,
            "base_lr": run.config.lr,
        },
        "rng": _rng_state(),
        "world_size": distributed.rank_world()[1],
        "data": {
            "train_size": len(run.data.train),
            "test_size": len(run.data.test),
            "fingerprint": _data_fingerprint(run),
        },
        "metrics": rows,
        "elapsed_s": elapsed,
        "config": run.config.to_dict(),
    }


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's dict, read with torch.load(weights_only=True): a pickle carrying code is refused."""
    state = load_torch(path, map_location="cpu")
    required = ("epoch", "model", "strategy", "metrics")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise TradyError(f"{path} is not a trady checkpoint (format {got!r}); accepted: a {CHECKPOINT} that "
                         f"trady finetune wrote ({CHECKPOINT_FORMAT})")  # fmt: skip
    missing = [k for k in required if k not in state]
    if missing:
        raise TradyError(f"checkpoint {path} lacks {', '.join(missing)}; accepted: a complete {CHECKPOINT_FORMAT}")
    return state


def _check_compatible(run: Run, state: dict[str, Any], path: Path) -> int:
    """The checkpoint belongs to this run (same settings, data and process count); returns its epoch."""
    config = run.config
    theirs = state.get("config")
    if isinstance(theirs, dict):
        ours = config.to_dict()
        diff = [k for k in ours if k not in RESUME_MAY_CHANGE and k in theirs and theirs[k] != ours[k]]
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
    ours = distributed.rank_world()[1]
    if world != ours:
        raise TradyError(
            f"checkpoint {path} was written by a run of {world} process(es), this one has {ours}; "
            "resume with the same number of processes (torchrun --nproc-per-node): the batches depend on it"
        )
    data = state.get("data")
    if isinstance(data, dict):
        now = {"train_size": len(run.data.train), "test_size": len(run.data.test),
               "fingerprint": _data_fingerprint(run)}  # fmt: skip
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


def _restore(run: Run, state: dict[str, Any], path: str | Path = CHECKPOINT) -> tuple[int, list[dict], float]:
    path = Path(path)
    epoch = _check_compatible(run, state, path)
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
            raise TradyError(f"checkpoint {path}: optimizer state does not fit the model: {_one_line(err)}") from None
    try:
        run.strategy.load_state_dict(state["strategy"])
    except TradyError as err:
        raise TradyError(f"checkpoint {path}: {err}") from None
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as err:
        raise TradyError(f"checkpoint {path}: strategy state is malformed: {_one_line(err)}") from None
    selection = getattr(run.strategy, "_selection", None)
    if selection:
        run.costs.check_selection(selection)
    norms = {}
    for name, v in (state.get("running_norms") or {}).items():
        lay = run.costs.by_name.get(name)
        t = torch.as_tensor(v, dtype=torch.float64).clone()
        if lay is None or t.shape != (lay.in_channels,):
            raise TradyError(f"checkpoint {path}: running gradient norms of {name!r} do not fit the model")
        norms[name] = t
    run.running_norms = norms
    if isinstance(state.get("rng"), dict):
        try:
            _set_rng_state(state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise TradyError(f"checkpoint {path}: malformed RNG state: {_one_line(err)}") from None
    return epoch, list(state["metrics"]), float(state.get("elapsed_s", 0.0))


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def _clear_stale(out: Path, fresh: bool) -> None:
    """Remove temporary files an interrupted atomic write left; a fresh start also removes the files of an
    earlier run in the folder, so that the folder never mixes two runs."""
    for name in RUN_FILES + ("config.json",):
        for tmp in out.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
        if fresh and name != "config.json":
            (out / name).unlink(missing_ok=True)


def _sync_start(run: Run) -> None:
    """Data parallel: all ranks start from rank 0's weights and optimizer state."""
    if distributed.rank_world()[1] == 1:
        return
    tensors = list(run.model.state_dict().values())
    if run.optimizer is not None:
        for st in run.optimizer.state.values():
            tensors += [v for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    distributed.broadcast_([t for t in tensors if t.is_floating_point() or t.dtype == torch.int64])


# --------------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------------


def finetune(config: FinetuneConfig, resume: bool = False) -> dict[str, Any]:
    """Run one fine-tune; write the run folder at `config.out` (if set); return the summary.

    resume: continue from `config.out`/checkpoint.pt when there is one (from the start otherwise).
    Bad input raises TradyError before anything is written; a failure during training writes
    summary.json with status "failed" and keeps the metrics and the last checkpoint.
    """
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _finetune(config, resume)
    finally:
        torch.set_num_threads(threads)


def _finetune(config: FinetuneConfig, resume: bool) -> dict[str, Any]:
    run = setup(config)
    out = Path(config.out) if config.out else None
    rank, world = distributed.rank_world()
    is_main = rank == 0
    start_epoch, rows, elapsed = 0, [], 0.0
    if out is not None and resume and (out / CHECKPOINT).is_file():
        path = out / CHECKPOINT
        start_epoch, rows, elapsed = _restore(run, load_checkpoint(path), path)
        _log(config, f"resuming {out} after epoch {start_epoch} of {config.epochs}")
        if is_main:
            _clear_stale(out, fresh=False)
            write_jsonl(out / "metrics.jsonl", rows)  # agrees with the checkpoint, whatever the kill left
    elif out is not None:
        if resume:
            _log(config, f"no {CHECKPOINT} in {out}: starting from the first epoch")
        if is_main:
            out.mkdir(parents=True, exist_ok=True)
            _clear_stale(out, fresh=True)
            write_json(out / "config.json", config.to_dict())
    if world > 1 and not distributed.all_equal(start_epoch, run.device):
        raise TradyError(
            f"the processes found different checkpoints in {out}; every process must see the same run folder"
        )
    _sync_start(run)
    t0 = time.perf_counter() - elapsed
    try:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            t_epoch = time.perf_counter()
            selection = choose_selection(run, epoch) if run.mode == "sparse" else {}
            optimizer = run.optimizer or _make_optimizer(run)
            stats = train_epoch(run, epoch, optimizer, measure=config.measure_memory)
            test_loss, test_acc = evaluate(run)
            if not math.isfinite(test_loss):
                raise NonFiniteLoss(epoch, value=test_loss, what="test loss", where="after")
            row = {
                "epoch": epoch,
                **{k: stats[k] for k in ("lr", "train_loss", "train_acc")},
                "test_loss": test_loss,
                "test_acc": test_acc,
                "selected_channels": sum(len(v) for v in selection.values()),
                "selected_units": run.costs.selection_units(selection),
                **_sparsity(run, selection),
                "measured_saved_bytes": stats.get("measured_saved_bytes"),
                "measured_budgeted_bytes": stats.get("measured_budgeted_bytes"),
                "epoch_time_s": time.perf_counter() - t_epoch,
            }
            rows.append(row)
            _log(config, f"epoch {epoch}/{config.epochs}  train_loss {row['train_loss']:.4f}  "
                         f"train_acc {row['train_acc']:.4f}  test_acc {test_acc:.4f}  "
                         f"channels {row['selected_channels']}  ({row['epoch_time_s']:.1f}s)")  # fmt: skip
            if out is not None and is_main:
                # checkpoint first: metrics.jsonl never shows an epoch that a resume would not start after
                save_torch(out / CHECKPOINT, _checkpoint_state(run, epoch, rows, time.perf_counter() - t0))
                write_jsonl(out / "metrics.jsonl", rows)
    except Exception as err:
        if isinstance(err, NonFiniteLoss):
            err = err.with_kept(_kept_note(out, rows))
        if out is not None and is_main:
            error = str(err) if isinstance(err, TradyError) else f"{type(err).__name__}: {_one_line(err)}"
            write_json(out / "summary.json", _summary(run, rows, time.perf_counter() - t0, status="failed",
                                                       error=error))  # fmt: skip
        if isinstance(err, NonFiniteLoss):
            raise err from None
        raise
    summary = _summary(run, rows, time.perf_counter() - t0)
    if out is not None and is_main:
        write_json(out / "summary.json", summary)
    return summary


def _kept_note(out: Path | None, rows: list[dict]) -> str:
    if not rows:
        return "no epoch finished, so there is no checkpoint"
    if out is None:
        return f"the last good epoch is {len(rows)}"
    return f"the last good checkpoint (epoch {len(rows)}) is kept in {out / CHECKPOINT}"


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
        "dataset": run.data.name,
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
        "train_size": len(run.data.train),
        "test_size": len(run.data.test),
        "resolution": run.resolution,
        "batch_size": c.batch_size,  # per process; data parallel: global batch = batch_size * world_size
        "world_size": distributed.rank_world()[1],
        "classes": len(run.data.classes),
        "notes": run.notes,
        "status": status,
        "error": error,
    }
