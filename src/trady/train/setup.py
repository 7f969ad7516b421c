"""What one fine-tune holds while it runs (`Run`) and how it is built from a config (`setup`).

`setup(config, model=None, train_data=None, test_data=None)` decides everything a run needs once:
the device, this process's rank and the world size, the model (the user's nn.Module, a user builder
`file.py:fn` / `package.module:fn`, or a zoo model), the batches (the user's Dataset/DataLoader or a
trady dataset) and the `Tuner` that applies the strategy: the one path from a strategy to the engine.
Checkpoints (trady.train.checkpoint) and the loop (trady.train.loop) read a `Run`; neither is imported here.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trady import models
from trady.config import FinetuneConfig
from trady.core import distributed
from trady.core.errors import TradyError
from trady.data import BatchLoader, load_dataset
from trady.data.text import TokenTransform, is_text_data, load_text_dataset
from trady.data.transforms import ImageTransform
from trady.engine import EngineConfig, SparseEngine
from trady.engine.costs import CostTable, Selection
from trady.models import entry
from trady.selection import ranking, strategies
from trady.selection.tuner import FULL_GRAD_BATCHES, Tuner
from trady.train import preflight
from trady.train.run_paths import absolute_paths

# det-rgn's full-gradient pass (Tuner._full_gradient_norms) is outside the measured training step
FULL_GRADIENT_NOTE = (
    "the full-gradient pass before each selection (dense backward of every layer over {batches} batches of "
    "{batch}) is not micro-batched and not in peak_memory_bytes or the budget"
)


@dataclass
class Run:
    """Everything a fine-tune holds while it runs (built by `setup`, used by the loop and checkpoints)."""

    config: FinetuneConfig
    model: nn.Module
    tuner: Tuner
    train_loader: Any  # BatchLoader, or a UserLoader over the user's DataLoader
    test_loader: Any
    dataset: str  # the data's name in the summary
    train_size: int | None
    test_size: int | None
    classes: int
    fingerprint: str  # identifies the data: a resumed run must see the same
    resolution: int | None
    device: torch.device = torch.device("cpu")
    rank: int = 0  # decided once per run (torchrun), read everywhere from here
    world: int = 1
    notes: list[str] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None  # persistent optimizer of full/classifier/bias
    comm_elements: int = 0  # data parallel: gradient elements all-reduced per step (last step)
    first_loss: float | None = None  # the run's first training loss: the scale of divergence (checkpointed)
    stem_warned: bool = False  # the stem warning is said once per run

    # the tuner's view, under the names the loop and the summary use
    @property
    def costs(self) -> CostTable:
        return self.tuner.costs

    @property
    def mode(self) -> str:
        return self.tuner.mode

    @property
    def engine(self) -> SparseEngine | None:
        return self.tuner.engine

    @property
    def strategy(self) -> strategies.Strategy:
        return self.tuner.strategy

    @property
    def budget_units(self) -> int | None:
        return self.tuner.budget_units

    def log(self, msg: str) -> None:
        if self.config.progress and self.rank == 0:
            print(msg, flush=True)


def setup(
    config: FinetuneConfig, model: nn.Module | None = None, train_data: Any = None, test_data: Any = None
) -> Run:
    config.validate()
    if (train_data is None) != (test_data is None):
        raise TradyError("give train_data and test_data together (torch Datasets or DataLoaders), or neither")
    if model is not None and not isinstance(model, nn.Module):
        raise TradyError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    defaults = FinetuneConfig()
    if model is not None and config.model == defaults.model:  # config.model only names a given model
        config = dataclasses.replace(config, model=type(model).__name__)
    if train_data is not None and config.data == defaults.data:
        config = dataclasses.replace(config, data=type(train_data).__name__)
    # config.json holds absolute paths: the run resumes from any working folder
    config = absolute_paths(config, data=train_data is None, model=model is None)
    strategy = strategies.get(config.strategy, **config.strategy_options)
    device = distributed.resolve_device(config.device)
    rank, world = distributed.rank_world()
    zoo = model is None and not entry.is_entry_point(config.model)
    spec = models.spec(config.model) if zoo else None
    resolution = config.resolution or (spec.resolution if spec is not None else None)
    torch.manual_seed(config.seed)  # the fresh classifier's initialisation
    if train_data is not None:
        from trady.data import torch_inputs
        train_loader = torch_inputs.batches_of(train_data, config.batch_size, train=True, seed=config.seed, rank=rank,
                                            world_size=world)  # fmt: skip
        test_loader = torch_inputs.batches_of(test_data, max(config.batch_size, 64), train=False, seed=config.seed)
        sizes = (torch_inputs.num_samples(train_data), torch_inputs.num_samples(test_data))
        dataset = config.data
        fingerprint = hashlib.sha256(repr(sizes).encode()).hexdigest()[:16]
        classes = None
    elif spec is not None and spec.inputs == "tokens" or is_text_data(config.data):
        train_loader, test_loader, sizes, dataset, fingerprint, classes, example = _text_batches(
            config, spec, rank, world)
        resolution = None
    else:
        if resolution is None:
            raise TradyError(f"model {config.model!r} is a user model: give the input resolution of trady's "
                             "images (--resolution), or your own train_data/test_data (Python)")  # fmt: skip
        data = load_dataset(config.data, data_dir=config.data_dir, train_size=config.train_size,
                            test_size=config.test_size, seed=config.seed)  # fmt: skip
        mean, std = (spec.mean, spec.std) if spec is not None else (entry.MEAN, entry.STD)
        train_tf, test_tf = (ImageTransform(resolution, mean, std, train=t) for t in (True, False))
        train_loader = BatchLoader(data.train, config.batch_size, train_tf, shuffle=True, seed=config.seed,
                                   drop_last=True, rank=rank, world_size=world)  # fmt: skip
        test_loader = BatchLoader(data.test, max(config.batch_size, 64), test_tf, shuffle=False, seed=config.seed)
        sizes, dataset, fingerprint = (len(data.train), len(data.test)), data.name, _fingerprint(data)
        classes = len(data.classes)
        if classes < 2:
            raise TradyError(f"dataset {config.data!r} has {classes} class(es) ({', '.join(map(repr, data.classes))}); "
                             "accepted: a dataset of at least 2 classes (one class has nothing to learn)")  # fmt: skip
    if len(train_loader) == 0:
        raise TradyError(
            f"train_size {sizes[0]} is smaller than one batch of {config.batch_size * world}; "
            "accepted: a train set of at least one batch"
        )
    if model is None:
        model = _build_model(config, classes)
    model = model.to(device)
    model.eval()  # the paper's recipe: BatchNorm frozen (running statistics), no dropout; batchnorm="train":
    # the loop puts the BatchNorm layers (only) into train mode for the training steps (trady.engine.batchnorm)
    if resolution is not None and train_data is None:
        # before anything of the run's size is allocated: the largest forward (training or test batches)
        forward_batch = max(config.micro_batch_size or config.batch_size, min(max(config.batch_size, 64), sizes[1]))
        preflight.check_fits_memory(model, resolution, forward_batch)
        example = torch.zeros(1, 3, resolution, resolution, device=device)
        preflight.check_output_classes(model, example, classes, config.model)
    elif train_data is None:  # text: the first training text's ids
        example = example.to(device)
        preflight.check_output_classes(model, example, classes, config.model)
    else:
        from trady.data import torch_inputs
        example = torch_inputs.first_input(train_loader).to(device)
    classifier = "classifier" if zoo else None  # zoo heads are named; elsewhere the last layer called
    tuner = Tuner(
        model, example, strategy=strategy, budget=config.budget if strategy.mode == "sparse" else None,
        profile=_load_profile(config, zoo), seed=config.seed, resample_every=config.resample_every,
        config=EngineConfig(classifier=classifier, train_bias=config.train_bias, mask_bits=config.mask_bits,
                            batchnorm=config.batchnorm),
        grad_batches=_FixedBatches(train_loader, device), world_size=world,
    )  # fmt: skip
    head = model.get_submodule(tuner.costs.classifier)
    if config.classifier_init == "zeros" and config.weights is None:
        # Zero logits at the start: the backbone gets no gradient from a random head's noise.
        with torch.no_grad():
            for p in head.parameters():
                p.zero_()
    run = Run(
        config=config, model=model, tuner=tuner, train_loader=train_loader, test_loader=test_loader, dataset=dataset,
        train_size=sizes[0], test_size=sizes[1], classes=classes or getattr(head, "out_features", 0),
        fingerprint=fingerprint, resolution=resolution, device=device, rank=rank, world=world,
    )  # fmt: skip
    if world > 1:
        tuner.agree = functools.partial(broadcast_selection, tuner.costs, device)
    notes = list(tuner.notes)
    if tuner.mode == "sparse" and strategy.grad_source == "full":
        notes.append(FULL_GRADIENT_NOTE.format(batches=FULL_GRAD_BATCHES, batch=config.batch_size))
    for note in notes:
        run.notes.append(note)
        run.log("note: " + note)
    if run.mode != "sparse":  # full/classifier/bias train the same tensors all run: one optimizer
        run.optimizer = make_optimizer(run)
    return run


def _text_batches(config: FinetuneConfig, spec, rank: int, world: int):
    """Texts -> token ids through the model's own tokenizer: loaders, sizes, name, fingerprint, classes, example."""
    if spec is None or spec.inputs != "tokens":
        accepted = ", ".join(n for n in models.available() if models.spec(n).inputs == "tokens")
        raise TradyError(f"data {config.data!r} is text; accepted models: {accepted} (model {config.model!r} "
                         "takes images)")  # fmt: skip
    if not is_text_data(config.data):
        raise TradyError(f"model {config.model!r} takes texts; accepted data: rotten-tomatoes or a .csv file "
                         f"with the columns text,label, got {config.data!r}")  # fmt: skip
    data = load_text_dataset(config.data, train_size=config.train_size, test_size=config.test_size, seed=config.seed)
    tf = TokenTransform(models.text_encoder(config.model, config.sequence_length))
    train_loader = BatchLoader(data.train, config.batch_size, tf, shuffle=True, seed=config.seed, drop_last=True,
                               rank=rank, world_size=world)  # fmt: skip
    test_loader = BatchLoader(data.test, max(config.batch_size, 64), tf, shuffle=False, seed=config.seed)
    example = tf(data.train.get_batch([0])[0])
    sizes = (len(data.train), len(data.test))
    return train_loader, test_loader, sizes, data.name, _fingerprint(data), len(data.classes), example


def make_optimizer(run: Run) -> torch.optim.Optimizer:
    """Plain SGD over the tuner's param groups; the classifier gets its own base learning rate when
    `classifier_lr` is set. Each group carries `base_lr`; the schedule scales it every step."""
    config = run.config
    clf_lr = config.classifier_lr if config.classifier_lr is not None else config.lr
    groups = run.tuner.param_groups()
    for g in groups:
        g["lr"] = g["base_lr"] = clf_lr if g["name"] == "classifier" else config.lr
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def _build_model(config: FinetuneConfig, classes: int | None) -> nn.Module:
    if entry.is_entry_point(config.model):
        model = entry.build(config.model, num_classes=classes)
        if config.weights:  # a local file (weights_only / safetensors), keys checked strictly
            models.load_into(model, models.load_state_dict_file(config.weights), source=str(config.weights))
        return model
    return models.create(config.model, pretrained=config.pretrained, num_classes=classes, weights=config.weights,
                         mcu_dir=config.mcu_dir)  # fmt: skip


def _load_profile(config: FinetuneConfig, zoo: bool) -> ranking.RankingProfile | None:
    if config.profile:
        path = Path(config.profile)
        if not path.is_file():
            raise TradyError(f"profile file {str(path)!r} not found; accepted: a JSON file written by `trady rank`")
        return ranking.RankingProfile.load(path)
    if not zoo or config.model not in ranking.shipped_profiles():
        return None  # strategies that need one say so when they select
    return ranking.load_profile(config.model)


def _fingerprint(data) -> str:
    """Identifies trady's training and test data (sizes, labels, classes)."""
    h = hashlib.sha256()
    for labels in (data.train.labels, data.test.labels):
        h.update(labels.to(torch.int64).cpu().numpy().tobytes())
        h.update(b"|")
    h.update("\n".join(data.classes).encode())
    return h.hexdigest()[:16]


class _FixedBatches:
    """The batches of the full-gradient pass (det-rgn): the same ones every time, independent of the epoch."""

    def __init__(self, loader: Any, device: torch.device) -> None:
        self.loader, self.device = loader, device

    def __iter__(self):
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(0)
        for x, y in self.loader:
            yield x.to(self.device), y.to(self.device)


def broadcast_selection(costs: CostTable, device: torch.device, selection: Selection) -> Selection:
    """Data parallel: every rank trains rank 0's selection (the ranks draw the same one anyway)."""
    offsets, total = {}, 0
    for lay in costs.layers:
        offsets[lay.name] = total
        total += lay.in_channels
    mask = torch.zeros(total, dtype=torch.uint8)
    for name, idx in costs.check_selection(selection).items():
        mask[offsets[name] + idx] = 1
    mask = mask.to(device)
    distributed.broadcast_([mask])
    mask = mask.cpu()
    out: Selection = {}
    for lay in costs.layers:
        idx = torch.nonzero(mask[offsets[lay.name] : offsets[lay.name] + lay.in_channels]).flatten()
        if idx.numel():
            out[lay.name] = idx.to(torch.int64)
    return out
