"""The whole-run high-water mark in summary.json, and the CLI launcher's choice of malloc (issue 22)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import shared_profile, tiny_config
from trady.cli import allocator
from trady.memory import resident_peak
from trady.train import loop as train

JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


def _only(*present: str):
    return lambda p: str(p) in present


def test_process_peak_survives_the_step_meters_resets() -> None:
    block = bytearray(96 * 2**20)  # touched: resident
    for i in range(0, len(block), 4096):
        block[i] = 1
    touched = resident_peak.resident_bytes()
    del block
    assert resident_peak.reset_resident_peak()
    # (the kernel's resident counters lag by a few hundred KiB: per-thread page-count batches)
    assert resident_peak.resident_peak_bytes() < touched - 64 * 2**20  # the kernel's mark went down ...
    assert resident_peak.process_peak_bytes() >= touched - 2**20  # ... the whole run's did not


def test_summary_has_the_process_peak_beside_the_step_peak(tmp_path_factory) -> None:
    profile = shared_profile(tmp_path_factory)
    summary = train.finetune(tiny_config(profile, "trady", epochs=1, control_allocator=True))
    peak = summary["process_peak_bytes"]
    # at least what this process holds now (torch and the model are loaded), at most its mark since
    assert resident_peak.resident_bytes() * 0.5 <= peak <= resident_peak.process_peak_bytes()
    assert summary["peak_memory_bytes"] is not None and summary["process_peak_allocator"].startswith(
        ("glibc", "tcmalloc", "jemalloc")
    )


@pytest.mark.parametrize(
    ("argv", "environ", "present", "expected"),
    [
        (["finetune", "--model", "m"], {}, (JEMALLOC,), JEMALLOC),  # the default, found
        (["finetune"], {}, (), None),  # absent: glibc (with a note)
        (["finetune", "--keep-allocator"], {}, (JEMALLOC,), None),  # the user's flag
        (["finetune"], {"LD_PRELOAD": "/x/libmine.so"}, (JEMALLOC,), None),  # the user's own preload
        (["finetune"], {"TRADY_ALLOCATOR": "glibc"}, (JEMALLOC,), None),
        (["finetune"], {"TRADY_ALLOCATOR": "/opt/libx.so"}, ("/opt/libx.so",), "/opt/libx.so"),
        (["sweep"], {"TRADY_ALLOCATOR_PRELOADED": "1"}, (JEMALLOC,), None),  # re-exec'd already: never twice
        (["models"], {}, (JEMALLOC,), None),  # light commands exec nothing
        ([], {}, (JEMALLOC,), None),
    ],
)
def test_preload_decision(argv, environ, present, expected, monkeypatch) -> None:
    monkeypatch.setattr(allocator.platform, "machine", lambda: "x86_64")
    decision = allocator.preload_decision(argv, environ, exists=_only(*present))
    assert decision.preload == expected
    if argv == ["finetune"] and not present and not environ:
        assert "apt-get install libjemalloc2" in decision.note and "glibc" in decision.note


def test_unknown_choice_is_one_line_naming_what_is_accepted() -> None:
    decision = allocator.preload_decision(["rank"], {"TRADY_ALLOCATOR": "tcmaloc"}, exists=_only())
    assert decision.preload is None
    assert "'tcmaloc'" in decision.note and "glibc, tcmalloc, jemalloc" in decision.note and "\n" not in decision.note


def test_reexec_runs_the_same_command_with_the_library_preloaded(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(sys, "argv", ["trady", "finetune", "--epochs", "1"])
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(allocator, "preload_decision", lambda argv, env: allocator.Decision("/lib/libtc.so"))
    monkeypatch.setattr(allocator.os, "execve", lambda exe, args, env: calls.append((exe, args, env)))
    allocator.reexec_with_allocator()
    (exe, args, env), = calls
    assert exe == sys.executable and args == [sys.executable, "-m", "trady", "finetune", "--epochs", "1"]
    assert env["LD_PRELOAD"] == "/lib/libtc.so" and env["TRADY_ALLOCATOR_PRELOADED"] == "1"


def test_the_cli_reexecs_once_and_runs(tmp_path) -> None:
    """A real `python -m trady rank --help`: preloaded once (no exec loop), exit 0; the note without the library."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "TRADY_ALLOCATOR_PRELOADED")}
    env["TRADY_ALLOCATOR"] = "jemalloc"
    code = (
        "import os, sys, trady.cli.allocator as a\n"
        "if os.environ.get('TRADY_ALLOCATOR_PRELOADED'):\n"
        "    print('PRELOAD=' + os.environ['LD_PRELOAD']); sys.exit(0)\n"
        "sys.argv = ['trady', 'rank', '--help']\n"
        "a.sys.executable = sys.executable\n"
        "a.reexec_with_allocator()\n"
        "print('NOT-PRELOADED')\n"
    )
    script = tmp_path / "launch.py"
    script.write_text(code)
    # the re-exec'd process runs `python -m trady ...`: point it at a stand-in `trady` package that
    # reports its environment instead of running a command
    fake = tmp_path / "fake" / "trady"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "__main__.py").write_text(
        "import os\nprint('PRELOAD=' + os.environ.get('LD_PRELOAD', '') + ' MARK=' + "
        "os.environ.get('TRADY_ALLOCATOR_PRELOADED', ''))\n"
    )
    env["PYTHONPATH"] = os.pathsep.join([str(Path(allocator.__file__).parents[2])])
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120,
                          cwd=str(tmp_path / "fake"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    library = allocator.find_library("jemalloc")
    if library is None:
        assert "NOT-PRELOADED" in proc.stdout and "apt-get install libjemalloc2" in proc.stderr
    else:
        assert f"PRELOAD={library} MARK=1" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", ["jemalloc", "tcmalloc"])
def test_a_preloaded_allocator_gives_its_free_pages_back_before_a_measured_step(name) -> None:
    """Under the CLI's jemalloc (or tcmalloc) the measured step starts from the live bytes (glibc's
    mallopt does not reach them): freed 1 MiB tensors' pages are kept, then given back."""
    library = allocator.find_library(name)
    code = (
        "import torch\n"
        "from trady.memory import resident_peak as r\n"
        "blocks = [torch.ones(2**18) for _ in range(300)]\n"
        "del blocks\n"
        "kept = r.resident_bytes()\n"
        "released = r.set_allocator_for_measurement()\n"
        "print(released, r.allocator_in_use(), kept - r.resident_bytes() > 16 * 2**20)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if library is not None:
        env["LD_PRELOAD"] = library
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    if library is None:  # not installed here: glibc, which the measured step's mallopt controls
        assert proc.stdout.split()[:2] == ["True", "glibc"]
    else:
        assert proc.stdout.split() == ["True", name, "True"], proc.stdout
