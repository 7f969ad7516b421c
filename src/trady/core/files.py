"""Atomic writes: a file is either its old content or its complete new content, never half."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from trady.core.errors import TradyError


def atomic_write(path: str | os.PathLike, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are meant to be shared
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class WriteFailed(TradyError):
    """A file could not be written (disk full, no permission, ...): one line naming the path and the cause.
    The file keeps its old content (atomic writes). The CLI exits 4."""

    exit_code = 4


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` atomically; an OSError becomes WriteFailed (one line: the path and the cause)."""
    try:
        atomic_write(path, lambda fh: fh.write(data))
    except OSError as err:
        cause = err.strerror or str(err) or type(err).__name__
        code = f" ({errno.errorcode[err.errno]})" if err.errno in errno.errorcode else ""
        raise WriteFailed(f"cannot write {os.fspath(path)}: {cause}{code}") from None


def write_json(path: str | os.PathLike, obj: Any) -> None:
    data = (json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n").encode()
    write_bytes(path, data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


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


def torch_bytes(obj: Any) -> bytes:
    """torch.save's bytes of `obj`, made in memory: a full disk then fails in one plain write."""
    import io

    import torch  # imported here so that light processes (sweep workers, reports) need no torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    write_bytes(path, torch_bytes(obj))


def load_torch(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """torch.load with weights_only=True: a checkpoint can never execute code when loaded.

    Raises TradyError (one line) for a missing or unreadable file and for a pickle that holds anything
    but tensors and plain data (a class or function to call, e.g. os.system)."""
    import pickle

    import torch

    if not Path(path).is_file():
        raise TradyError(f"checkpoint {os.fspath(path)!r} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise TradyError(f"refusing to load {os.fspath(path)}: {unpickling_refusal(err)}") from None
    except Exception as err:  # noqa: BLE001 - truncated, not a zip, not a torch file: one line
        text = " ".join(str(err).split()).split(". ")[0][:200]
        raise TradyError(
            f"cannot read {os.fspath(path)}: not a complete torch.save file ({type(err).__name__}: {text})"
        ) from None


def unpickling_refusal(err: BaseException) -> str:
    """One line saying why torch.load(weights_only=True) refused a pickle (without its advice to turn
    the check off, which would let the file run code)."""
    import re

    text = " ".join(str(err).split())
    m = re.search(r"(Unsupported global: GLOBAL \S+|unsupported GLOBAL \S+(?: whose module \S+ is blocked)?)", text)
    reason = m.group(1).rstrip(".") if m else text[:200]
    return f"it holds a pickled object that weights_only=True does not allow ({reason}); only tensors and data load"


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist") and hasattr(obj, "dim"):  # a tensor
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
