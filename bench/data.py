"""What the data steps cost: snapshot, the canary's copy and a migration, on 10 MB and 200 MB SQLite
databases while a writer keeps inserting rows (as students do during class).

For each size: the database is made (WAL mode, ~1 KiB rows), a writer thread commits one row
at a time and records each commit's latency; then, one after the other, a snapshot
(proto4d.snapshots.take), the canary's copy (proto4d.canarydata.build) and an additive alembic
migration on that copy (the tests' database app, in a real venv) are timed. The writer's
commit latency while each step runs is compared with the same writer at rest, in the same run.

    ./dev bench data [--sizes 10,200]
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from proto4d import canarydata, migrate, releases, snapshots

ROOT = Path(__file__).resolve().parents[1]
DBAPP = ROOT / "tests" / "dbapp"
MIGRATIONS = ROOT / "tests" / "dbapp_migrations"
ROW = "x" * 1000


class Writer(threading.Thread):
    def __init__(self, db: Path) -> None:
        super().__init__(daemon=True)
        self.db = db
        self.stop = threading.Event()
        self.lat: list[tuple[float, float]] = []  # (when, seconds)
        self.failed = 0

    def run(self) -> None:
        con = sqlite3.connect(self.db, timeout=30)
        while not self.stop.is_set():
            t = time.monotonic()
            try:
                con.execute("INSERT INTO answers (text) VALUES (?)", (ROW,))
                con.commit()
            except sqlite3.Error:
                self.failed += 1
                continue
            self.lat.append((t, time.monotonic() - t))
            time.sleep(0.002)  # ~400 writes/s: far above a classroom, far below SQLite's limit
        con.close()

    def during(self, a: float, b: float) -> list[float]:
        return [s for t, s in self.lat if a <= t <= b]


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, round(p / 100 * (len(v) - 1)))]


def make_db(path: Path, mb: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE answers (id INTEGER PRIMARY KEY, text TEXT)")
    con.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)")
    con.execute("INSERT INTO alembic_version VALUES ('0001')")
    rows = mb * 1024 * 1024 // 1040
    con.executemany("INSERT INTO answers (text) VALUES (?)", ((ROW,) for _ in range(rows)))
    con.commit()
    con.close()


def venv_python(base: Path) -> Path:
    uv = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
    venv = base / "venv"
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(venv)], check=True)
    subprocess.run([uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python"), "-r",
                    str(DBAPP / "requirements.txt")], check=True, timeout=600)
    return venv / "bin" / "python"


def measure(base: Path, mb: int, python: Path) -> dict[str, Any]:
    shared = base / f"shared{mb}"
    db = shared / "data" / "app.db"
    make_db(db, mb)
    rel = base / f"release{mb}"
    shutil.copytree(DBAPP, rel, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(MIGRATIONS / "0002_hint.py", rel / "migrations" / "versions")
    releases.link_shared(rel, shared, ["data"], lambda _t: None)
    w = Writer(db)
    w.start()
    out: dict[str, Any] = {"size_mb": round(db.stat().st_size / 2**20, 1)}
    try:
        time.sleep(3)
        rest = w.during(time.monotonic() - 2.5, time.monotonic())
        steps = {}
        a = time.monotonic()
        snapshots.take(base / f"backups{mb}", shared, ["data/app.db"], release="bench", reason="bench")
        steps["snapshot"] = (a, time.monotonic())
        a = time.monotonic()
        cd = canarydata.build(rel, shared, ["data"], base / f"canary{mb}")
        steps["canary copy"] = (a, time.monotonic())
        a = time.monotonic()
        m = migrate.run(["{python}", "-m", "alembic", "upgrade", "head"], python=python, release=cd.tree,
                        workdir=cd.tree, env={"PATH": "/usr/bin:/bin"}, timeout=600)
        steps["migration (copy)"] = (a, time.monotonic())
        assert m.ok, m.output
        time.sleep(1)
    finally:
        w.stop.set()
        w.join()
    out["rest_p50_ms"], out["rest_max_ms"] = pct(rest, 50) * 1000, max(rest) * 1000
    for name, (a, b) in steps.items():
        lat = w.during(a, b)
        out[name] = {"seconds": b - a, "writes": len(lat), "p50_ms": pct(lat, 50) * 1000,
                     "p99_ms": pct(lat, 99) * 1000, "max_ms": max(lat, default=float("nan")) * 1000}
    out["writer_failed"] = w.failed
    out["added_s"] = sum(b - a for a, b in steps.values())
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10,200", help="database sizes in MB (default 10,200)")
    args = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="proto4d-bench-data-"))
    try:
        python = venv_python(base)
        print("| database | step | seconds | writes during | writer p50 / p99 / max ms (at rest p50 / max) |")
        print("|---|---|---|---|---|")
        for mb in (int(s) for s in args.sizes.split(",")):
            r = measure(base, mb, python)
            for step in ("snapshot", "canary copy", "migration (copy)"):
                s = r[step]
                print(f"| {r['size_mb']} MiB | {step} | {s['seconds']:.2f} | {s['writes']} | "
                      f"{s['p50_ms']:.1f} / {s['p99_ms']:.1f} / {s['max_ms']:.1f} "
                      f"({r['rest_p50_ms']:.1f} / {r['rest_max_ms']:.1f}) |")
            print(f"| {r['size_mb']} MiB | **added before the switch** | {r['added_s']:.2f} | | "
                  f"writes failed: {r['writer_failed']} |")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
