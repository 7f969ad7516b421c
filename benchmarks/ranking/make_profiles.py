"""Compute the layer-ranking profiles shipped in src/trady/profiles/ (one per pretrained zoo model).

The proxy task is scikit-learn's digits (NOT Fashion-MNIST, on which the accuracy benchmark evaluates):
512 training samples, 3 epochs of full fine-tuning (SGD lr 0.05, updates clipped to norm 1, cosine,
frozen BatchNorm, batch 32).
The MCU models run at their 128 px; the 224-260 px models at 128 px too, to keep each profile to a
few CPU minutes (the profile records its resolution; strategies re-weight RGN to the training
resolution's units through `RankingProfile.for_costs`).

    .venv/bin/python benchmarks/ranking/make_profiles.py [MODEL ...] [--resolution R] [--force]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from trady.selection.rank_run import compute_profile

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ROOT / "src" / "trady" / "profiles"
MODELS = ["mcunet-in1", "mbv2-w0.35", "proxyless-w0.3", "mobilenet_v2", "efficientnet_lite0",
          "efficientnet_lite1", "efficientnet_lite2"]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", default=MODELS)
    ap.add_argument("--data", default="digits")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-size", type=int, default=512)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--force", action="store_true", help="recompute profiles that exist")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models:
        out = PROFILES / f"{name}.json"
        if out.exists() and not args.force:
            print(f"{name}: {out} exists (--force to recompute)", flush=True)
            continue
        t0 = time.perf_counter()
        profile = compute_profile(
            name,
            data=args.data,
            epochs=args.epochs,
            seed=args.seed,
            train_size=args.train_size,
            resolution=args.resolution,
        )
        profile.save(out)
        dt = time.perf_counter() - t0
        print(
            f"{name}: K = {profile.k()} of {len(profile.layers)} layers at {profile.resolution}px, "
            f"{profile.iterations} steps, final loss {profile.extra['final_loss']:.3f}, {dt:.0f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
