"""A lock held by one process at a time on a file, released by the OS when the process dies
(kill -9 included); the holder's pid is written in the file so a refusal can name it."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def try_lock(path: Path) -> tuple[int | None, str]:
    """(open fd holding the lock, "") or (None, pid of the process that holds it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        return None, holder
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd, ""
