"""Grid runner: models x datasets x budgets x strategies x seeds into one results folder.

One run folder per grid point, named readably and deterministically
(`mcunet-in1__fashion-mnist__trady__b27946__s0`; non-sparse strategies have no budget part). A run
whose summary.json says status "ok" or "diverged" (a finished result: its loss blew up; running it
again would diverge again) is skipped, so a sweep can be stopped and started again. A run
that raises is recorded (summary.json with status "failed" and the message, error.txt with the
traceback) and the others go on. Runs execute in "spawn" worker processes, each with its own torch
thread count; the runner is injectable (default `trady.train.finetune`) so tests can fake it.
"""

from __future__ import annotations

import inspect
import json
import math
import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trady.config import CHECKPOINT, NON_RESULT_SETTINGS, FinetuneConfig
from trady.core.errors import TradyError
from trady.core.files import write_json, write_text
from trady.core.formatting import render_table
from trady.experiments.sweep_grid import AXES, GridPoint, SweepGrid, is_sparse, validate_names  # noqa: F401

Runner = Callable[..., dict]  # runner(config) -> summary; may also take resume=True

# ---------------------------------------------------------------------------------------------------
# Running one point (in a worker process or in this one)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


FINISHED = ("ok", "diverged")  # statuses of a run that is done: a sweep does not run it again


def run_status(run_dir: str | os.PathLike) -> str | None:
    """"ok", "diverged", "failed", another status string, or None when the run has no readable summary."""
    summary = _read_json(Path(run_dir) / "summary.json")
    return None if summary is None else str(summary.get("status"))


def _default_runner(config: FinetuneConfig, resume: bool = False) -> dict:
    from trady.train.loop import finetune

    return finetune(config, resume=resume)


def _accepts_resume(runner: Runner) -> bool:
    try:
        return "resume" in inspect.signature(runner).parameters
    except (TypeError, ValueError):
        return False


def _settings_diff(stored: dict, wanted: dict) -> str | None:
    """Differences in what a run computes between a stored config.json and the wanted config."""
    from trady.train.run_paths import absolute_settings  # on use: importing the sweep stays torch-free

    diffs = []
    stored, wanted = absolute_settings(stored), absolute_settings(wanted)  # paths as run folders store them
    for key, value in wanted.items():
        if key in NON_RESULT_SETTINGS or value is None or key not in stored:
            continue  # None: "the default", which the trainer may have filled in
        if stored[key] != value:
            diffs.append(f"{key}: {stored[key]!r} there, {value!r} now")
    return "; ".join(diffs) or None


def _failure_summary(run_dir: Path, config: dict, error: str) -> dict:
    summary = _read_json(run_dir / "summary.json") or {}  # the runner's own failure summary, if any
    if summary.get("status") == "ok":  # the runner finished, then something after it failed
        summary = {}
    summary.update(
        model=config.get("model"), dataset=config.get("data"), strategy=config.get("strategy"),
        budget=config.get("budget"), seed=config.get("seed"), epochs=config.get("epochs"),
        status="failed", error=error,
    )
    summary.setdefault("budget_units", None)
    write_json(run_dir / "summary.json", summary)
    return summary


def _set_threads(threads: int, load_torch: bool) -> None:
    """Thread count of this worker: environment for libraries loaded later, torch itself when it is
    (or is about to be) loaded. A runner that never touches torch keeps the worker light."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    if load_torch or "torch" in sys.modules:
        import torch

        torch.set_num_threads(threads)


def execute(config_dict: dict, runner: Runner | None = None, threads: int | None = None) -> dict:
    """Run one grid point and record its outcome in its run folder; never raises on a run failure.

    Returns {"status", "summary", "error", "wall_time_s"}. Module-level so that "spawn" workers can
    import it; the runner must be importable too (a module-level function)."""
    run_dir = Path(config_dict["out"])
    run_dir.mkdir(parents=True, exist_ok=True)
    runner = runner or _default_runner
    previous = _read_json(run_dir / "summary.json")
    # A run stopped part-way (no summary, a checkpoint, same settings) goes on from its checkpoint
    # when the runner can; a failed run starts again from scratch.
    stored = _read_json(run_dir / "config.json")
    resume = (previous is None and (run_dir / CHECKPOINT).is_file() and stored is not None
              and _settings_diff(stored, config_dict) is None and _accepts_resume(runner))
    # Stale outcome files of an earlier attempt go: an interrupted rerun then reads as unfinished.
    (run_dir / "error.txt").unlink(missing_ok=True)
    if previous is not None:
        (run_dir / "summary.json").unlink(missing_ok=True)
    if threads:
        _set_threads(int(threads), load_torch=runner is _default_runner)
    start = time.perf_counter()
    try:
        config = FinetuneConfig.from_dict(dict(config_dict))
        result = runner(config, resume=True) if resume else runner(config)
        summary = _read_json(run_dir / "summary.json")
        if summary is None:  # the runner returned its summary but did not write it
            if not isinstance(result, dict):
                raise RuntimeError("runner wrote no summary.json and returned no summary dict")
            summary = {**result}
            summary.setdefault("status", "ok")
            write_json(run_dir / "summary.json", summary)
        if summary.get("status") == "diverged":
            return _diverged(run_dir, summary, start)
        if summary.get("status") != "ok":
            error = str(summary.get("error") or f"runner reported status {summary.get('status')!r}")
            write_text(run_dir / "error.txt", error + "\n")
            return {"status": "failed", "summary": summary, "error": error,
                    "wall_time_s": time.perf_counter() - start}
        return {"status": "ok", "summary": summary, "error": None, "wall_time_s": time.perf_counter() - start}
    except Exception as err:
        summary = _read_json(run_dir / "summary.json")
        if summary is not None and summary.get("status") == "diverged":  # the trainer's own record of it
            return _diverged(run_dir, summary, start)
        error = f"{type(err).__name__}: {err}"
        write_text(run_dir / "error.txt", traceback.format_exc())
        summary = _failure_summary(run_dir, config_dict, error)
        return {"status": "failed", "summary": summary, "error": error, "wall_time_s": time.perf_counter() - start}


def _diverged(run_dir: Path, summary: dict, start: float) -> dict:
    """A run whose loss diverged: a finished result (kept, reported, not run again), not a failure."""
    error = str(summary.get("error") or f"diverged at epoch {summary.get('diverged_epoch')}")
    write_text(run_dir / "error.txt", error + "\n")
    return {"status": "diverged", "summary": summary, "error": error, "wall_time_s": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------------
# The sweep


@dataclass
class RunOutcome:
    point: GridPoint
    status: str  # "ok" | "diverged" | "failed" | "skipped"
    test_acc: float | None = None
    wall_time_s: float | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {**self.point.as_dict(), "status": self.status, "test_acc": self.test_acc,
                "wall_time_s": self.wall_time_s, "error": self.error}


@dataclass
class SweepResult:
    out: str
    outcomes: list[RunOutcome]
    jobs: int
    threads: int

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def ran(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if o.status == "ok"]

    @property
    def skipped(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if o.status == "skipped"]

    @property
    def failed(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def as_dict(self) -> dict[str, Any]:
        return {"out": self.out, "jobs": self.jobs, "threads": self.threads,
                "counts": {s: self.count(s) for s in ("ok", "diverged", "skipped", "failed")},
                "runs": [o.as_dict() for o in self.outcomes]}

    def table(self) -> str:
        return format_table(self)


def _fmt_acc(v: float | None) -> str:
    if v is None or not isinstance(v, (int, float)) or math.isnan(v):
        return "-"
    return f"{100 * v:.2f}" if v <= 1 else f"{v:.2f}"


def format_table(result: SweepResult) -> str:
    rows = [("run", "status", "test acc", "time", "error")]
    for o in result.outcomes:
        t = "-" if o.wall_time_s is None else f"{o.wall_time_s:.1f}s"
        err = (o.error or "").splitlines()[0][:80] if o.error else ""
        rows.append((o.point.name, o.status, _fmt_acc(o.test_acc), t, err))
    lines = [render_table(rows[0], rows[1:], left=len(rows[0]))]
    diverged = f"{result.count('diverged')} diverged, " if result.count("diverged") else ""
    lines.append(f"{result.count('ok')} ran, {diverged}{result.count('skipped')} skipped (already done), "
                 f"{result.count('failed')} failed  ->  {result.out}")
    return "\n".join(lines)


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def resolve_parallelism(jobs: int | None, threads: int | None, cores: int | None = None) -> tuple[int, int]:
    """(jobs, threads per run): --jobs defaults to cores // threads, --threads to cores // jobs."""
    cores = cores or available_cores()
    if jobs is not None and jobs < 1:
        raise TradyError(f"jobs must be >= 1, got {jobs}")
    if threads is not None and threads < 1:
        raise TradyError(f"threads must be >= 1, got {threads}")
    if threads is None:
        threads = 1 if jobs is None else max(1, cores // jobs)
    if jobs is None:
        jobs = max(1, cores // threads)
    return jobs, threads


def _check_same_settings(grid: SweepGrid, point: GridPoint, run_dir: Path) -> str | None:
    """A finished run made with other settings (say fewer epochs) must not be silently reused."""
    stored = _read_json(run_dir / "config.json")
    return None if stored is None else _settings_diff(stored, grid.config(point).to_dict())


def plan(grid: SweepGrid, out: str | os.PathLike) -> list[tuple[GridPoint, str]]:
    """Each grid point with what a sweep would do with it: "run", "skip" (finished ok) or
    "stale: <differences>" (finished with other settings: the sweep would refuse to start)."""
    out = Path(out)
    actions = []
    for p in grid.points():
        if run_status(out / p.name) not in FINISHED:
            actions.append((p, "run"))
            continue
        diff = _check_same_settings(grid, p, out / p.name)
        actions.append((p, f"stale: {diff}" if diff else "skip"))
    return actions


def run_sweep(
    grid: SweepGrid,
    out: str | os.PathLike,
    *,
    jobs: int | None = None,
    threads: int | None = None,
    runner: Runner | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> SweepResult:
    """Run every grid point not finished yet into `out/<run name>/`; returns what ran/skipped/failed.

    runner: called with a FinetuneConfig (its `out` set to the run folder), plus resume=True for a run
    stopped part-way that left a checkpoint, when the runner takes `resume`; default
    trady.train.finetune, whose names are checked against the registries first. With jobs > 1 it
    must be picklable (a module-level function). Failures are recorded, never raised."""
    out = Path(out)
    if runner is None:
        validate_names(grid)
    points = grid.points()
    out.mkdir(parents=True, exist_ok=True)

    outcomes: dict[GridPoint, RunOutcome] = {}
    todo: list[GridPoint] = []
    stale = []
    for p in points:
        run_dir = out / p.name
        summary = _read_json(run_dir / "summary.json")
        if summary is not None and summary.get("status") in FINISHED:
            diff = _check_same_settings(grid, p, run_dir)
            if diff:
                stale.append(f"{p.name} ({diff})")
            outcomes[p] = RunOutcome(p, "skipped", test_acc=summary.get("test_acc"),
                                     wall_time_s=summary.get("wall_time_s"))
        else:
            todo.append(p)
    if stale:
        raise TradyError(
            f"{len(stale)} finished run(s) in {str(out)!r} were made with other settings, e.g. {stale[0]}; "
            f"use another results folder (or delete those runs) to run with the new settings"
        )

    jobs, threads = resolve_parallelism(jobs, threads if threads is not None else grid.base.get("threads"))
    jobs = max(1, min(jobs, len(todo)))
    # A sweep shows its own progress; the runs' own bars would interleave.
    configs = {}
    for p in todo:
        cfg = grid.config(p, out / p.name)
        cfg.progress = False
        cfg.threads = threads
        configs[p] = cfg.to_dict()

    write_json(out / "sweep.json", {**grid.to_dict(), "runs": [p.as_dict() for p in points]})

    emit = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    skipped = len(points) - len(todo)
    if skipped:
        emit(f"sweep: {skipped} of {len(points)} runs already finished, skipping them")
    if todo:
        emit(f"sweep: {len(todo)} runs to do, {jobs} at a time with {threads} thread(s) each -> {out}")

    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="sweep", unit="run", file=sys.stderr, dynamic_ncols=True)

    def finished(p: GridPoint, result: dict) -> None:
        summary = result.get("summary") or {}
        o = RunOutcome(p, result["status"], test_acc=summary.get("test_acc") if result["status"] == "ok" else None,
                       wall_time_s=result.get("wall_time_s"), error=result.get("error"))
        outcomes[p] = o
        if o.status == "ok":
            line = f"[ok]     {p.name}  test acc {_fmt_acc(o.test_acc)}  {o.wall_time_s or 0:.1f}s"
        elif o.status == "diverged":
            line = f"[diverged] {p.name}  {(o.error or '').splitlines()[0] if o.error else ''}"
        else:
            line = f"[failed] {p.name}  {(o.error or '').splitlines()[0] if o.error else ''}"
        if bar is not None:
            bar.write(line, file=sys.stderr)
            bar.update(1)
        else:
            emit(line)

    try:
        if jobs == 1:
            for p in todo:
                finished(p, execute(configs[p], runner, threads))
        else:
            broken = _run_pool(todo, configs, runner, threads, jobs, finished)
            # A worker that died (killed, out of memory, crashed) takes the whole pool down with it,
            # and the runs in flight cannot tell who did it: retry those one per fresh process.
            for p, _ in broken:
                left = _run_pool([p], configs, runner, threads, 1, finished)
                if left:
                    error = f"worker process died (killed, out of memory or crashed) while running it: {left[0][1]}"
                    summary = _failure_summary(out / p.name, configs[p], error)
                    finished(p, {"status": "failed", "summary": summary, "error": error})
    finally:
        if bar is not None:
            bar.close()
    return SweepResult(str(out), [outcomes[p] for p in points], jobs, threads)


def _run_pool(points, configs, runner, threads, jobs, finished) -> list[tuple[GridPoint, str]]:
    """Run points in a spawn pool; returns the points lost to a broken pool (not yet recorded), each
    with the pool's error message."""
    ctx = multiprocessing.get_context("spawn")
    broken: list[tuple[GridPoint, str]] = []
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx)
    try:
        futures = {pool.submit(execute, configs[p], runner, threads): p for p in points}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in sorted(done, key=lambda f: points.index(futures[f])):
                p = futures[fut]
                try:
                    result = fut.result()
                except BrokenProcessPool as err:
                    broken.append((p, str(err)))
                    continue
                except Exception as err:  # e.g. the runner could not be pickled / imported
                    error = f"{type(err).__name__}: {err}"
                    summary = _failure_summary(Path(configs[p]["out"]), configs[p], error)
                    result = {"status": "failed", "summary": summary, "error": error}
                finished(p, result)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return broken
