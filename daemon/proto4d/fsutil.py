"""Crash-safe file operations, and the modes of what proto4d writes.

Everything proto4d rewrites goes through a temp file and a rename: a reader (the CLI, a human,
the next daemon after a crash) sees the old content or the new content, never half of either.

What proto4d creates is private to its user: files 0600, directories 0700, never wider than the
umask allows (status.json holds students' addresses, the logs what the app printed). A file
meant for others to read (the notice) asks for `mode=None`: whatever the umask gives.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

FILE_MODE = 0o600
DIR_MODE = 0o700
ROOT_MODE = 0o755  # `root` only: never group-writable (the request trust rule), its contents private


def _read_umask() -> int:
    # Read once, at import (single-threaded): os.umask() can only be read by setting it, which would
    # race with other threads creating files.
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _read_umask()


def file_mode(mode: int | None = FILE_MODE) -> int:
    """The mode a created file gets: `mode` (None = 0666) without what the umask takes away."""
    return (0o666 if mode is None else mode) & ~UMASK


def private_opener(path: str, flags: int) -> int:
    """`open(..., opener=private_opener)`: a log file created 0600, and one left wider by an older
    version tightened."""
    fd = os.open(path, flags, file_mode())
    with contextlib.suppress(OSError):
        st = os.fstat(fd)
        if st.st_mode & 0o077 & ~file_mode() and st.st_uid == os.geteuid():
            os.fchmod(fd, stat_mode(st.st_mode) & file_mode())
    return fd


def stat_mode(st_mode: int) -> int:
    return st_mode & 0o7777


def ensure_dir(path: Path, mode: int = DIR_MODE) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=mode)
    return path


def sync_fd(fd: int) -> None:
    """Make what was written to `fd` durable.

    On macOS fsync() only hands the data to the drive, whose cache can still lose it on a power
    cut; F_FULLFSYNC asks the drive to flush. Where it is missing (Linux, where fsync is enough)
    or refused (some network and FAT volumes), fsync.
    """
    full = getattr(fcntl, "F_FULLFSYNC", None)
    if full is not None:
        try:
            fcntl.fcntl(fd, full)
            return
        except OSError:
            pass
    os.fsync(fd)


def fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; some filesystems (and macOS) refuse O_RDONLY fsync on dirs.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            sync_fd(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, data: bytes | str, mode: int | None = FILE_MODE, durable: bool = True) -> None:
    """Write `data` to `path` via a temp file in the same directory and a rename; the file gets
    `file_mode(mode)` (0600 by default, never wider than the umask).

    `durable=False` skips the fsyncs, for files rewritten every few seconds whose loss on a
    power cut costs nothing (status.json); the rename still keeps readers from seeing a torn file.
    """
    if isinstance(data, str):
        data = data.encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                sync_fd(f.fileno())
        os.chmod(tmp, file_mode(mode))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any, durable: bool = True, mode: int | None = FILE_MODE) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", durable=durable, mode=mode)


def read_json(path: Path, default: Any = None) -> Any:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return default


def atomic_symlink(target: str | Path, link: Path) -> None:
    """Point `link` at `target` by renaming a fresh symlink over it: never a moment without one."""
    tmp = link.parent / f".{link.name}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


def remove_tree(path: Path) -> None:
    """Remove a directory tree, or a file/symlink, if it exists."""
    if path.is_symlink() or path.is_file():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    elif path.exists():
        shutil.rmtree(path, ignore_errors=False, onerror=_force_remove)


def _force_remove(func, p, exc_info) -> None:  # pragma: no cover - read-only files inside a venv
    with contextlib.suppress(OSError):
        os.chmod(p, 0o700)
        func(p)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
