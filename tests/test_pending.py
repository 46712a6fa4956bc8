"""`proto4d pending` against a real git origin: what an update would bring, before asking for one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from harness import Origin
from proto4d import datasteps, pending, views


def test_requirement_lines_added_and_removed() -> None:
    diff = "--- a/r.txt\n+++ b/r.txt\n@@ -1,2 +1,2 @@\n-fastapi==0.100\n+fastapi==0.110\n+# a comment\n+\n httpx\n"
    assert pending.requirement_changes(diff) == (["fastapi==0.110"], ["fastapi==0.100"])


def test_new_env_keys_and_the_missing_ones() -> None:
    assert pending.new_env_keys("A=\n", "A=\nB=\nC=\n", "A=1\nC=2\n") == (["B", "C"], ["B"])
    assert pending.new_env_keys("", "A=\n", None) == (["A"], [])


def test_migration_files_are_added_versions() -> None:
    out = "A\tbackend/migrations/versions/0002_hint.py\nM\tbackend/main.py\nA\tbackend/alembic/versions/x.py\n" \
          "D\tbackend/migrations/versions/old.py\nA\tdocs/versions/notes.py\n"
    assert pending.migration_files(out) == ["backend/migrations/versions/0002_hint.py", "backend/alembic/versions/x.py"]


def _setup(tmp_path: Path) -> tuple[Origin, Path, Path]:
    origin = Origin(tmp_path, subdir="app")
    first = origin.commit("1", files={".env.example": "TUTOR_SECRET=\n"})
    root = tmp_path / "root"
    (root / "state").mkdir(parents=True)
    (root / "shared").mkdir()
    (root / "shared" / ".env").write_text("TUTOR_SECRET=x\n")
    (root / "state" / "status.json").write_text(json.dumps({"app": {"commit": first}}))
    cfg = {"root": str(root), "python": sys.executable,
           "app": {"repo": str(origin.bare), "subdir": "app", "requirements": "requirements.txt",
                   "shared": [".env", "data"], "command": ["{python}", "-m", "uvicorn", "main:app", "--fd", "{fd}"]}}
    config = tmp_path / "proto4d.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return origin, root, config


def _pending(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proto4d", "pending", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=60)


def test_pending_shows_commits_requirements_env_keys_and_migrations(tmp_path: Path) -> None:
    origin, root, config = _setup(tmp_path)
    r = _pending(config)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "nothing pending" in r.stdout and "staged: none" in r.stdout

    origin.commit("2", message="hints for every exercise",
                  files={".env.example": "TUTOR_SECRET=\nOPENAI_MODEL=\n",
                         "migrations/versions/0002_hint.py": "revision = '0002'\n"},
                  requirements="uvicorn==0.54.0\nh11==0.16.0\nsqlalchemy==2.0.30\n")
    origin.commit("3", message="fix a typo")
    r = _pending(config)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "2 commit(s)" in out and "hints for every exercise" in out and "fix a typo" in out
    assert "+ sqlalchemy==2.0.30" in out
    assert "new keys in .env.example: .env: OPENAI_MODEL" in out
    assert "MISSING from the shared .env" in out and ".env: OPENAI_MODEL" in out
    assert "app/migrations/versions/0002_hint.py" in out
    data = json.loads(_pending(config, "--json").stdout)
    assert data["up_to_date"] is False and len(data["commits"]) == 2
    assert data["requirements_added"] == ["sqlalchemy==2.0.30"] and data["requirements_removed"] == []
    # Its own repository: the daemon's mirror is never touched.
    assert (root / "state" / "pending.git").is_dir() and not (root / "state" / "repo.git").exists()
    assert str(origin.bare) not in (root / "state" / "pending.git" / "config").read_text()

    # What it found stays for `status`, while the running commit is the one it compared.
    first = json.loads((root / "state" / "status.json").read_text())["app"]["commit"]
    report = json.loads((root / "state" / "pending.json").read_text())
    assert (report["running"], report["commits"]) == (first, 2)
    assert report["migrations"] == ["app/migrations/versions/0002_hint.py"]
    st = datasteps.status(root / "shared", [], root / "backups", pending_report=root / "state" / "pending.json",
                          running_commit=first)
    assert st["pending"]["migrations"] == ["app/migrations/versions/0002_hint.py"] and st["pending"]["commits"] == 2
    assert "pending" not in datasteps.status(root / "shared", [], root / "backups",
                                             pending_report=root / "state" / "pending.json", running_commit="other")
    shown = views.render_status({"daemon": {"state": "running"}, "app": {}, "activity": {}, "update": {},
                                 "data": st}, None)
    assert "pending  2 commits on the branch, 1 migration (0002_hint.py)" in shown, shown


def test_an_unreachable_origin_is_said_plainly(tmp_path: Path) -> None:
    origin, _root, config = _setup(tmp_path)
    import shutil
    shutil.rmtree(origin.bare)
    r = _pending(config)
    assert r.returncode == 1 and "cannot tell what an update would bring" in r.stdout
    assert "Traceback" not in r.stderr
