"""`trady rank`: compute a model's layer-ranking profile (RGN / LaRa) by a short full fine-tuning."""

from __future__ import annotations

import argparse
import json
import sys

from trady.selection.ranking import DEFAULT_THRESHOLD

# steps done of all, time spent and left, the loss: no rate (a fast model shows "12945.38step/s")
PROGRESS_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| step {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"


def register(sub) -> None:
    p = sub.add_parser(
        "rank",
        help="rank a model's layers by reweighted gradient norm (writes a profile JSON)",
        description="Fine-tune the (pretrained) model fully for a few epochs on a proxy task (plain SGD, cosine "
        "schedule, frozen BatchNorm), accumulate each layer's reweighted gradient norm (RGN) and LaRa, and "
        "write the layer-ranking profile used by trady / s-topk-random / medyate. K is the smallest number "
        "of layers holding --threshold of the total RGN.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model", required=True,
        help="zoo model name (see `trady models`), or your own: path/to/file.py:build_fn or package.module:build_fn "
        "(this imports and RUNS that code; build_fn(num_classes=N) or build_fn() returns an nn.Module; give "
        "--resolution)",
    )  # fmt: skip
    p.add_argument(
        "--data", default="digits",
        help="proxy dataset: digits | fashion-mnist | cifar10 | ... | PATH; text: rotten-tomatoes | FILE.csv",
    )  # fmt: skip
    p.add_argument("--data-dir", help="folder holding the dataset files when not in the default place")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-size", type=int, default=512,
                   help="at most this many training images, a seeded stratified subset (fewer when the data has "
                   "fewer; 0: all)")  # fmt: skip
    p.add_argument("--resolution", "--seq-len", type=int,
                   help="input resolution; text models: token ids per text (default: the model's)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--clip-grad-norm", type=float, default=1.0, help="clip each update to this norm (0: off)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="share of RGN that fixes K")
    p.add_argument("--mcu-dir", help="folder of the paper's int8 MCU models")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", required=True, help="profile JSON to write")
    p.add_argument("--plot", metavar="FILE.png", help="also plot layer RGN and the cumulative share")
    p.add_argument("--json", action="store_true", help="print the profile as JSON")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from trady.core.errors import TradyError
    from trady.experiments.report import plot_profile
    from trady.selection.rank_run import compute_profile

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.train_size is not None and args.train_size < 0:
        raise TradyError(f"--train-size must be >= 0, got {args.train_size}")
    bar = None
    progress = None
    if args.progress and not args.json:
        from tqdm import tqdm

        def progress(step: int, total: int, loss: float) -> None:
            nonlocal bar
            if bar is None:
                bar = tqdm(total=total, desc=f"rank {args.model}", file=sys.stderr, bar_format=PROGRESS_FORMAT)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")

    try:
        profile = compute_profile(
            args.model,
            data=args.data,
            epochs=args.epochs,
            seed=args.seed,
            train_size=args.train_size or None,
            resolution=args.resolution,
            batch_size=args.batch_size,
            lr=args.lr,
            clip_grad_norm=args.clip_grad_norm or None,
            threshold=args.threshold,
            data_dir=args.data_dir,
            mcu_dir=args.mcu_dir,
            device=args.device,
            progress=progress,
        )
    finally:
        if bar is not None:
            bar.close()
    profile.save(args.out)
    if args.plot:
        plot_profile(profile, args.plot)
    if args.json:
        print(json.dumps(profile.to_dict(), indent=2))
        return 0
    k = profile.k()
    n = len(profile.layers)
    print(
        f"{profile.model} @ {profile.resolution}px on {profile.dataset}, {profile.extra.get('train_size')} images "
        f"({profile.epochs} epochs, seed "
        f"{profile.seed}, {profile.iterations} steps, {profile.extra.get('wall_time_s', 0):.0f} s)"
    )
    print(f"K = {k} of {n} layers hold {100 * profile.threshold:.0f}% of the layer RGN")
    by = profile.by_name
    share = profile.cumulative_share()
    print(f"{'rank':>4}  {'layer':<40} {'kind':<9} {'RGN':>11} {'LaRa':>11} {'cum.':>6}")
    for i, name in enumerate(profile.order):
        lay = by[name]
        mark = "*" if i < k else " "
        print(f"{i + 1:>4}{mark} {name:<40} {lay.kind:<9} {lay.rgn:>11.4g} {lay.lara:>11.4g} {share[i]:>6.1%}")
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return 0
