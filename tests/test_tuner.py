"""The whole method on a model the zoo lacks, on real data (scikit-learn's digits), in a plain loop.

Per epoch: the budget holds, the selection is redrawn, only the selected weight slices and the head
change (checked against a hand-computed mask of each layer's input-channel entries), and a resume from
`tuner.state_dict()` (plus the model's state_dict) is bit-exact."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import trady
from helpers import assert_same_weights, channel_mask, cli, digits_batches, metrics, weights
from trady.config import FinetuneConfig
from trady.core.errors import TradyError
from trady.core.files import read_jsonl, write_jsonl
from trady.engine.costs import analyze, parse_budget
from trady.selection.ranking import RankingProfile
from trady.train import loop as train
from user_model import build


@pytest.fixture(scope="module")
def batches():
    return digits_batches()


@pytest.fixture(scope="module")
def profile(batches):
    return trady.rank(build(), batches, epochs=1)


def assert_only_selected_changed(costs, selection, before: dict, after: dict, what: str = "") -> None:
    """Between two state_dicts: every selected input channel's weights changed, nothing else did but the
    head (layer names from `costs`; the head is `costs.classifier`); BatchNorm buffers stay frozen."""
    model = build()
    for lay in costs.layers:
        old, new = before[f"{lay.name}.weight"], after[f"{lay.name}.weight"]
        idx = torch.as_tensor(selection.get(lay.name, torch.zeros(0, dtype=torch.int64)))
        mask = channel_mask(old, getattr(model.get_submodule(lay.name), "groups", 1), idx)
        assert torch.equal(old[~mask], new[~mask]), f"{what}{lay.name}: a frozen channel changed"
        if idx.numel():
            assert not torch.equal(old[mask], new[mask]), f"{what}{lay.name}: a selected channel did not change"
    head = costs.classifier
    assert not torch.equal(before[f"{head}.weight"], after[f"{head}.weight"]), f"{what}the head did not change"
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed <= {f"{n}.weight" for n in selection} | {f"{head}.weight", f"{head}.bias"}, what


def train_epoch(model, tuner, batches, epoch: int, lr: float = 0.05) -> None:
    """The user's plain loop body: what the README shows."""
    optimizer = torch.optim.SGD(tuner.start_epoch(epoch), lr=lr)
    for x, y in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        tuner.step()


def test_rank_profiles_every_layer_and_leaves_the_model_as_given(batches, profile):
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    got = trady.rank(model, batches, epochs=1)
    assert got.names == ["stem.0", "grouped", "depthwise", "point", "mid"]  # head left out
    assert got.names == profile.names and got.iterations == len(batches)
    assert all(lay.rgn > 0 and lay.lara > 0 for lay in got.layers)
    assert got.layers[1].in_channels == 8 and got.model == "UserNet" and got.resolution == 8
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and not model.training
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(TradyError, match="one-shot iterator"):
        trady.rank(model, iter(batches), epochs=2)


@pytest.mark.parametrize("strategy", ["trady", "medyate"])
def test_tuner_in_a_plain_loop_on_a_model_the_zoo_lacks(batches, profile, strategy):
    model = build()
    tuner = trady.Tuner(model, batches[0][0][:1], strategy=strategy, budget="20%", profile=profile, seed=1)
    assert tuner.costs.classifier == "head" and 0 < tuner.budget_units < tuner.costs.full_units
    previous, saved = None, None
    for epoch in (1, 2, 3):
        weights = {k: v.clone() for k, v in model.state_dict().items()}  # state_dict() holds the trained values
        if epoch == 3:  # what a checkpoint after epoch 2 holds
            saved = ({k: v.clone() for k, v in model.state_dict().items()}, tuner.state_dict())
        train_epoch(model, tuner, batches, epoch)
        selection = tuner.selection
        assert 0 < tuner.costs.selection_units(selection) <= tuner.budget_units
        if previous is not None:
            assert {k: v.tolist() for k, v in selection.items()} != previous
        previous = {k: v.tolist() for k, v in selection.items()}
        assert_only_selected_changed(tuner.costs, selection, weights, model.state_dict(), f"epoch {epoch}: ")
    final = {k: v.clone() for k, v in model.state_dict().items()}
    final_selection = {k: v.tolist() for k, v in tuner.selection.items()}
    tuner.restore()
    assert type(model.grouped) is torch.nn.Conv2d

    # resume: a fresh model and tuner from the epoch-2 state, then epoch 3 again
    model2 = build()
    tuner2 = trady.Tuner(model2, batches[0][0][:1], strategy=strategy, budget="20%", profile=profile, seed=1)
    model2.load_state_dict(saved[0])
    tuner2.load_state_dict(saved[1])
    train_epoch(model2, tuner2, batches, 3)
    assert {k: v.tolist() for k, v in tuner2.selection.items()} == final_selection
    got = model2.state_dict()
    assert all(torch.equal(final[k], got[k]) for k in final)


def test_resample_every_redraws_within_an_epoch_and_swaps_the_optimizer(batches, profile):
    model = build()
    tuner = trady.Tuner(model, batches[0][0][:1], budget="20%", profile=profile, resample_every=3)
    optimizer = torch.optim.SGD(tuner.start_epoch(1), lr=0.05)
    trained = []  # the selection each step trained
    for i, (x, y) in enumerate(batches[:7], start=1):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
        assert {id(p) for p in tuner.parameters()} == in_optimizer  # the optimizer trains the current draw
        assert all(p.grad is not None for p in tuner.engine.slice_parameters())
        before = {k: v.clone() for k, v in model.state_dict().items()}
        optimizer.step()  # built once at epoch 1: it trains whichever draw is current
        assert_only_selected_changed(tuner.costs, tuner.selection, before, model.state_dict(), f"step {i}: ")
        trained.append({k: v.tolist() for k, v in tuner.selection.items()})
        assert tuner.step() == (i % 3 == 0)  # a redraw is due after steps 3 and 6
    # steps 1-3 train draw 0, steps 4-6 draw 1, step 7 draw 2
    assert trained[0] == trained[1] == trained[2] != trained[3] == trained[4] == trained[5] != trained[6]
    assert tuner.draw == 2 and len(tuner.epoch_selections) == 3
    with torch.no_grad():
        tuner.step(), tuner.step()  # step 9: a redraw is due ...
        model(batches[0][0])  # ... but an evaluation forward does not draw
    assert tuner.draw == 2
    tuner.start_epoch(2)  # the count restarts with the epoch; its first draw is draw 0
    assert tuner.draw == 0 and tuner.steps == 0 and len(tuner.epoch_selections) == 1


def test_tuner_errors_name_the_value(batches, profile):
    x = batches[0][0][:1]
    with pytest.raises(TradyError, match="needs a budget"):
        trady.Tuner(build(), x, profile=profile)
    with pytest.raises(TradyError, match="cheapest channel costs"):
        trady.Tuner(build(), x, budget=1, profile=profile)
    with pytest.raises(TradyError, match="resample_every"):
        trady.Tuner(build(), x, budget="20%", profile=profile, resample_every=0)
    tuner = trady.Tuner(build(), x, strategy="d-det-rgn", budget="20%")
    with pytest.raises(TradyError, match="grad_batches"):
        tuner.start_epoch(1)
    full = trady.Tuner(build(), x, budget="100%", profile=profile)
    assert full.mode == "full" and "running full fine-tuning instead" in full.notes[0]


def test_det_rgn_gets_its_full_gradient_through_the_tuner(batches):
    model = build()
    tuner = trady.Tuner(model, batches[0][0][:1], strategy="d-det-rgn", budget="20%", grad_batches=batches)
    tuner.start_epoch(1)
    # the selection is the highest-RGN channels of a dense gradient over the first 8 batches
    ref = build()
    for x, y in batches[:8]:
        F.cross_entropy(ref(x), y).backward()
    from trady.selection.ranking import channel_norms

    rgn = {}
    for lay in tuner.costs.layers:
        m = ref.get_submodule(lay.name)
        rgn[lay.name] = channel_norms(m.weight.grad, getattr(m, "groups", 1)) / lay.space_units_per_channel
    best = max(((n, c) for n, v in rgn.items() for c in range(len(v))), key=lambda nc: rgn[nc[0]][nc[1]])
    assert best[1] in tuner.selection[best[0]].tolist()
    assert all(p.grad is None for p in model.parameters())  # the pass made no update and left no gradient


# --------------------------------------------------------------------------------------------------
# the same through finetune(config, model=...) and through the CLI's --model file.py:fn

USER_MODEL = str(Path(__file__).with_name("user_model.py"))


def keep_every_checkpoint(monkeypatch) -> list[dict]:
    """The state of each epoch's checkpoint, as finetune writes it (the run folder keeps only the last)."""
    kept: list[dict] = []
    real = train.save_checkpoint

    def save(folder, state):
        real(folder, state)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        kept.append(torch.load(buffer, weights_only=True))

    monkeypatch.setattr(train, "save_checkpoint", save)
    return kept


def check_epochs(start: dict[str, torch.Tensor], kept: list[dict], budget: str) -> None:
    """Per epoch: the budget holds, the selection is redrawn, only the selected slices and the head change."""
    model = build()
    costs = analyze(model, example_input=torch.zeros(1, 3, 8, 8))
    units = parse_budget(budget, costs)
    before, previous = start, None
    for state in kept:
        selection = state["tuner"]["selection"]
        assert 0 < costs.selection_units(selection) <= units
        as_lists = {k: v.tolist() for k, v in selection.items()}
        assert as_lists != previous
        previous = as_lists
        after = state["model"]
        assert_only_selected_changed(costs, selection, before, after, f"epoch {state['epoch']}: ")
        before = after


def tensor_data(split: str, n: int) -> torch.utils.data.TensorDataset:
    x, y = zip(*digits_batches(n, batch=n, split=split))
    return torch.utils.data.TensorDataset(x[0], y[0])


@pytest.mark.parametrize("kind", ["Dataset", "DataLoader"])
def test_finetune_a_user_model_on_torch_data_and_resume(tmp_path, monkeypatch, profile, kind):
    profile_path = tmp_path / "profile.json"
    profile.save(profile_path)
    train_data, test_data = tensor_data("train", 128), tensor_data("test", 64)
    if kind == "DataLoader":  # iterated as it is (shuffled by trady's own batching only for a Dataset)
        train_data, test_data = (torch.utils.data.DataLoader(d, batch_size=32) for d in (train_data, test_data))
    config = FinetuneConfig(strategy="trady", budget="20%", profile=str(profile_path), epochs=3, batch_size=32,
                            lr=0.05, warmup_epochs=0, seed=1, out=str(tmp_path / "run"), progress=False, threads=1)
    kept = keep_every_checkpoint(monkeypatch)
    summary = train.finetune(config, model=build(), train_data=train_data, test_data=test_data)
    assert summary["model"] == "UserNet" and summary["dataset"] == ("TensorDataset" if kind == "Dataset" else kind)
    assert summary["epochs_done"] == 3
    assert summary["train_size"] == 128 and summary["classes"] == 10 and summary["status"] == "ok"
    check_epochs(build().state_dict(), kept, "20%")

    cut = cut_after(tmp_path / "run", tmp_path / "cut", kept[1])
    again = dataclasses.replace(config, out=str(cut))
    train.finetune(again, model=build(), train_data=train_data, test_data=test_data, resume=True)
    assert metrics(cut) == metrics(tmp_path / "run")
    assert_same_weights(weights(cut), weights(tmp_path / "run"))


def cut_after(ref: Path, folder: Path, state: dict) -> Path:
    """The folder a run killed during the next epoch leaves: config, that epoch's checkpoint, its metrics."""
    folder.mkdir()
    shutil.copy(ref / "config.json", folder / "config.json")
    torch.save(state, folder / train.CHECKPOINT)
    write_jsonl(folder / "metrics.jsonl", state["metrics"])
    return folder


def test_cli_ranks_and_finetunes_a_user_model_from_a_file(tmp_path, monkeypatch):
    model = f"{USER_MODEL}:build"
    profile = tmp_path / "profile.json"
    data = ["--data", "digits", "--train-size", "128", "--resolution", "8"]
    assert cli(["rank", "--model", model, *data, "--epochs", "1", "--batch-size", "32", "--out", profile,
                "--no-progress"]) == 0  # fmt: skip
    ranked = RankingProfile.load(profile)
    assert ranked.names == ["stem.0", "grouped", "depthwise", "point", "mid"] and ranked.model == model
    args = ["finetune", "--model", model, *data, "--test-size", "64", "--batch-size", "32", "--epochs", "3",
            "--strategy", "trady", "--budget", "20%", "--profile", profile, "--lr", "0.05", "--warmup-epochs", "0",
            "--threads", "1", "--no-progress", "--seed", "1"]  # fmt: skip
    kept = keep_every_checkpoint(monkeypatch)
    assert cli([*args, "--out", tmp_path / "run"]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["model"] == model
    start = build(10).state_dict()  # what the CLI built first (build seeds itself)
    check_epochs(start, kept, "20%")

    cut = cut_after(tmp_path / "run", tmp_path / "cut", kept[1])
    assert cli(["finetune", "--resume", cut, "--no-progress"]) == 0
    assert metrics(cut) == metrics(tmp_path / "run")
    assert_same_weights(weights(cut), weights(tmp_path / "run"))


def test_finetune_resample_every_redraws_within_each_epoch(tmp_path, profile):
    profile_path = tmp_path / "profile.json"
    profile.save(profile_path)
    config = FinetuneConfig(strategy="trady", budget="20%", profile=str(profile_path), epochs=2, batch_size=32,
                            lr=0.05, seed=1, progress=False, threads=1, resample_every=2, out=str(tmp_path / "run"))
    data = (tensor_data("train", 128), tensor_data("test", 64))  # 4 steps an epoch: a redraw after the second
    train.finetune(config, build(), *data)
    units = parse_budget("20%", analyze(build(), example_input=torch.zeros(1, 3, 8, 8)))
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["draws"] for r in rows] == [2, 2] and all(0 < r["selected_units"] <= units for r in rows)

    run = train.setup(config, build(), *data)
    train.choose_selection(run, 1)
    train.train_epoch(run, 1, train.make_optimizer(run), measure=False)
    draws = [{k: v.tolist() for k, v in d.items()} for d in run.tuner.epoch_selections]
    assert len(draws) == 2 and draws[0] != draws[1]
    assert all(0 < run.costs.selection_units(d) <= run.budget_units for d in run.tuner.epoch_selections)


def test_resample_every_redraw_steps_run_in_the_functional_call_mode(monkeypatch):
    """Every training forward routes F.silu to the few-bit path, those that redraw first included (the
    redraw's strict path check runs a nested forward, which must not leave the outer forward's mode)."""
    from helpers import SiluNet
    from trady.engine import activations

    torch.manual_seed(0)
    model, x, y = SiluNet().eval(), torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    tuner = trady.Tuner(model, x[:1], strategy="s-full-random", budget="40%", resample_every=1)
    optimizer = torch.optim.SGD(tuner.start_epoch(1), lr=0.05)
    calls = []
    few_bit = activations.few_bit
    monkeypatch.setattr(activations, "few_bit", lambda *a, **k: calls.append(1) or few_bit(*a, **k))
    model.register_forward_pre_hook(lambda m, a: calls.clear())  # after the redraw: the outer forward's calls
    routed, expected = [], []
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        routed.append(len(calls))
        expected.append(1 + ("c1" in tuner.selection))  # silu(c1(x)) needs grad only when c1 trains
        tuner.step()
    assert tuner.draw == 2
    assert routed == expected, routed
    tuner.restore()
