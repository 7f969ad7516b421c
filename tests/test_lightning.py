"""trady.train.lightning.TradyCallback on a toy LightningModule (CPU): per epoch the budget holds and the
selection is redrawn, and the whole fit equals the plain Tuner loop bit for bit (same draws, weights)."""

from __future__ import annotations

import lightning
import pytest
import torch
import torch.nn.functional as F

import trady
from helpers import digits_batches
from trady.train.lightning import TradyCallback
from user_model import build


class ToyModule(lightning.LightningModule):
    def __init__(self, momentum: float = 0.0) -> None:
        super().__init__()
        self.net, self.momentum = build(), momentum

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=self.momentum)


class Record(lightning.Callback):
    def __init__(self, trady_cb: TradyCallback) -> None:
        self.trady_cb, self.selections = trady_cb, []

    def on_train_epoch_end(self, trainer, pl_module):
        self.selections.append({k: v.tolist() for k, v in self.trady_cb.tuner.selection.items()})


def fit(batches, profile, epochs: int, resample_every=None, momentum=0.0, accumulate=1, ckpt_dir=None, ckpt_path=None):
    module = ToyModule(momentum)
    cb = TradyCallback(batches[0][0][:1], budget="20%", profile=profile, seed=1, resample_every=resample_every)
    record = Record(cb)
    callbacks = [cb, record]
    if ckpt_dir is not None:
        callbacks.append(lightning.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1))
    trainer = lightning.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=ckpt_dir is not None,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, num_sanity_val_steps=0,
        accumulate_grad_batches=accumulate,
    )  # fmt: skip
    x, y = (torch.cat(t) for t in zip(*batches))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(batches[0][1]))
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)  # the same batches in the same order
    return module, cb, record


@pytest.mark.filterwarnings("ignore:Found .* in eval mode")  # on purpose: frozen BatchNorm, no dropout
@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")  # inside lightning
@pytest.mark.parametrize("resample_every", [None, 2])
def test_callback_equals_the_plain_tuner_loop(resample_every):
    batches = digits_batches(128)
    profile = trady.rank(ToyModule(), batches, epochs=1)  # layer names as the module has them
    module, cb, record = fit(batches, profile, epochs=3, resample_every=resample_every)
    assert cb.tuner.restored and type(module.net.grouped) is torch.nn.Conv2d  # stock layers after fit
    for sel in record.selections:
        units = cb.tuner.costs.selection_units({k: torch.tensor(v) for k, v in sel.items()})
        assert 0 < units <= cb.tuner.budget_units
    assert record.selections[0] != record.selections[1] != record.selections[2]
    assert cb.state_dict()["tuner"]["epoch"] == 3  # what a Lightning checkpoint keeps of the draws

    # the plain loop with the same tuner settings on the same (plain nn.Module) model
    model = ToyModule().eval()
    tuner = trady.Tuner(model, batches[0][0][:1], budget="20%", profile=profile, seed=1, resample_every=resample_every)
    plain = []
    for epoch in (1, 2, 3):
        optimizer = torch.optim.SGD(tuner.start_epoch(epoch), lr=0.05)
        for x, y in batches:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            tuner.step()
        plain.append({k: v.tolist() for k, v in tuner.selection.items()})
    tuner.restore()
    assert record.selections == plain
    ours = module.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in model.state_dict().items())


@pytest.mark.filterwarnings("ignore:Found .* in eval mode")
@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")
def test_resample_every_counts_optimizer_steps_with_accumulated_batches():
    """accumulate_grad_batches=2, resample_every=1: a draw per optimizer step (two batches), as the plain
    loop that accumulates two batches per step."""
    batches = digits_batches(128)
    profile = trady.rank(ToyModule(), batches, epochs=1)
    module, cb, record = fit(batches, profile, epochs=1, resample_every=1, accumulate=2)
    assert cb.state_dict()["tuner"]["steps"] == len(batches) // 2
    model = ToyModule().eval()
    tuner = trady.Tuner(model, batches[0][0][:1], budget="20%", profile=profile, seed=1, resample_every=1)
    optimizer = torch.optim.SGD(tuner.start_epoch(1), lr=0.05)
    for i, (x, y) in enumerate(batches):
        (F.cross_entropy(model(x), y) / 2).backward()
        if i % 2:
            optimizer.step()
            optimizer.zero_grad()
            tuner.step()
    assert record.selections == [{k: v.tolist() for k, v in tuner.selection.items()}]
    tuner.restore()
    ours = module.state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ours[k], v, msg=k)


@pytest.mark.filterwarnings("ignore:Found .* in eval mode")
@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")
def test_a_resume_with_momentum_equals_the_uninterrupted_fit(tmp_path):
    """SGD momentum, resumed from the epoch-2 checkpoint: the loaded momentum of slices whose channels the
    next draw changes is dropped, exactly as in the uninterrupted fit (same draws, same weights)."""
    batches = digits_batches(128)
    profile = trady.rank(ToyModule(), batches, epochs=1)
    full, _, full_record = fit(batches, profile, epochs=3, momentum=0.9)
    fit(batches, profile, epochs=2, momentum=0.9, ckpt_dir=tmp_path)
    ckpt = next(p for p in tmp_path.iterdir() if p.name.startswith("epoch=1"))
    resumed, _, record = fit(batches, profile, epochs=3, momentum=0.9, ckpt_path=str(ckpt))
    assert record.selections == full_record.selections[2:]
    ours = resumed.state_dict()
    for k, v in full.state_dict().items():
        torch.testing.assert_close(ours[k], v, msg=k)
