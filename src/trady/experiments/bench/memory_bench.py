"""`trady bench memory`: the measured peak of a training step, engine vs. stock PyTorch vs. inference.

Each variant of trady.experiments.bench.variants (inference, engine, freeze, full) runs in its own fresh Python process,
`repeats` times; a process builds the model, the input batch and the variant, runs `warmup` steps,
drops the gradients, then measures `steps` steps with trady.memory.resident_peak.PeakMeter:
- CPU: the resident high-water mark (VmHWM, reset through /proc/self/clear_refs) minus the resident
  size when model, input and variant are ready. It includes the activations, everything kept for
  backward, backward temporaries, gradients, kernel workspaces, and what the C allocator holds back.
  The child processes start with trady.memory.resident_peak.ALLOCATOR_ENV (a fixed glibc mmap threshold) so that
  the resident size follows the live tensors; `allocator_control=False` runs them with glibc's
  defaults (for comparing the spread).
- CUDA: torch.cuda.max_memory_allocated minus memory_allocated at the start.
The report gives, per variant, the median over processes and the range. Keys (bytes):
inference_peak_bytes, engine_peak_bytes, freeze_peak_bytes, full_peak_bytes (medians),
engine_saved_bytes (kept for backward, one forward), predicted_engine_peak_bytes (trady.train.prediction),
plus <variant>_peak_samples, <variant>_step_s (median step time inside its process), setup, ratios.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from trady.config import check_micro_batch
from trady.core.errors import TradyError
from trady.core.formatting import fmt_bytes, mib
from trady.experiments.bench.engine_bench import StepBenchConfig

MEMORY_VARIANTS = ("inference", "engine", "freeze", "full")

@dataclass
class MemoryBenchConfig(StepBenchConfig):
    """bench.StepBenchConfig's step (other defaults: mobilenet_v2, one thread) measured in fresh processes."""

    model: str = "mobilenet_v2"
    threads: int | None = 1
    micro_batch_size: int | None = None
    repeats: int = 3  # fresh processes per variant
    steps: int = 3  # measured steps per process
    warmup: int = 1
    allocator_control: bool = True
    variants: tuple[str, ...] = MEMORY_VARIANTS
    # Each measuring process forked from one that imported torch once (and never ran a step) instead of
    # a new interpreter each: the same untouched start, without an import of torch per process.
    fork: bool = False

    def validate(self) -> None:
        super().validate()
        if self.threads is None:
            raise TradyError("threads must be >= 1 (each fresh process runs that many), got None")
        for name in ("repeats", "steps"):
            if getattr(self, name) < 1:
                raise TradyError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_micro_batch(self.micro_batch_size)
        for v in self.variants:
            if v not in MEMORY_VARIANTS:
                raise TradyError(f"unknown variant {v!r}; accepted: {', '.join(MEMORY_VARIANTS)}")


# ---------------------------------------------------------------------------------------------
# Inside one child process
# ---------------------------------------------------------------------------------------------


def step_inputs(config: MemoryBenchConfig, mcu_dir: str | None = None):
    """The model, batch and selection every variant works on (the same in every process: seeded)."""
    from trady import models
    from trady.engine.costs import analyze, parse_budget
    from trady.experiments.bench.engine_bench import candidate_layers, random_selection
    from trady.experiments.bench.variants import StepInputs
    from trady.models import entry
    from trady.selection import ranking, strategies

    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    if entry.is_entry_point(config.model):  # the user's builder, run in this (child) process
        model = entry.build(config.model, num_classes=config.num_classes)
    else:
        model = models.create(config.model, pretrained=config.pretrained, num_classes=config.num_classes,
                              mcu_dir=mcu_dir)  # fmt: skip
    model = model.to(device).eval()
    gen = torch.Generator().manual_seed(config.seed)
    res, b = config.resolution, config.batch_size
    x = torch.randn(b, 3, res, res, generator=gen).to(device)
    y = torch.randint(0, config.num_classes, (b,), generator=gen).to(device)
    costs = analyze(model, example_input=x[:1])
    names, source = candidate_layers(costs, config.layers, config.model)
    if config.layers == "auto" and source.startswith("profile"):  # the draw `trady plan` predicts (the registry's)
        profile = ranking.load_profile(config.model)
        selection, _ = strategies.draw_once(costs, config.budget, profile=profile, model=model, seed=config.seed)
    else:
        selection = random_selection(costs, names, parse_budget(config.budget, costs), gen)
    selection = {n: i.to(device) for n, i in selection.items()}
    inp = StepInputs(model, costs, selection, x, y, config.lr, config.mask_bits, config.micro_batch_size)
    return inp, source


def measure_variant(config: MemoryBenchConfig, variant: str) -> dict:
    """Build one variant and measure the peak of its steps (run this in a fresh process)."""
    import gc

    from trady.experiments.bench.variants import build
    from trady.memory.resident_peak import PeakMeter, allocator_env_active

    torch.set_num_threads(config.threads)
    torch.set_flush_denormal(config.flush_denormal)
    inp, source = step_inputs(config)
    v = build(variant, inp)
    for _ in range(config.warmup):
        v.step()
    v.clear()
    gc.collect()
    meter = PeakMeter(config.device)
    times, peaks = [], []
    for _ in range(config.steps):
        v.clear()
        meter.start()
        t0 = time.perf_counter()
        v.step()
        times.append(time.perf_counter() - t0)
        peaks.append(meter.stop())
    out = {
        "variant": variant,
        "peak_bytes": max(peaks) if peaks and peaks[0] is not None else None,
        "step_s": statistics.median(times),
        "allocator_env": allocator_env_active(),
        "layer_source": source,
    }
    if variant == "engine":
        v.clear()
        b = config.micro_batch_size or config.batch_size
        report = v.engine.measure_step(inp.x[:b], inp.y[:b])
        out["saved_bytes"] = report.saved_bytes
        out["budgeted_bytes"] = report.budgeted_bytes
        out["analytic_budgeted_bytes"] = report.analytic_budgeted_bytes
        out["selected_channels"] = int(sum(len(i) for i in inp.selection.values()))
        out["selected_layers"] = len(inp.selection)
    return out


def time_micro_batches(config: MemoryBenchConfig, rounds: int = 5) -> dict:
    """Engine step time, whole batch vs. micro-batches, side by side in this process (alternating rounds)."""
    from dataclasses import replace

    from trady.experiments.bench.variants import build

    torch.set_num_threads(config.threads)
    torch.set_flush_denormal(config.flush_denormal)
    whole_cfg = replace(config, micro_batch_size=None)
    inp, _ = step_inputs(whole_cfg)
    whole = build("engine", inp)
    inp.micro_batch_size = config.micro_batch_size
    micro = build("engine", inp)
    times: dict[str, list[float]] = {"whole": [], "micro": []}
    for v in (whole, micro):
        v.step()  # warm-up
    for r in range(rounds):
        order = [("whole", whole), ("micro", micro)]
        for name, v in order if r % 2 == 0 else order[::-1]:
            v.clear()
            t0 = time.perf_counter()
            v.step()
            times[name].append(time.perf_counter() - t0)
    w, m = statistics.median(times["whole"]), statistics.median(times["micro"])
    return {"whole_batch_step_s": w, "micro_batch_step_s": m, "micro_over_whole_step": m / w, "rounds": rounds,
            "micro_batch_size": config.micro_batch_size, "batch_size": config.batch_size}  # fmt: skip


def _config_from(data: dict) -> MemoryBenchConfig:
    return MemoryBenchConfig(**{**data, "variants": tuple(data["variants"])})


def _child_main(argv: list[str]) -> int:
    if argv and argv[0] == "--zygote":
        return _zygote_main()
    print(json.dumps(measure_variant(_config_from(json.loads(argv[0])), argv[1])))
    return 0


def _zygote_main() -> int:
    """A process that has imported torch and trady but never run a step; for each request line on stdin
    ({"config", "variant"}) it forks a child that measures the variant and sends back one JSON line. Each
    child starts from the same untouched state (no allocator history of earlier steps), as a fresh
    process would, without paying for importing torch again."""
    import torch._dynamo  # noqa: F401 - the first optimizer imports it (seconds): once here, not per child

    from trady import engine, models  # noqa: F401 - loaded once, before the forks
    from trady.experiments.bench import engine_bench, variants  # noqa: F401
    from trady.memory import resident_peak  # noqa: F401
    from trady.selection import ranking, strategies  # noqa: F401

    for line in sys.stdin:
        request = json.loads(line)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: measure, write the result, leave without running the zygote's cleanup
            os.close(read_end)
            try:
                out = {"ok": measure_variant(_config_from(request["config"]), request["variant"])}
            except BaseException as err:  # noqa: BLE001 - reported to the parent as one line
                out = {"error": f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"}
            with os.fdopen(write_end, "w") as fh:
                fh.write(json.dumps(out))
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end) as fh:
            text = fh.read()
        _, status = os.waitpid(pid, 0)
        print(text or json.dumps({"error": f"the measuring process died (wait status {status})"}), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# The parent: fresh processes, medians, prediction
# ---------------------------------------------------------------------------------------------


def _src_root() -> str:
    return str(Path(__file__).resolve().parents[3])  # src/, above trady/experiments/bench/


def _child_env(config: MemoryBenchConfig) -> dict:
    from trady.memory.resident_peak import ALLOCATOR_ENV

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if config.allocator_control:
        env.update(ALLOCATOR_ENV)
    env["OMP_NUM_THREADS"] = str(config.threads)
    env["PYTHONPATH"] = os.pathsep.join([_src_root()] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


class Zygote:
    """The forking parent of the quick mode's measuring processes (see _zygote_main); one per bench run,
    started with the run's allocator environment (glibc reads it when the process starts)."""

    def __init__(self, config: MemoryBenchConfig) -> None:
        cmd = [sys.executable, "-m", "trady.experiments.bench.memory_bench", "--zygote"]
        self.errors = tempfile.TemporaryFile("w+")  # a file, not a pipe: warnings can never fill it and block
        self.proc = subprocess.Popen(cmd, env=_child_env(config), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.errors, text=True)  # fmt: skip

    def measure(self, config: MemoryBenchConfig, variant: str) -> dict:
        self.proc.stdin.write(json.dumps({"config": asdict(config), "variant": variant}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.errors.seek(0)
            tail = self.errors.read().strip().splitlines()[-1:] or ["(no output)"]
            raise TradyError(f"memory bench process for {variant!r} failed: {tail[0]}")
        out = json.loads(line)
        if "error" in out:
            raise TradyError(f"memory bench child for {variant!r} failed: {out['error']}")
        return out["ok"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()
        self.proc.stdout.close()
        self.errors.close()


def run_child(config: MemoryBenchConfig, variant: str) -> dict:
    """One variant measured in a fresh interpreter."""
    env = _child_env(config)
    cmd = [sys.executable, "-m", "trady.experiments.bench.memory_bench", json.dumps(asdict(config)), variant]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise TradyError(f"memory bench child for {variant!r} failed: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _summary(values: list[int]) -> dict:
    return {"median": int(statistics.median(values)), "min": int(min(values)), "max": int(max(values))}


def bench_memory(config: MemoryBenchConfig, progress=None) -> dict:
    """Every variant `repeats` times, each in a fresh process (rounds alternate the variants)."""
    from trady.train.prediction import predict_step_peak

    config.validate()
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise TradyError(f"device {config.device!r} requested but no CUDA device is available; accepted here: cpu")
    runs: dict[str, list[dict]] = {v: [] for v in config.variants}
    zygote = Zygote(config) if config.fork else None
    try:
        for r in range(config.repeats):
            for v in config.variants:
                runs[v].append(zygote.measure(config, v) if zygote is not None else run_child(config, v))
                if progress:
                    peak = fmt_bytes(runs[v][-1]["peak_bytes"])
                    progress(f"round {r + 1}/{config.repeats} {v}: measured step peak {peak}")
    finally:
        if zygote is not None:
            zygote.close()
    result: dict = {}
    for v, rs in runs.items():
        peaks = [x["peak_bytes"] for x in rs]
        if any(p is None for p in peaks):
            raise TradyError("the peak cannot be measured here (no writable /proc/self/clear_refs); accepted: Linux")
        s = _summary(peaks)
        result[f"{v}_peak_bytes"] = s["median"]
        result[f"{v}_peak_range_bytes"] = [s["min"], s["max"]]
        result[f"{v}_peak_samples"] = peaks
        result[f"{v}_step_s"] = statistics.median(x["step_s"] for x in rs)
    if "engine" in runs:
        e = runs["engine"][0]
        result["engine_saved_bytes"] = e["saved_bytes"]
        result["engine_budgeted_bytes"] = e["budgeted_bytes"]
        result["analytic_budgeted_bytes"] = e["analytic_budgeted_bytes"]
        pred = predict_step_peak(
            config.model, config.resolution, config.budget, config.batch_size, config.micro_batch_size,
            seed=config.seed, num_classes=config.num_classes, mask_bits=config.mask_bits,
        )  # fmt: skip
        result["predicted_engine_peak_bytes"] = pred["predicted_step_peak_bytes"]
        result["prediction"] = pred
    result["ratios"] = peak_ratios(result)
    result["setup"] = {
        **asdict(config),
        "layer_source": next(iter(runs.values()))[0]["layer_source"],
        "allocator_env": next(iter(runs.values()))[0]["allocator_env"],
        "measure": "cuda max_memory_allocated delta" if config.device.startswith("cuda") else "VmHWM - VmRSS at ready",
    }
    if "engine" in runs:
        result["setup"]["selected_channels"] = runs["engine"][0]["selected_channels"]
        result["setup"]["selected_layers"] = runs["engine"][0]["selected_layers"]
    return result


def peak_ratios(r: dict) -> dict[str, float]:
    def div(a, b):
        return float(r[a]) / float(r[b]) if r.get(a) is not None and r.get(b) else None

    out = {
        "engine_over_inference_peak": div("engine_peak_bytes", "inference_peak_bytes"),
        "engine_over_freeze_peak": div("engine_peak_bytes", "freeze_peak_bytes"),
        "full_over_engine_peak": div("full_peak_bytes", "engine_peak_bytes"),
        "predicted_over_measured_engine_peak": div("predicted_engine_peak_bytes", "engine_peak_bytes"),
        "engine_over_inference_step": div("engine_step_s", "inference_step_s"),
    }
    return {k: v for k, v in out.items() if v is not None}


RATIO_LABELS = {  # the table's words for the JSON's ratio keys (docs/outputs.md)
    "engine_over_inference_peak": "measured step peak, engine / inference",
    "engine_over_freeze_peak": "measured step peak, engine / stock freeze",
    "full_over_engine_peak": "measured step peak, full / engine",
    "predicted_over_measured_engine_peak": "engine step peak, predicted / measured",
    "engine_over_inference_step": "step time, engine / inference",
}
_mib = functools.partial(mib, digits=1, unit="")  # MiB cells of the table (trady.core.formatting)


def format_memory_bench(r: dict) -> str:
    s = r["setup"]
    micro = f", micro-batches of {s['micro_batch_size']}" if s.get("micro_batch_size") else ""
    lines = [
        f"memory benchmark: {s['model']} @ {s['resolution']} px, batch {s['batch_size']}{micro}, budget {s['budget']}, "
        f"{s['repeats']} fresh processes per variant, {s['steps']} measured steps each, {s['threads']} thread(s)",
        f"measured step peak = {s['measure']}; allocator control {'on' if s['allocator_env'] else 'off'}",
        "",
        f"{'variant':<12}{'measured step peak, MiB (median)':>34}{'range':>18}{'x inference':>13}{'step (median)':>16}",
    ]
    inf = r.get("inference_peak_bytes")
    for v in MEMORY_VARIANTS:
        if f"{v}_peak_bytes" not in r:
            continue
        p, (lo, hi) = r[f"{v}_peak_bytes"], r[f"{v}_peak_range_bytes"]
        ratio = f"{p / inf:.2f}x" if inf else "-"
        lines.append(
            f"{v:<12}{_mib(p):>34}{_mib(lo) + '-' + _mib(hi):>18}{ratio:>13}{r[f'{v}_step_s'] * 1e3:>13.0f} ms"
        )
    if "engine_saved_bytes" in r:
        pred = r["prediction"]
        lines += [
            "",
            f"engine: kept for backward {_mib(r['engine_saved_bytes'])} MiB (budgeted: measured "
            f"{r['engine_budgeted_bytes']} / analytic {r['analytic_budgeted_bytes']} bytes)",
            f"predicted engine step peak {_mib(r['predicted_engine_peak_bytes'])} MiB "
            f"(inference working set {_mib(pred['inference_working_set_bytes'])} + budgeted "
            f"{_mib(pred['budgeted_bytes'])} + masks and rest {_mib(pred['kept_rest_bytes'])} + gradients "
            f"{_mib(pred['gradient_bytes'])}; backward transient {_mib(pred['backward_transient_bytes'])}) "
            f"= {r['ratios'].get('predicted_over_measured_engine_peak', float('nan')):.2f}x measured",
        ]
    lines.append("")
    for key, value in r["ratios"].items():
        lines.append(f"{RATIO_LABELS.get(key, key.replace('_', ' ')):<48}{value:>7.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
