"""`trady finetune`: one fine-tune under a memory budget, with a readable report at the end."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trady.config import BATCHNORM_MODES, NON_RESULT_SETTINGS, RECIPES, FinetuneConfig
from trady.core.errors import TradyError
from trady.core.formatting import mib, pct


def add_config_arguments(p) -> None:
    """The FinetuneConfig fields as options (shared with commands that launch fine-tunes); `p` is an
    argparse parser, or anything with its add_argument."""
    d = FinetuneConfig()
    p.add_argument(
        "--model", default=d.model,
        help=f"zoo model name (default {d.model}; see `trady models`), or your own model: path/to/file.py:build_fn "
        "or package.module:build_fn. This imports and RUNS that code, as any Python entry point does; "
        "build_fn(num_classes=N) (or build_fn()) returns an nn.Module taking [B, 3, R, R] images normalised "
        "with ImageNet's mean/std, R = --resolution (required for your own model)",
    )  # fmt: skip
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false", help="start from random weights")
    p.add_argument(
        "--weights",
        help="local .pth/.pt/.safetensors weights instead of the packaged ones (read with weights_only=True)",
    )
    p.add_argument("--mcu-dir", help="folder of the paper's int8 MCU models (default ../shared/models/mcu)")
    p.add_argument("--data", default=d.data,
                   help="fashion-mnist | digits | cifar10 | cifar100 | PATH; text models: rotten-tomatoes | FILE.csv")
    p.add_argument("--data-dir", help="folder holding the dataset files when not in the default place")
    p.add_argument("--train-size", type=int, help="seeded stratified subset of the training set")
    p.add_argument("--test-size", type=int, help="seeded stratified subset of the test set")
    p.add_argument("--resolution", type=int, help="input resolution (default: the model's)")
    p.add_argument("--seq-len", dest="sequence_length", type=int,
                   help="text models: token ids per text, truncated/padded (default: the model's, 64 for minilm-l6)")
    p.add_argument(
        "--strategy", default=d.strategy, help="trady, s-topk-random, d-full-random, ... full, classifier, bias"
    )
    p.add_argument("--budget", help="memory budget: units (27946), bytes (256KB) or share of full fine-tuning (2.2%%)")
    p.add_argument("--profile", help="layer-ranking profile JSON (default: the one shipped for the model)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size,
        help=f"samples per step and process (default {d.batch_size}); data parallel (torchrun): the global "
        "batch is batch-size x WORLD_SIZE",
    )  # fmt: skip
    p.add_argument("--micro-batch", dest="micro_batch_size", type=int, default=None,
                   help="split each step's batch into micro-batches of this size; their gradients accumulate "
                   "into one optimizer step (equal to the full batch's with frozen BatchNorm, no dropout)")  # fmt: skip
    ours, paper = RECIPES["default"], RECIPES["paper"]
    p.add_argument(
        "--recipe", choices=sorted(RECIPES), default="default",
        help=f"the training recipe: default (backbone lr {ours['lr']}, head lr {ours['classifier_lr']} from a zero "
        f"head: trains every zoo model and strategy) or paper (one lr {paper['lr']}, PyTorch's head init: the "
        "published recipe, which collapses the MCU models here); --lr, --classifier-lr, --classifier-init, "
        "--warmup-epochs and --momentum given with it win",
    )  # fmt: skip
    p.add_argument("--lr", type=float, default=None, help="base learning rate of the backbone (default: the recipe's)")
    p.add_argument("--classifier-init", choices=("default", "zeros"), default=None,
                   help="initialisation of the fresh classifier (zeros: no random-head noise into the backbone; "
                   "default: the recipe's)")  # fmt: skip
    p.add_argument("--classifier-lr", type=float, default=None,
                   help="base learning rate of the fresh classifier (default: the recipe's; paper: --lr)")
    p.add_argument("--warmup-epochs", type=int, default=None, help="linear warm-up epochs (default: the recipe's)")
    p.add_argument("--momentum", type=float, default=None,
                   help="SGD momentum (default: the recipe's, 0: optimizer state would count against the budget)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--train-bias", action="store_true", help="also train biases and BatchNorm shifts")
    p.add_argument("--mask-bits", type=int, choices=(1, 8), default=d.mask_bits, help="bits per ReLU mask element")
    p.add_argument("--batchnorm", choices=BATCHNORM_MODES, default=d.batchnorm,
                   help="frozen (default): running statistics, folded; train: batch statistics while training, "
                   "running statistics updated, its input kept for backward outside the budget")  # fmt: skip
    p.add_argument("--resample-every", type=int, metavar="N",
                   help="redraw the selection every N steps (default: once per epoch, as the paper)")
    p.add_argument("--strategy-option", action="append", default=[], metavar="KEY=VALUE",
                   help="strategy option, e.g. ratio=0.2 (repeatable)")  # fmt: skip
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--device", default=d.device,
        help="cpu, cuda or cuda:N (under torchrun, cuda means GPU LOCAL_RANK)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--no-measure", dest="measure_memory", action="store_false",
                   help="skip counting the bytes kept for backward")  # fmt: skip
    p.add_argument("--keep-allocator", dest="control_allocator", action="store_false",
                   help="leave glibc's malloc settings alone during the measured step (default: the CLI "
                        "makes glibc return freed blocks then, so the step peak follows live tensors)")  # fmt: skip


def _option_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    options = {}
    for item in args.strategy_option:
        if "=" not in item:
            raise TradyError(f"invalid --strategy-option {item!r}; accepted: KEY=VALUE")
        k, v = item.split("=", 1)
        options[k] = _option_value(v)
    fields = {f: getattr(args, f) for f in FinetuneConfig.__dataclass_fields__ if hasattr(args, f)}
    for key, value in RECIPES[getattr(args, "recipe", "default")].items():
        if fields.get(key) is None:  # not given on the command line: the recipe's
            fields[key] = value
    fields["strategy_options"] = options
    if fields.get("weights"):
        fields["pretrained"] = False  # --weights replaces the packaged pretrained weights
    return FinetuneConfig(**fields)


DESCRIPTION = """\
Fine-tune a pretrained model on a dataset with a channel-selection strategy under a memory budget;
writes config.json, metrics.jsonl, summary.json and checkpoint.pt (every epoch, atomically) to --out.

Resuming: `trady finetune --resume DIR` continues a run stopped at any moment (killed, out of time) from
its last checkpoint, with the settings in DIR/config.json, and ends with the same metrics and weights as
an uninterrupted run with the same seed.

Data parallel: `torchrun --standalone --nproc-per-node N -m trady finetune ...` trains on N processes
(gloo on CPU, nccl with --device cuda: one GPU per process). Each process takes --batch-size samples
per step (global batch = batch-size x N); every process trains the same channels and only the selected
weight slices, the classifier and trained biases are all-reduced. Rank 0 writes the run folder.
"""

# Options that may accompany --resume: the settings that do not change results (config.py's one list)
# and the CLI's own; the rest of the settings come from DIR/config.json.
RESUME_OPTIONS = {"resume", "json", *NON_RESULT_SETTINGS}


class _RecordingParser:
    """Adds options to a parser and records each one's dest, long flag and default, from the Action
    that add_argument returns (argparse keeps no public list of its options)."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser
        self.options: dict[str, tuple[str, object]] = {}

    def add_argument(self, *names, **kwargs) -> argparse.Action:
        action = self.parser.add_argument(*names, **kwargs)
        if action.option_strings:
            self.options[action.dest] = (max(action.option_strings, key=len), action.default)
        return action


def register(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a pretrained model under a memory budget",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rec = _RecordingParser(p)
    add_config_arguments(rec)
    rec.add_argument(
        "--out",
        help="run folder (default runs/<model>__<data>__<strategy>__s<seed>); a run already there is replaced",
    )
    rec.add_argument(
        "--resume", metavar="DIR",
        help="continue the run in DIR from its last checkpoint, with its own settings (DIR/config.json); "
        "only settings that do not change results (--threads, --device, --no-progress, --no-measure, --data-dir, "
        "--mcu-dir) and --json may be given with it",
    )  # fmt: skip
    rec.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run, _finetune_options=rec.options)


def _changed_options(args: argparse.Namespace) -> list[str]:
    """Options given on the command line (values differing from the defaults) that --resume ignores."""
    options: dict[str, tuple[str, object]] = getattr(args, "_finetune_options", {})
    return [flag for dest, (flag, default) in options.items()
            if dest not in RESUME_OPTIONS and hasattr(args, dest) and getattr(args, dest) != default]


def _resume_config(args: argparse.Namespace) -> FinetuneConfig:
    folder = Path(args.resume)
    if not folder.is_dir():
        raise TradyError(f"cannot resume {str(folder)!r}: no such folder; accepted: a run folder of trady finetune")
    if not (folder / "config.json").is_file():
        raise TradyError(f"cannot resume {str(folder)!r}: no config.json there; accepted: a run folder")
    changed = _changed_options(args)
    if changed:
        raise TradyError(
            f"--resume continues {str(folder)!r} with its own settings (config.json); drop {', '.join(changed)} "
            "(or start a new run with --out)"
        )
    if args.out and Path(args.out).resolve() != folder.resolve():
        raise TradyError(f"--resume {str(folder)!r} writes to that folder; drop --out {args.out!r}")
    try:
        config = FinetuneConfig.load(folder / "config.json")
    except (ValueError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise TradyError(f"cannot resume {str(folder)!r}: its config.json is unreadable ({err})") from None
    config.out = str(folder)
    defaults = FinetuneConfig()
    for name in NON_RESULT_SETTINGS:  # given on the command line: they win over config.json
        value = getattr(args, name, None)
        if name != "out" and value is not None and value != getattr(defaults, name):
            setattr(config, name, value)
    config.progress = args.progress
    config.control_allocator = args.control_allocator
    return config


def run(args: argparse.Namespace) -> int:
    from trady.core import distributed
    from trady.train.loop import finetune

    if args.resume:
        config = _resume_config(args)
    else:
        config = config_from_args(args)
        if args.out is None:  # an empty --out '' is refused by the config's check, not replaced
            model = Path(config.model).name.replace(":", "-")  # a builder path/to/file.py:fn -> file.py-fn
            name = f"{model}__{Path(config.data).name}__{config.strategy}__s{config.seed}"
            args.out = str(Path("runs") / name)
        config.out = args.out
    try:
        rank, _ = distributed.init_from_env(config.device)  # torchrun: WORLD_SIZE > 1
        summary = finetune(config, resume=bool(args.resume))
    except TradyError as err:
        text = str(err)
        if "\n" in text:  # the CLI prints one line
            flat = TradyError(" ".join(text.split()))
            flat.exit_code = getattr(err, "exit_code", 2)
            raise flat from None
        raise
    finally:
        distributed.cleanup()
    if rank != 0:
        return 0
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary, config.out))
    return 0


def format_summary(s: dict, out: str | None) -> str:
    budget = "-"
    if s.get("budget_units"):
        budget = f"{s['budget_units']:,} units ({pct(s['budget_fraction'])} of full fine-tuning)"
    lines = [
        f"model {s['model']}  data {s['dataset']}  strategy {s['strategy']}  seed {s['seed']}",
        f"  budget                 {budget}",
        f"  test accuracy          {s['test_acc']:.4f} (best {s['best_test_acc']:.4f}) after {s['epochs_done']} epochs",
        f"  activation sparsity    {pct(s['activation_sparsity'])}",
        f"  weight sparsity        {pct(s['weight_sparsity'])}",
        f"  weight-grad FLOPs cut  {pct(s['flops_reduction'])}",
        f"  kept for backward      {mib(s['measured_saved_bytes'])}"
        f" (budgeted part {mib(s['measured_budgeted_bytes'])}); measured step peak {mib(s.get('peak_memory_bytes'))}",
        f"  BatchNorm              {s.get('batchnorm', 'frozen')}, kept for backward "
        f"{mib(s.get('batchnorm_kept_bytes'))} (outside the budget)",
        f"  wall time              {s['wall_time_s']:.1f} s",
    ]
    for note in s.get("notes") or []:
        lines.append(f"  note: {note}")
    if out:
        lines.append(f"  run folder             {out}")
    return "\n".join(lines)
