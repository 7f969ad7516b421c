"""Data-parallel fine-tuning: 2 CPU processes (torchrun, gloo) match the single-process run with the
same global batch within fp32 tolerance; only the trained tensors' gradients are all-reduced."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import cli, metrics, run_args, shared_profile, tiny_config, weights
from trady.core import distributed
from trady.core.errors import TradyError
from trady.train import checkpoint
from trady.train import loop as train

TORCHRUN = Path(sys.executable).parent / "torchrun"
EXACT = ("epoch", "lr", "selected_channels", "selected_units", "activation_sparsity", "weight_sparsity",
         "flops_reduction")  # fmt: skip


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> Path:
    return shared_profile(tmp_path_factory)


@pytest.mark.skipif(not TORCHRUN.is_file() or not torch.distributed.is_gloo_available(), reason="needs torchrun+gloo")
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, profile):
    single = tmp_path / "single"
    assert cli(["finetune", *run_args(profile, "trady", epochs=2, extra=("--batch-size", "32")), "--out", single]) == 0

    parallel = tmp_path / "parallel"
    target = ["-m", "trady"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [str(a) for a in run_args(profile, "trady", epochs=2, extra=("--batch-size", "16"))]
    proc = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", *target, "finetune", *args, "--out", str(parallel)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("run folder") == 1  # only rank 0 reports (and writes)

    one, two = metrics(single), metrics(parallel)
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        for key in EXACT:
            assert a[key] == b[key], key  # same selection, same schedule
        for key in ("train_loss", "test_loss", "train_acc", "test_acc"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    wa, wb = weights(single), weights(parallel)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-5), k
    state = train.load_checkpoint(parallel / train.CHECKPOINT)
    assert state["world_size"] == 2 and state["schedule"]["steps_per_epoch"] == 2


@pytest.mark.usefixtures("one_thread")
def test_only_the_trained_slices_are_all_reduced(profile, monkeypatch):
    """With collectives faked as 2 identical ranks: one flat all-reduce per step holding exactly the
    optimizer's tensors (selected slices + classifier), and the same numbers as one process."""
    reference = train.setup(tiny_config(profile))
    train.choose_selection(reference, 1)
    train.train_epoch(reference, 1, train.make_optimizer(reference), False)

    run = train.setup(tiny_config(profile))
    train.choose_selection(run, 1)
    trained = run.tuner.parameters()
    sizes: list[int] = []

    def fake_all_reduce(tensor, op=None, group=None, async_op=False):
        sizes.append(tensor.numel())
        tensor.mul_(2)  # the sum over two ranks holding the same values

    monkeypatch.setattr(run, "world", 2)  # decided once per run (setup): the loop reads it from the run
    monkeypatch.setattr(distributed, "rank_world", lambda: (0, 2))  # what the collectives see
    monkeypatch.setattr(torch.distributed, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(torch.distributed, "broadcast", lambda tensor, src, group=None, async_op=False: None)
    train.train_epoch(run, 1, train.make_optimizer(run), False)
    monkeypatch.undo()

    steps = len(run.train_loader)
    grads = sum(p.numel() for p in trained)
    assert run.comm_elements == grads
    assert sizes.count(grads) == steps and len(sizes) == 2 * steps + 1  # + per-step loss, + epoch metrics
    assert grads < 0.2 * sum(p.numel() for p in run.model.parameters())
    ref, got = reference.model.state_dict(), run.model.state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)

    state = checkpoint.checkpoint_state(run, 1, [{}], 0.0)
    state["world_size"] = 2
    with pytest.raises(TradyError, match="2 process\\(es\\), this one has 1"):
        checkpoint.check_compatible(run, state, Path("checkpoint.pt"))


def test_process_group_from_torchrun_environment(monkeypatch):
    for var in distributed.ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    assert distributed.init_from_env("cpu") == (0, 1) and not distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TradyError, match="RANK is not set.*torchrun"):
        distributed.init_from_env("cpu")
    assert distributed.backend_for("cpu") == "gloo"
    assert distributed.all_reduce_mean_([torch.ones(3)]) == 0  # no process group: nothing to do
