"""Finding 1 of the TraDy paper on our data: the layer ranking by RGN depends on the architecture,
hardly on the task or the seed.

For each model, three profiles with the same recipe (3 epochs of full fine-tuning on 512 training
samples, SGD lr 0.05 with updates clipped to norm 1, cosine, frozen BatchNorm, batch 32, 128 px):
digits seed 0 (the shipped profile when its settings match), digits seed 1, Fashion-MNIST seed 0.
Reports the Spearman correlation of the layer RGN (and of LaRa) over the layers, the K of each
profile and the Jaccard overlap of the top-K sets.

    .venv/bin/python benchmarks/ranking/finding1.py [--models mcunet-in1 mbv2-w0.35 mobilenet_v2] [--force]

Writes benchmarks/ranking/results/finding1.json; the profiles it computes are cached under
benchmarks/ranking/results/profiles/ (delete them, or pass --force, to recompute).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from trady.core.files import write_json
from trady.selection.rank_run import compute_profile
from trady.selection.ranking import RankingProfile, spearman_layer_order

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = RESULTS / "profiles"
SHIPPED = HERE.parents[1] / "src" / "trady" / "profiles"
RUNS = [("digits", 0), ("digits", 1), ("fashion-mnist", 0)]
PAIRS = [
    ("task", ("digits", 0), ("fashion-mnist", 0)),
    ("seed", ("digits", 0), ("digits", 1)),
    ("task+seed", ("digits", 1), ("fashion-mnist", 0)),
]


def get_profile(model: str, data: str, seed: int, args) -> tuple[RankingProfile, str]:
    path = CACHE / f"{model}__{data}__s{seed}.json"
    if path.exists() and not args.force:
        return RankingProfile.load(path), "cached"
    shipped = SHIPPED / f"{model}.json"
    if shipped.exists() and not args.force:
        p = RankingProfile.load(shipped)
        same = (p.dataset, p.seed, p.epochs, p.resolution, p.extra.get("train_size")) == (
            data, seed, args.epochs, args.resolution, args.train_size,
        )  # fmt: skip
        if same:
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shipped, path)
            return p, "shipped"
    t0 = time.perf_counter()
    p = compute_profile(
        model, data=data, epochs=args.epochs, seed=seed, train_size=args.train_size, resolution=args.resolution
    )
    p.save(path)
    print(f"  computed {path.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return p, "computed"


def overlap(a: RankingProfile, b: RankingProfile) -> float:
    """Jaccard index of the two top-K layer sets (each with its own K)."""
    x, y = set(a.top_k()), set(b.top_k())
    return len(x & y) / len(x | y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mcunet-in1", "mbv2-w0.35", "mobilenet_v2"])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-size", type=int, default=512)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--force", action="store_true", help="recompute every profile")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rows, profiles_out = [], {}
    for model in args.models:
        print(f"{model}:", flush=True)
        profs = {}
        for data, seed in RUNS:
            p, src = get_profile(model, data, seed, args)
            profs[(data, seed)] = p
            profiles_out[f"{model}/{data}/s{seed}"] = {
                "k": p.k(), "layers": len(p.layers), "source": src, "final_loss": p.extra.get("final_loss"),
                "wall_time_s": p.extra.get("wall_time_s"),
            }  # fmt: skip
        for kind, a, b in PAIRS:
            pa, pb = profs[a], profs[b]
            rows.append(
                {
                    "model": model,
                    "comparison": kind,
                    "a": f"{a[0]}/s{a[1]}",
                    "b": f"{b[0]}/s{b[1]}",
                    "layers": len(pa.layers),
                    "spearman_rgn": round(spearman_layer_order(pa, pb, "rgn"), 4),
                    "spearman_lara": round(spearman_layer_order(pa, pb, "lara"), 4),
                    "k_a": pa.k(),
                    "k_b": pb.k(),
                    "topk_jaccard": round(overlap(pa, pb), 4),
                }
            )
    result = {
        "description": "Spearman correlation of the layer order by accumulated layer RGN (and LaRa) between "
        "profiles of the same architecture on different tasks / seeds (TraDy paper, Finding 1: >= 0.8)",
        "command": "python benchmarks/ranking/finding1.py --models " + " ".join(args.models),
        "settings": {
            "epochs": args.epochs,
            "train_size": args.train_size,
            "resolution": args.resolution,
            "batch_size": 32,
            "lr": 0.05,
            "clip_grad_norm": 1.0,
            "schedule": "cosine",
            "batchnorm": "frozen",
            "threshold": 0.97,
            "torch": torch.__version__,
        },  # fmt: skip
        "profiles": profiles_out,
        "rows": rows,
    }
    write_json(RESULTS / "finding1.json", result)
    head = (
        f"{'model':<14} {'comparison':<10} {'a':<12} {'b':<18} {'rho RGN':>8} {'rho LaRa':>9} {'K a/b':>7} "
        f"{'top-K J':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['model']:<14} {r['comparison']:<10} {r['a']:<12} {r['b']:<18} {r['spearman_rgn']:>8.3f} "
            f"{r['spearman_lara']:>9.3f} {str(r['k_a']) + '/' + str(r['k_b']):>7} {r['topk_jaccard']:>8.3f}"
        )
    print(f"wrote {RESULTS / 'finding1.json'}")


if __name__ == "__main__":
    main()
