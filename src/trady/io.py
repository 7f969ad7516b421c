"""Atomic writes: a file is either its old content or its complete new content, never half."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def _atomic_write(path: str | os.PathLike, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    data = (json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n").encode()
    _atomic_write(path, lambda fh: fh.write(data))


def write_text(path: str | os.PathLike, text: str) -> None:
    _atomic_write(path, lambda fh: fh.write(text.encode()))


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    """Rewrite a JSON-lines file whole (atomically) with the given rows."""
    text = "".join(json.dumps(r, default=_jsonable) + "\n" for r in rows)
    write_text(path, text)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    rows = []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    _atomic_write(path, lambda fh: torch.save(obj, fh))


def load_torch(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    # weights_only=True: a checkpoint can never execute code when loaded.
    return torch.load(path, map_location=map_location, weights_only=True)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
