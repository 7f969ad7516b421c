"""`trady bench memory --timeline FILE.png`: one engine step beside one inference forward, per block.

Both run in this process after a warm-up step, under trady.memory.timeline.profile_step (the allocator's
accounting of live bytes). The table gives, per block (the first two parts of a module name, e.g.
features.3), the highest live bytes of inference's forward, the engine's forward and the engine's
backward; the operators that allocated the most are listed for each; `above_inference` names every
segment of the engine step whose live bytes exceed inference's peak, with what it is.
"""

from __future__ import annotations

import functools

import torch

from trady.core.formatting import mib
from trady.memory.timeline import StepProfile, plot_timelines, profile_step


def _block(label: str) -> tuple[str, str]:
    phase, _, name = label.partition(" ")
    return phase, ".".join(name.split(".")[:2]) if name else label


def per_block(inference: StepProfile, engine: StepProfile) -> list[dict]:
    rows: dict[str, dict] = {}
    order: list[str] = []
    for source, prof in (("inference_forward", inference), ("engine", engine)):
        for s in prof.segments:
            phase, block = _block(s.label)
            if phase not in ("fwd", "bwd"):
                continue
            if source == "engine":
                source_key = "engine_forward" if phase == "fwd" else "engine_backward"
            else:
                source_key = source
            if block not in rows:
                rows[block] = {"block": block}
                order.append(block)
            field = f"{source_key}_peak_bytes"
            rows[block][field] = max(rows[block].get(field, 0), s.peak_bytes)
    return [rows[b] for b in order]


def timeline_for(config, png_path: str) -> dict:
    from trady.experiments.bench.memory_bench import step_inputs
    from trady.experiments.bench.variants import build

    torch.set_num_threads(config.threads)
    inp, _ = step_inputs(config)
    profiles = {}
    for name in ("inference", "engine"):
        v = build(name, inp)
        v.step()  # warm-up: lazily built kernels and caches are not part of the step
        v.clear()
        profiles[name] = profile_step(v.model, v.step)
        del v
    inf, eng = profiles["inference"], profiles["engine"]
    above = [
        {"segment": s.label, "peak_bytes": s.peak_bytes, "over_inference_bytes": s.peak_bytes - inf.peak_bytes}
        for s in eng.segments
        if s.peak_bytes > inf.peak_bytes
    ]
    micro = f", micro-batches of {config.micro_batch_size}" if config.micro_batch_size else ""
    title = (
        f"{config.model} @ {config.resolution} px, batch {config.batch_size}{micro}, budget {config.budget}: "
        "one engine step vs. one inference forward"
    )
    plot_timelines({"inference forward": inf, "engine step": eng}, png_path, title)
    return {
        "png": str(png_path),
        "inference_peak_live_bytes": inf.peak_bytes,
        "engine_peak_live_bytes": eng.peak_bytes,
        "per_block": per_block(inf, eng),
        "above_inference": above,
        "inference_top_ops": inf.top_ops,
        "engine_top_ops": eng.top_ops,
        "engine_segments": [s.__dict__ for s in eng.segments],
        "inference_segments": [s.__dict__ for s in inf.segments],
    }


_mib = functools.partial(mib, digits=1, unit="")  # MiB cells of the table (trady.core.formatting)


def format_timeline(t: dict) -> str:
    lines = [
        f"timeline (PyTorch allocator's live bytes, not resident pages): inference forward peak "
        f"{_mib(t['inference_peak_live_bytes'])} MiB, engine step peak {_mib(t['engine_peak_live_bytes'])} MiB; "
        f"plot: {t['png']}",
        "",
        f"{'block':<16}{'inference fwd':>15}{'engine fwd':>12}{'engine bwd':>12}   (highest live MiB)",
    ]
    for r in t["per_block"]:
        lines.append(
            f"{r['block']:<16}{_mib(r.get('inference_forward_peak_bytes')):>15}"
            f"{_mib(r.get('engine_forward_peak_bytes')):>12}{_mib(r.get('engine_backward_peak_bytes')):>12}"
        )
    lines.append("")
    if t["above_inference"]:
        lines.append("engine segments above the inference peak (the highest of each, over micro-batches):")
        highest: dict[str, dict] = {}
        for a in t["above_inference"]:
            if a["segment"] not in highest or a["peak_bytes"] > highest[a["segment"]]["peak_bytes"]:
                highest[a["segment"]] = a
        for a in highest.values():
            over = a["over_inference_bytes"]
            lines.append(f"  {a['segment']:<40} {_mib(a['peak_bytes'])} MiB (+{over / 2**10:.1f} KiB)")
    else:
        lines.append("no segment of the engine step holds more live bytes than the inference forward's peak")
    lines.append("")
    lines.append(
        "most allocating operators (MiB allocated over the whole step, summed over calls and nested calls, "
        "not live at once): engine | inference"
    )
    for e, i in zip(t["engine_top_ops"], t["inference_top_ops"]):
        lines.append(
            f"  {e['name']:<28}{_mib(e['allocated_bytes']):>8} ({e['calls']:>3}) | "
            f"{i['name']:<28}{_mib(i['allocated_bytes']):>8} ({i['calls']:>3})"
        )
    return "\n".join(lines)
