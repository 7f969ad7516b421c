"""The method inside any training loop: `Tuner` drives a strategy's draws on any nn.Module.

    tuner = trady.Tuner(model, example_input, strategy="trady", budget="5%", profile=profile)
    for epoch in range(1, epochs + 1):
        optimizer = torch.optim.SGD(tuner.start_epoch(epoch), lr=0.01)
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            tuner.step()                   # only needed with resample_every
    tuner.restore()                        # the model's stock classes; trained values in its weights

The tuner prepares the model (a `SparseEngine` for sparse strategies and `bias`; requires_grad flags
for `full` and `classifier`), turns the budget into units once (`budget_units`; a budget that fits no
channel raises, one at or above full fine-tuning runs full fine-tuning with a note), and at each
`start_epoch(epoch)` draws that epoch's selection from a generator that depends only on
(seed, epoch, draw): the same seed gives the same selections, and a resume replays them.

Gradient statistics reach the strategies without user hooks: `grad_source == "running"` (medyate)
reads the per-channel gradient norms of the trained slices from a global optimizer step pre-hook
(any torch.optim optimizer that holds the tuner's slices; the mean over the steps since the last draw),
`grad_source == "full"` (d-/s-det-rgn) runs a full-gradient pass without update on `grad_batches`
(the first FULL_GRAD_BATCHES of them) before each draw.

`resample_every=N` redraws the selection every N training steps within an epoch: steps 1..N of an
epoch train its first draw, steps N+1..2N the next, and so on (the count restarts at each
`start_epoch`; `tuner.step()` after each `optimizer.step()` counts them, and the redraw happens right
before the next training forward, so an epoch's end wastes no draw). The optimizer needs no change:
it holds every layer's slice tensor, resized in place by the engine (a layer whose channels change
loses its optimizer state, e.g. momentum). None (default) is the paper's one draw per epoch: no
`tuner.step` needed.
"""

from __future__ import annotations

import math
import numbers
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from trady.core.errors import TradyError
from trady.engine import EngineConfig, SparseEngine
from trady.engine.costs import CostTable, Selection, analyze, parse_budget
from trady.selection import strategies
from trady.selection.ranking import RankingProfile

FULL_GRAD_BATCHES = 8  # batches of the full-gradient pass that det-rgn strategies rank channels by
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def draw_generator(seed: int, epoch: int, draw: int = 0) -> torch.Generator:
    """A generator that depends only on (seed, epoch, draw): selections replay exactly after a resume.

    draw 0 is an epoch's first draw (the only one without resample_every)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7_919 + draw) % (2**63))


class Tuner:
    """Applies a registered strategy to any nn.Module from the user's own training loop.

    model: prepared in place (the module docstring says how; `restore()` undoes it).
    example_input: one input batch; a forward on it finds the layers and their input sizes.
    strategy: a registered name (`trady.selection.strategies.available()`) or a Strategy with its options
      (`strategies.get("medyate", ratio=0.3)`).
    budget: units (27946), bytes ("256KB") or a share of full fine-tuning ("2.2%"); sparse strategies only.
    profile: the layer ranking (`trady.rank(...)`, or a JSON path) for strategies that need one.
    seed: the draws depend only on (seed, epoch, draw).
    config: EngineConfig (classifier name, train_bias, mask_bits, strict, fold_bn).
    resample_every: redraw every N training steps within an epoch (module docstring); None: per epoch.
    grad_batches: (input, target) batches of the full-gradient pass of d-/s-det-rgn.
    loss_fn: the loss of that pass. world_size: data-parallel processes (default: torch.distributed's);
    agree: a function every draw goes through before the engine (data parallel: rank 0's draw).
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: torch.Tensor,
        *,
        strategy: str | strategies.Strategy = "trady",
        budget: int | str | None = None,
        profile: RankingProfile | str | Path | None = None,
        seed: int = 0,
        config: EngineConfig | None = None,
        resample_every: int | None = None,
        grad_batches: Iterable | None = None,
        loss_fn: LossFn = F.cross_entropy,
        world_size: int | None = None,
        agree: Callable[[Selection], Selection] | None = None,
    ) -> None:
        if resample_every is not None and (isinstance(resample_every, bool) or int(resample_every) < 1):
            raise TradyError(f"resample_every must be a whole number of steps >= 1 or None, got {resample_every!r}")
        self.model = model
        self.strategy = strategies.get(strategy) if isinstance(strategy, str) else strategy
        if not isinstance(self.strategy, strategies.Strategy):
            raise TradyError(f"strategy must be a name ({', '.join(strategies.available())}) or a Strategy, "
                             f"got {type(strategy).__name__}")  # fmt: skip
        self.seed = int(seed)
        self.resample_every = None if resample_every is None else int(resample_every)
        self.grad_batches = grad_batches
        self.loss_fn = loss_fn
        self.agree = agree  # data parallel: makes every process train the same selection
        if world_size is None:
            from trady.core import distributed

            world_size = distributed.rank_world()[1]
        self.world_size = int(world_size)
        engine_config = config or EngineConfig()
        self.costs: CostTable = analyze(model, example_input=example_input, classifier=engine_config.classifier)
        self.profile = _as_profile(profile)
        if self.profile is not None:  # a profile of the bare network fits the same network in a wrapper
            self.profile = self.profile.matched_to(self.costs)
        self.mode = self.strategy.mode
        self.notes: list[str] = []
        self.budget_units: int | None = None
        if self.mode == "sparse":
            self.budget_units = self._budget_units(budget)
        self.engine: SparseEngine | None = None
        self._orig_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        if self.mode == "sparse":
            self.engine = SparseEngine(model, example_input, engine_config)
        elif self.mode == "bias":
            cfg = EngineConfig(**{**vars(engine_config), "train_bias": True})
            self.engine = SparseEngine(model, example_input, cfg)
            self.engine.select({})
        elif self.mode == "adapter":  # lora: the strategy attaches its adapters (restore() merges them)
            self.strategy.attach(model, self.costs.classifier)
        else:
            head = set(map(id, model.get_submodule(self.costs.classifier).parameters()))
            for p in model.parameters():
                p.requires_grad_(self.mode == "full" or id(p) in head)
        self.selection: Selection = {}
        self.epoch_selections: list[Selection] = []  # every draw of the current epoch (resample_every)
        self.epoch = 0  # the epoch of the last start_epoch (0: none yet)
        self.draw = 0  # draws made in this epoch (resample_every)
        self.steps = 0  # tuner.step() calls in this epoch
        self.running_norms: dict[str, torch.Tensor] = {}  # medyate: last measured mean norm per channel
        self._norm_sums: dict[str, torch.Tensor] = {}
        self._norm_counts: dict[str, torch.Tensor] = {}
        self._hook = None
        if self.strategy.grad_source == "running" and self.engine is not None:
            self._hook = _register_norm_hook(self)
        self._due = False  # a resample_every redraw waits for the next training forward
        self._forward_hook = None
        if self.resample_every is not None and self.mode == "sparse":
            # prepend: the redraw (whose strict path check runs a forward) comes before the engine's root hooks
            # enter the functional-call mode for this forward
            self._forward_hook = model.register_forward_pre_hook(self._redraw_if_due, prepend=True)
        self.restored = False

    # -- budget: the one place that decides what a budget means for this model ----------------------
    def _budget_units(self, budget: int | str | None) -> int:
        if budget is None:
            raise TradyError(f"strategy {self.strategy.name!r} needs a budget: units like 27946, bytes like "
                             "256KB, or a share of full fine-tuning like 2.2%")  # fmt: skip
        units = parse_budget(budget, self.costs)
        if units >= self.costs.full_units:
            self.notes.append(f"budget {units} units >= full fine-tuning ({self.costs.full_units} units): "
                              "running full fine-tuning instead")  # fmt: skip
            self.mode = "full"
            return units
        strategies.check_budget(self.strategy.name, self.costs, units, spec=budget)
        return units

    # -- the loop ---------------------------------------------------------------------------------------
    def start_epoch(self, epoch: int, grad_batches: Iterable | None = None) -> list[dict[str, Any]]:
        """Draw the selection of `epoch` (1-based) and return the param groups the optimizer must train.

        Groups: {"name": "backbone", "params": every layer's slice tensor (empty while unselected; the
        engine resizes them in place, so an optimizer built once stays valid) and biases when trained}
        and {"name": "classifier", "params": the head's parameters}, empty groups left out. Each group's
        "param_names" (PyTorch's own key, kept in `optimizer.param_groups` and its state_dict) names its
        tensors as `named_parameters()` does. The list goes straight into any torch.optim optimizer
        (rebuilding it each epoch, as the paper's SGD does, is fine; so is one optimizer for the whole
        run: a slice keeps its state, e.g. momentum, while its layer's channels stay the same).
        `grad_batches` overrides the constructor's batches of the full-gradient pass (d-/s-det-rgn)."""
        self._check_live()
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 1:
            raise TradyError(f"epoch must be a whole number >= 1 (an int), got {epoch!r}")
        self.epoch, self.draw, self.steps, self._due = int(epoch), 0, 0, False
        self.epoch_selections = []
        self._redraw(grad_batches)
        return self.param_groups()

    def step(self) -> bool:
        """Count one training step (call it after `optimizer.step()`). With `resample_every`, after every
        N steps of the epoch a redraw is due: it happens right before the next training forward (one
        with gradients enabled; an evaluation does not trigger it, nor does an epoch's end: the next
        `start_epoch` draws anyway). The optimizer stays valid: it holds every layer's slice tensor, which
        the engine resizes in place. Returns whether a redraw is now due."""
        self._check_live()
        self.steps += 1
        if self.resample_every is None or self.mode != "sparse" or self.steps % self.resample_every:
            return False
        self._due = True
        return True

    def _redraw_if_due(self, module: nn.Module, args: Any) -> None:
        """Forward pre-hook of the model: the redraw that `step` made due, before a training forward."""
        if self._due and torch.is_grad_enabled():
            self._due = False
            self.draw += 1
            self._redraw(None)

    def _redraw(self, grad_batches: Iterable | None) -> None:
        if self.mode != "sparse":
            return
        strategy = self.strategy
        self._fold_norms()
        grad_stats = None
        if strategy.needs_full_gradient():
            grad_stats = self._full_gradient_norms(grad_batches if grad_batches is not None else self.grad_batches)
        elif strategy.grad_source == "running" and self.running_norms:
            grad_stats = self.running_norms
        ctx = strategies.SelectionContext(
            epoch=self.epoch, costs=self.costs, budget_units=self.budget_units,
            generator=draw_generator(self.seed, self.epoch, self.draw), profile=self.profile,
            grad_stats=grad_stats, model=self.model,
        )  # fmt: skip
        selection = strategy.select(ctx)
        if self.agree is not None:
            selection = self.agree(selection)
        self.selection = self.engine.select(selection)
        self.epoch_selections.append(self.selection)

    def parameters(self) -> list[torch.Tensor]:
        """Every tensor the optimizer must train now (the groups of `param_groups`, flat)."""
        return [p for g in self.param_groups() for p in g["params"]]

    def param_groups(self) -> list[dict[str, Any]]:
        """[{"name": "backbone"|"classifier", "params": [...], "param_names": [...]}] (start_epoch says more)."""
        head = self.model.get_submodule(self.costs.classifier)
        head_ids = set(map(id, head.parameters()))
        named = self.named_parameters()
        groups = []
        for group, in_head in (("backbone", False), ("classifier", True)):
            members = [(n, p) for n, p in named if (id(p) in head_ids) == in_head]
            if members:
                names, params = zip(*members)
                groups.append({"name": group, "params": list(params), "param_names": list(names)})
        return groups

    def named_parameters(self, trained_only: bool = False) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) of everything the optimizer must hold, in `parameters()` order. A layer's slice is
        named after the weight it updates (`"blocks.0.conv.weight"`, a MultiheadAttention's
        `"<name>.in_proj_weight"`) and holds the selected input channels of it (layout:
        `trady.engine.functions.gather_slice`; `tuner.selection[layer]` lists them); it is empty (0 channels)
        while its layer is unselected: it stays in the list so that an optimizer built once holds it when
        a later draw selects the layer (optimizers skip tensors without a gradient). Classifier and
        trained biases keep their model names. trained_only: without the empty slices."""
        by_id = {id(p): n for n, p in self.model.named_parameters()}
        if self.engine is not None:
            for layer, module in self.engine.layers.items():
                weight = "in_proj_weight" if isinstance(module, nn.MultiheadAttention) else "weight"
                by_id[id(module.trady.w_slice)] = f"{layer}.{weight}"
            params = self.engine.parameters()
        else:
            params = [p for p in self.model.parameters() if p.requires_grad]
        return [(by_id[id(p)], p) for p in params if not (trained_only and p.numel() == 0)]

    # -- gradient statistics --------------------------------------------------------------------------
    def _record_norms(self) -> None:
        """medyate: add this step's per-channel gradient norms of the trained slices (optimizer pre-hook)."""
        for name, (idx, n) in self.engine.slice_grad_norms().items():
            c = self.costs.by_name[name].in_channels
            idx = idx.cpu()
            self._norm_sums.setdefault(name, torch.zeros(c, dtype=torch.float64)).index_add_(0, idx, n.double().cpu())
            self._norm_counts.setdefault(name, torch.zeros(c, dtype=torch.float64)).index_add_(
                0, idx, torch.ones(len(idx), dtype=torch.float64)
            )

    def _fold_norms(self) -> None:
        """The mean norm of each channel over the steps since the last draw becomes its last measured norm."""
        for name, s in self._norm_sums.items():
            cur = self.running_norms.setdefault(name, torch.full_like(s, math.nan))
            hit = self._norm_counts[name] > 0
            cur[hit] = s[hit] / self._norm_counts[name][hit]
        self._norm_sums, self._norm_counts = {}, {}

    def _full_gradient_norms(self, batches: Iterable | None) -> dict[str, torch.Tensor]:
        """Per-channel weight-gradient norms of every layer from a few batches, without an update."""
        if batches is None:
            raise TradyError(f"strategy {self.strategy.name!r} ranks channels by a full gradient: give the tuner "
                             "grad_batches (an iterable of (input, target) batches)")  # fmt: skip
        engine = self.engine
        engine.select(self.costs.all_channels())
        params = engine.parameters()
        for p in params:
            p.grad = None
        device = engine.slice_parameters()[0].device
        seen = 0
        for x, y in batches:
            if seen >= FULL_GRAD_BATCHES:
                break
            self.loss_fn(self.model(x.to(device)), y.to(device)).backward()
            seen += 1
        if seen == 0:
            raise TradyError("grad_batches yielded no batch; accepted: an iterable of (input, target) batches")
        if self.world_size > 1:  # the gradient of the global batches, the same on every process
            from trady.core import distributed

            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            distributed.all_reduce_mean_([p.grad for p in params])
        norms = {name: n.detach().clone() for name, (_, n) in engine.slice_grad_norms().items()}
        for p in params:
            p.grad = None
        engine.select({})
        return norms

    # -- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs besides the model's weights: the strategy's state (static selection,
        MeDyate's norms), the measured norms, the position (epoch, draw, steps) and the current selection.
        Tensors only in plain containers: loadable with torch.load(weights_only=True)."""
        return {
            "strategy": self.strategy.state_dict(),
            "mode": self.mode,
            "budget_units": self.budget_units,
            "epoch": self.epoch,
            "draw": self.draw,
            "steps": self.steps,
            "due": self._due,
            "selection": {k: v.clone() for k, v in self.selection.items()},
            "running_norms": {k: v.clone() for k, v in self.running_norms.items()},
            "norm_sums": {k: v.clone() for k, v in self._norm_sums.items()},
            "norm_counts": {k: v.clone() for k, v in self._norm_counts.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was taken; re-selects its selection (rebuild the optimizer)."""
        self._check_live()
        if not isinstance(state, dict) or "strategy" not in state:
            raise TradyError("tuner state must be a dict from Tuner.state_dict()")
        if state.get("budget_units") != self.budget_units or state.get("mode", self.mode) != self.mode:
            raise TradyError(
                f"tuner state was taken with mode {state.get('mode')!r} and budget {state.get('budget_units')} units; "
                f"this tuner has mode {self.mode!r} and {self.budget_units} units"
            )
        try:
            self.strategy.load_state_dict(state["strategy"])
        except TradyError:
            raise
        except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as err:
            raise TradyError(f"strategy state is malformed: {' '.join(str(err).split())[:200]}") from None
        static = getattr(self.strategy, "_selection", None)
        if static:
            self.costs.check_selection(static)
        self.running_norms = self._norms(state.get("running_norms"), "running gradient norms")
        self._norm_sums = self._norms(state.get("norm_sums"), "gradient norm sums")
        self._norm_counts = self._norms(state.get("norm_counts"), "gradient norm counts")
        self.epoch, self.draw, self.steps = (int(state.get(k, 0)) for k in ("epoch", "draw", "steps"))
        selection = state.get("selection") or {}
        if self.mode == "sparse":
            self.selection = self.engine.select(selection)
            self.epoch_selections = [self.selection]
        self._due = bool(state.get("due"))  # drawn before the next training forward

    def _norms(self, values: dict | None, what: str) -> dict[str, torch.Tensor]:
        out = {}
        for name, v in (values or {}).items():
            lay = self.costs.by_name.get(name)
            t = torch.as_tensor(v, dtype=torch.float64).clone()
            if lay is None or t.shape != (lay.in_channels,):
                raise TradyError(f"tuner state: {what} of {name!r} do not fit the model")
            out[name] = t
        return out

    def restore(self) -> nn.Module:
        """Write the trained slices into the weights, return the model to its stock classes and flags."""
        for handle in (self._hook, self._forward_hook):
            if handle is not None:
                handle.remove()
        self._hook = self._forward_hook = None
        if self.engine is not None:
            self.engine.restore()
        else:
            if self.mode == "adapter":
                self.strategy.detach(self.model)
            for n, p in self.model.named_parameters():
                p.requires_grad_(self._orig_requires_grad.get(n, p.requires_grad))
        self.restored = True
        return self.model

    def _check_live(self) -> None:
        if self.restored:
            raise TradyError("this tuner was restored; make a new Tuner(model, example_input, ...)")

    def __repr__(self) -> str:
        return (f"Tuner({self.strategy!r}, mode={self.mode!r}, budget_units={self.budget_units}, "
                f"epoch={self.epoch}, layers={len(self.costs.layers)})")  # fmt: skip


def _as_profile(profile: RankingProfile | str | Path | None) -> RankingProfile | None:
    if profile is None or isinstance(profile, RankingProfile):
        return profile
    if isinstance(profile, (str, Path)):
        return RankingProfile.load(profile)
    got = type(profile).__name__
    raise TradyError(f"profile must be a RankingProfile (trady.rank), a JSON path or None, got {got}")


def _register_norm_hook(tuner: Tuner):
    """A global optimizer step pre-hook that records the tuner's slice-gradient norms: the gradients are
    final then (after backward, accumulation and any all-reduce). Only optimizers holding one of the
    tuner's current slices count; the hook holds the tuner weakly and ends with `restore()`."""
    ref = weakref.ref(tuner)

    def hook(optimizer, args, kwargs):
        t = ref()
        if t is None or t.engine is None or t.restored:
            return None
        slices = {id(p) for p in t.engine.slice_parameters()}
        if slices and any(id(p) in slices for g in optimizer.param_groups for p in g["params"]):
            t._record_norms()
        return None

    handle = register_optimizer_step_pre_hook(hook)
    weakref.finalize(tuner, handle.remove)  # a tuner dropped without restore() leaves no hook behind
    return handle
