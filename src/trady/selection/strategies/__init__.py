"""Channel-selection strategies behind one registry (`register`, `get`, `available`).

Importing the package registers every strategy, as peft registers its methods: the interface and the
registry live in `base`, the strategies in `random` (TopK / Full Random, TraDy), `gradient` (det-rgn,
MeDyate, su-magnitude), `modes` (full, classifier, bias), `su_published` (Lin et al.'s schemes) and
`lora` (PEFT LoRA adapters, mode "adapter": the baseline that transformer users know).
"""

from trady.selection.ranking import DEFAULT_THRESHOLD
from trady.selection.strategies import gradient, lora, modes, random, su_published  # noqa: F401  (registers them)
from trady.selection.strategies.base import (
    GRAD_SOURCES,
    MODES,
    SelectionContext,
    Strategy,
    available,
    check_budget,
    draw_once,
    fill_budget,
    get,
    option_names,
    register,
    strategy_class,
    uniform_candidates,
)

__all__ = [
    "DEFAULT_THRESHOLD",
    "GRAD_SOURCES",
    "MODES",
    "SelectionContext",
    "Strategy",
    "available",
    "check_budget",
    "draw_once",
    "fill_budget",
    "get",
    "option_names",
    "register",
    "strategy_class",
    "uniform_candidates",
]
