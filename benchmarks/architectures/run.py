"""Modern architectures: bytes kept for backward (engine vs stock requires_grad freezing of the same
selection) and selected-slice gradient cosine to dense autograd, for each activation_bits / kept_precision.

    PYTHONPATH=src python benchmarks/architectures/run.py

Models: the constructed small EfficientNet-B0-, MobileNetV3-, ConvNeXt- and ViT-like networks of
trady.models.constructed (random weights, BatchNorm statistics calibrated on random batches so that
pre-activations are normalised as in a trained network). Batch 4; selection: an eighth of the input
channels of 6 layers drawn from the upper two thirds of the layers (seeds 0, 1, 2); loss: a fixed
random projection of the logits. "bytes" = every tensor kept between forward and backward
(trady.engine.measure_saved_bytes: each storage once, parameters and buffers excluded), the engine's
selected input slices included (with blocks recomputed, the slices inside them are recomputed, not
kept). Writes results/architectures.json and results/architectures.md.
"""

from __future__ import annotations

import copy
import random
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trady.core.files import write_json, write_text
from trady.engine import EngineConfig, SparseEngine
from trady.experiments.bench.engine_bench import environment
from trady.memory.kept_bytes import measure_saved_bytes
from trady.models.constructed import SMALL, ConvNeXtBlock, MBConv, calibrate_batchnorm, layer_weight, stock_freeze

HERE = Path(__file__).resolve().parent
COMMAND = "PYTHONPATH=src python benchmarks/architectures/run.py"
RESOLUTION = {"efficientnet_b0_like": 96, "mobilenet_v3_like": 96, "convnext_like": 64, "vit_like": 32}
TARGET = {"efficientnet_b0_like": 10.0, "mobilenet_v3_like": 10.0, "convnext_like": 4.0, "vit_like": 4.0}
CONFIGS = {
    "exact": EngineConfig(activation_bits=None, kept_precision="fp32"),
    "1 bit": EngineConfig(activation_bits=1),
    "2 bits": EngineConfig(activation_bits=2),
    "3 bits": EngineConfig(activation_bits=3),
    "4 bits (default)": EngineConfig(),
    "4 bits, fp32 kept": EngineConfig(activation_bits=4, kept_precision="fp32"),
    "4 bits, blocks recomputed": EngineConfig(recompute=("<blocks>",)),  # every block (see blocks_of)
}
BLOCKS = (MBConv, ConvNeXtBlock, nn.TransformerEncoderLayer)


def blocks_of(model: nn.Module) -> tuple[str, ...]:
    return tuple(n for n, m in model.named_modules() if isinstance(m, BLOCKS))
SEEDS = (0, 1, 2)
BATCH = 4



def selection_of(engine: SparseEngine, seed: int) -> dict[str, list[int]]:
    rng = random.Random(seed)
    names = engine.costs.names
    sizes = {n: engine.costs.by_name[n].in_channels for n in rng.sample(names[len(names) // 3 :], 6)}
    return {n: sorted(rng.sample(range(c), max(1, c // 8))) for n, c in sizes.items()}


def measure(name: str, config: EngineConfig, seed: int) -> dict:
    res = RESOLUTION[name]
    torch.manual_seed(0)
    model = calibrate_batchnorm(SMALL[name][0](), res)
    x = torch.randn(BATCH, 3, res, res, generator=torch.Generator().manual_seed(1 + seed))
    w = torch.randn(BATCH, 10, generator=torch.Generator().manual_seed(2))
    dense, stock = copy.deepcopy(model), copy.deepcopy(model)
    for p in dense.parameters():
        p.requires_grad_(True)
    (dense(x) * w).sum().backward()
    if config.recompute == ("<blocks>",):
        config = EngineConfig(**{**vars(config), "recompute": blocks_of(model)})
    engine = SparseEngine(model, x, config)
    selection = engine.select(selection_of(engine, seed))
    saved, budget = engine.measure_saved(lambda: (model(x) * w).sum())
    saved.loss.backward()
    cos = []
    for n, idx in selection.items():
        module = dense.get_submodule(n)
        g = layer_weight(module).grad
        expected = g[:, idx] if getattr(module, "groups", 1) == 1 else g[idx]
        got = engine.layers[n].trady.w_slice.grad
        cos.append(float(F.cosine_similarity(got.flatten(), expected.flatten(), dim=0)))
    stock_freeze(stock, selection)
    stock_bytes = measure_saved_bytes(stock, lambda: (stock(x) * w).sum()).total
    return {"engine_saved_bytes": saved.total, "engine_budgeted_bytes": budget, "stock_freeze_saved_bytes": stock_bytes,
            "cosine": cos}  # fmt: skip


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for name in SMALL:
        for label, config in CONFIGS.items():
            runs = [measure(name, config, s) for s in SEEDS]
            cos = [c for r in runs for c in r["cosine"]]
            ratios = [r["stock_freeze_saved_bytes"] / r["engine_saved_bytes"] for r in runs]
            rows.append({
                "model": name, "resolution": RESOLUTION[name], "config": label,
                "activation_bits": config.activation_bits, "kept_precision": config.kept_precision,
                "recompute": "every block" if config.recompute else "none",
                "engine_saved_bytes": [r["engine_saved_bytes"] for r in runs],
                "engine_budgeted_bytes": [r["engine_budgeted_bytes"] for r in runs],
                "stock_freeze_saved_bytes": [r["stock_freeze_saved_bytes"] for r in runs],
                "ratio_min": min(ratios), "cosine_min": min(cos), "cosine_median": statistics.median(cos),
                "target_ratio": TARGET[name],
            })  # fmt: skip
            sys.stderr.write(f"{name} {label}: ratio {min(ratios):.1f}x, cosine min {min(cos):.4f}\n")
    # The default: the fewest bits whose min cosine is >= 0.99 on every model.
    ok = {b: all(r["cosine_min"] >= 0.99 for r in rows if r["activation_bits"] == b and r["kept_precision"] == "int8"
                 and r["recompute"] == "none") for b in (1, 2, 3, 4)}  # fmt: skip
    chosen = min((b for b, good in ok.items() if good), default=None)
    env = environment(1)
    write_json(HERE / "results" / "architectures.json",
               {"command": COMMAND, "environment": env, "batch": BATCH, "seeds": list(SEEDS), "rows": rows,
                "fewest_bits_with_cosine_0.99": chosen})  # fmt: skip
    lines = [
        f"Bytes kept for backward, engine vs stock requires_grad freezing of the same selection (min over seeds "
        f"{list(SEEDS)}), and selected-slice gradient cosine to dense autograd (min / median over 6 layers x 3 "
        f"seeds). Batch {BATCH}. `{COMMAND}` ({env['date']}, torch {env['torch']}).",
        "",
        "| model (input) | config | engine KiB | stock freeze KiB | fewer bytes | target | cosine min / median |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} ({r['resolution']}px) | {r['config']} | {min(r['engine_saved_bytes']) / 1024:.0f} | "
            f"{min(r['stock_freeze_saved_bytes']) / 1024:.0f} | {r['ratio_min']:.1f}x | {r['target_ratio']:.0f}x | "
            f"{r['cosine_min']:.4f} / {r['cosine_median']:.4f} |"
        )
    lines += ["", f"Fewest activation bits with cosine >= 0.99 on every model: {chosen} (EngineConfig's default)."]
    write_text(HERE / "results" / "architectures.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
