"""The training-step variants the benchmarks compare, one small builder each (a registry).

Every variant gets its own deep copy of the model, in eval mode (frozen BatchNorm), and yields a
`StepVariant`: `step()` runs one step (forward + cross-entropy + backward + SGD step, or the no-grad
forward for "inference"), `clear()` drops its gradients, `params` are the tensors its optimizer
updates.
- inference:  stock model, forward + loss under torch.no_grad (the floor of every training step);
- engine:     the SparseEngine-prepared copy, updating only the selection (plus the classifier);
- freeze:     what a user would do instead: stock autograd, requires_grad=False except the whole
              weights of the selected layers and the classifier;
- full:       stock model, every weight trained;
- simulation: what the paper's code does: dense backward, then each partially selected weight's
              gradient multiplied by a 0/1 input-channel mask, fully frozen tensors' gradients zeroed.
`micro_batch_size` splits a training step's batch (trady.train.microbatch); the inference variant runs
one forward at the micro-batch size then (what one forward of the split step sees).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from trady.core.errors import unknown_name
from trady.engine import EngineConfig, SparseEngine, functions
from trady.engine.costs import CostTable, Selection
from trady.train.microbatch import accumulate_gradients


@dataclass
class StepVariant:
    name: str
    model: nn.Module
    step: Callable[[], None]
    clear: Callable[[], None]
    params: list[torch.Tensor] = field(default_factory=list)
    engine: SparseEngine | None = None
    optimizer: torch.optim.Optimizer | None = None


@dataclass
class StepInputs:
    """What every variant's step works on."""

    model: nn.Module  # the stock model (left untouched: variants copy it)
    costs: CostTable
    selection: Selection
    x: torch.Tensor
    y: torch.Tensor
    lr: float = 1e-4
    mask_bits: int = 1
    micro_batch_size: int | None = None


def _trained_step(m: nn.Module, params: list[torch.Tensor], inp: StepInputs, after_backward=None):
    opt = torch.optim.SGD(params, lr=inp.lr)

    def forward_loss(xs, ys):
        logits = m(xs)
        return logits, F.cross_entropy(logits, ys)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        accumulate_gradients(forward_loss, inp.x, inp.y, inp.micro_batch_size)
        if after_backward is not None:
            after_backward()
        opt.step()

    return step, (lambda: opt.zero_grad(set_to_none=True)), opt


def _stock_copy(inp: StepInputs, trained: Callable[[str, nn.Parameter], bool]) -> tuple[nn.Module, list]:
    m = copy.deepcopy(inp.model).eval()
    for n, p in m.named_parameters():
        p.requires_grad_(trained(n, p))
    return m, [p for p in m.parameters() if p.requires_grad]


def build_inference(inp: StepInputs) -> StepVariant:
    m, _ = _stock_copy(inp, lambda n, p: False)
    b = inp.micro_batch_size or inp.x.shape[0]
    x, y = inp.x[:b], inp.y[:b]

    def step() -> None:
        with torch.no_grad():
            F.cross_entropy(m(x), y)

    return StepVariant("inference", m, step, lambda: None)


def build_engine(inp: StepInputs) -> StepVariant:
    m = copy.deepcopy(inp.model).eval()
    engine = SparseEngine(m, inp.x[:1], EngineConfig(classifier=inp.costs.classifier, mask_bits=inp.mask_bits))
    engine.select(inp.selection)
    params = engine.parameters()
    step, clear, opt = _trained_step(m, params, inp)
    return StepVariant("engine", m, step, clear, params, engine=engine, optimizer=opt)


def build_freeze(inp: StepInputs) -> StepVariant:
    chosen = {f"{name}.{w}" for name in inp.selection for w in ("weight", "in_proj_weight")}  # MHA: in_proj
    head = inp.costs.classifier + "."
    m, params = _stock_copy(inp, lambda n, p: n in chosen or n.startswith(head))
    step, clear, opt = _trained_step(m, params, inp)
    return StepVariant("freeze", m, step, clear, params, optimizer=opt)


def build_full(inp: StepInputs) -> StepVariant:
    m, params = _stock_copy(inp, lambda n, p: True)
    step, clear, opt = _trained_step(m, params, inp)
    return StepVariant("full", m, step, clear, params, optimizer=opt)


def _input_channel_mask(module: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """0/1 tensor broadcastable to the module's weight: 1 on the weights of input channels `idx`."""
    w = module.weight
    if isinstance(module, nn.Linear):
        mask = torch.zeros(1, w.shape[1], dtype=w.dtype, device=w.device)
        mask[0, idx.to(w.device)] = 1
        return mask
    groups = module.groups
    cout, cin_g = w.shape[:2]
    ones = torch.ones(idx.numel(), cout // groups, 1, 1, dtype=w.dtype, device=w.device)
    mask = torch.zeros(cout, cin_g, 1, 1, dtype=w.dtype, device=w.device)
    functions.scatter_slice_(mask, idx.to(w.device), ones if groups > 1 else ones.transpose(0, 1), groups)
    return mask


def simulation_masks(
    model: nn.Module, costs: CostTable, selection: Selection
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(parameter, mask) for every parameter outside the classifier; mask None: zero the whole gradient."""
    classifier = model.get_submodule(costs.classifier)
    keep = {id(p) for p in classifier.parameters()}
    masks: dict[int, torch.Tensor] = {}
    for name, idx in selection.items():
        module = model.get_submodule(name)
        if isinstance(module, nn.MultiheadAttention):  # the selection is in_proj's input channels
            w = module.in_proj_weight
            mask = torch.zeros(1, w.shape[1], dtype=w.dtype, device=w.device)
            mask[0, idx.to(w.device)] = 1
            masks[id(w)] = mask
            continue
        masks[id(module.weight)] = _input_channel_mask(module, idx)
    return [(p, masks.get(id(p))) for p in model.parameters() if id(p) not in keep]


def build_simulation(inp: StepInputs) -> StepVariant:
    m, params = _stock_copy(inp, lambda n, p: True)
    masks = simulation_masks(m, inp.costs, inp.selection)

    def apply_masks() -> None:
        with torch.no_grad():
            for p, mask in masks:
                if p.grad is None:
                    continue
                if mask is None:
                    p.grad.zero_()
                else:
                    p.grad.mul_(mask)

    step, clear, opt = _trained_step(m, params, inp, after_backward=apply_masks)
    return StepVariant("simulation", m, step, clear, params, optimizer=opt)


BUILDERS: dict[str, Callable[[StepInputs], StepVariant]] = {
    "inference": build_inference,
    "engine": build_engine,
    "freeze": build_freeze,
    "full": build_full,
    "simulation": build_simulation,
}


def build(name: str, inp: StepInputs) -> StepVariant:
    if name not in BUILDERS:
        raise unknown_name("step variant", name, tuple(BUILDERS))
    return BUILDERS[name](inp)
