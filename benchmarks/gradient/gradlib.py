"""The gradient-approximation measurement (the paper's Eq. 9), reusable by the gradient benchmarks.

During a real sparse fine-tune driven by trady's own pieces (`train.setup`, `train.choose_selection`,
`train.train_epoch`, `train.evaluate`), every optimizer step also computes the FULL gradient of the
same loss on the same batch at the same weights: a dense autograd pass on a stock copy of the model
that receives the engine model's current weights (measurement only; it is never applied).

Per epoch it records, over all conv weights (every layer of the cost table; the classifier is always
trained and sits outside) and over the profile's top-K layers only:
  cosine            cos(W_0 - W_t, sum_s lr_s g_s): the cumulative applied update (the real weight
                    change) against the cumulative full gradient, weighted by the same learning rates
                    (a selection of every channel gives exactly 1)
  cosine_unweighted cos(W_0 - W_t, sum_s g_s)
  captured_share    mean over the epoch's steps of ||g_s restricted to the selection||^2 / ||g_s||^2
  coverage          share of the channels (by count) selected at least once so far
A consistency check: the engine's slice gradients must equal the dense gradient restricted to the
selection (`slice_grad_rel_err`, the largest relative difference seen).

`redraw_every` N (steps): the run's `resample_every` (trady.Tuner): the selection is redrawn after
every N optimizer steps inside an epoch, so N >= steps per epoch is plain trady; every draw counts
for the coverage.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from trady import models
from trady.config import FinetuneConfig
from trady.engine import functions
from trady.engine.costs import Selection
from trady.train import loop as train
from trady.train.setup import make_optimizer


class BatchRecorder:
    """Wraps the run's train loader: the loop sees the same batches, the measurement the last one."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            self.last = (x, y)
            yield x, y


@dataclass
class Tracker:
    """Cumulative sums over the conv weights of one run."""

    names: list[str]
    topk: set[str]
    w0: dict[str, torch.Tensor]
    cum_lr: dict[str, torch.Tensor] = field(default_factory=dict)
    cum: dict[str, torch.Tensor] = field(default_factory=dict)
    seen: dict[str, torch.Tensor] = field(default_factory=dict)  # channel selected at least once
    step_shares: list[float] = field(default_factory=list)
    step_shares_topk: list[float] = field(default_factory=list)
    slice_grad_rel_err: float = 0.0


class MeasuringOptimizer:
    """Stands in for the epoch's optimizer in train.train_epoch: before each real step it computes the
    full gradient on the step's batch (dense copy), then steps."""

    def __init__(self, bench: GradientRun) -> None:
        self.bench = bench
        self.inner = make_optimizer(bench.run)

    @property
    def param_groups(self):
        return self.inner.param_groups

    def step(self) -> None:
        self.bench.measure_step(float(self.inner.param_groups[0]["lr"]))  # group 0: the backbone (slices)
        self.inner.step()


class GradientRun:
    def __init__(self, config: FinetuneConfig, redraw_every: int | None = None) -> None:
        config = dataclasses.replace(config, resample_every=redraw_every)
        self.config = config
        self.redraw_every = redraw_every
        self.run = run = train.setup(config)
        if run.mode != "sparse":
            raise ValueError(f"strategy {config.strategy!r} is not sparse: nothing to measure")
        run.train_loader = BatchRecorder(run.train_loader)
        # the dense twin: same architecture, stock modules, weights copied in before every step
        self.dense = models.create(
            config.model, pretrained=False, num_classes=run.classes, mcu_dir=config.mcu_dir
        ).to(run.device)
        self.dense.eval()
        for p in self.dense.parameters():
            p.requires_grad_(False)
        self.names = list(run.costs.names)
        self.groups = {n: getattr(run.model.get_submodule(n), "groups", 1) for n in self.names}
        for n in self.names:
            self.dense.get_submodule(n).weight.requires_grad_(True)
        profile = run.tuner.profile.for_costs(run.costs)
        w0 = {n: run.model.get_submodule(n).weight.detach().double().clone() for n in self.names}
        self.tracker = Tracker(self.names, set(profile.top_k()), w0)
        self.topk = profile.top_k()
        for n in self.names:
            c = run.costs.by_name[n].in_channels
            self.tracker.seen[n] = torch.zeros(c, dtype=torch.bool)
            self.tracker.cum_lr[n] = torch.zeros_like(w0[n])
            self.tracker.cum[n] = torch.zeros_like(w0[n])

    # -- selection
    def mark_selected(self, selection: Selection) -> None:
        for n, idx in selection.items():
            self.tracker.seen[n][idx.cpu()] = True

    # -- the full gradient at this step
    def measure_step(self, lr: float) -> None:
        run, t = self.run, self.tracker
        x, y = run.train_loader.last
        self.dense.load_state_dict(run.model.state_dict())  # the state_dict hook syncs the slices first
        for n in self.names:
            self.dense.get_submodule(n).weight.grad = None
        with torch.enable_grad():
            F.cross_entropy(self.dense(x.to(run.device)), y.to(run.device)).backward()
        sel = run.engine.selection  # this step's draw (resample_every redraws before a forward)
        self.mark_selected(sel)
        tot = tot_k = cap = cap_k = 0.0
        for n in self.names:
            g = self.dense.get_submodule(n).weight.grad.detach()
            gd = g.double()
            t.cum_lr[n].add_(gd, alpha=lr)
            t.cum[n].add_(gd)
            sq = float(gd.pow(2).sum())
            tot += sq
            got = 0.0
            if n in sel:
                idx = sel[n].to(g.device)
                part = functions.gather_slice(g, idx, self.groups[n])
                got = float(part.double().pow(2).sum())
                slice_grad = run.model.get_submodule(n).trady.w_slice.grad
                if slice_grad is not None:
                    err = float((slice_grad - part).abs().max()) / max(float(part.abs().max()), 1e-12)
                    t.slice_grad_rel_err = max(t.slice_grad_rel_err, err)
            cap += got
            if n in t.topk:
                tot_k += sq
                cap_k += got
        t.step_shares.append(cap / tot if tot > 0 else math.nan)
        t.step_shares_topk.append(cap_k / tot_k if tot_k > 0 else math.nan)

    # -- per-epoch summary
    def epoch_row(self) -> dict[str, Any]:
        run, t = self.run, self.tracker
        run.engine.sync()
        delta = {n: t.w0[n] - run.model.get_submodule(n).weight.detach().double() for n in self.names}
        row = {
            "cosine": _cos(delta, t.cum_lr, self.names),
            "cosine_topk": _cos(delta, t.cum_lr, self.topk),
            "cosine_unweighted": _cos(delta, t.cum, self.names),
            "cosine_unweighted_topk": _cos(delta, t.cum, self.topk),
            "captured_share": _mean(t.step_shares),
            "captured_share_topk": _mean(t.step_shares_topk),
            "coverage": _share(t.seen, self.names),
            "coverage_topk": _share(t.seen, self.topk),
            "slice_grad_rel_err": t.slice_grad_rel_err,
        }
        t.step_shares, t.step_shares_topk = [], []
        return row

    def fit(self, progress=None) -> list[dict[str, Any]]:
        """The fine-tune, epoch by epoch as train.finetune runs it; one row per epoch."""
        run, config = self.run, self.config
        rows = []
        for epoch in range(1, config.epochs + 1):
            train.choose_selection(run, epoch)
            optimizer = MeasuringOptimizer(self)
            stats = train.train_epoch(run, epoch, optimizer, measure=False)
            test_loss, test_acc = train.evaluate(run)
            row = {"epoch": epoch, "train_loss": stats["train_loss"], "test_acc": test_acc, **self.epoch_row()}
            rows.append(row)
            if progress:
                progress(row)
        return rows


def _cos(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names) -> float:
    dot = sum(float((a[n] * b[n]).sum()) for n in names)
    na = math.sqrt(sum(float(a[n].pow(2).sum()) for n in names))
    nb = math.sqrt(sum(float(b[n].pow(2).sum()) for n in names))
    return dot / (na * nb) if na > 0 and nb > 0 else math.nan


def _mean(v: list[float]) -> float:
    v = [x for x in v if math.isfinite(x)]
    return sum(v) / len(v) if v else math.nan


def _share(seen: dict[str, torch.Tensor], names) -> float:
    hit = sum(int(seen[n].sum()) for n in names)
    tot = sum(seen[n].numel() for n in names)
    return hit / tot if tot else math.nan
