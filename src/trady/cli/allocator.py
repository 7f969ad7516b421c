"""The CLI's malloc: re-exec once with the chosen allocator preloaded (LD_PRELOAD), as PyTorch's own
CPU launcher does (`python -m torch.backends.xeon.run_cpu --enable-jemalloc`).

Chosen by measurement (benchmarks/allocator, docs/results/allocator.md): jemalloc (Debian
libjemalloc2) kept a trady run's whole-process high-water mark within 1.01x the classifier-only run's
on both models measured (glibc's defaults: up to 1.14x, tcmalloc: up to 1.08x), at no measured
step-time cost against glibc's defaults. The decision (`preload_decision`) respects an explicit choice:
LD_PRELOAD already set, TRADY_ALLOCATOR=glibc|tcmalloc|jemalloc|/path/lib.so, or --keep-allocator on
the command line; an absent library leaves glibc with a one-line note. Python users get the same with

    LD_PRELOAD=$(python -m trady.cli.allocator) python train.py

(the command prints the library's path, or nothing where it is absent).
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT = "jemalloc"
LIBRARIES = {"tcmalloc": "libtcmalloc_minimal.so.4", "jemalloc": "libjemalloc.so.2"}
PACKAGES = {"tcmalloc": "libtcmalloc-minimal4", "jemalloc": "libjemalloc2"}
# Commands that run training or measured steps; the others stay light and exec nothing.
COMMANDS = ("finetune", "sweep", "rank")
_MARK = "TRADY_ALLOCATOR_PRELOADED"  # set in the re-exec'd process: never twice


@dataclass(frozen=True)
class Decision:
    preload: str | None  # the library to preload, None: run as is
    note: str | None = None  # one line for stderr


def _lib_dirs() -> list[Path]:
    arch = f"{platform.machine()}-linux-gnu"
    return [Path(d) for d in (f"/usr/lib/{arch}", "/usr/lib64", "/usr/lib", "/usr/local/lib", f"/lib/{arch}")]


def find_library(name: str, exists: Callable[[Path], bool] = Path.exists) -> str | None:
    """The path of allocator `name` (a key of LIBRARIES) in the usual library folders, else None."""
    for d in _lib_dirs():
        candidate = d / LIBRARIES[name]
        if exists(candidate):
            return str(candidate)
    return None


def preload_decision(
    argv: Sequence[str], environ: Mapping[str, str], exists: Callable[[Path], bool] = Path.exists
) -> Decision:
    """Whether (and what) to preload before running `trady argv`; no side effects."""
    if not argv or argv[0] not in COMMANDS or platform.system() != "Linux":
        return Decision(None)
    if environ.get(_MARK) or environ.get("LD_PRELOAD") or "--keep-allocator" in argv:
        return Decision(None)  # already done, or the user's own choice
    choice = environ.get("TRADY_ALLOCATOR", DEFAULT).strip() or DEFAULT
    if choice in ("glibc", "system", "none"):
        return Decision(None)
    if choice not in LIBRARIES:  # a path
        if exists(Path(choice)):
            return Decision(choice)
        return Decision(None, f"trady: TRADY_ALLOCATOR={choice!r} not found; accepted: glibc, "
                              f"{', '.join(LIBRARIES)} or a library path; using glibc malloc")  # fmt: skip
    path = find_library(choice, exists)
    if path is None:
        return Decision(None, f"trady: {choice} not found (Debian/Ubuntu: apt-get install {PACKAGES[choice]}); "
                              "using glibc malloc")  # fmt: skip
    return Decision(path)


def reexec_with_allocator() -> None:
    """For the `trady` entry point: exec this same command again with the library preloaded (returns
    only where nothing is to be done)."""
    decision = preload_decision(sys.argv[1:], os.environ)
    if decision.note:
        print(decision.note, file=sys.stderr)
    if decision.preload is None:
        return
    env = dict(os.environ, LD_PRELOAD=decision.preload, **{_MARK: "1"})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "trady", *sys.argv[1:]], env)


if __name__ == "__main__":  # `python -m trady.cli.allocator`: the library path for LD_PRELOAD, or nothing
    name = os.environ.get("TRADY_ALLOCATOR", DEFAULT)
    path = find_library(name) if name in LIBRARIES else (name if Path(name).exists() else None)
    print(path or "")
