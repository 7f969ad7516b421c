"""Engine benchmark: what a training step really keeps and costs, engine vs. stock PyTorch.

One run measures five variants of a training step on deep copies of the same model, alternating:
- full:        stock model, eval mode (frozen BatchNorm), every weight trained (dense backward);
- simulation:  what the paper's code does: every parameter requires grad, dense backward, then each
               partially selected weight's gradient is multiplied by a 0/1 input-channel mask and the
               gradients of fully frozen tensors are zeroed, then the SGD step;
- engine:      the SparseEngine-prepared copy, updating only the selection (plus the classifier);
- freeze:      stock freezing: stock autograd, requires_grad=False except the selected layers' whole
               weights and the classifier (what a user would do without trady);
- forward:     forward + loss of the stock model under torch.no_grad (the floor).
A step of (full, simulation, engine) is forward + cross-entropy + backward + SGD step (no momentum).

The variants are built by trady.experiments.bench.variants (one builder each) and listed in BENCH_VARIANTS with their
own measurement. Memory: bytes kept between forward and backward (`trady.memory.kept_bytes.measure_saved_bytes`,
each storage once, parameters and buffers excluded), the engine's budgeted part from
`SparseEngine.measure_step` beside the analytic one, gradient bytes of each variant, and on CUDA
the `torch.cuda.max_memory_allocated` delta of a step. Time: warm-up, then the variants run
round-robin for `rounds` rounds; the median per variant.

The selection is TraDy's: input channels drawn uniformly at random from the model's top layers (the
shipped ranking profile's top-K, else the top fraction by execution order), each one added while its space
cost still fits the budget (a channel that does not fit is skipped).

Result keys (bytes, seconds): full_saved_bytes, simulation_saved_bytes, engine_saved_bytes,
engine_budgeted_bytes (measured: kept slices + slice gradients), analytic_budgeted_bytes (costs.py),
full_step_s, simulation_step_s, engine_step_s, freeze_step_s, forward_step_s (medians of wall time);
floor_forwards (plan's step-time floor in forwards, trady.train.prediction.time_floor); *_step_cpu_s
(medians of process CPU time), engine_forward_step_s (the engine-prepared model's no-grad forward, for
reference), *_grad_bytes, engine_rest_saved_bytes, cuda_peak_delta_bytes (CUDA only), ratios, targets,
setup, step_samples_s, selection; run_engine_bench adds model, config and environment.
"""

from __future__ import annotations

import copy
import datetime as _dt
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trady.core.errors import TradyError, unknown_name
from trady.core.formatting import mib
from trady.engine.costs import CostTable, Selection, analyze, parse_budget
from trady.experiments.bench.layer_draw import (  # noqa: F401 (re-exported)
    LAYER_CHOICES,
    candidate_layers,
    random_selection,
    top_layers,
)
from trady.experiments.bench.variants import StepInputs, StepVariant, simulation_masks  # noqa: F401 (bench.simulation_masks)
from trady.experiments.bench.variants import build as build_variant
from trady.memory.kept_bytes import measure_saved_bytes
from trady.memory.resident_peak import PeakMeter
from trady.train.prediction import time_floor

VARIANTS = ("full", "simulation", "engine", "freeze", "forward")



@dataclass
class StepBenchConfig:
    """The step both benches measure (`trady bench engine` and `trady bench memory`): model, input,
    selection and the step's settings."""

    model: str = "mcunet-in1"
    resolution: int = 128
    batch_size: int = 32
    budget: str = "2.2%"
    layers: str = "auto"  # auto: the shipped profile's top-K if any, else top-fraction
    threads: int | None = None  # None: os.cpu_count()
    device: str = "cpu"
    seed: int = 0
    lr: float = 1e-4
    num_classes: int = 10
    pretrained: bool = True
    mask_bits: int = 1
    # CPU: flush denormals to zero during the run. Freed gradient buffers full of denormals get reused
    # uninitialised (e.g. as padded lanes of blocked conv layouts), and arithmetic on denormals is
    # ~100x slower: without this, a full fine-tuning step slows every later variant down 3-6x.
    flush_denormal: bool = True

    def validate(self) -> None:
        if self.layers not in LAYER_CHOICES:
            raise unknown_name("layer choice", self.layers, LAYER_CHOICES)
        for name in ("resolution", "batch_size"):
            if getattr(self, name) < 1:
                raise TradyError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise TradyError(f"threads must be >= 1, got {self.threads}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise TradyError(f"device {self.device!r} not supported; accepted: cpu, cuda, cuda:N")


@dataclass
class EngineBenchConfig(StepBenchConfig):
    top_fraction: float = 0.5  # share of the layers (execution order, closest to the classifier)
    rounds: int = 7
    warmup: int = 2

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.top_fraction <= 1.0:
            raise TradyError(f"top_fraction must be in (0, 1], got {self.top_fraction}")
        if self.rounds < 1:
            raise TradyError(f"rounds must be >= 1, got {self.rounds}")
        if self.warmup < 0:
            raise TradyError(f"warmup must be >= 0, got {self.warmup}")


# ---------------------------------------------------------------------------------------------
# The variants: how each is built (trady.experiments.bench.variants) and what one measured step reports
# ---------------------------------------------------------------------------------------------


def _grad_bytes(params: Sequence[torch.Tensor]) -> int:
    return sum(p.grad.nbytes for p in params if p.grad is not None)


def _measure_stock(v: StepVariant, inp: StepInputs) -> dict:
    """Bytes kept for backward (saved-tensor hooks) and gradient bytes of one real step."""
    v.clear()
    saved = measure_saved_bytes(v.model, lambda: F.cross_entropy(v.model(inp.x), inp.y))
    saved.loss.backward()
    out = {"saved_bytes": saved.total, "grad_bytes": _grad_bytes(v.params)}
    v.optimizer.step()
    return out


def _measure_engine(v: StepVariant, inp: StepInputs) -> dict:
    v.clear()
    report = v.engine.measure_step(inp.x, inp.y, optimizer=v.optimizer)
    return {
        "saved_bytes": report.saved_bytes,
        "grad_bytes": report.budgeted_grad_bytes + report.other_grad_bytes,
        "budgeted_bytes": report.budgeted_bytes,
        "analytic_budgeted_bytes": report.analytic_budgeted_bytes,
        "budgeted_activation_bytes": report.budgeted_activation_bytes,
        "budgeted_grad_bytes": report.budgeted_grad_bytes,
        "rest_saved_bytes": report.rest_saved_bytes,
        "saved_by_dtype": dict(report.saved_by_kind),
    }


def _engine_forward(engine_variant: StepVariant, inp: StepInputs) -> StepVariant:
    """Extra, for transparency: the engine-prepared model's own no-grad forward."""
    m = engine_variant.model

    def step() -> None:
        with torch.no_grad():
            F.cross_entropy(m(inp.x), inp.y)

    return StepVariant("engine_forward", m, step, lambda: None)


@dataclass
class BenchVariant:
    key: str  # prefix of its result keys
    builds: str  # the trady.experiments.bench.variants builder
    measure: Callable[[StepVariant, StepInputs], dict] | None  # memory of one measured step


BENCH_VARIANTS = (
    BenchVariant("full", "full", _measure_stock),
    BenchVariant("simulation", "simulation", _measure_stock),
    BenchVariant("engine", "engine", _measure_engine),
    BenchVariant("freeze", "freeze", _measure_stock),
    BenchVariant("forward", "inference", None),
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cuda_peak_delta(device: torch.device, v: StepVariant) -> int:
    """Peak bytes allocated during a step above what was allocated before it (gradients cleared first)."""
    v.clear()
    meter = PeakMeter(device)
    with meter:
        v.step()
    return int(meter.peak_bytes)


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _time_round_robin(variants: dict[str, StepVariant], rounds: int, warmup: int, device) -> tuple[dict, dict]:
    """Warm-up, then round-robin rounds (the first variant of a round rotates): wall and CPU samples."""
    names = list(variants)
    for _ in range(warmup):
        for n in names:
            variants[n].step()
    _sync(device)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            variants[n].step()
            _sync(device)
            wall[n].append(time.perf_counter() - t0)
            cpu[n].append(time.process_time() - c0)
    return wall, cpu


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


def bench_engine(
    model: nn.Module,
    *,
    resolution: int = 128,
    batch_size: int = 32,
    budget: str | int = "2.2%",
    layers: str = "auto",
    top_fraction: float = 0.5,
    model_name: str | None = None,
    selection: Selection | None = None,
    rounds: int = 7,
    warmup: int = 2,
    device: str | torch.device = "cpu",
    seed: int = 0,
    lr: float = 1e-4,
    mask_bits: int = 1,
    in_channels: int = 3,
) -> dict:
    """Measure full fine-tuning, the simulation, the engine and forward-only on copies of `model`.

    `model` is left untouched (every variant runs on its own deep copy). `selection` overrides the
    random one. Returns a JSON-ready dict (keys: see the module docstring).
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TradyError("device 'cuda' requested but torch.cuda.is_available() is False; accepted here: cpu")
    gen = torch.Generator().manual_seed(seed)
    base = copy.deepcopy(model).to(device).eval()
    x = torch.randn(batch_size, in_channels, resolution, resolution, generator=gen).to(device)
    costs = analyze(base, example_input=x[:1])
    with torch.no_grad():
        n_classes = int(base(x[:1]).shape[-1])
    y = torch.randint(0, n_classes, (batch_size,), generator=gen).to(device)

    budget_units = parse_budget(budget, costs)
    if selection is None:
        names, layer_source = candidate_layers(costs, layers, model_name, top_fraction)
        selection = random_selection(costs, names, budget_units, gen)
    else:
        names, layer_source = sorted(selection), "given selection"
    selection = costs.check_selection(selection)
    selection = {n: i.to(device) for n, i in selection.items()}

    inp = StepInputs(base, costs, selection, x, y, lr, mask_bits)
    built = {bv.key: build_variant(bv.builds, inp) for bv in BENCH_VARIANTS}
    built["engine_forward"] = _engine_forward(built["engine"], inp)
    mem = {bv.key: bv.measure(built[bv.key], inp) for bv in BENCH_VARIANTS if bv.measure is not None}
    cuda_peak = None
    if device.type == "cuda":
        cuda_peak = {bv.key: _cuda_peak_delta(device, built[bv.key]) for bv in BENCH_VARIANTS}
    samples, cpu_samples = _time_round_robin(built, rounds, warmup, device)
    med = {v: _median(samples[v]) for v in built}
    built["engine"].engine.sync()

    eng = mem["engine"]
    result = {
        "full_saved_bytes": mem["full"]["saved_bytes"],
        "simulation_saved_bytes": mem["simulation"]["saved_bytes"],
        "freeze_saved_bytes": mem["freeze"]["saved_bytes"],
        "engine_saved_bytes": eng["saved_bytes"],
        "engine_budgeted_bytes": eng["budgeted_bytes"],
        "analytic_budgeted_bytes": eng["analytic_budgeted_bytes"],
        **{f"{v}_step_s": med[v] for v in VARIANTS},
        **{f"{v}_step_cpu_s": _median(cpu_samples[v]) for v in VARIANTS},
        "engine_forward_step_s": med["engine_forward"],
        "engine_forward_step_cpu_s": _median(cpu_samples["engine_forward"]),
        **{f"{v}_grad_bytes": mem[v]["grad_bytes"] for v in ("full", "simulation", "engine", "freeze")},
        # plan's step-time floor (trady.train.prediction.time_floor): 1 + the forward MAC share at and
        # above the lowest selected layer, in forwards
        "floor_forwards": time_floor(costs, _lowest(costs, selection))[1],
        "engine_budgeted_activation_bytes": eng["budgeted_activation_bytes"],
        "engine_budgeted_grad_bytes": eng["budgeted_grad_bytes"],
        "engine_rest_saved_bytes": eng["rest_saved_bytes"],
        "engine_saved_by_dtype": eng["saved_by_dtype"],
        "cuda_peak_delta_bytes": cuda_peak,
    }
    result["ratios"] = engine_ratios(result)
    sparsity = costs.sparsity(selection)
    result["setup"] = {
        "resolution": resolution,
        "batch_size": batch_size,
        "budget": str(budget),
        "budget_units": budget_units,
        "full_units": costs.full_units,
        "selected_units": costs.selection_units(selection),
        "selected_channels": int(sum(len(i) for i in selection.values())),
        "selected_layers": len(selection),
        "lowest_selected_layer": next(iter(selection), None),
        "layer_source": layer_source,
        "candidate_layers": len(names),
        "total_layers": len(costs.layers),
        "classifier": costs.classifier,
        "rounds": rounds,
        "warmup": warmup,
        "device": str(device),
        "seed": seed,
        "lr": lr,
        "mask_bits": mask_bits,
        **sparsity,
    }
    result["step_samples_s"] = samples
    result["step_cpu_samples_s"] = cpu_samples
    result["selection"] = {n: i.tolist() for n, i in selection.items()}
    return result


def _lowest(costs: CostTable, selection: Selection) -> str | None:
    order = {n: i for i, n in enumerate(costs.names)}
    return min(selection, key=lambda n: order.get(n, len(order)), default=None)


def engine_ratios(r: dict) -> dict[str, float]:
    def div(a, b):
        return float(a) / float(b) if b else float("inf")

    more = {}
    if "freeze_step_s" in r:
        more["engine_over_freeze_step"] = div(r["engine_step_s"], r["freeze_step_s"])
    if "floor_forwards" in r:
        more["engine_over_floor_step"] = div(r["engine_step_s"], r["forward_step_s"] * r["floor_forwards"])
    return {
        **more,
        "full_over_engine_saved_bytes": div(r["full_saved_bytes"], r["engine_saved_bytes"]),
        "simulation_over_engine_saved_bytes": div(r["simulation_saved_bytes"], r["engine_saved_bytes"]),
        "engine_over_simulation_step": div(r["engine_step_s"], r["simulation_step_s"]),
        "engine_over_forward_step": div(r["engine_step_s"], r["forward_step_s"]),
        "engine_over_full_step": div(r["engine_step_s"], r["full_step_s"]),
        "engine_over_engine_forward_step": div(r["engine_step_s"], r["engine_forward_step_s"]),
        "engine_over_forward_step_cpu": div(r["engine_step_cpu_s"], r["forward_step_cpu_s"]),
        "engine_over_simulation_step_cpu": div(r["engine_step_cpu_s"], r["simulation_step_cpu_s"]),
        "full_over_forward_step": div(r["full_step_s"], r["forward_step_s"]),
        "simulation_over_forward_step": div(r["simulation_step_s"], r["forward_step_s"]),
    }


# ---------------------------------------------------------------------------------------------
# Entry point by model name, environment, table
# ---------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(threads: int, device: torch.device | str = "cpu") -> dict:
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": threads,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def run_engine_bench(config: EngineBenchConfig, model: nn.Module | None = None) -> dict:
    """Build the zoo model `config.model` (unless `model` is given), set threads, run bench_engine."""
    config.validate()
    threads = config.threads or os.cpu_count() or 1
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    if model is None:
        from trady import models

        model = models.create(config.model, pretrained=config.pretrained, num_classes=config.num_classes)
    flushing = config.flush_denormal and torch.set_flush_denormal(True)
    try:
        result = bench_engine(
            model,
            resolution=config.resolution,
            batch_size=config.batch_size,
            budget=config.budget,
            layers=config.layers,
            top_fraction=config.top_fraction,
            model_name=config.model,
            rounds=config.rounds,
            warmup=config.warmup,
            device=config.device,
            seed=config.seed,
            lr=config.lr,
            mask_bits=config.mask_bits,
        )
    finally:
        if flushing:
            torch.set_flush_denormal(False)
        torch.set_num_threads(previous_threads)
    result["model"] = config.model
    result["config"] = asdict(config)
    result["environment"] = environment(threads, config.device)
    result["environment"]["flush_denormal"] = bool(flushing)
    return result


def format_engine_bench(r: dict) -> str:
    """A human-readable table of one benchmark result."""
    s = r["setup"]
    lines = [
        f"engine benchmark: {r.get('model', 'model')} @ {s['resolution']} px, batch {s['batch_size']}, "
        f"budget {s['budget']} = {s['budget_units']} units ({s['selected_units']} used), "
        f"{s['selected_channels']} channels in {s['selected_layers']} layers from {s['layer_source']}",
        "",
        f"{'variant':<16}{'kept for backward':>20}{'gradients':>14}{'step (median)':>16}{'x forward':>11}"
        f"{'CPU time':>13}{'x forward':>11}",
    ]
    fwd, fwd_cpu = r["forward_step_s"], r.get("forward_step_cpu_s")
    for v in (*VARIANTS, "engine_forward"):
        saved = r.get(f"{v}_saved_bytes")
        grad = r.get(f"{v}_grad_bytes")
        t, c = r[f"{v}_step_s"], r.get(f"{v}_step_cpu_s")
        cpu = f"{c * 1e3:>10.1f} ms{c / fwd_cpu:>10.2f}x" if c is not None and fwd_cpu else f"{'-':>13}{'-':>11}"
        lines.append(
            f"{v:<16}{mib(saved) if saved is not None else '-':>20}{mib(grad) if grad is not None else '-':>14}"
            f"{t * 1e3:>13.1f} ms{t / fwd if fwd else float('nan'):>10.2f}x{cpu}"
        )
    lines += [
        "",
        f"engine budgeted bytes: measured {r['engine_budgeted_bytes']} / analytic {r['analytic_budgeted_bytes']}"
        f"  (rest kept: {mib(r['engine_rest_saved_bytes'])})",
    ]
    if r.get("cuda_peak_delta_bytes"):
        peaks = ", ".join(f"{v} {mib(b)}" for v, b in r["cuda_peak_delta_bytes"].items())
        lines.append(f"measured step peak (CUDA, allocated above the start): {peaks}")
    lines.append("")
    if "floor_forwards" in r:
        lines.append(f"plan's step-time floor: {r['floor_forwards']:.2f}x forward (trady.train.prediction.time_floor)")
    shown = {"full_over_engine_saved_bytes": "kept for backward, full / engine",
             "engine_over_simulation_step": "step time, engine / simulation",
             "engine_over_forward_step": "step time, engine / forward",
             "engine_over_freeze_step": "step time, engine / stock freeze",
             "engine_over_floor_step": "step time, engine / plan's floor"}  # fmt: skip
    for key, label in ((k, v) for k, v in shown.items() if k in r["ratios"]):
        lines.append(f"{label:<34}{r['ratios'][key]:>9.2f}")
    return "\n".join(lines)
