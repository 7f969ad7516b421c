"""The profiling run: a short full fine-tune of any nn.Module that accumulates each layer's RGN / LaRa.

`rank(model, batches)` is the paper's recipe on the user's own model and batches: every weight
trainable, plain SGD (no momentum, no weight decay), cosine learning rate from `lr` to 0 over all
steps (`schedule.lr_at` without warm-up), BatchNorm frozen (eval mode), each update clipped to a total
gradient norm of `clip_grad_norm`; RGN is accumulated from the raw, unclipped gradients
(`ranking.RankAccumulator`). The model is left as it was given: its weights, gradients, requires_grad
flags and train/eval mode are put back afterwards. `compute_profile(model_name)` is the same for a
zoo model on a trady dataset (what `trady rank --model NAME` runs).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from trady.core.errors import TradyError
from trady.core.schedule import lr_at
from trady.engine.costs import analyze
from trady.selection.ranking import DEFAULT_THRESHOLD, RankAccumulator, RankingProfile

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Progress = Callable[[int, int, float], None]


def rank(
    model: nn.Module,
    batches: Iterable,
    *,
    epochs: int = 3,
    loss_fn: LossFn = F.cross_entropy,
    lr: float = 0.05,
    clip_grad_norm: float | None = 1.0,
    example_input: torch.Tensor | None = None,
    classifier: str | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    seed: int = 0,
    name: str | None = None,
    dataset: str = "user",
    progress: Progress | None = None,
) -> RankingProfile:
    """The layer-ranking profile (RGN / LaRa per layer) of any nn.Module from (input, target) batches.

    batches: a DataLoader, a list, anything iterable again each epoch (a one-shot iterator raises when
    epochs > 1); a `set_epoch(epoch)` method is called before each epoch when present.
    example_input: one input batch for the cost table (default: the first batch's first sample).
    classifier: module name of the head, left out of the ranking (default: the last Conv2d/Linear called).
    name: the profile's model name (default: the model's class name). `progress(step, total, loss)`
    is called after each step. The model is left as given (see the module docstring).
    """
    _check_settings(epochs, lr, threshold)
    if iter(batches) is batches and epochs > 1:
        raise TradyError("batches is a one-shot iterator; accepted: a DataLoader or a list, iterable once per epoch")
    total = _count(batches) * epochs
    if total == 0:
        raise TradyError("batches yielded no batch; accepted: an iterable of (input, target) batches")
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    if example_input is None:
        example_input = next(iter(batches))[0][:1]
    costs = analyze(model, example_input=example_input.to(device), classifier=classifier)
    saved = _Snapshot(model)
    try:
        model.eval()  # frozen BatchNorm (running statistics), no dropout
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        acc = RankAccumulator(model, costs)
        start = time.perf_counter()
        losses = _train(model, batches, epochs, total, loss_fn, lr, clip_grad_norm, device, acc, progress)
    finally:
        saved.put_back()
    resolution = int(example_input.shape[-1]) if example_input.dim() == 4 else 0
    steps_per_epoch = total // epochs
    extra = {
        "lr": lr, "clip_grad_norm": clip_grad_norm, "final_loss": sum(losses[-steps_per_epoch:]) / steps_per_epoch,
        "wall_time_s": round(time.perf_counter() - start, 2), "torch_threads": torch.get_num_threads(),
        "device": str(device), "torch": torch.__version__, "input_shape": list(example_input.shape[1:]),
    }  # fmt: skip
    return acc.profile(name or type(model).__name__, resolution, dataset, epochs, seed, threshold=threshold,
                       extra=extra)  # fmt: skip


def _train(model, batches, epochs, total, loss_fn, lr, clip, device, acc, progress) -> list[float]:
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=0.0)
    step, losses = 0, []
    for epoch in range(1, epochs + 1):
        if hasattr(batches, "set_epoch"):
            batches.set_epoch(epoch)
        for x, y in batches:
            if step >= total:  # an iterable longer in a later epoch than it said
                break
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step, total, 0, lr)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x.to(device)), y.to(device))
            if not torch.isfinite(loss):
                raise TradyError(f"loss became {float(loss)} at step {step + 1}; try a smaller lr than {lr}")
            loss.backward()
            acc.update()  # the raw gradient, before any clipping
            if clip is not None:
                nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            step += 1
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(step, total, losses[-1])
    return losses


def _count(batches: Iterable) -> int:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return sum(1 for _ in batches)


def _check_settings(epochs: int, lr: float, threshold: float) -> None:
    if epochs < 1:
        raise TradyError(f"epochs must be >= 1, got {epochs}")
    if lr <= 0:
        raise TradyError(f"lr must be > 0, got {lr}")
    if not 0.0 < threshold <= 1.0:
        raise TradyError(f"threshold must be in (0, 1], got {threshold}")


class _Snapshot:
    """A model's weights, buffers, gradients, requires_grad flags and modes, to put back after profiling."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
        self.flags = {n: (p.requires_grad, p.grad) for n, p in model.named_parameters()}
        self.modes = {n: m.training for n, m in model.named_modules()}

    def put_back(self) -> None:
        with torch.no_grad():
            for k, v in self.model.state_dict(keep_vars=True).items():
                v.copy_(self.state[k])
        for n, p in self.model.named_parameters():
            p.requires_grad_(self.flags[n][0])
            p.grad = self.flags[n][1]
        for n, m in self.model.named_modules():
            m.training = self.modes[n]


def _at_most(pair, train_size: int | None, seed: int):
    """The pair with at most `train_size` training images: the same seeded stratified subset that
    load_dataset(train_size=...) takes, or every image when the dataset has no more."""
    from dataclasses import replace

    from trady.data.seeding import TRAIN_SUBSET
    from trady.data.splits import stratified_subset

    if train_size is not None and (isinstance(train_size, bool) or int(train_size) < 1):
        raise TradyError(f"train_size must be a positive integer or None, got {train_size!r}")
    if train_size is None or len(pair.train) <= train_size:
        return pair
    subset = pair.train.subset(stratified_subset(pair.train.labels, int(train_size), seed, TRAIN_SUBSET))
    return replace(pair, train=subset)


def compute_profile(
    model_name: str,
    data: str = "digits",
    epochs: int = 3,
    seed: int = 0,
    train_size: int | None = 512,
    resolution: int | None = None,
    batch_size: int = 32,
    lr: float = 0.05,
    clip_grad_norm: float | None = 1.0,
    threshold: float = DEFAULT_THRESHOLD,
    data_dir: str | None = None,
    mcu_dir: str | None = None,
    device: str = "cpu",
    progress: Progress | None = None,
) -> RankingProfile:
    """`rank()` of a zoo model (pretrained) or a user model (`file.py:build_fn`, `package.module:build_fn`)
    on a trady dataset (`trady rank`): at most `train_size` images (a seeded stratified subset; all of
    them when the dataset has fewer; None: all), `resolution` px, batches of `batch_size`."""
    from trady import models
    from trady.data import BatchLoader, load_dataset
    from trady.data.transforms import ImageTransform
    from trady.models import entry

    _check_settings(epochs, lr, threshold)
    if batch_size < 1:
        raise TradyError(f"batch_size must be >= 1, got {batch_size}")
    torch.manual_seed(seed)
    if not entry.is_entry_point(model_name) and models.spec(model_name).inputs == "tokens":
        return _compute_text_profile(model_name, data, epochs, seed, train_size, resolution, batch_size, lr,
                                     clip_grad_norm, threshold, device, progress)  # fmt: skip
    pair = _at_most(load_dataset(data, data_dir=data_dir, test_size=1, seed=seed), train_size, seed)
    if entry.is_entry_point(model_name):
        if resolution is None:
            raise TradyError(f"model {model_name!r} is a user model: give its input resolution (--resolution)")
        model = entry.build(model_name, num_classes=len(pair.classes)).to(device)
        mean, std, res, classifier = entry.MEAN, entry.STD, int(resolution), None
    else:
        spec = models.spec(model_name)
        kwargs = {"pretrained": True, "num_classes": len(pair.classes)}
        if mcu_dir is not None:
            kwargs["mcu_dir"] = mcu_dir
        model = models.create(model_name, **kwargs).to(device)
        mean, std, res, classifier = spec.mean, spec.std, int(resolution or spec.resolution), "classifier"
    loader = BatchLoader(pair.train, batch_size, ImageTransform(res, mean, std, train=True), shuffle=True, seed=seed,
                         drop_last=True)  # fmt: skip
    if len(loader) < 1:
        raise TradyError(f"train_size {len(pair.train)} is smaller than one batch of {batch_size}")
    profile = rank(
        model, loader, epochs=epochs, lr=lr, clip_grad_norm=clip_grad_norm, classifier=classifier,
        example_input=torch.zeros(1, 3, res, res, device=device), threshold=threshold, seed=seed, name=model_name,
        dataset=pair.name, progress=progress,
    )  # fmt: skip
    profile.extra.update(batch_size=batch_size, train_size=len(pair.train))
    return profile


def _compute_text_profile(model_name, data, epochs, seed, train_size, length, batch_size, lr, clip_grad_norm,
                          threshold, device, progress) -> RankingProfile:  # fmt: skip
    """compute_profile of a token model (`resolution` is then the sequence length) on a text data set."""
    from trady import models
    from trady.data import BatchLoader
    from trady.data.text import TokenTransform, load_text_dataset

    pair = load_text_dataset(data, train_size=train_size, test_size=1, seed=seed)
    model = models.create(model_name, pretrained=True, num_classes=len(pair.classes)).to(device)
    length = int(length or models.spec(model_name).resolution)
    tf = TokenTransform(models.text_encoder(model_name, length))
    loader = BatchLoader(pair.train, batch_size, tf, shuffle=True, seed=seed, drop_last=True)
    if len(loader) < 1:
        raise TradyError(f"train_size {len(pair.train)} is smaller than one batch of {batch_size}")
    profile = rank(
        model, loader, epochs=epochs, lr=lr, clip_grad_norm=clip_grad_norm, classifier="classifier",
        example_input=tf(pair.train.get_batch([0])[0]).to(device), threshold=threshold, seed=seed, name=model_name,
        dataset=pair.name, progress=progress,
    )  # fmt: skip
    profile.resolution = length
    profile.extra.update(batch_size=batch_size, train_size=len(pair.train), sequence_length=length)
    return profile
