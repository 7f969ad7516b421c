"""LoRA (PEFT) as a baseline behind the same interface: `lora` (option `r`, also `alpha`, `targets`).

Not a channel selection: the Tuner attaches PEFT's LoRA adapters (`peft.inject_adapter_in_model`, the
extra trady[transformers]) to the Linear layers whose names end with one of `targets` (query and value
by default, as in the LoRA paper), freezes every other weight but the classifier, and trains the
adapters' A and B matrices with the head. Their memory differs from TraDy's where it matters: the
adapted layers' weights take no gradient, but every adapted layer keeps its full input for backward
(for the A matrix) and backward runs through the whole network down to the lowest adapter.
`restore()` merges the trained adapters into the weights and returns the stock Linear layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from trady.core.errors import TradyError
from trady.engine.costs import Selection
from trady.selection.strategies.base import SelectionContext, Strategy, register


def _peft():
    try:
        import peft
    except ImportError:
        raise TradyError("strategy 'lora' needs peft: pip install 'trady[transformers]'") from None
    return peft


@register("lora")
class LoRA(Strategy):
    """PEFT LoRA of rank `r` (scale alpha / r; alpha defaults to 2 r) on the Linear layers named `targets`."""

    dynamic = False
    mode = "adapter"
    display_order, colour = 89, "#17becf"

    def __init__(self, *, r: int = 8, alpha: float | None = None, targets: Sequence[str] = ("query", "value")) -> None:
        super().__init__()
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise TradyError(f"option r of strategy 'lora' must be a positive integer, got {r!r}")
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0):
            raise TradyError(f"option alpha of strategy 'lora' must be a positive number, got {alpha!r}")
        if isinstance(targets, str):
            targets = [targets]
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise TradyError(f"option targets of strategy 'lora' must be module names, got {targets!r}")
        self.r, self.alpha, self.targets = r, alpha, list(targets)

    def select(self, ctx: SelectionContext) -> Selection:
        return {}

    def attach(self, model: nn.Module, classifier: str) -> list[torch.Tensor]:
        """Inject the adapters in place; every weight but theirs and the classifier's is frozen."""
        peft = _peft()
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != classifier
                 and n.rsplit(".", 1)[-1] in self.targets]  # fmt: skip
        if not names:
            linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise TradyError(f"strategy 'lora' found no Linear layer named {self.targets}; Linear names here: "
                             f"{', '.join(linears[:12])}")  # fmt: skip
        config = peft.LoraConfig(r=self.r, lora_alpha=self.alpha or 2 * self.r, lora_dropout=0.0, target_modules=names)
        peft.inject_adapter_in_model(config, model)
        head = set(map(id, model.get_submodule(classifier).parameters()))
        trainable = []
        for n, p in model.named_parameters():
            train = "lora_" in n or id(p) in head
            p.requires_grad_(train)
            if train:
                trainable.append(p)
        return trainable

    def detach(self, model: nn.Module) -> None:
        """Merge the trained adapters into the weights and put the stock Linear layers back."""
        from peft.tuners.lora import LoraLayer

        for name, module in list(model.named_modules()):
            if isinstance(module, LoraLayer):
                module.merge()
                parent_name, _, attr = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, attr, module.get_base_layer())
