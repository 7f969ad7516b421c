"""Non-sparse modes (full, classifier, bias): the trainer handles them; no channel selection."""

from __future__ import annotations

from trady.engine.costs import Selection
from trady.selection.strategies.base import SelectionContext, Strategy, register

# ----------------------------------------------------------------------------------------------------
# non-sparse modes: the trainer handles them; no channel selection


class _Mode(Strategy):
    dynamic = False

    def select(self, ctx: SelectionContext) -> Selection:
        return {}


@register("full")
class Full(_Mode):
    """Full fine-tuning (every weight; no budget)."""

    display_order, colour = 92, "#000000"
    mode = "full"


@register("classifier")
class ClassifierOnly(_Mode):
    """Only the classifier is trained."""

    display_order, colour = 91, "#7f7f7f"
    mode = "classifier"


@register("bias")
class BiasAndClassifier(_Mode):
    """Biases and the classifier are trained (TinyTL-style)."""

    display_order, colour = 90, "#8c564b"
    mode = "bias"
