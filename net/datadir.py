"""The data dir's lock: one node per data dir.

Owns ``DATA_DIR/.lock``.  Whatever writes a data dir (the node, and the
tools that give a data dir a past) takes an exclusive ``flock`` on it before
it reads or writes anything else there, and holds it for as long as it
works on the data dir; the kernel drops it when the process ends, even by
``kill -9``, so a lock is never stale.  The holder writes its pid into the
file, for the one line a second process is refused with.  A process that is
refused has changed nothing: the file existed (or is created empty) and is
neither truncated nor written.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from types import TracebackType

from net.errors import StorageError

LOCK_FILE = ".lock"


class DataDirInUse(StorageError):
    """Another process holds the data dir's lock."""

    code = "data_dir_in_use"


class DataDirLock:
    """The held lock of one data dir; ``release`` (or the end of the process) lets it go."""

    __slots__ = ("_fd", "data_dir")

    def __init__(self, data_dir: Path, fd: int) -> None:
        self.data_dir = data_dir
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, data_dir: Path) -> DataDirLock:
        """Lock ``data_dir`` (created if missing); DataDirInUse when another process holds it."""
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise DataDirInUse(in_use_line(data_dir, holder)) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(data_dir, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # no pid once nobody holds it
        finally:
            os.close(fd)  # closing the descriptor drops the flock

    def __enter__(self) -> DataDirLock:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def ensure_free(data_dir: Path) -> None:
    """Raise DataDirInUse when a process holds ``data_dir`` (for a command
    that is about to start that data dir's node as a child)."""
    DataDirLock.acquire(data_dir).release()


def in_use_line(data_dir: Path, pid: int | None) -> str:
    holder = "another node" if pid is None else f"another node (pid {pid})"
    return f"data dir {data_dir} is in use by {holder}; one node per data dir"


def _holder(fd: int) -> int | None:
    """The pid the holder wrote into the lock file (None if it has not yet, or it does not read)."""
    with contextlib.suppress(OSError, ValueError):
        text = os.pread(fd, 32, 0).decode("ascii").strip()
        return int(text) if text else None
    return None
