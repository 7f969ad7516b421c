"""`trady <command>`: a thin argparse layer over the Python API.

Each command lives in its own module exposing `register(subparsers)`; the parser it adds sets
`func(args) -> int` as its default. Human-readable tables by default, `--json` for machines.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from trady import __version__
from trady.core.errors import TradyError

# Module names under trady.cli, in the order `trady --help` lists them.
COMMAND_MODULES = ["finetune", "plan", "rank", "sweep", "report", "bench", "export", "models_cmd"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trady",
        description="Fine-tune a pretrained network under a hard training-memory budget.",
    )
    parser.add_argument("--version", action="version", version=f"trady {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMAND_MODULES:
        importlib.import_module(f"trady.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the `trady` command itself (not a call from Python): its malloc first
        from trady.cli.allocator import reexec_with_allocator

        reexec_with_allocator()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except TradyError as err:
        # One clear line, no traceback: the message names the bad value and what is accepted.
        # Exit codes (docs/reliability.md): 2 bad input or refusal, 3 diverged, 4 a write failed.
        print(f"trady: error: {err}", file=sys.stderr)
        return int(getattr(err, "exit_code", 2))
    except KeyboardInterrupt:
        print("trady: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
