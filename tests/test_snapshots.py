"""Shared links and database snapshots on real SQLite files (WAL mode, a writer running throughout).

No fakes: the databases are real SQLite files written by a real writer thread while the
snapshot and the restore run; the CLI is the real `proto4d backups` in a subprocess.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from proto4d import releases, snapshots


def _wal_db(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE answers (id INTEGER PRIMARY KEY, text TEXT NOT NULL)")
    con.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
    con.commit()
    con.close()


class Writer(threading.Thread):
    """Inserts rows with ids 1, 2, 3... one transaction each, as fast as it can, until stopped."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.acked = 0
        self.stop = threading.Event()

    def run(self) -> None:
        con = sqlite3.connect(self.path, timeout=30)
        while not self.stop.is_set():
            con.execute("INSERT INTO answers (id, text) VALUES (?, ?)", (self.acked + 1, "x" * 200))
            con.commit()
            self.acked += 1
        con.close()

    def wait_rows(self, n: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while self.acked < n:
            assert time.monotonic() < deadline, f"writer reached only {self.acked} rows"
            time.sleep(0.005)


def test_a_missing_shared_file_is_linked_so_the_app_creates_it_in_shared(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    rel1, rel2 = tmp_path / "releases" / "r1", tmp_path / "releases" / "r2"
    for r in (rel1, rel2):
        (r / "backend").mkdir(parents=True)
    said: list[str] = []
    releases.link_shared(rel1, shared, ["backend/data/app.db"], said.append)
    assert (rel1 / "backend/data/app.db").is_symlink()
    assert not (shared / "backend/data/app.db").exists()  # dangling until the app's first write
    assert "linked" in said[0]

    # The app of release 1 creates its database on first start, in WAL mode, and students write.
    _wal_db(rel1 / "backend/data/app.db")
    con = sqlite3.connect(rel1 / "backend/data/app.db")
    con.executemany("INSERT INTO answers (text) VALUES (?)", [("a",)] * 25)
    con.commit()
    con.close()
    assert snapshots.is_sqlite(shared / "backend/data/app.db")
    assert not (rel1 / "backend/data/app.db-wal").exists()  # SQLite's side files follow the link too

    # The next release links the same file; retention then deletes release 1 whole: nothing is lost.
    releases.link_shared(rel2, shared, ["backend/data/app.db"], said.append)
    import shutil
    shutil.rmtree(rel1)
    assert snapshots.row_counts(rel2 / "backend/data/app.db")["answers"] == 25


def test_find_databases_by_header_skips_side_files_and_links(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    _wal_db(shared / "data" / "app.db")
    (shared / "data" / "notes.txt").write_text("SQLite format 2, not a database")
    (shared / ".env").write_text("A=1\n")
    outside = tmp_path / "outside"
    _wal_db(outside / "other.db")
    os.symlink(outside, shared / "linked")
    assert snapshots.find_databases(shared) == ["data/app.db"]
    assert snapshots.find_databases(shared, ["data/app.db", "data/missing.db"]) == ["data/app.db"]


def test_snapshot_under_a_running_writer_is_consistent(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    db = shared / "data" / "app.db"
    _wal_db(db)
    w = Writer(db)
    w.start()
    try:
        w.wait_rows(200)
        snap = snapshots.take(tmp_path / "backups", shared, ["data/app.db"], release="r1", reason="test")
        acked_after = w.acked
    finally:
        w.stop.set()
        w.join()
    assert snap is not None
    copy = snap.path / "data" / "app.db"
    con = sqlite3.connect(copy)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    ids = [r[0] for r in con.execute("SELECT id FROM answers ORDER BY id")]
    con.close()
    # One consistent read: rows 1..n with no gap, n between what was acknowledged before and after.
    assert ids == list(range(1, len(ids) + 1))
    assert 200 <= len(ids) <= acked_after
    assert snap.databases[0]["rows"] == {"answers": len(ids), "users": 0}
    assert not list(copy.parent.glob("*-wal"))  # self-contained
    assert [s.id for s in snapshots.listing(tmp_path / "backups")] == [snap.id]


def test_an_interrupted_snapshot_is_not_listed(tmp_path: Path) -> None:
    backups = tmp_path / "backups"
    (backups / ".tmp-20261129_000000_r1").mkdir(parents=True)
    (backups / "junk").mkdir()
    assert snapshots.listing(backups) == []


def test_retention_keeps_the_newest_and_the_young() -> None:
    day = 86400.0
    snaps = [snapshots.Snapshot(f"2026110{i}_000000_r", Path("/x"), {"created_at": i * day}) for i in range(1, 7)]
    gone = snapshots.plan_retention(snaps, now=10 * day, keep_days=7, keep_min=2)
    assert sorted(gone) == ["20261101_000000_r", "20261102_000000_r"]
    assert snapshots.plan_retention(snaps, now=10 * day, keep_days=7, keep_min=6) == []


def _config(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    cfg = {"root": str(tmp_path / "root"), "python": sys.executable,
           "app": {"repo": str(repo), "command": ["{python}", "-m", "uvicorn", "main:app", "--fd", "{fd}"]}}
    path = tmp_path / "proto4d.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proto4d", "backups", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=60)


def test_backups_cli_takes_lists_and_restores_saying_what_it_replaces(tmp_path: Path) -> None:
    config = _config(tmp_path)
    shared = tmp_path / "root" / "shared"
    db = shared / "data" / "app.db"
    _wal_db(db)
    con = sqlite3.connect(db)
    con.executemany("INSERT INTO answers (text) VALUES (?)", [("before",)] * 10)
    con.commit()

    r = _cli(config, "--take", "--reason", "before the lesson")
    assert r.returncode == 0, r.stderr
    assert "data/app.db" in r.stdout and "10 rows" in r.stdout
    sid = snapshots.listing(tmp_path / "root" / "backups")[0].id

    # Students write 7 more answers and 2 users while the app's connection stays open.
    con.executemany("INSERT INTO answers (text) VALUES (?)", [("after",)] * 7)
    con.executemany("INSERT INTO users DEFAULT VALUES", [()] * 2)
    con.commit()

    r = _cli(config, "--restore", sid)
    assert r.returncode == 1
    assert "answers +7" in r.stdout and "users +2" in r.stdout and "nothing restored" in r.stdout
    assert snapshots.row_counts(db)["answers"] == 17  # untouched without --yes

    r = _cli(config, "--restore", sid, "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert con.execute("SELECT COUNT(*) FROM answers").fetchone()[0] == 10  # the open connection sees it
    kept = [s for s in snapshots.listing(tmp_path / "root" / "backups") if s.id != sid]
    assert len(kept) == 1 and kept[0].databases[0]["rows"] == {"answers": 17, "users": 2}
    assert kept[0].id in r.stdout
    con.close()

    listing = _cli(config)
    assert listing.returncode == 0 and sid in listing.stdout and kept[0].id in listing.stdout


@pytest.mark.parametrize("bad", ["../../etc", "latest-ish", "2026"])
def test_restore_of_an_unknown_snapshot_names_it(tmp_path: Path, bad: str) -> None:
    r = _cli(_config(tmp_path), "--restore", bad, "--yes")
    assert r.returncode == 1
    assert repr(bad) in r.stdout and "Traceback" not in r.stderr


def test_the_canary_writes_only_its_own_copies(tmp_path: Path) -> None:
    from proto4d import canarydata

    shared, rel = tmp_path / "shared", tmp_path / "releases" / "r2"
    (rel / "backend").mkdir(parents=True)
    (rel / "backend" / "main.py").write_text("print('app')\n")
    _wal_db(shared / "backend" / "data" / "app.db")
    (shared / "backend" / "data" / "uploads").mkdir()
    (shared / "backend" / "data" / "uploads" / "a.txt").write_text("upload")
    (shared / "backend" / ".env").write_text("SECRET=1\n")
    rels = ["backend/.env", "backend/data", "backend/new.db"]
    releases.link_shared(rel, shared, rels, lambda _t: None)
    w = Writer(shared / "backend" / "data" / "app.db")
    w.start()
    try:
        w.wait_rows(50)
        cd = canarydata.build(rel, shared, rels, tmp_path / "state" / "canary" / "r2")
        w.wait_rows(w.acked + 20)  # production keeps being written while the canary runs
    finally:
        w.stop.set()
        w.join()
    assert cd.copied == ("backend/data/app.db",)
    # The canary migrates and writes through the paths it sees, relative to its tree.
    con = sqlite3.connect(cd.tree / "backend" / "data" / "app.db")
    con.execute("ALTER TABLE answers ADD COLUMN hint TEXT")
    con.execute("INSERT INTO answers (id, text) VALUES (-1, 'canary')")
    con.commit()
    con.close()
    (cd.tree / "backend" / "data" / "uploads" / "a.txt").write_text("changed by the canary")
    (cd.tree / "backend" / "new.db").write_text("created by the canary")
    assert (cd.tree / "backend" / ".env").read_text() == "SECRET=1\n"
    assert not os.access(cd.shared / "backend" / ".env", os.W_OK) or os.geteuid() == 0
    assert oct((cd.shared / "backend" / ".env").stat().st_mode & 0o777) == "0o400"

    live = sqlite3.connect(shared / "backend" / "data" / "app.db")
    cols = [r[1] for r in live.execute("PRAGMA table_info(answers)")]
    assert "hint" not in cols
    assert live.execute("SELECT COUNT(*) FROM answers WHERE id < 0").fetchone()[0] == 0
    assert live.execute("SELECT COUNT(*) FROM answers").fetchone()[0] == w.acked
    live.close()
    assert (shared / "backend" / "data" / "uploads" / "a.txt").read_text() == "upload"
    assert not (shared / "backend" / "new.db").exists()
    assert (rel / "backend" / "main.py").read_text() == "print('app')\n"
    cd.remove()
    assert not cd.base.exists()
