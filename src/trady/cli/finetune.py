"""`trady finetune`: one fine-tune under a memory budget, with a readable report at the end."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trady.config import FinetuneConfig
from trady.errors import TradyError


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """The FinetuneConfig fields as options (shared with commands that launch fine-tunes)."""
    d = FinetuneConfig()
    p.add_argument("--model", default=d.model, help=f"zoo model name (default {d.model}; see `trady models`)")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false", help="start from random weights")
    p.add_argument("--weights", help="local .pth/.safetensors weights instead of the packaged ones")
    p.add_argument("--mcu-dir", help="folder of the paper's int8 MCU models (default ../shared/models/mcu)")
    p.add_argument("--data", default=d.data, help="fashion-mnist | digits | cifar10 | cifar100 | PATH")
    p.add_argument("--data-dir", help="folder holding the dataset files when not in the default place")
    p.add_argument("--train-size", type=int, help="seeded stratified subset of the training set")
    p.add_argument("--test-size", type=int, help="seeded stratified subset of the test set")
    p.add_argument("--resolution", type=int, help="input resolution (default: the model's)")
    p.add_argument(
        "--strategy", default=d.strategy, help="trady, s-topk-random, d-full-random, ... full, classifier, bias"
    )
    p.add_argument("--budget", help="memory budget: units (27946), bytes (256KB) or share of full fine-tuning (2.2%%)")
    p.add_argument("--profile", help="layer-ranking profile JSON (default: the one shipped for the model)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs)
    p.add_argument("--momentum", type=float, default=d.momentum, help="0 by default: state would break the budget")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--train-bias", action="store_true", help="also train biases and BatchNorm shifts")
    p.add_argument("--mask-bits", type=int, choices=(1, 8), default=d.mask_bits, help="bits per ReLU mask element")
    p.add_argument("--strategy-option", action="append", default=[], metavar="KEY=VALUE",
                   help="strategy option, e.g. ratio=0.2 (repeatable)")  # fmt: skip
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--no-measure", dest="measure_memory", action="store_false",
                   help="skip counting the bytes kept for backward")  # fmt: skip


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
    fields["strategy_options"] = options
    return FinetuneConfig(**fields)


def register(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a pretrained model under a memory budget",
        description="Fine-tune a pretrained model on a dataset with a channel-selection strategy under a memory "
        "budget; writes config, metrics, summary and checkpoint to --out.",
    )
    add_config_arguments(p)
    p.add_argument("--out", help="run folder (default runs/<model>__<data>__<strategy>__s<seed>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from trady.train import finetune

    if args.resume:
        folder = Path(args.resume)
        if not (folder / "config.json").is_file():
            raise TradyError(f"cannot resume {str(folder)!r}: no config.json there; accepted: a run folder")
        config = FinetuneConfig.load(folder / "config.json")
        config.out = str(folder)
        config.progress = args.progress
        summary = finetune(config, resume=True)
    else:
        config = config_from_args(args)
        if not args.out:
            name = f"{config.model}__{Path(config.data).name}__{config.strategy}__s{config.seed}"
            args.out = str(Path("runs") / name)
        config.out = args.out
        summary = finetune(config)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary, config.out))
    return 0


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.2f} MiB"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_summary(s: dict, out: str | None) -> str:
    budget = "-"
    if s.get("budget_units"):
        budget = f"{s['budget_units']:,} units ({_pct(s['budget_fraction'])} of full fine-tuning)"
    lines = [
        f"model {s['model']}  data {s['dataset']}  strategy {s['strategy']}  seed {s['seed']}",
        f"  budget                 {budget}",
        f"  test accuracy          {s['test_acc']:.4f} (best {s['best_test_acc']:.4f}) after {s['epochs_done']} epochs",
        f"  activation sparsity    {_pct(s['activation_sparsity'])}",
        f"  weight sparsity        {_pct(s['weight_sparsity'])}",
        f"  weight-grad FLOPs cut  {_pct(s['flops_reduction'])}",
        f"  kept for backward      {_mib(s['measured_saved_bytes'])}"
        f" (budgeted part {_mib(s['measured_budgeted_bytes'])})",
        f"  wall time              {s['wall_time_s']:.1f} s",
    ]
    for note in s.get("notes") or []:
        lines.append(f"  note: {note}")
    if out:
        lines.append(f"  run folder             {out}")
    return "\n".join(lines)
