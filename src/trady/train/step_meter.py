"""StepMeter: what the training loop measures of its steps, in one object.

Two memories, each of one step of an epoch (docs/memory.md):
- kept for backward: the epoch's first forward runs with saved-tensor hooks that count every tensor kept
  for backward (the hooks return each tensor unchanged: the step computes exactly what an unmeasured one
  does); with an engine, its budgeted part too;
- the measured step peak: the process's resident high-water mark over the epoch's second step (one-time
  set-up is done by then), through `PeakMeter`.

    meter = StepMeter(run, steps=len(loader), enabled=config.measure_memory)
    with meter:
        for i, (x, y) in enumerate(loader):
            with meter.step(i):
                logits, loss = accumulate_gradients(meter.forward_loss(i), x, y, micro_batch_size)
                ...
    row.update(meter.results())  # measured_saved_bytes, measured_budgeted_bytes, batchnorm_kept_bytes,
    # peak_memory_bytes
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from trady.engine.batchnorm import batchnorms
from trady.memory.kept_bytes import measure_saved_bytes
from trady.memory.resident_peak import PeakMeter

ForwardLoss = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class StepMeter:
    def __init__(self, run, steps: int, enabled: bool) -> None:
        self.run = run
        self.enabled = enabled
        self.peak_step = min(1, steps - 1)  # the second step: one-time set-up is done
        self._meter = PeakMeter(run.device, control_allocator=run.config.control_allocator)
        self._kept: dict[str, Any] = {}
        self._peak: int | None = None

    def __enter__(self) -> StepMeter:
        return self

    def __exit__(self, *exc) -> None:
        self._meter.close()  # a step that raised leaves no measurement settings behind

    @contextmanager
    def step(self, i: int) -> Iterator[None]:
        """Measures the step peak around step `peak_step` (forward, backward, optimizer and tuner step)."""
        measured = self.enabled and i == self.peak_step
        if measured:
            self._meter.start()
        yield
        if measured:
            self._peak = self._meter.stop()

    def forward_loss(self, i: int) -> ForwardLoss:
        """forward(x, y) -> (logits, mean loss); step 0's first call counts the bytes kept for backward."""
        model = self.run.model

        def forward(x: torch.Tensor, y: torch.Tensor):
            if self.enabled and i == 0 and not self._kept:
                return self._counted_forward(x, y)
            logits = model(x)
            return logits, F.cross_entropy(logits, y)

        return forward

    def _counted_forward(self, x: torch.Tensor, y: torch.Tensor):
        run, holder = self.run, {}

        def step():
            holder["logits"] = run.model(x)
            return F.cross_entropy(holder["logits"], y)

        if run.engine is not None:
            saved, act = run.engine.measure_saved(step)
            budgeted = act + sum(p.numel() * p.element_size() for p in run.engine.slice_parameters())
        else:
            saved, budgeted = measure_saved_bytes(run.model, step, attribute_to=batchnorms(run.model)), None
        self._kept = {"measured_saved_bytes": saved.total, "measured_budgeted_bytes": budgeted,
                      "batchnorm_kept_bytes": saved.attributed}  # fmt: skip
        return holder["logits"], saved.loss

    def results(self) -> dict[str, Any]:
        """This epoch's figures, JSON keys of metrics.jsonl: the kept bytes when counted, the peak (None unmeasured)."""
        return {**self._kept, "peak_memory_bytes": self._peak}
