"""The update's data work: the canary on copies, the migration proven twice, snapshots, restores.

Order of an update that carries a migration (`app.migrate`):

1. canary: the new release's tree gets its own copies of the shared data (canarydata); the
   migration runs there first (a failure aborts with production untouched); the new release
   starts on the migrated copy and passes its checks; then the *previous* release starts on
   the same migrated copy: if it passes, the update is rollback-compatible and a later
   rollback is code-only with every row kept.
2. An incompatible migration goes on only when the request allows it (or
   `update.allow_incompatible`); its rollback restores the pre-switch snapshot and saves
   what was written since, counted per table.
3. switch: a consistent snapshot of every database, then the migration on the live database
   (timed), then the handoff. A failed live migration restores the snapshot; the old release
   keeps serving.

This module decides and does the data part; update.py calls it at those three points and
owns the states. The journal keeps `snapshot` and `restore_on_rollback` so a daemon that
restarts mid-update restores too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proto4d import appuser, canarydata, fsutil, migrate, snapshots
from proto4d.releases import Release

Progress = Callable[[str], None]
# runner.canary: start a release (here: a tree on copies) on a private port, check it, stop it.
CanaryRunner = Callable[[Release], Awaitable[tuple[Any, str]]]


class DataStepFailed(Exception):
    """A data step failed before anything live changed (or after restoring it): abort the update."""


def migration_env(python: Path, app_env: Mapping[str, str]) -> dict[str, str]:
    """What the migration command runs with: the release venv first on PATH, `app.env`, nothing secret of ours."""
    venv = python.parent.parent
    env = {k: os.environ[k] for k in ("HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER", "LOGNAME") if k in os.environ}
    env.update({"PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
                "VIRTUAL_ENV": str(venv), "PYTHONUNBUFFERED": "1"})
    env.update(app_env)
    return env


@dataclass
class DataSteps:
    shared_root: Path
    shared: Sequence[str]
    declared: Sequence[str]
    migrate_argv: Sequence[str]
    workdir: str
    state_dir: Path
    backups: Path
    timeout_s: float
    app_env: Mapping[str, str]
    python_for: Callable[[Release], Path]
    progress: Progress
    registry: Any = None
    app_user: str = ""  # app.user: migrations run as the app does
    # results, kept in the journal by the caller
    compatible: bool | None = None
    snapshot: str | None = None
    no_migration_pending: bool = False  # proven on a copy (update.promote: live): the live migration is skipped
    migrated_live: bool = False
    kept: Path | None = None  # canary(keep=True): the copies a staged release runs on
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def migrates(self) -> bool:
        return bool(self.migrate_argv)

    def databases(self) -> list[str]:
        return snapshots.find_databases(self.shared_root, self.declared)

    def revisions(self) -> dict[str, str]:
        """alembic's revision of each live database, for release.json (`proto4d releases` shows it)."""
        out = {}
        for rel in self.databases():
            rev = migrate.schema_revision(self.shared_root / rel)
            if rev:
                out[rel] = rev
        return out

    def _run_migration(self, release: Release, tree: Path) -> migrate.Migration:
        python = self.python_for(release)
        user = appuser.resolve(self.app_user)
        if user is not None:
            user.prepare(root=self.shared_root.parent, shared=self.shared_root, state=self.state_dir,
                         cwd=tree / self.workdir, venv=python.parent.parent)
        return migrate.run(self.migrate_argv, python=python, release=tree, workdir=tree / self.workdir,
                           env=migration_env(python, self.app_env), timeout=self.timeout_s,
                           registry=self.registry, user=user)

    # -- 1. the canary, on copies

    async def canary(self, new: Release, old: Release | None, run_canary: CanaryRunner | None, *,
                     migrate_copy: bool = True, keep: bool = False) -> tuple[Any, str]:
        """Copy the data, migrate the copy, run the canary on it, then the previous release on it.

        Returns the canary's (report, died) like runner.canary; (None, "") when there is no canary
        to run (`run_canary` None: the command takes neither {fd} nor {port}) but a migration was
        still proven on a copy. A rollback passes `migrate_copy=False`: an older release's
        migrations cannot even see the newer revision; its canary on the copy tells whether it runs.
        `keep` (a staged release, whose process goes on running on the copies): a canary that passed
        leaves its copies in place and their directory in `self.kept`, for the caller to remove.
        """
        migrating = self.migrates and migrate_copy
        base = self.state_dir / "canary" / new.name
        t = time.monotonic()
        data = await asyncio.to_thread(canarydata.build, new.path, self.shared_root, self.shared, base)
        self.timings["canary_copy"] = time.monotonic() - t
        self.progress(f"canary data: copies of {', '.join(data.copied) or 'no database'} "
                      f"in {data.seconds:.2f} s (production's data is never the canary's)")
        try:
            if migrating:
                m = await asyncio.to_thread(self._run_migration, new, data.tree)
                self.timings["migrate_copy"] = m.seconds
                self.progress(f"migration on the copy: {m.describe()}")
                if not m.ok:
                    raise DataStepFailed(f"the migration failed on a copy of the data (production untouched): "
                                         f"{m.output.strip()[-600:]}")
                self._note_revisions(data, "after the migration on the copy")
            if run_canary is None:
                report, died = None, ""
            else:
                report, died = await run_canary(Release(new.name, data.tree, new.info))
                if not getattr(report, "ok", False):
                    return report, died
            if migrating and old is not None and run_canary is not None:
                view = await asyncio.to_thread(canarydata.view, old.path, data, self.shared, base / "previous")
                back, back_died = await run_canary(Release(old.name, view, old.info))
                self.compatible = bool(getattr(back, "ok", False))
                if self.compatible:
                    self.progress(f"rollback-compatible: {old.name} passes its checks on the migrated copy "
                                  "(a rollback is code-only and keeps every row)")
                else:
                    why = back_died or (back.failures() if hasattr(back, "failures") else "checks failed")
                    self.progress(f"NOT rollback-compatible: {old.name} fails on the migrated copy: {why}")
            elif migrating:
                self.compatible = None  # nothing to compare with: a first release, or no canary possible
            if keep and report is not None:
                self.kept = data.base
            return report, died
        finally:
            if self.kept != data.base:
                await asyncio.to_thread(data.remove)

    async def migration_pending(self, new: Release) -> str:
        """What the migration would change, proven on a copy of the data ("" = nothing: every database's
        schema revision is the same after it ran, so the new release runs on the live schema as it is)."""
        base = self.state_dir / "canary" / f"{new.name}.pending"
        data = await asyncio.to_thread(canarydata.build, new.path, self.shared_root, self.shared, base)
        try:
            before = {rel: migrate.schema_revision(data.shared / rel) for rel in data.copied}
            m = await asyncio.to_thread(self._run_migration, new, data.tree)
            self.timings["migrate_copy"] = m.seconds
            if not m.ok:
                return "the migration fails on a copy of the data"
            after = {rel: migrate.schema_revision(data.shared / rel) for rel in data.copied}
            if not before:
                return "there is no database to compare"
            changed = [f"{rel} {before[rel] or 'none'} -> {after.get(rel) or 'none'}" for rel in before
                       if before[rel] != after.get(rel) or not before[rel]]
            if changed:
                return "the migration changes " + ", ".join(changed)
            self.progress(f"no migration pending: {m.describe()} on a copy left "
                          + ", ".join(f"{rel} at {rev}" for rel, rev in before.items()))
            self.no_migration_pending = True
            return ""
        finally:
            await asyncio.to_thread(data.remove)

    def _note_revisions(self, data: canarydata.CanaryData, when: str) -> None:
        for rel in data.copied:
            rev = migrate.schema_revision(data.shared / rel)
            if rev:
                self.progress(f"  {rel}: schema revision {rev} {when}")

    # -- 3. the switch: snapshot, migrate live

    def take_snapshot(self, new: Release, *, release_name: str) -> None:
        """A consistent snapshot of every database, taken while the old release serves."""
        dbs = self.databases()
        t = time.monotonic()
        snap = snapshots.take(self.backups, self.shared_root, dbs, release=release_name,
                              reason=f"before switching to {new.name}")
        self.timings["snapshot"] = time.monotonic() - t
        if snap is not None:
            self.snapshot = snap.id
            self.progress("snapshot " + snap.id + ": " + ", ".join(
                f"{d['path']} {d['bytes'] // 1024} KiB, {sum(d['rows'].values())} rows" for d in snap.databases)
                + f" in {self.timings['snapshot']:.2f} s")

    def migrate_live(self, new: Release) -> None:
        """Migrate the live database(s) through the new release's tree. On failure, restore and raise."""
        m = self._run_migration(new, new.path)
        self.timings["migrate_live"] = m.seconds
        self.progress(f"migration on the live database: {m.describe()}")
        if m.ok:
            self.migrated_live = True
            return
        restored = self._restore_snapshot("the live migration failed")
        raise DataStepFailed(f"the migration failed on the live database; {restored}; the old release keeps "
                             f"serving: {m.output.strip()[-600:]}")

    # -- rollback

    @property
    def restore_on_rollback(self) -> bool:
        """Only an incompatible migration's rollback touches data; a compatible one is code-only."""
        return self.migrated_live and self.compatible is not True and self.snapshot is not None

    def restore_for_rollback(self) -> str:
        return self._restore_snapshot("rolling back an incompatible migration")

    def _restore_snapshot(self, why: str) -> str:
        if self.snapshot is None:
            return "there was no database to restore"
        return restore_snapshot(self.backups, self.shared_root, self.snapshot, why)


def restore_snapshot(backups: Path, shared: Path, snapshot_id: str, why: str) -> str:
    """Restore `snapshot_id`, first saving the live databases beside it; say what the rows since were."""
    snap = snapshots.find(backups, snapshot_id)
    plans = snapshots.plan_restore(snap, shared)
    stamp = time.strftime("%Y%m%d_%H%M%S")
    saved_dir = snap.path / f"replaced_{stamp}"
    parts = []
    for p in plans:
        diff = p.differences
        if p.live.exists():
            snapshots.save_rows_since(p, saved_dir / p.database)
        snapshots.restore(p)
        if diff:
            parts.append(f"{p.database}: " + ", ".join(f"{t} {n:+d} rows" for t, n in diff.items()))
    if parts:
        fsutil.atomic_write_json(saved_dir / "replaced.json", {"why": why, "snapshot": snap.id, "at": time.time(),
                                                              "differences": {p.database: p.differences
                                                                              for p in plans}})
    said = (f"restored snapshot {snap.id} ({why}); " + ("; ".join(parts) + f" were in the replaced databases, "
            f"saved in {saved_dir}" if parts else "no row had changed since it was taken"))
    return said


def prune(backups: Path, *, keep_days: float, keep_min: int, now: float | None = None) -> list[str]:
    """Remove snapshots beyond retention (the same keep_days/keep_min as releases)."""
    doomed = snapshots.plan_retention(snapshots.listing(backups), now=time.time() if now is None else now,
                                      keep_days=keep_days, keep_min=keep_min)
    for sid in doomed:
        with contextlib.suppress(OSError):
            fsutil.remove_tree(backups / sid)
    return doomed


def status(shared: Path, declared: Sequence[str], backups: Path, now: float | None = None,
           pending_report: Path | None = None, running_commit: str = "") -> dict[str, Any]:
    """Databases (size, WAL size, schema revision), the last snapshot's age and the migrations the
    branch would bring (from the last `proto4d pending`, while the running commit is the one it
    compared), for `status`."""
    now = time.time() if now is None else now
    dbs = []
    for rel in snapshots.find_databases(shared, declared):
        p = shared / rel
        wal = p.with_name(p.name + "-wal")
        dbs.append({"path": rel, "bytes": _size(p), "wal_bytes": _size(wal), "revision": migrate.schema_revision(p)})
    snaps = snapshots.listing(backups)
    last = snaps[0] if snaps else None
    out: dict[str, Any] = {"databases": dbs, "snapshots": len(snaps),
                           "last_snapshot": {"id": last.id, "age_s": round(now - last.created_at, 1)} if last else None}
    report = fsutil.read_json(pending_report) if pending_report is not None else None
    if isinstance(report, dict) and running_commit and report.get("running") == running_commit:
        out["pending"] = {"migrations": [str(m) for m in report.get("migrations") or []][:50],
                          "commits": int(report.get("commits") or 0), "head": str(report.get("head", ""))[:40],
                          "age_s": round(now - float(report.get("checked_at") or now), 1)}
    return out


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0
