"""`proto4d backups`: list database snapshots, take one, restore one (explicitly, saying what it replaces)."""

from __future__ import annotations

import argparse
import json
import time

from proto4d import config as configmod
from proto4d import snapshots
from proto4d.paths import Paths

EX_OK, EX_FAILED = 0, 1


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def cmd_backups(args: argparse.Namespace) -> int:
    cfg = configmod.load(args.config)
    paths = Paths(cfg.root)
    try:
        if args.restore:
            return _restore(paths, args)
        if args.take:
            dbs = snapshots.find_databases(paths.shared)
            snap = snapshots.take(paths.backups, paths.shared, dbs, release=paths.current_release() or "",
                                  reason=args.reason or "asked for by `proto4d backups --take`")
            if snap is None:
                print(f"no SQLite database under {paths.shared}: nothing to snapshot")
                return EX_OK
            print(f"snapshot {snap.id}: " + ", ".join(
                f"{d['path']} ({_size(d['bytes'])}, {sum(d['rows'].values())} rows)" for d in snap.databases))
            return EX_OK
    except snapshots.SnapshotError as e:
        print(f"proto4d backups: {e}")
        return EX_FAILED
    snaps = snapshots.listing(paths.backups)
    if args.json:
        print(json.dumps([{"id": s.id, **s.info} for s in snaps], indent=2))
        return EX_OK
    if not snaps:
        print(f"no snapshots under {paths.backups} (one is taken before every switch; "
              "`proto4d backups --take` takes one now)")
        return EX_OK
    now = time.time()
    for s in snaps:
        dbs = ", ".join(f"{d['path']} {_size(d['bytes'])} {sum(d['rows'].values())} rows" for d in s.databases)
        print(f"{s.id}  {_age(now - s.created_at):>4} ago  release {s.info.get('release') or '-'}  "
              f"{s.info.get('reason', '')}\n    {dbs}")
    print("\nrestore one: proto4d backups --restore ID [--db PATH] --yes   (says first what it replaces)")
    return EX_OK


def _restore(paths: Paths, args: argparse.Namespace) -> int:
    snap = snapshots.find(paths.backups, args.restore)
    plans = snapshots.plan_restore(snap, paths.shared, args.db)
    print(f"restore from snapshot {snap.id} (taken {_age(time.time() - snap.created_at)} ago, "
          f"release {snap.info.get('release') or '-'}):")
    for p in plans:
        print(f"  replaces shared/{p.database}: {p.describe()}")
    if not args.yes:
        print("nothing restored: add --yes to replace the databases above")
        return EX_FAILED
    # The live state is kept as a snapshot of its own first: a restore never loses rows silently.
    saved = snapshots.take(paths.backups, paths.shared, [p.database for p in plans if p.live.exists()],
                           release=paths.current_release() or "", reason=f"before restoring {snap.id}")
    for p in plans:
        snapshots.restore(p)
    if saved is not None:
        print(f"the databases as they were are kept in snapshot {saved.id}")
    print("restored: " + ", ".join(p.database for p in plans))
    return EX_OK
