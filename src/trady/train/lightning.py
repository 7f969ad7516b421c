"""A PyTorch Lightning callback that applies a strategy to a LightningModule (extra: `trady[lightning]`).

    trainer = lightning.Trainer(max_epochs=10, callbacks=[TradyCallback(example_input, budget="5%",
                                                                        profile=profile)])
    trainer.fit(module, loader)

At fit start the callback makes a `trady.Tuner` over the LightningModule (the last Conv2d/Linear
called in its forward is the head, or `EngineConfig(classifier=...)`) and adds every layer's slice
tensor to the first param group of the optimizer that `configure_optimizers` returned (the engine
resizes them in place at each draw). At each training epoch's start it draws the epoch's selection;
the head keeps training through the optimizer's own param groups, the frozen weights get no gradient,
which torch optimizers skip. With `resample_every` it redraws every N optimizer steps (with
`accumulate_grad_batches=k`, every N*k batches). The tuner's state is the callback's state in
Lightning checkpoints (an exact resume of the draws; the optimizer's loaded slice state, e.g. momentum,
is kept only for a slice whose channels are the ones it was made for); at fit end the module gets its
stock layers back, the trained values in its own weights. One optimizer only. A profile ranked on the
bare network fits the LightningModule that holds it (`conv1` matches `net.conv1`: layer names are
matched by a unique dotted suffix, `RankingProfile.matched_to`).
"""

from __future__ import annotations

from typing import Any

import torch

from trady.core.errors import TradyError
from trady.engine import EngineConfig

try:
    import lightning
except ImportError:  # pragma: no cover - the extra is not installed
    raise TradyError("trady.train.lightning needs PyTorch Lightning: pip install 'trady[lightning]'") from None
from trady.selection.ranking import RankingProfile
from trady.selection.tuner import Tuner


class TradyCallback(lightning.Callback):
    def __init__(
        self,
        example_input: torch.Tensor,
        *,
        strategy: str = "trady",
        budget: int | str | None = None,
        profile: RankingProfile | str | None = None,
        seed: int = 0,
        config: EngineConfig | None = None,
        resample_every: int | None = None,
    ) -> None:
        self.example_input = example_input
        self.options = dict(strategy=strategy, budget=budget, profile=profile, seed=seed, config=config,
                            resample_every=resample_every)  # fmt: skip
        self.tuner: Tuner | None = None
        self._pending_state: dict[str, Any] | None = None

    def on_fit_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            got = len(trainer.optimizers)
            raise TradyError(f"TradyCallback drives one optimizer; configure_optimizers returned {got}")
        pl_module.eval()  # frozen BatchNorm (running statistics), no dropout: the paper's recipe
        self.tuner = Tuner(pl_module, self.example_input.to(pl_module.device), **self.options)
        if self._pending_state is not None:
            self.tuner.load_state_dict(self._pending_state)
            self._pending_state = None
        # The slice tensors are no module parameters: they join the optimizer's first group once (the
        # engine resizes them in place at each draw, so they stay valid for the whole fit).
        optimizer = _torch_optimizer(trainer.optimizers[0])
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        slices = [(n, p) for n, p in self.tuner.named_parameters() if id(p) not in held]
        optimizer.param_groups[0]["params"].extend(p for _, p in slices)
        if "param_names" in optimizer.param_groups[0]:  # an optimizer built from named parameters
            optimizer.param_groups[0]["param_names"].extend(n for n, _ in slices)

    def on_train_epoch_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        pl_module.eval()  # Lightning sets train mode; prepared BatchNorms are frozen either way, dropout is off
        self.tuner.start_epoch(trainer.current_epoch + 1)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        pl_module.eval()  # Lightning may set train mode again (after validation): dropout stays off

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # Counts optimizer steps, not batches (accumulate_grad_batches): the redraw this may make due
        # happens at the next training forward, after this step.
        self.tuner.step()

    def on_fit_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        if self.tuner is not None and not self.tuner.restored:
            self.tuner.restore()

    def state_dict(self) -> dict[str, Any]:
        return {"tuner": self.tuner.state_dict()} if self.tuner is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "tuner" in state_dict:
            self._pending_state = state_dict["tuner"]  # the tuner is made at fit start


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer wraps the torch one
