"""What the few-bit derivatives and 8-bit kept tensors cost in accuracy: a real fine-tune, same seeds.

    PYTHONPATH=src python benchmarks/architectures/finetune.py [--epochs 8] [--seeds 0 1 2]

1. Pretrain (stock autograd, every parameter, seed 0) a constructed EfficientNet-B0-like (SiLU + SE) and a
   ViT-like (LayerNorm + attention) on 8000 Fashion-MNIST training images at 32 px (no PyPI package ships
   pretrained weights for these architectures, so we make our own starting point).
2. Fine-tune each on scikit-learn's digits (1347 train / 450 test, 32 px) with the engine: a fresh
   zero-initialised head, and each epoch (TraDy-style) a quarter of the input channels of the upper half of
   the layers redrawn at random; SGD momentum 0.9, lr 0.05, cosine; batch 64. The same seeds give the same
   data order and the same channel draws for every config: exact (activation_bits=None, kept_precision="fp32"),
   the default (4 bits, int8 kept), and 2 bits.
Writes results/finetune.json and results/finetune.md (test accuracy per seed, mean, paired difference).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from trady.core.files import write_json, write_text
from trady.data import load_dataset
from trady.data.transforms import ImageTransform
from trady.engine import EngineConfig, SparseEngine
from trady.experiments.bench.engine_bench import environment
from trady.models.constructed import efficientnet_b0_like, vit_like

HERE = Path(__file__).resolve().parent
RES = 32
MODELS = {"efficientnet_b0_like": lambda: efficientnet_b0_like(10), "vit_like": lambda: vit_like(10)}
CONFIGS = {
    "exact": EngineConfig(activation_bits=None, kept_precision="fp32"),
    "default (4 bits, int8)": EngineConfig(),
    "2 bits, int8": EngineConfig(activation_bits=2),
}


def tensors(split) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = split.get_batch(torch.arange(len(split)))
    return ImageTransform(RES, (0.5,) * 3, (0.5,) * 3, train=False)(images), labels


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def pretrain(name: str, x, y, epochs: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = MODELS[name]()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(y), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model


def draw(engine: SparseEngine, seed: int, epoch: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * seed + epoch)
    names = engine.costs.names
    sel = {}
    for n in names[len(names) // 2 :]:
        c = engine.costs.by_name[n].in_channels
        sel[n] = torch.randperm(c, generator=g)[: max(1, c // 4)]
    return sel


def finetune(base, config: EngineConfig, seed: int, data, epochs: int) -> float:
    (xtr, ytr), (xte, yte) = data
    model = copy.deepcopy(base)
    model.reset_classifier(10)
    torch.nn.init.zeros_(model.classifier.weight)
    torch.nn.init.zeros_(model.classifier.bias)
    engine = SparseEngine(model, xtr[:2], config)
    g = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(ytr) / 64)
    step, total = 0, epochs * steps_per_epoch
    for epoch in range(epochs):
        engine.select(draw(engine, seed, epoch))
        opt = torch.optim.SGD(engine.parameters(), lr=0.05, momentum=0.9)
        model.train()
        for idx in torch.randperm(len(ytr), generator=g).split(64):
            for group in opt.param_groups:
                group["lr"] = 0.05 * 0.5 * (1 + math.cos(math.pi * step / total))
            opt.zero_grad()
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
            step += 1
    return accuracy(model, xte, yte)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--pretrain-epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    command = " ".join(["PYTHONPATH=src python benchmarks/architectures/finetune.py", *sys.argv[1:]])
    fm = load_dataset("fashion-mnist", train_size=8000, test_size=2000, seed=0)
    digits = load_dataset("digits", seed=0)
    pre_train, pre_test = tensors(fm.train), tensors(fm.test)
    data = (tensors(digits.train), tensors(digits.test))
    rows = []
    for name in MODELS:
        t0 = time.perf_counter()
        base = pretrain(name, *pre_train, args.pretrain_epochs)
        pre_acc = accuracy(base, *pre_test)
        seconds = time.perf_counter() - t0
        sys.stderr.write(f"{name}: pretrained, Fashion-MNIST test acc {pre_acc:.3f} ({seconds:.0f}s)\n")
        for label, config in CONFIGS.items():
            accs = [finetune(base, config, s, data, args.epochs) for s in args.seeds]
            rows.append({"model": name, "config": label, "activation_bits": config.activation_bits,
                         "kept_precision": config.kept_precision, "seeds": args.seeds, "test_acc": accs,
                         "pretrain_fashion_mnist_test_acc": pre_acc})  # fmt: skip
            sys.stderr.write(f"  {label}: {accs}\n")
    env = environment(1)
    summary = {"command": command, "environment": env, "epochs": args.epochs, "pretrain_epochs": args.pretrain_epochs,
               "rows": rows}  # fmt: skip
    write_json(HERE / "results" / "finetune.json", summary)
    lines = [
        f"Digits test accuracy after fine-tuning (seeds {args.seeds}, {args.epochs} epochs), starting from a "
        f"{args.pretrain_epochs}-epoch Fashion-MNIST pretraining. `{command}` ({env['date']}, torch {env['torch']}).",
        "",
        "| model | config | test acc per seed | mean | paired difference to exact (mean, min..max) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        exact = next(e for e in rows if e["model"] == r["model"] and e["config"] == "exact")["test_acc"]
        diff = [a - b for a, b in zip(r["test_acc"], exact)]
        lines.append(
            f"| {r['model']} | {r['config']} | {', '.join(f'{a:.3f}' for a in r['test_acc'])} | "
            f"{statistics.mean(r['test_acc']):.3f} | {statistics.mean(diff):+.3f} "
            f"({min(diff):+.3f}..{max(diff):+.3f}) |"
        )
    write_text(HERE / "results" / "finetune.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
