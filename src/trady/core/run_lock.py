"""One process owns a run folder: an exclusive flock on `<folder>/.trady.lock`, holding the owner's pid.

The kernel drops a flock when its process ends, however it ends (kill -9 included), so a lock can
never outlive its holder; a lock file left by a dead process is simply taken over (and said). Runs in
different folders (a sweep's workers) never meet.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from trady.core.errors import TradyError

LOCK_FILE = ".trady.lock"


class RunFolderBusy(TradyError):
    """Another live process holds the run folder."""


class RunLock:
    """An exclusive lock of one run folder; `release()` (or the process's end) frees it."""

    def __init__(self, folder: Path, fd: int, took_over: int | None) -> None:
        self.folder, self._fd = folder, fd
        self.took_over = took_over  # pid of the dead process whose lock file was taken over, if any

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # no pid left behind: the next run finds no stale holder
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 64).decode(errors="replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def acquire(folder: str | os.PathLike) -> RunLock:
    """Lock `folder` (created if needed) for this process, or raise one line naming the holder's pid."""
    folder = Path(folder)
    path = folder / LOCK_FILE
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise TradyError(f"cannot use run folder {str(folder)!r}: {err.strerror or err}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = _read_pid(fd)
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            who = f"process {holder}" if holder else "another process"
            raise RunFolderBusy(
                f"run folder {str(folder)!r} is in use by {who} (lock {path}); wait for it to end, or give "
                "another --out"
            ) from None
        raise TradyError(f"cannot lock run folder {str(folder)!r}: {err.strerror or err}") from None
    previous = _read_pid(fd)
    took_over = previous if previous and previous != os.getpid() else None
    try:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as err:
        os.close(fd)
        raise TradyError(f"cannot write {path}: {err.strerror or err}") from None
    return RunLock(folder, fd, took_over)
