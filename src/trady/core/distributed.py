"""Data-parallel fine-tuning across processes with torch.distributed (launched by torchrun).

`init_from_env(device)` starts the process group from torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) when WORLD_SIZE > 1: backend gloo for CPU devices, nccl for
CUDA devices (each process on GPU LOCAL_RANK). Without WORLD_SIZE (or with 1) nothing happens and
training is single-process.

The trainer (`trady.train.loop`) uses the helpers below: every rank draws the same channel selection
(rank 0's is broadcast to be sure), the gradients of the optimizer's tensors only (the selected
weight slices, the classifier and trained biases) are averaged in one flat all-reduce per step, and
only rank 0 writes files. Each process trains on `--batch-size` samples per step: the global batch
is batch_size * WORLD_SIZE, and the union of the ranks' batches is exactly the single-process batch
of that size (`trady.data.BatchLoader`).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

from trady.core.errors import TradyError

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def env_world_size() -> int:
    """WORLD_SIZE from the environment (1 when unset)."""
    raw = os.environ.get("WORLD_SIZE", "1") or "1"
    try:
        world = int(raw)
    except ValueError:
        raise TradyError(f"WORLD_SIZE={raw!r} is not an integer; accepted: the value torchrun sets") from None
    if world < 1:
        raise TradyError(f"WORLD_SIZE={world} must be >= 1")
    return world


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        if default is not None:
            return default
        raise TradyError(
            f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} but {name} is not set; launch data-parallel runs with "
            "torchrun (e.g. `torchrun --standalone --nproc-per-node 2 -m trady finetune ...`)"
        )
    try:
        return int(raw)
    except ValueError:
        raise TradyError(f"{name}={raw!r} is not an integer") from None


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, (0, 1) without one."""
    if is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def backend_for(device: str | torch.device) -> str:
    """nccl for CUDA devices, gloo otherwise."""
    return "nccl" if resolve_device(device).type == "cuda" else "gloo"


def init_from_env(device: str | torch.device = "cpu", timeout_s: float = 1800.0) -> tuple[int, int]:
    """Initialise the default process group from torchrun's variables when WORLD_SIZE > 1.

    Returns (rank, world size); (0, 1) and no process group when WORLD_SIZE is unset or 1. Idempotent.
    """
    world = env_world_size()
    if world == 1:
        return rank_world()
    if is_initialized():
        if dist.get_world_size() != world:
            raise TradyError(f"a process group of {dist.get_world_size()} processes exists but WORLD_SIZE={world}")
        return rank_world()
    if not dist.is_available():
        raise TradyError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK", 0)
    _env_int("MASTER_PORT")
    if not os.environ.get("MASTER_ADDR"):
        _env_int("MASTER_ADDR")  # raises the "launch with torchrun" error
    if not 0 <= rank < world:
        raise TradyError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
    backend = backend_for(device)
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise TradyError(f"device {str(device)!r} needs CUDA, which is not available; accepted: cpu")
        if local_rank >= torch.cuda.device_count():
            raise TradyError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                "use at most one process per GPU (--nproc-per-node)"
            )
        torch.cuda.set_device(local_rank)
    elif not dist.is_gloo_available():
        raise TradyError("data-parallel training on CPU needs the gloo backend, which this torch build lacks")
    dist.init_process_group(
        backend, init_method="env://", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s)
    )
    return rank_world()


def resolve_device(device: str | torch.device) -> torch.device:
    """The device of this process: `cuda` without an index means GPU LOCAL_RANK under torchrun."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise TradyError(f"invalid device {str(device)!r}; accepted: cpu, cuda, cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TradyError(f"device {str(device)!r} needs CUDA, which is not available; accepted: cpu")
        if dev.index is None and env_world_size() > 1:
            return torch.device("cuda", _env_int("LOCAL_RANK", 0))
    return dev


def cleanup() -> None:
    """Destroy the default process group (when one exists)."""
    if is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# collectives the trainer uses (no-ops in a single process)


def all_reduce_mean_(tensors: Sequence[torch.Tensor]) -> int:
    """Average `tensors` in place over the ranks, one flat all-reduce per (dtype, device); returns the
    number of elements sent. Every rank must pass tensors of the same shapes in the same order."""
    tensors = [t for t in tensors if t is not None]
    world = rank_world()[1]
    if world == 1 or not tensors:
        return 0
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    sent = 0
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n
        sent += flat.numel()
    return sent


def all_reduce_sum(values: Sequence[float], device: torch.device | str = "cpu") -> list[float]:
    """Sum a few numbers over the ranks (float64)."""
    if rank_world()[1] == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_equal(value: int, device: torch.device | str = "cpu") -> bool:
    """Whether every rank holds the same integer."""
    if rank_world()[1] == 1:
        return True
    t = torch.tensor([value, -value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t[0]) == value and int(-t[1]) == value


def broadcast_(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite `tensors` on every rank with rank `src`'s values."""
    if rank_world()[1] == 1:
        return
    for t in tensors:
        dist.broadcast(t, src)
