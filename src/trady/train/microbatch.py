"""Gradient accumulation over micro-batches: one optimizer step sees the whole batch's gradient.

With frozen BatchNorm and no dropout the samples of a batch are independent, so the gradient of the
batch's mean loss is the sum over micro-batches of (micro-batch mean loss) x (rows / batch rows): the
accumulated step equals the full-batch step to fp32 rounding, while activations (and the engine's
kept masks and slices) only ever exist for one micro-batch at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from trady.config import check_micro_batch

ForwardLoss = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def accumulate_gradients(
    forward_loss: ForwardLoss, x: torch.Tensor, y: torch.Tensor, micro_batch_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of the batch (x, y) in micro-batches of `micro_batch_size` rows.

    `forward_loss(x_part, y_part) -> (logits, mean loss over the part)`. Each part's loss is scaled
    by its share of the rows before its backward, so the gradients accumulated into `.grad` are those
    of the full batch's mean loss. None (or a size >= the batch) is one ordinary forward/backward.
    Returns (the batch's logits, detached; the batch's mean loss, detached).
    """
    check_micro_batch(micro_batch_size)
    n = int(x.shape[0])
    if micro_batch_size is None or micro_batch_size >= n:
        logits, loss = forward_loss(x, y)
        loss.backward()
        return logits.detach(), loss.detach()
    parts, total = [], None
    for start in range(0, n, micro_batch_size):
        xs, ys = x[start : start + micro_batch_size], y[start : start + micro_batch_size]
        logits, loss = forward_loss(xs, ys)
        part = loss * (xs.shape[0] / n)
        part.backward()
        parts.append(logits.detach())
        total = part.detach() if total is None else total + part.detach()
        del logits, loss, part  # the micro-batch's graph is gone before the next one starts
    return torch.cat(parts), total
