"""Database snapshots: which shared files are SQLite databases, consistent copies of them, restore.

A snapshot is taken while the app writes: SQLite's online backup API reads a consistent
state of the database (WAL included) without stopping the writer, into a temp file that is
renamed into `<root>/backups/<id>/` with a `snapshot.json` listing each database, its size
and its rows per table. Restore is the same API in the other direction, so a connection the
app holds sees the restored pages and never a torn file; it says first what it replaces and
how many rows differ per table.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proto4d import fsutil

SQLITE_HEADER = b"SQLite format 3\x00"
INFO = "snapshot.json"
_ID_RE = re.compile(r"^\d{8}_\d{6}(_\d+)?_[A-Za-z0-9_.-]+$")


class SnapshotError(Exception):
    """A snapshot or restore that could not be done; the message names the file and why."""


def is_sqlite(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(16) == SQLITE_HEADER
    except OSError:
        return False


def find_databases(shared: Path, declared: Sequence[str] = ()) -> list[str]:
    """Databases to snapshot, relative to `shared/`: the declared ones that exist, else every SQLite file.

    The search follows no symlink out of `shared/` and skips SQLite's own side files.
    """
    if declared:
        return [rel for rel in declared if is_sqlite(shared / rel)]
    found = []
    if not shared.is_dir():
        return found
    for dirpath, dirnames, filenames in os.walk(shared):
        dirnames[:] = sorted(d for d in dirnames if not os.path.islink(os.path.join(dirpath, d)))
        for name in sorted(filenames):
            if name.endswith(("-wal", "-shm", "-journal")):
                continue
            p = Path(dirpath) / name
            if not p.is_symlink() and is_sqlite(p):
                found.append(str(p.relative_to(shared)))
    return found


def _connect_ro(path: Path) -> Any:
    import sqlite3  # only apps with a database pay for the module (the daemon's memory target)

    # Read-only through a URI so a snapshot never creates or changes the live file; WAL is still read.
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)


def row_counts(path: Path) -> dict[str, int]:
    """Rows per user table (sqlite_* internal tables left out)."""
    con = _connect_ro(path)
    try:
        tables = [r[0] for r in con.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        return {t: int(con.execute(f'SELECT COUNT(*) FROM "{t.replace(chr(34), chr(34) * 2)}"').fetchone()[0])
                for t in tables}
    finally:
        con.close()


def copy_database(src: Path, dest: Path) -> None:
    """A consistent copy of `src` at `dest` while writers go on: backup API into a temp file, fsync, rename."""
    import sqlite3

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        source = _connect_ro(src)
        try:
            target = sqlite3.connect(tmp)
            try:
                # pages=-1: one step, so the copy is one consistent read of the source.
                source.backup(target)
                target.execute("PRAGMA journal_mode=DELETE")  # a self-contained file, no -wal beside it
            finally:
                target.close()
        finally:
            source.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        fsutil.fsync_dir(dest.parent)
    except sqlite3.Error as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise SnapshotError(f"{src}: could not copy the database: {e}") from e
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@dataclass(frozen=True)
class Snapshot:
    id: str
    path: Path
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def created_at(self) -> float:
        return float(self.info.get("created_at", 0))

    @property
    def databases(self) -> list[dict[str, Any]]:
        return list(self.info.get("databases", []))


def _new_id(backups: Path, release: str, now: float) -> str:
    stamp = time.strftime("%Y%m%d_%H%M%S", time.gmtime(now))
    base = f"{stamp}_{release or 'none'}"
    name, n = base, 1
    while (backups / name).exists():
        n += 1
        name = f"{stamp}_{n}_{release or 'none'}"
    return name


def take(backups: Path, shared: Path, databases: Iterable[str], *, release: str, reason: str,
         now: float | None = None) -> Snapshot | None:
    """Snapshot every database into a new `backups/<id>/`; None when there is no database to take."""
    dbs = list(databases)
    if not dbs:
        return None
    now = time.time() if now is None else now
    fsutil.ensure_dir(backups, 0o700)
    sid = _new_id(backups, release, now)
    tmp = backups / f".tmp-{sid}"
    fsutil.remove_tree(tmp)
    tmp.mkdir(mode=0o700)
    try:
        entries = []
        for rel in dbs:
            t = time.monotonic()
            copy_database(shared / rel, tmp / rel)
            entries.append({"path": rel, "bytes": (tmp / rel).stat().st_size, "rows": row_counts(tmp / rel),
                            "seconds": round(time.monotonic() - t, 4)})
        info = {"id": sid, "created_at": now, "release": release, "reason": reason, "databases": entries}
        fsutil.atomic_write_json(tmp / INFO, info)
        os.rename(tmp, backups / sid)
        fsutil.fsync_dir(backups)
        return Snapshot(sid, backups / sid, info)
    except BaseException:
        with contextlib.suppress(OSError):
            fsutil.remove_tree(tmp)
        raise


def listing(backups: Path) -> list[Snapshot]:
    """Complete snapshots, newest first (temp dirs of an interrupted snapshot are not snapshots)."""
    out = []
    if not backups.is_dir():
        return out
    for entry in backups.iterdir():
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        info = fsutil.read_json(entry / INFO)
        if isinstance(info, dict):
            out.append(Snapshot(entry.name, entry, info))
    return sorted(out, key=lambda s: (s.created_at, s.id), reverse=True)


def find(backups: Path, sid: str) -> Snapshot:
    if not _ID_RE.match(sid) and sid != "latest":
        raise SnapshotError(f"{sid!r} is not a snapshot id (see `proto4d backups`)")
    snaps = listing(backups)
    if sid == "latest":
        if not snaps:
            raise SnapshotError(f"no snapshot under {backups}")
        return snaps[0]
    for s in snaps:
        # APFS and HFS+ are case-insensitive by default: match the name as the disk spells it.
        if s.id.casefold() == sid.casefold():
            return s
    raise SnapshotError(f"no snapshot {sid!r} under {backups} (see `proto4d backups`)")


def diff_counts(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Per table, rows in `after` minus rows in `before` (tables only in one side count fully)."""
    return {t: after.get(t, 0) - before.get(t, 0) for t in sorted(set(before) | set(after))
            if after.get(t, 0) != before.get(t, 0)}


@dataclass(frozen=True)
class RestorePlan:
    database: str
    live: Path
    snapshot_file: Path
    live_rows: dict[str, int]
    snapshot_rows: dict[str, int]

    @property
    def differences(self) -> dict[str, int]:
        """Per table, rows the live database has beyond the snapshot (negative: fewer)."""
        return diff_counts(self.snapshot_rows, self.live_rows)

    def describe(self) -> str:
        diff = self.differences
        if not diff:
            return f"{self.database}: same row counts as the snapshot in every table"
        parts = ", ".join(f"{t} {n:+d}" for t, n in diff.items())
        return f"{self.database}: the live database differs from the snapshot by rows per table: {parts}"


def plan_restore(snap: Snapshot, shared: Path, only: str | None = None) -> list[RestorePlan]:
    plans = []
    for entry in snap.databases:
        rel = entry["path"]
        if only and rel != only:
            continue
        src = snap.path / rel
        if not is_sqlite(src):
            raise SnapshotError(f"{src}: missing or not a SQLite database")
        live = shared / rel
        plans.append(RestorePlan(rel, live, src, row_counts(live) if is_sqlite(live) else {}, row_counts(src)))
    if only and not plans:
        raise SnapshotError(f"snapshot {snap.id} has no database {only!r} "
                            f"(it has: {', '.join(e['path'] for e in snap.databases) or 'none'})")
    return plans


def save_rows_since(plan: RestorePlan, dest: Path) -> Path:
    """Keep the live database as it is before a restore replaces it: nothing is lost silently."""
    copy_database(plan.live, dest)
    return dest


def restore(plan: RestorePlan) -> None:
    """Write the snapshot's pages into the live database through SQLite, under its lock."""
    import sqlite3

    plan.live.parent.mkdir(parents=True, exist_ok=True)
    try:
        source = _connect_ro(plan.snapshot_file)
        try:
            target = sqlite3.connect(plan.live, timeout=30)
            try:
                source.backup(target)
            finally:
                target.close()
        finally:
            source.close()
    except sqlite3.Error as e:
        raise SnapshotError(f"{plan.live}: could not restore from {plan.snapshot_file}: {e}") from e


def plan_retention(snaps: Sequence[Snapshot], *, now: float, keep_days: float, keep_min: int) -> list[str]:
    """Snapshot ids to remove: older than `keep_days`, beyond the newest `keep_min` (pure)."""
    newest_first = sorted(snaps, key=lambda s: (s.created_at, s.id), reverse=True)
    cutoff = now - keep_days * 86400
    return [s.id for s in newest_first[keep_min:] if s.created_at < cutoff]
