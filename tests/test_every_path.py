"""Every path on every kind of model (issue 19 item 1): one table of models, the engine's own test cases,
a constructed modern network and a user's model file, each run through
rank -> plan -> Tuner -> measured memory -> finetune -> export (and back into a fresh model).

Tiny sizes (a few 16-sample batches, 1-2 epochs) so the whole table runs in seconds. What each step checks:
- rank: trady.rank gives a profile naming the model's layers, and leaves the model's weights as they were;
- plan: the plan of the analysed model (train.plan.plan_from_table) and the Tuner agree on the budget in units,
  and predict_step_peak predicts a step peak for the module (image models [B, 3, R, R]: what it takes today;
  the engine's cases take 4-channel non-square inputs);
- Tuner: a trady draw fits the budget and an SGD step changes only what it hands over;
- measured memory: the bytes a step keeps for backward (measured with saved-tensor hooks) under the budget
  are below full fine-tuning's;
- finetune + export: trady.train.finetune on the user's tensors, then export_run; the exported weights in a
  freshly built model give the run's test accuracy exactly.
- measured step peak: trady.memory.measure_step_peak runs the Tuner's step and an inference forward beside
  it, allocator controlled (what the figure is worth on a real step: tests/test_user_model_memory.py).
An entry that waits for work elsewhere is marked xfail(strict=True) with that reason (none today): it
fails loudly once it passes, so that the mark is removed.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import cases
import trady
from trady import models
from trady.config import FinetuneConfig
from trady.engine.costs import analyze
from trady.memory import measure_step_peak
from trady.memory.kept_bytes import measure_saved_bytes
from trady.models import constructed, entry
from trady.train import finetune
from trady.train.export import export_run
from trady.train.plan import plan_from_table
from trady.train.prediction import predict_step_peak

USER_MODEL = Path(__file__).parent / "user_model.py"
BUDGET = "30%"
BATCH = 16


@dataclass(frozen=True)
class Entry:
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # one sample
    needs: str | None = None  # the branch whose work this entry waits for (strict xfail)


def _case(build) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        model, _ = cases._build(cases.Case(build))
        return model.eval()

    return make


def _constructed(name: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        factory, resolution = constructed.SMALL[name]
        return constructed.calibrate_batchnorm(factory(num_classes=5), resolution)

    return make


TABLE = {
    "case-residual_block": Entry(_case(cases.residual_block), (4, 11, 14)),
    "case-silu_se_blocks": Entry(_case(cases.silu_se_blocks), (4, 11, 14)),
    "constructed-efficientnet_b0_like": Entry(_constructed("efficientnet_b0_like"), (3, 32, 32)),
    "constructed-vit_like": Entry(_constructed("vit_like"), (3, 32, 32)),
    "user-file-model": Entry(lambda: entry.build(f"{USER_MODEL}:build", num_classes=5), (3, 16, 16)),
}


def _data(model: nn.Module, shape: tuple[int, ...], n: int, seed: int) -> torch.utils.data.TensorDataset:
    """Inputs with labels the untrained model can learn: a fixed random projection of the inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=g)
    w = torch.randn(x[0].numel(), 5, generator=torch.Generator().manual_seed(99))
    return torch.utils.data.TensorDataset(x, (x.flatten(1) @ w).argmax(1))


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _table_params():
    for name, e in TABLE.items():
        marks = [pytest.mark.xfail(strict=True, reason=f"needs branch {e.needs}")] if e.needs else []
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", list(_table_params()))
def test_rank_plan_tune_measure_finetune_export(tmp_path, name):
    e = TABLE[name]
    model = e.build()
    train, test = _data(model, e.input_shape, 64, seed=1), _data(model, e.input_shape, 32, seed=2)
    batches = [(train.tensors[0][i : i + BATCH], train.tensors[1][i : i + BATCH]) for i in range(0, 64, BATCH)]
    example = train.tensors[0][:1]

    # rank
    before = _params(model)
    profile = trady.rank(model, batches, epochs=1)
    costs = analyze(model, example_input=example)
    assert set(profile.order) == set(costs.names)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    # plan
    plan = plan_from_table(costs, name, e.input_shape[-1], BUDGET, BATCH)
    if e.input_shape[0] == 3 and e.input_shape[1] == e.input_shape[2]:  # predict_step_peak takes images only
        predicted = predict_step_peak(model, e.input_shape[-1], BUDGET, BATCH, profile=profile,
                                      classifier=costs.classifier)  # fmt: skip
        assert predicted["predicted_step_peak_bytes"] > 0

    # Tuner + measured kept bytes, on a copy (finetune prepares the model itself)
    dense = copy.deepcopy(model)
    tuned = copy.deepcopy(model)
    tuner = trady.Tuner(tuned, example, strategy="trady", budget=BUDGET, profile=profile)
    assert tuner.budget_units == plan["budget_units"]
    optimizer = torch.optim.SGD(tuner.start_epoch(1), lr=0.05)
    assert 0 < tuner.costs.selection_units(tuner.selection) <= tuner.budget_units
    x, y = batches[0]
    report = tuner.engine.measure_step(x, y, optimizer=optimizer)

    def tuned_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(tuned(x), y).backward()
        optimizer.step()

    def inference() -> None:
        with torch.no_grad():
            tuned(x)

    peak = measure_step_peak(tuned_step, inference, steps=1, warmup=0)
    assert peak.step_peak_bytes is not None and peak.inference_peak_bytes is not None  # measured on every kind
    tuner.restore()
    changed = {k for k, v in tuned.state_dict().items() if not torch.equal(before[k], v)}
    allowed = {f"{layer}.weight" for layer in tuner.selection} | {f"{costs.classifier}.{p}" for p in ("weight", "bias")}
    assert changed and changed <= allowed | {f"{layer}.in_proj_weight" for layer in tuner.selection}
    full = measure_saved_bytes(dense, lambda: F.cross_entropy(dense(x), y))
    assert 0 < report.saved_bytes < full.total

    # finetune on the user's tensors, export, load into a fresh model
    config = FinetuneConfig(strategy="trady", budget=BUDGET, epochs=2, batch_size=BATCH, lr=0.01, classifier_lr=0.01,
                            threads=1, progress=False, out=str(tmp_path / "run"), seed=0)  # fmt: skip
    profile_path = tmp_path / "profile.json"
    profile.save(profile_path)
    config.profile = str(profile_path)
    summary = finetune(config, model=model, train_data=train, test_data=test)
    info = export_run(tmp_path / "run", tmp_path / "model.safetensors")
    assert info["test_acc"] == summary["test_acc"] and json.loads((tmp_path / "model.json").read_text()) == info
    fresh = e.build()
    models.load_into(fresh, load_file(str(tmp_path / "model.safetensors")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the run evaluated (config.threads): the same kernels, the same rounding
    try:
        with torch.no_grad():
            acc = (fresh.eval()(test.tensors[0]).argmax(1) == test.tensors[1]).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    assert acc == summary["test_acc"]
