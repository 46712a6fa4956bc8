"""Crash-safe file operations: everything proto4d writes goes through a temp file and a rename.

A reader (the CLI, a human, the next daemon after a crash) sees the old content or the
new content, never half of either.
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

FILE_MODE = 0o644
DIR_MODE = 0o755


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


def atomic_write(path: Path, data: bytes | str, mode: int = FILE_MODE, durable: bool = True) -> None:
    """Write `data` to `path` via a temp file in the same directory and a rename.

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
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any, durable: bool = True) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", durable=durable)


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
