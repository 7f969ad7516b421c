"""Error of the 8-bit kept tensors (kept_precision="int8") against stock autograd, and the bytes kept.

    PYTHONPATH=src python benchmarks/architectures/kept.py

Relative error ||g - g_stock|| / ||g_stock|| of the input gradients, for: squeeze-excitation x * gate
(x = SiLU of N(0, 1), [8, 64, 14, 14], gate = Sigmoid of N(0, 1), [8, 64, 1, 1]); LayerNorm over 192
features of N(2, 3^2) tokens [8, 65, 192]; attention q, k, v ~ N(0, 1) [8, 3, 65, 64]. Five seeds, the
maximum reported. Bytes: everything saved for backward (saved-tensor hooks, each storage once).
Writes results/kept.json and results/kept.md.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from trady.core.files import write_json, write_text
from trady.engine import kept_tensors
from trady.experiments.bench.engine_bench import environment

HERE = Path(__file__).resolve().parent
COMMAND = "PYTHONPATH=src python benchmarks/architectures/kept.py"


def grads_and_bytes(fn, inputs, seed):
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*leaves)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(100 + seed)))
    return [t.grad for t in leaves], sum(seen.values())


def cases(seed):
    g = torch.Generator().manual_seed(seed)
    x = F.silu(torch.randn(8, 64, 14, 14, generator=g))
    gate = torch.sigmoid(torch.randn(8, 64, 1, 1, generator=g))
    tokens = 2 + 3 * torch.randn(8, 65, 192, generator=g)
    w, b = 1 + 0.1 * torch.randn(192, generator=g), 0.1 * torch.randn(192, generator=g)
    q, k, v = (torch.randn(8, 3, 65, 64, generator=g) for _ in range(3))
    return {
        "squeeze-excitation x * gate": ((x, gate), torch.mul, lambda m: lambda a, c: kept_tensors.gate_mul(a, c, m)),
        "LayerNorm": ((tokens,), lambda t: F.layer_norm(t, (192,), w, b),
                      lambda m: lambda t: kept_tensors.layer_norm(t, (192,), w, b, 1e-5, m)),
        "attention (q, k, v)": ((q, k, v), F.scaled_dot_product_attention,
                                lambda m: lambda a, c, d: kept_tensors.attention(a, c, d, mode=m)),
    }  # fmt: skip


def main() -> None:
    torch.set_num_threads(1)
    rows = {}
    for seed in range(5):
        for name, (inputs, stock, ours) in cases(seed).items():
            ref, stock_bytes = grads_and_bytes(stock, inputs, seed)
            row = rows.setdefault(name, {"stock_bytes": stock_bytes})
            for mode in ("int8", "fp32"):
                got, nbytes = grads_and_bytes(ours(mode), inputs, seed)
                errs = [float((a - r).norm() / r.norm()) for a, r in zip(got, ref)]
                row[f"{mode}_bytes"] = nbytes
                row[f"{mode}_max_rel_error"] = max(row.get(f"{mode}_max_rel_error", 0.0), max(errs))
    env = environment(1)
    write_json(HERE / "results" / "kept.json", {"command": COMMAND, "environment": env, "rows": rows})
    lines = [
        f"Input-gradient relative error (max over 5 seeds and inputs) and bytes kept for backward. `{COMMAND}` "
        f"({env['date']}, torch {env['torch']}).",
        "",
        "| op | stock KiB | fp32 kept: KiB, error | int8 kept: KiB, error |",
        "|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['stock_bytes'] / 1024:.0f} | {r['fp32_bytes'] / 1024:.0f}, {r['fp32_max_rel_error']:.1e} | "
            f"{r['int8_bytes'] / 1024:.0f}, {r['int8_max_rel_error']:.1e} |"
        )
    write_text(HERE / "results" / "kept.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
