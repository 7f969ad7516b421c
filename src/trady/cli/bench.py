"""`trady bench engine`: what a training step keeps and costs, engine vs. stock PyTorch.

The benches themselves are trady.experiments.bench.engine_bench and memory_bench."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from trady.core.errors import TradyError
from trady.core.files import write_json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmarks (engine: memory kept for backward and step time vs. stock PyTorch)",
        description="Benchmarks of trady's machinery.",
    )
    sub = p.add_subparsers(dest="bench_command", metavar="<benchmark>")
    e = sub.add_parser(
        "engine",
        help="full fine-tuning vs. the paper's simulation vs. the engine vs. forward-only, in one run",
        description=(
            "Measure, on deep copies of one model, alternating round-robin and taking the median of "
            "--rounds steps: (a) full fine-tuning, (b) the simulation the paper's code uses (dense "
            "backward, then gradients multiplied by 0/1 input-channel masks), (c) the channel-sparse "
            "engine, (d) forward only (no_grad). A step is forward + cross-entropy + backward + SGD step. "
            "Memory: bytes kept for backward (saved-tensor hooks, each storage once, parameters excluded), "
            "the engine's budgeted bytes measured and analytic, gradient bytes, and on CUDA the peak "
            "allocation of a step. The selection: random input channels of the model's top layers "
            "until the budget is full."
        ),
        epilog="example: trady bench engine --model mcunet-in1 --resolution 128 --batch-size 32 --budget 2.2%",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_step_arguments(e, threads_help="torch threads (default: CPU count)", threads=None)
    e.add_argument("--top-fraction", type=float, default=0.5, help="share of layers for top-fraction (default 0.5)")
    e.add_argument("--rounds", type=int, default=7, help="timed round-robin rounds; medians over them (default 7)")
    e.add_argument("--warmup", type=int, default=2, help="untimed warm-up rounds (default 2)")
    e.set_defaults(func=run)
    _register_memory(sub)
    p.set_defaults(func=lambda args: _missing(p))


def _register_memory(sub) -> None:
    m = sub.add_parser(
        "memory",
        help="the measured peak of a step: inference vs. engine vs. stock freeze vs. full fine-tuning",
        description=(
            "Run each variant in its own fresh process, --repeats times: inference (no-grad forward), the "
            "engine, stock freeze (requires_grad=False except the selected layers' weights and the head), "
            "full fine-tuning. Peak on CPU: the resident high-water mark (VmHWM, reset through "
            "/proc/self/clear_refs) over --steps steps minus the resident size when model, input and variant "
            "are ready; children start with a fixed glibc mmap threshold so that it follows the live tensors "
            "(--no-allocator-control: glibc defaults). CUDA: torch.cuda.max_memory_allocated delta. Prints "
            "the medians with their range, the bytes kept for backward and the predicted engine peak."
        ),
        epilog="example: trady bench memory --model mobilenet_v2 --resolution 128 --batch-size 32 --budget 2.2%",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_step_arguments(m, threads_help="torch threads per process (default 1)", threads=1)
    m.add_argument("--micro-batch", type=int, default=None, help="split each step into micro-batches of this size")
    m.add_argument("--repeats", type=int, default=None, help="fresh processes per variant (default 3; --quick: 1)")
    m.add_argument("--steps", type=int, default=None, help="measured steps per process (default 3; --quick: 1)")
    m.add_argument("--quick", action="store_true",
                   help="one process per variant, each forked from one that imported torch once and never ran "
                   "a step (no import per process: most of the time on a small model), one measured step; "
                   "the figures then have no range")  # fmt: skip
    m.add_argument("--variants", default="inference,engine,freeze,full", help="comma-separated subset")
    m.add_argument("--no-allocator-control", action="store_true", help="children run with glibc's malloc defaults")
    m.add_argument("--timeline", default=None, help="also profile one engine and one inference step: PNG path")
    m.set_defaults(func=run_memory)


def _add_step_arguments(p: argparse.ArgumentParser, threads_help: str, threads: int | None) -> None:
    """The step's arguments, shared by both benches (engine_bench.StepBenchConfig), and the output ones."""
    p.add_argument("--model", required=True,
                   help="zoo model name (trady models), or your own: path/to/file.py:build_fn or "
                   "package.module:build_fn (this imports and RUNS that code, in each fresh process too)")
    p.add_argument("--resolution", type=int, default=128, help="input size in pixels (default 128)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of a step (default 32)")
    p.add_argument("--budget", default="2.2%", help="units (27946), bytes (256KB) or share of full fine-tuning (2.2%%)")
    p.add_argument(
        "--layers",
        default="auto",
        choices=["auto", "profile", "top-fraction", "all"],
        help="layers to draw channels from: the shipped profile's top-K (profile), the top --top-fraction "
        "by execution order (top-fraction), all layers, or auto = profile if shipped else top-fraction",
    )
    p.add_argument("--threads", type=int, default=threads, help=threads_help)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed of the input batch and the selection (default 0)")
    p.add_argument("--lr", type=float, default=1e-4, help="SGD learning rate of the steps (default 1e-4)")
    p.add_argument("--num-classes", type=int, default=10, help="size of the fresh classifier (default 10)")
    p.add_argument("--no-pretrained", action="store_true", help="random weights instead of the pretrained ones")
    p.add_argument("--mask-bits", type=int, default=1, choices=[1, 8], help="ReLU mask bits in the engine (default 1)")
    p.add_argument(
        "--no-flush-denormal",
        action="store_true",
        help="keep denormal arithmetic on CPU (by default flushed to zero during the run: reused buffers "
        "full of denormals otherwise slow every variant down several times)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")


def _step_fields(args: argparse.Namespace) -> dict:
    """StepBenchConfig's fields from _add_step_arguments' arguments."""
    return dict(
        model=args.model, resolution=args.resolution, batch_size=args.batch_size, budget=args.budget,
        layers=args.layers, threads=args.threads, device=args.device, seed=args.seed, lr=args.lr,
        num_classes=args.num_classes, pretrained=not args.no_pretrained, mask_bits=args.mask_bits,
        flush_denormal=not args.no_flush_denormal,
    )  # fmt: skip


def run_memory(args: argparse.Namespace) -> int:
    from trady.experiments.bench.memory_bench import MemoryBenchConfig, bench_memory, format_memory_bench

    config = MemoryBenchConfig(
        **_step_fields(args), micro_batch_size=args.micro_batch,
        repeats=args.repeats if args.repeats is not None else 1 if args.quick else 3,
        steps=args.steps if args.steps is not None else 1 if args.quick else 3,
        allocator_control=not args.no_allocator_control, fork=args.quick,
        variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()),
    )  # fmt: skip
    progress = None if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    result = bench_memory(config, progress=progress)
    if args.timeline:
        from trady.experiments.bench.timeline_table import timeline_for

        result["timeline"] = timeline_for(config, args.timeline)
    result["command"] = _command()

    def table() -> str:
        if not args.timeline:
            return format_memory_bench(result)
        from trady.experiments.bench.timeline_table import format_timeline

        return format_memory_bench(result) + "\n\n" + format_timeline(result["timeline"])

    return _emit(args, result, table)


def _missing(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def run(args: argparse.Namespace) -> int:
    from trady.experiments.bench.engine_bench import EngineBenchConfig, format_engine_bench, run_engine_bench

    config = EngineBenchConfig(
        **_step_fields(args), top_fraction=args.top_fraction, rounds=args.rounds, warmup=args.warmup
    )
    if config.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise TradyError(f"device {config.device!r} requested but no CUDA device is available; accepted here: cpu")
    result = run_engine_bench(config)
    result["environment"]["command"] = _command()
    return _emit(args, result, lambda: format_engine_bench(result))


def _command() -> str:
    """The command line that produced a result, recorded in it."""
    return "trady " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _emit(args: argparse.Namespace, result: dict, table) -> int:
    """Write the result to --out (JSON) and print it: JSON with --json, else table() (made only then)."""
    if args.out:
        write_json(args.out, result)
    print(json.dumps(result, indent=2) if args.json else table())
    return 0
