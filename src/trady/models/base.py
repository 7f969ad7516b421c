"""What every zoo model shares: the `classifier` head, its reset, weight initialisation.

Any nn.Module can be fine-tuned by trady; the helpers `get_classifier`, `classifier_name` and
`reset_classifier` therefore also accept models from outside the zoo (the last nn.Linear is taken
as the head when the model has no `classifier` attribute).
"""

from __future__ import annotations

import torch
from torch import nn

from trady.core.errors import TradyError


class ZooModel(nn.Module):
    """Base of the zoo: `self.classifier` is the final nn.Linear (module name "classifier").

    Subclasses set `checkpoint_prefix_map`: prefixes of foreign checkpoint keys and the prefix they
    load into (e.g. torchvision's MobileNetV2 stores the head as "classifier.1."), applied by the
    weight loader before the strict key check.
    """

    checkpoint_prefix_map: dict[str, str] = {}
    classifier: nn.Linear

    def reset_classifier(self, num_classes: int) -> nn.Linear:
        """Replace the head with a freshly initialised nn.Linear(in_features, num_classes)."""
        num_classes = check_num_classes(num_classes)
        old = self.classifier
        self.classifier = new_linear(old.in_features, num_classes).to(device=old.weight.device, dtype=old.weight.dtype)
        return self.classifier

    def remap_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename a checkpoint's keys from the layouts this model accepts into its own names."""
        if not self.checkpoint_prefix_map:
            return dict(state_dict)
        out = {}
        for key, value in state_dict.items():
            for old, new in self.checkpoint_prefix_map.items():
                if key.startswith(old):
                    key = new + key[len(old) :]
                    break
            out[key] = value
        return out


def new_linear(in_features: int, out_features: int) -> nn.Linear:
    """A fresh head: PyTorch's default nn.Linear initialisation (as timm's reset_classifier)."""
    return nn.Linear(in_features, out_features)


def check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise TradyError(f"num_classes must be a positive integer, got {num_classes!r}")
    return num_classes


def classifier_name(model: nn.Module) -> str:
    """Qualified module name of the model's head: "classifier" for zoo models, else the last Linear."""
    if isinstance(getattr(model, "classifier", None), nn.Linear):
        return "classifier"
    linears = [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    if not linears:
        raise TradyError(
            f"{type(model).__name__} has no classifier: expected a `classifier` nn.Linear attribute "
            "or at least one nn.Linear module"
        )
    return linears[-1]


def get_classifier(model: nn.Module) -> nn.Linear:
    """The model's final nn.Linear (see `classifier_name`)."""
    return model.get_submodule(classifier_name(model))


def reset_classifier(model: nn.Module, num_classes: int) -> nn.Linear:
    """Give `model` a fresh head of `num_classes` outputs (in place); returns the new nn.Linear."""
    if isinstance(model, ZooModel):
        return model.reset_classifier(num_classes)
    num_classes = check_num_classes(num_classes)
    name = classifier_name(model)
    old = model.get_submodule(name)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    new = new_linear(old.in_features, num_classes).to(device=old.weight.device, dtype=old.weight.dtype)
    setattr(parent, attr, new)
    return new


def init_weights(model: nn.Module) -> None:
    """torchvision's initialisation: Kaiming-normal (fan_out) convs, unit BN, N(0, 0.01) Linear."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
