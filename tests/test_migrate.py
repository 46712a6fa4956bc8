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
    assert not m.ok and "FileNotFoundError" in m.output


def test_schema_revision_of_a_non_database_is_none(tmp_path: Path) -> None:
    (tmp_path / "x.db").write_text("not sqlite")
    assert migrate.schema_revision(tmp_path / "x.db") is None
    assert migrate.schema_revision(tmp_path / "missing.db") is None
