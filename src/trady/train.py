"""The fine-tuning loop: per-epoch channel re-selection, plain SGD, cosine schedule, eval, checkpoints.

One call, `finetune(config)`, runs a whole fine-tune and writes its run folder:
config.json, metrics.jsonl (one line per epoch), summary.json, checkpoint.pt (every epoch, atomic).
Sparse strategies train through the SparseEngine; `full` and `classifier` train the stock model;
`bias` trains biases plus the classifier through the engine (bias gradients keep no activations).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trady import models, ranking, strategies
from trady.config import FinetuneConfig
from trady.costs import CostTable, Selection, analyze, parse_budget
from trady.data import BatchLoader, DatasetPair, load_dataset
from trady.engine import EngineConfig, SparseEngine, measure_saved_bytes
from trady.errors import TradyError
from trady.io import load_torch, save_torch, write_json, write_jsonl
from trady.schedule import lr_at
from trady.transforms import ImageTransform

CHECKPOINT = "checkpoint.pt"
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


def _log(config: FinetuneConfig, msg: str) -> None:
    if config.progress:
        print(msg, flush=True)


def setup(config: FinetuneConfig) -> Run:
    config.validate()
    strategy = strategies.get(config.strategy, **config.strategy_options)
    spec = models.spec(config.model)
    resolution = config.resolution or spec.resolution
    device = torch.device(config.device)
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
    example = torch.zeros(1, 3, resolution, resolution, device=device)
    costs = analyze(model, example_input=example, classifier="classifier")
    mean, std = spec.mean, spec.std
    train_tf = ImageTransform(resolution, mean, std, train=True)
    test_tf = ImageTransform(resolution, mean, std, train=False)
    rank, world = _dist_rank_world()
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
                f"of {config.model} costs {costs.min_channel_units} units"
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
        run.optimizer = _make_optimizer(config, _trainable(run))
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


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _trainable(run: Run) -> list[torch.Tensor]:
    if run.engine is not None:
        return run.engine.parameters()
    return [p for p in run.model.parameters() if p.requires_grad]


def _make_optimizer(config: FinetuneConfig, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


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
    norms = {name: n.detach().clone() for name, (_, n) in engine.slice_grad_norms().items()}
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
    return run.engine.select(run.strategy.select(ctx))


def _all_reduce_grads(params: list[torch.Tensor]) -> None:
    """Data parallel: average the (slice) gradients over ranks; only selected slices travel."""
    world = torch.distributed.get_world_size()
    for p in params:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(world)


def train_epoch(run: Run, epoch: int, optimizer: torch.optim.Optimizer, measure: bool) -> dict[str, Any]:
    config, model, loader = run.config, run.model, run.train_loader
    loader.set_epoch(epoch)
    steps = len(loader)
    total_steps = steps * config.epochs
    warmup_steps = steps * config.warmup_epochs
    params = [p for g in optimizer.param_groups for p in g["params"]]
    distributed = _dist_rank_world()[1] > 1
    track_norms = run.strategy.grad_source == "running" and run.engine is not None
    norm_sums: dict[str, torch.Tensor] = {}
    norm_counts: dict[str, torch.Tensor] = {}
    loss_sum, correct, seen = 0.0, 0, 0
    memory: dict[str, Any] = {}
    bar = _progress(loader, config, f"epoch {epoch}/{config.epochs}")
    for i, (x, y) in enumerate(bar):
        x, y = x.to(run.device), y.to(run.device)
        lr = lr_at((epoch - 1) * steps + i, total_steps, warmup_steps, config.lr)
        for g in optimizer.param_groups:
            g["lr"] = lr
        for p in params:
            p.grad = None
        if measure and i == 0:
            logits, loss, memory = _measured_forward(run, x, y)
        else:
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(epoch, i)
        loss.backward()
        if distributed:
            _all_reduce_grads(params)
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
    if track_norms:
        # MeDyate: the last measured raw gradient norm of each channel (mean over this epoch's steps)
        for name, s in norm_sums.items():
            cur = run.running_norms.setdefault(name, torch.full_like(s, math.nan))
            hit = norm_counts[name] > 0
            cur[hit] = s[hit] / norm_counts[name][hit]
    return {"lr": lr, "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1), **memory}


def _measured_forward(run: Run, x: torch.Tensor, y: torch.Tensor):
    """The epoch's first forward, with every tensor kept for backward counted (no extra step)."""
    holder: dict[str, torch.Tensor] = {}

    def step():
        holder["logits"] = run.model(x)
        return F.cross_entropy(holder["logits"], y)

    if run.engine is not None:
        budget_keys: set = set()
        for m in run.engine.layers.values():
            m.trady.on_saved = lambda t, keys=budget_keys: keys.add((t.device.type, t.untyped_storage().data_ptr()))
        try:
            saved = measure_saved_bytes(run.model, step, exclude=run.engine.slice_parameters())
        finally:
            for m in run.engine.layers.values():
                m.trady.on_saved = None
        act = sum(saved.per_storage.get(k, 0) for k in budget_keys)
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
    def __init__(self, epoch: int, step: int) -> None:
        super().__init__(f"non-finite loss at epoch {epoch}, step {step}; lower --lr")
        self.epoch = epoch


def _progress(loader, config: FinetuneConfig, desc: str):
    if not config.progress:
        return loader
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return loader
    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------------


def _checkpoint_state(run: Run, epoch: int, rows: list[dict], elapsed: float) -> dict[str, Any]:
    if run.engine is not None:
        run.engine.sync()
    return {
        "format": "trady-checkpoint-1",
        "epoch": epoch,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict() if run.optimizer is not None else None,
        "strategy": run.strategy.state_dict(),
        "running_norms": dict(run.running_norms),
        "metrics": rows,
        "elapsed_s": elapsed,
        "config": run.config.to_dict(),
    }


def _restore(run: Run, state: dict[str, Any]) -> tuple[int, list[dict], float]:
    try:
        run.model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise TradyError(f"checkpoint does not match model {run.config.model!r}: {str(err).splitlines()[0]}") from None
    if run.optimizer is not None and state.get("optimizer") is not None:
        run.optimizer.load_state_dict(state["optimizer"])
    run.strategy.load_state_dict(state["strategy"])
    run.running_norms = {k: torch.as_tensor(v).clone() for k, v in state.get("running_norms", {}).items()}
    return int(state["epoch"]), list(state["metrics"]), float(state.get("elapsed_s", 0.0))


def finetune(config: FinetuneConfig, resume: bool = False) -> dict[str, Any]:
    """Run one fine-tune; write the run folder at `config.out` (if set); return the summary."""
    if config.threads:
        torch.set_num_threads(config.threads)
    run = setup(config)
    out = Path(config.out) if config.out else None
    is_main = _dist_rank_world()[0] == 0
    start_epoch, rows, elapsed = 0, [], 0.0
    if out is not None and resume and (out / CHECKPOINT).is_file():
        start_epoch, rows, elapsed = _restore(run, load_torch(out / CHECKPOINT, map_location=run.device))
        _log(config, f"resuming {out} after epoch {start_epoch}")
    elif out is not None and is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", config.to_dict())
    t0 = time.perf_counter() - elapsed
    for epoch in range(start_epoch + 1, config.epochs + 1):
        t_epoch = time.perf_counter()
        selection = choose_selection(run, epoch) if run.mode == "sparse" else {}
        optimizer = run.optimizer or _make_optimizer(config, _trainable(run))
        try:
            stats = train_epoch(run, epoch, optimizer, measure=config.measure_memory)
        except NonFiniteLoss:
            if out is not None and is_main:
                write_json(out / "summary.json", _summary(run, rows, time.perf_counter() - t0, status="failed",
                                                           error=f"non-finite loss at epoch {epoch}"))  # fmt: skip
            raise
        test_loss, test_acc = evaluate(run)
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
            write_jsonl(out / "metrics.jsonl", rows)
            save_torch(out / CHECKPOINT, _checkpoint_state(run, epoch, rows, time.perf_counter() - t0))
    summary = _summary(run, rows, time.perf_counter() - t0)
    if out is not None and is_main:
        write_json(out / "summary.json", summary)
    return summary


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
        "batch_size": c.batch_size,
        "classes": len(run.data.classes),
        "notes": run.notes,
        "status": status,
        "error": error,
    }
