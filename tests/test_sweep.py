"""trady.experiments.sweep with fake runners: grid expansion, resume, failure isolation, parallel == serial."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import pytest

from trady.cli import sweep as sweep_cli
from trady.config import FinetuneConfig
from trady.core.errors import TradyError
from trady.core.formatting import sanitise
from trady.experiments.sweep import GridPoint, SweepGrid, plan, resolve_parallelism, run_sweep

# ---- fake runners (module level: "spawn" workers import them by name) ------------------------------


def _fake_acc(cfg: FinetuneConfig) -> float:
    key = f"{cfg.model}|{cfg.data}|{cfg.strategy}|{cfg.budget}|{cfg.seed}".encode()
    return 0.5 + int(hashlib.sha256(key).hexdigest()[:6], 16) / 0xFFFFFF * 0.4


def _units(budget: str | None) -> int | None:
    if budget is None:
        return None
    return int(budget) if budget.isdigit() else 1000 + int(hashlib.sha256(budget.encode()).hexdigest()[:4], 16)


def fake_runner(cfg: FinetuneConfig) -> dict:
    """Writes a run folder like trady.train.finetune would, deterministically from the config."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "calls.log", "a") as fh:  # one line per call, to count (re)runs
        fh.write("call\n")
    (out / "config.json").write_text(cfg.to_json())
    acc = _fake_acc(cfg)
    rows = [{"epoch": e, "test_acc": acc * e / cfg.epochs} for e in range(1, cfg.epochs + 1)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"model": cfg.model, "dataset": cfg.data, "strategy": cfg.strategy,
               "budget_units": _units(cfg.budget), "seed": cfg.seed, "epochs": cfg.epochs,
               "test_acc": acc, "best_test_acc": acc, "threads": cfg.threads, "progress": cfg.progress,
               "status": "ok"}
    (out / "summary.json").write_text(json.dumps(summary))
    return summary


def flaky_runner(cfg: FinetuneConfig) -> dict:
    """Fails on (trady, seed 1); fine otherwise."""
    if cfg.strategy == "trady" and cfg.seed == 1:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "calls.log", "a") as fh:
            fh.write("call\n")
        raise RuntimeError("budget fits no channel")
    return fake_runner(cfg)


def dying_runner(cfg: FinetuneConfig) -> dict:
    """Kills its worker process outright on (full, seed 0), like an out-of-memory kill."""
    if cfg.strategy == "full" and cfg.seed == 0:
        os._exit(9)
    return fake_runner(cfg)


def resuming_runner(cfg: FinetuneConfig, resume: bool = False) -> dict:
    """Records whether it was asked to go on from a checkpoint."""
    summary = fake_runner(cfg)
    summary["resumed"] = resume
    (Path(cfg.out) / "summary.json").write_text(json.dumps(summary))
    return summary


def _grid(**kw) -> SweepGrid:
    data = {"base": {"epochs": 2}, "models": ["mcunet-in1"], "datasets": ["fashion-mnist"],
            "budgets": ["2.2%", "27946"], "strategies": ["trady", "full"], "seeds": [0, 1]}
    data.update(kw)
    return SweepGrid.from_dict(data)


def _calls(run_dir: Path) -> int:
    p = run_dir / "calls.log"
    return len(p.read_text().splitlines()) if p.exists() else 0


def _summaries(root: Path) -> dict[str, dict]:
    out = {}
    for p in sorted(root.glob("*/summary.json")):
        s = json.loads(p.read_text())
        out[p.parent.name] = s
    return out


# ---- grid ------------------------------------------------------------------------------------------


def test_grid_expansion_non_sparse_once_per_seed():
    grid = _grid(datasets=["fashion-mnist", "digits"], strategies=["trady", "d-full-random", "full", "classifier"],
                 seeds=[0, 1, 2])
    points = grid.points()
    sparse = [p for p in points if p.strategy in ("trady", "d-full-random")]
    ref = [p for p in points if p.strategy in ("full", "classifier")]
    assert len(sparse) == 1 * 2 * 2 * 2 * 3  # models x datasets x strategies x budgets x seeds
    assert len(ref) == 1 * 2 * 2 * 3  # budgets ignored
    assert all(p.budget is None for p in ref)
    assert {p.budget for p in sparse} == {"2.2%", "27946"}
    names = [p.name for p in points]
    assert len(set(names)) == len(names)
    assert "mcunet-in1__fashion-mnist__trady__b2.2pct__s0" in names
    assert "mcunet-in1__digits__trady__b27946__s2" in names
    assert "mcunet-in1__fashion-mnist__full__s1" in names
    # deterministic
    assert [p.name for p in _grid().points()] == [p.name for p in _grid().points()]


def test_grid_config_and_errors():
    grid = _grid()
    cfg = grid.config(GridPoint("mcunet-in1", "digits", "trady", "2.2%", 3), "/tmp/x")
    assert (cfg.model, cfg.data, cfg.strategy, cfg.budget, cfg.seed, cfg.epochs, cfg.out) == (
        "mcunet-in1", "digits", "trady", "2.2%", 3, 2, "/tmp/x")
    with pytest.raises(TradyError, match="unknown config keys"):
        SweepGrid.from_dict({"base": {"epoch": 3}})
    with pytest.raises(TradyError, match="unknown grid keys"):
        SweepGrid.from_dict({"model": ["a"]})
    with pytest.raises(TradyError, match="needs a budget"):
        _grid(budgets=[]).points()
    with pytest.raises(TradyError, match="epochs"):
        _grid(base={"epochs": 0}).config(grid.points()[0])
    # empty axes fall back on the base config
    g = SweepGrid.from_dict({"base": {"model": "m", "data": "d", "strategy": "full", "seed": 4}})
    assert [p.name for p in g.points()] == ["m__d__full__s4"]


def test_sanitise():
    assert sanitise("2.2%") == "2.2pct"
    assert sanitise("256KB") == "256KB"
    assert sanitise("/data/my images/") == "data-my-images"
    assert sanitise("") == "x"


def test_resolve_parallelism():
    assert resolve_parallelism(None, None, cores=8) == (8, 1)
    assert resolve_parallelism(None, 4, cores=8) == (2, 4)
    assert resolve_parallelism(2, None, cores=8) == (2, 4)
    assert resolve_parallelism(None, 16, cores=8) == (1, 16)
    with pytest.raises(TradyError):
        resolve_parallelism(0, None, cores=8)


# ---- running ---------------------------------------------------------------------------------------


def test_sweep_serial_writes_runs_and_sweep_json(tmp_path):
    grid = _grid()
    res = run_sweep(grid, tmp_path, jobs=1, threads=1, runner=fake_runner, progress=False, log=lambda m: None)
    assert res.count("ok") == 6 and res.count("failed") == 0 and res.count("skipped") == 0
    names = {p.name for p in grid.points()}
    assert set(_summaries(tmp_path)) == names
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert sweep["strategies"] == ["trady", "full"] and sweep["seeds"] == [0, 1]
    assert {r["name"] for r in sweep["runs"]} == names
    assert SweepGrid.from_dict(sweep).points() == grid.points()  # sweep.json reads back as a grid
    s = json.loads((tmp_path / "mcunet-in1__fashion-mnist__trady__b27946__s0" / "summary.json").read_text())
    assert s["progress"] is False and s["threads"] == 1
    table = res.table()
    assert "6 ran, 0 skipped" in table and "mcunet-in1__fashion-mnist__full__s1" in table


def test_failure_is_recorded_and_does_not_stop_others(tmp_path):
    res = run_sweep(_grid(), tmp_path, jobs=1, runner=flaky_runner, progress=False, log=lambda m: None)
    failed = {o.point.name for o in res.failed}
    assert failed == {"mcunet-in1__fashion-mnist__trady__b2.2pct__s1", "mcunet-in1__fashion-mnist__trady__b27946__s1"}
    assert res.count("ok") == 4
    for name in failed:
        d = tmp_path / name
        s = json.loads((d / "summary.json").read_text())
        assert s["status"] == "failed"
        assert "RuntimeError: budget fits no channel" in s["error"]
        assert s["strategy"] == "trady" and s["seed"] == 1
        tb = (d / "error.txt").read_text()
        assert "Traceback" in tb and "budget fits no channel" in tb
    assert "budget fits no channel" in res.table()


def test_resume_skips_finished_and_reruns_failed(tmp_path):
    grid = _grid()
    run_sweep(grid, tmp_path, jobs=1, runner=flaky_runner, progress=False, log=lambda m: None)
    planned = dict((p.name, a) for p, a in plan(grid, tmp_path))
    assert sorted(a for a in planned.values()) == ["run", "run", "skip", "skip", "skip", "skip"]
    res = run_sweep(grid, tmp_path, jobs=1, runner=fake_runner, progress=False, log=lambda m: None)
    assert res.count("skipped") == 4 and res.count("ok") == 2 and res.count("failed") == 0
    for p in grid.points():
        d = tmp_path / p.name
        expected = 2 if (p.strategy == "trady" and p.seed == 1) else 1
        assert _calls(d) == expected, p.name
        assert json.loads((d / "summary.json").read_text())["status"] == "ok"
        assert not (d / "error.txt").exists()  # the stale traceback is gone after a good rerun
    # a third time: nothing to do
    res = run_sweep(grid, tmp_path, jobs=1, runner=fake_runner, progress=False, log=lambda m: None)
    assert res.count("skipped") == 6
    # skipped runs report their stored accuracy
    assert all(o.test_acc is not None for o in res.skipped)


def test_interrupted_run_goes_on_from_its_checkpoint(tmp_path):
    grid = _grid(strategies=["full"], seeds=[0, 1, 2])
    p0, p1, p2 = grid.points()
    for p in (p0, p1):  # stopped part-way: config + checkpoint, no summary
        d = tmp_path / p.name
        d.mkdir()
        (d / "config.json").write_text(grid.config(p, d).to_json())
        (d / "checkpoint.pt").write_bytes(b"x")
    (tmp_path / p1.name / "config.json").write_text(_grid(base={"epochs": 9}).config(p1).to_json())
    run_sweep(grid, tmp_path, jobs=1, runner=resuming_runner, progress=False, log=lambda m: None)
    resumed = {p.name: json.loads((tmp_path / p.name / "summary.json").read_text())["resumed"] for p in (p0, p1, p2)}
    # p1's checkpoint was made with other settings: start again
    assert resumed == {p0.name: True, p1.name: False, p2.name: False}


def test_resume_refuses_runs_made_with_other_settings(tmp_path):
    run_sweep(_grid(), tmp_path, jobs=1, runner=fake_runner, progress=False, log=lambda m: None)
    with pytest.raises(TradyError, match="other settings.*epochs"):
        run_sweep(_grid(base={"epochs": 5}), tmp_path, jobs=1, runner=fake_runner, progress=False,
                  log=lambda m: None)
    # more seeds with the same settings is fine: only the new ones run
    res = run_sweep(_grid(seeds=[0, 1, 2]), tmp_path, jobs=1, runner=fake_runner, progress=False,
                    log=lambda m: None)
    assert res.count("skipped") == 6 and res.count("ok") == 3


def test_parallel_matches_serial(tmp_path):
    grid = _grid(seeds=[0, 1, 2])
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    r1 = run_sweep(grid, serial, jobs=1, threads=1, runner=flaky_runner, progress=False, log=lambda m: None)
    r2 = run_sweep(grid, parallel, jobs=2, threads=1, runner=flaky_runner, progress=False, log=lambda m: None)
    assert r2.jobs == 2
    assert [(o.point, o.status, o.test_acc) for o in r1.outcomes] == [
        (o.point, o.status, o.test_acc) for o in r2.outcomes]
    s1, s2 = _summaries(serial), _summaries(parallel)
    assert s1.keys() == s2.keys()
    for name in s1:
        assert s1[name] == s2[name], name
    assert sum(s["status"] == "failed" for s in s2.values()) == 2  # trady, seed 1, both budgets


def test_parallel_worker_death_is_isolated(tmp_path):
    grid = _grid(strategies=["trady", "full"], budgets=["2.2%"], seeds=[0, 1])
    res = run_sweep(grid, tmp_path, jobs=2, runner=dying_runner, progress=False, log=lambda m: None)
    assert [o.point.name for o in res.failed] == ["mcunet-in1__fashion-mnist__full__s0"]
    assert res.count("ok") == 3
    s = json.loads((tmp_path / "mcunet-in1__fashion-mnist__full__s0" / "summary.json").read_text())
    assert s["status"] == "failed" and "worker process died" in s["error"]


# ---- CLI layer -------------------------------------------------------------------------------------


def _parse(argv):
    parser = argparse.ArgumentParser()
    sweep_cli.register(parser.add_subparsers())
    return parser.parse_args(argv)


def test_cli_grid_from_flags_and_file(tmp_path):
    grid_file = tmp_path / "grid.json"
    grid_file.write_text(json.dumps({"base": {"epochs": 7, "lr": 0.05}, "models": ["a"], "datasets": ["d"],
                                     "budgets": ["1%"], "strategies": ["trady"], "seeds": [0]}))
    args = _parse(["sweep", "--out", str(tmp_path / "r"), "--grid", str(grid_file), "--seeds", "0-2",
                   "--budgets", "2.2%,5.3%", "--epochs", "3", "--set", "momentum=0.5", "--set", "train-bias=true"])
    grid = sweep_cli.build_grid(args)
    assert grid.seeds == [0, 1, 2] and grid.budgets == ["2.2%", "5.3%"] and grid.models == ["a"]
    assert grid.base == {"epochs": 3, "lr": 0.05, "momentum": 0.5, "train_bias": True}


def test_cli_dry_run(tmp_path, capsys):
    out = tmp_path / "r"
    run_sweep(_grid(), out, jobs=1, runner=flaky_runner, progress=False, log=lambda m: None)
    args = _parse(["sweep", "--out", str(out), "--models", "mcunet-in1", "--datasets", "fashion-mnist",
                   "--budgets", "2.2%,27946", "--strategies", "trady,full", "--seeds", "0,1", "--epochs", "2",
                   "--dry-run", "--json"])
    assert args.func(args) == 0
    planned = json.loads(capsys.readouterr().out)
    assert len(planned) == 6
    assert {p["name"] for p in planned if p["action"] == "run"} == {
        "mcunet-in1__fashion-mnist__trady__b2.2pct__s1", "mcunet-in1__fashion-mnist__trady__b27946__s1"}


def test_report_reads_a_sweep(tmp_path):
    from trady.experiments.report import summarize

    run_sweep(_grid(), tmp_path, jobs=1, runner=flaky_runner, progress=False, log=lambda m: None)
    report = summarize(tmp_path)
    assert report["n_runs"] == 4
    assert sorted(f["path"] for f in report["failed"]) == [
        "mcunet-in1__fashion-mnist__trady__b2.2pct__s1", "mcunet-in1__fashion-mnist__trady__b27946__s1"]
    assert all("budget fits no channel" in f["error"] for f in report["failed"])
    assert {(r["strategy"], r["seeds"]) for r in report["rows"]} == {("trady", 1), ("full", 2)}
