"""The migration step on the real database app (FastAPI + SQLAlchemy + alembic, SQLite in WAL mode).

A real venv (uv), real alembic runs against real copies: a good migration upgrades the copy
and only the copy, a broken one fails with alembic's reason and leaves the live database
byte-identical, and the old code's health check tells a rollback-compatible schema from an
incompatible one.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from harness import FULL
from proto4d import canarydata, migrate, releases

DBAPP = Path(__file__).resolve().parent / "dbapp"
MIGRATIONS = Path(__file__).resolve().parent / "dbapp_migrations"
UPGRADE = ["{python}", "-m", "alembic", "upgrade", "head"]


@pytest.fixture(scope="module")
def venv_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    uv = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
    venv = tmp_path_factory.mktemp("dbapp-venv") / "venv"
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(venv)], check=True)
    subprocess.run([uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python"), "-r",
                    str(DBAPP / "requirements.txt")], check=True, timeout=300)
    return venv / "bin" / "python"


def _release(base: Path, name: str, *extra: str) -> Path:
    rel = base / "releases" / name
    shutil.copytree(DBAPP, rel, ignore=shutil.ignore_patterns("__pycache__"))
    for m in extra:
        shutil.copy(MIGRATIONS / m, rel / "migrations" / "versions" / m)
    releases.link_shared(rel, base / "shared", ["data"], lambda _t: None)
    return rel


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _migrate(python: Path, rel: Path) -> migrate.Migration:
    return migrate.run(UPGRADE, python=python, release=rel, workdir=rel, env={"PATH": "/usr/bin:/bin"}, timeout=120)


def test_migrations_run_on_the_canary_copy_only(tmp_path: Path, venv_python: Path) -> None:
    v1 = _release(tmp_path, "v1")
    first = _migrate(venv_python, v1)  # the first release creates the live schema
    assert first.ok, first.output
    live = tmp_path / "shared" / "data" / "app.db"
    con = sqlite3.connect(live)
    con.executemany("INSERT INTO answers (text) VALUES (?)", [("student",)] * 5)
    con.commit()
    con.close()
    assert migrate.schema_revision(live) == "0001"
    before = _digest(live)

    v2 = _release(tmp_path, "v2", "0002_hint.py")
    cd = canarydata.build(v2, tmp_path / "shared", ["data"], tmp_path / "state" / "canary" / "v2")
    m = _migrate(venv_python, cd.tree)
    assert m.ok, m.output
    assert migrate.schema_revision(cd.shared / "data" / "app.db") == "0002"
    assert migrate.schema_revision(live) == "0001" and _digest(live) == before

    broken = _release(tmp_path, "broken", "0002_broken.py")
    cd2 = canarydata.build(broken, tmp_path / "shared", ["data"], tmp_path / "state" / "canary" / "broken")
    m = _migrate(venv_python, cd2.tree)
    assert not m.ok
    assert "no_such_table" in m.output and "FAILED" in m.describe()
    assert _digest(live) == before


def test_a_missing_interpreter_is_a_failed_migration_not_a_crash(tmp_path: Path) -> None:
    m = migrate.run(UPGRADE, python=tmp_path / "gone" / "python", release=tmp_path, workdir=tmp_path, env={},
                    timeout=10)
    assert not m.ok and "not found" in m.output and str(tmp_path / "gone" / "python") in m.output


def test_schema_revision_of_a_non_database_is_none(tmp_path: Path) -> None:
    (tmp_path / "x.db").write_text("not sqlite")
    assert migrate.schema_revision(tmp_path / "x.db") is None
    assert migrate.schema_revision(tmp_path / "missing.db") is None


def _healthy(python: Path, tree: Path) -> tuple[int, str]:
    """Start the app from `tree` with uvicorn on a free port, ask /health once it listens, stop it."""
    import socket
    import time
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(python), "-m", "uvicorn", "main:app", "--port", str(port)], cwd=tree,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()
            except OSError:
                assert proc.poll() is None, "the app exited"
                assert time.monotonic() < deadline, "the app never answered"
                time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(10)


# The data suite proves the same end to end through the daemon (test_data_e2e); this direct table runs in
# `./dev proofs`, keeping the default suite in its budget.
@pytest.mark.skipif(not FULL, reason="the direct compatibility table runs in ./dev proofs (PROTO4D_FULL=1)")
def test_the_previous_release_on_the_migrated_copy_tells_compatible_from_not(tmp_path: Path,
                                                                          venv_python: Path) -> None:
    v1 = _release(tmp_path, "v1")
    assert _migrate(venv_python, v1).ok
    state = tmp_path / "state" / "canary"

    v2 = _release(tmp_path, "v2", "0002_hint.py")
    cd = canarydata.build(v2, tmp_path / "shared", ["data"], state / "v2")
    assert _migrate(venv_python, cd.tree).ok
    old_on_new = canarydata.view(v1, cd, ["data"], state / "v2-previous")
    assert _healthy(venv_python, old_on_new)[0] == 200  # additive: a code-only rollback keeps every row

    v3 = _release(tmp_path, "v3", "0002_hint.py", "0003_body.py")
    (v3 / "mode.txt").write_text("body\n")
    cd3 = canarydata.build(v3, tmp_path / "shared", ["data"], state / "v3")
    assert _migrate(venv_python, cd3.tree).ok
    assert _healthy(venv_python, cd3.tree)[0] == 200  # the new code runs on its schema
    old_on_new = canarydata.view(v1, cd3, ["data"], state / "v3-previous")
    status, body = _healthy(venv_python, old_on_new)
    assert status == 503 and "OperationalError" in body  # destructive: the old code cannot run on it
    assert migrate.schema_revision(tmp_path / "shared" / "data" / "app.db") == "0001"
