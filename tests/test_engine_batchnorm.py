"""EngineConfig(batchnorm="train") beyond the shared exactness table (tests/cases.py, "-bn_train" cases):
what train-mode BatchNorm keeps for backward (by hand: its input and two per-channel statistics for each
BatchNorm on the backprop path), its running statistics (updated by training forwards only, not by
select()'s path check), the refusals, and a fine-tune's record of its regime."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from cases import Chain, _loss
from trady.config import FinetuneConfig
from trady.core.errors import TradyError
from trady.engine import EngineConfig, SparseEngine, modules
from trady.engine.batchnorm import batchnorm_training, batchnorms
from trady.train import loop as train

TRAIN = EngineConfig(batchnorm="train")


def _chain(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    return Chain().eval(), torch.randn(3, 3, 10, 12)


def _bn_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Each BatchNorm's input shape and whether it is on the backprop path (input requiring grad)."""
    seen, handles = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_pre_hook(
                lambda mod, a, name=name: seen.__setitem__(name, (tuple(a[0].shape), a[0].requires_grad))))  # fmt: skip
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("selection", [{"b2.0": [1, 5]}, {"b0.0": [0, 2]}, {}])
def test_train_mode_batchnorm_kept_bytes_are_its_inputs_and_statistics(selection) -> None:
    """fp32: 4 bytes per input element plus mean and inverse std (4 bytes per channel each), for every
    BatchNorm above the lowest selected layer; none below it; the budgeted part is unchanged."""
    model, x = _chain()
    frozen_model = copy.deepcopy(model)
    engine = SparseEngine(model, x, TRAIN)
    engine.select(selection)
    model.train()
    expected = sum(4 * torch.Size(shape).numel() + 2 * 4 * shape[1] for shape, grad in _bn_inputs(model, x).values()
                   if grad)  # fmt: skip
    report = engine.measure_step(x, None, loss_fn=lambda o, _y: _loss(o))
    assert report.batchnorm_kept_bytes == expected
    assert report.as_dict()["batchnorm_kept_bytes"] == expected
    assert report.batchnorm_kept_bytes <= report.rest_saved_bytes  # outside the budget
    if selection:
        assert expected > 0
    frozen = SparseEngine(frozen_model, x)  # folded: the BatchNorms keep nothing of their own
    frozen.select(selection)
    frozen_model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", modules.FrozenBatchNormWarning)
        frozen_report = frozen.measure_step(x, None, loss_fn=lambda o, _y: _loss(o))
    assert frozen_report.batchnorm_kept_bytes == 0
    assert frozen_report.budgeted_bytes == report.budgeted_bytes
    # everything else kept is no more than the frozen engine keeps (which adds the folded convs' scales)
    assert report.saved_bytes - expected <= frozen_report.saved_bytes


def test_train_mode_batchnorm_is_stock_unfolded_and_restored() -> None:
    model, x = _chain()
    stock = copy.deepcopy(model)
    engine = SparseEngine(model, x, TRAIN)
    assert all(type(m) is modules.TrainBatchNorm2d for m in batchnorms(model))
    assert all(m.trady.fold is None for m in engine.layers.values())  # nothing folded
    running = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    engine.select({"b1.0": [0, 3], "b3.0": [2]})  # the path check runs a forward: statistics untouched
    assert all(torch.equal(model.state_dict()[k], v) for k, v in running.items())
    assert not any(m.training for m in batchnorms(model))  # select() leaves the flags as they were
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no FrozenBatchNormWarning in train mode
        with batchnorm_training(model):
            out = model(x)
    with batchnorm_training(stock):
        expected = stock(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), stock.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(v.double(), v2.double(), rtol=1e-5, atol=1e-6, msg=k)
    assert not model.b0[1].training  # batchnorm_training puts the flags back
    with torch.no_grad():  # eval mode: the running statistics, as stock
        torch.testing.assert_close(model(x), stock(x), rtol=1e-5, atol=1e-5)
    engine.restore()
    assert all(type(m) is nn.BatchNorm2d for m in batchnorms(model))


def test_batchnorm_training_switches_only_batchnorm() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Dropout(0.5)).eval()
    with batchnorm_training(model):
        assert model[1].training and not model[2].training and not model.training
    assert not model[1].training


def test_bad_batchnorm_values_get_one_line() -> None:
    model, x = _chain()
    with pytest.raises(TradyError, match=r"batchnorm must be one of frozen, train, got 'folded'"):
        SparseEngine(model, x, EngineConfig(batchnorm="folded"))
    assert all(type(m) is nn.BatchNorm2d for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    with pytest.raises(TradyError, match=r"batchnorm must be one of frozen, train, got 'on'"):
        FinetuneConfig(batchnorm="on").validate()


def _data(n: int, seed: int) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 10, 12, generator=g)
    return torch.utils.data.TensorDataset(x, torch.randint(0, 5, (n,), generator=g))


@pytest.mark.parametrize("strategy", ["full", "d-full-random"])
@pytest.mark.parametrize("batchnorm", ["frozen", "train"])
def test_finetune_records_its_batchnorm_regime(tmp_path, strategy, batchnorm) -> None:
    model, _ = _chain()
    running = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    config = FinetuneConfig(strategy=strategy, budget="30%" if strategy != "full" else None, epochs=2, batch_size=8,
                            lr=0.05, warmup_epochs=0, batchnorm=batchnorm, out=str(tmp_path / "run"), progress=False,
                            threads=1)  # fmt: skip
    summary = train.finetune(config, model=model, train_data=_data(32, 0), test_data=_data(16, 1))
    assert summary["status"] == "ok" and summary["batchnorm"] == batchnorm
    changed = any(not torch.equal(model.state_dict()[k], v) for k, v in running.items())
    assert changed == (batchnorm == "train")  # running statistics move only in train mode
    assert not any(m.training for m in batchnorms(model))  # evaluation and the end: eval mode
    kept = summary["batchnorm_kept_bytes"]
    if batchnorm == "train" or strategy == "full":  # stock BatchNorm keeps its input (full: for its gamma)
        assert kept > 0
    else:
        assert kept == 0  # folded into the convs
    assert kept < summary["measured_saved_bytes"]
