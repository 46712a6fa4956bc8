"""The canary's own data: a view of a release whose shared paths point at copies, never at production.

A canary that migrates or writes at start-up must not change what students wrote while the
old version still serves, least of all when the canary then fails and the update is called
"aborted, the live service never touched". So the canary runs from `state/canary/<name>/tree`,
a hard-linked copy of the release (cheap: the code is read-only to it), whose shared links
point into `state/canary/<name>/shared`:

- databases: a consistent copy by SQLite's backup API (WAL respected), taken while the app writes;
- directories: copied, with the databases inside them copied as above;
- secrets (`.env*`): a read-only copy (0400), so the canary reads the same keys;
- a path that does not exist yet: a link to where the canary's own copy would be.

The whole directory goes when the canary ends; nothing under it is ever read back.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from proto4d import fsutil, snapshots


@dataclass(frozen=True)
class CanaryData:
    base: Path
    tree: Path
    shared: Path
    copied: tuple[str, ...]
    seconds: float

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            fsutil.remove_tree(self.base)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links refused: a copy does the same job
        shutil.copy2(src, dst)


def _copy_shared_dir(src: Path, dst: Path, copied: list[str], rel: str) -> None:
    for dirpath, dirnames, filenames in os.walk(src):
        here = Path(dirpath)
        out = dst / here.relative_to(src)
        out.mkdir(parents=True, exist_ok=True)
        for d in list(dirnames):
            if (here / d).is_symlink():  # a link out of shared/ is copied as a link, never followed
                os.symlink(os.readlink(here / d), out / d)
                dirnames.remove(d)
        for name in filenames:
            if name.endswith(("-wal", "-shm", "-journal")) and snapshots.is_sqlite(here / name[: name.rindex("-")]):
                continue  # the backup copy below already holds the WAL's content
            p = here / name
            if p.is_symlink():
                os.symlink(os.readlink(p), out / name)
            elif snapshots.is_sqlite(p):
                snapshots.copy_database(p, out / name)
                copied.append(f"{rel}/{p.relative_to(src)}")
            else:
                shutil.copy2(p, out / name)


def _tree(release: Path, tree: Path, own: Path, shared: Iterable[str]) -> None:
    shutil.copytree(release, tree, symlinks=True, copy_function=_link_or_copy)
    for rel in shared:
        inside = tree / rel
        if inside.exists() or inside.is_symlink():
            fsutil.remove_tree(inside)
        inside.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(own / rel, inside)


def build(release: Path, shared_root: Path, shared: Iterable[str], dest: Path) -> CanaryData:
    """Make `dest/tree` (the release, its shared paths on copies) and `dest/shared` (the copies)."""
    t = time.monotonic()
    shared = list(shared)
    fsutil.remove_tree(dest)
    dest.mkdir(parents=True, mode=0o700)
    tree, own = dest / "tree", dest / "shared"
    copied: list[str] = []
    try:
        for rel in shared:
            live, mine = shared_root / rel, own / rel
            mine.parent.mkdir(parents=True, exist_ok=True)
            if live.is_dir():
                _copy_shared_dir(live, mine, copied, rel)
            elif snapshots.is_sqlite(live):
                snapshots.copy_database(live, mine)
                copied.append(rel)
            elif live.is_file():
                shutil.copy2(live, mine)
                if Path(rel).name.startswith(".env"):
                    os.chmod(mine, 0o400)
        _tree(release, tree, own, shared)
    except BaseException:
        with contextlib.suppress(OSError):
            fsutil.remove_tree(dest)
        raise
    return CanaryData(dest, tree, own, tuple(copied), time.monotonic() - t)


def view(release: Path, data: CanaryData, shared: Iterable[str], dest: Path) -> Path:
    """Another release on the same copies (the previous release against the migrated copy)."""
    fsutil.remove_tree(dest)
    _tree(release, dest, data.shared, shared)
    return dest
