"""`app.user`: a daemon run as root starts the app, its canary and its migrations as that user, who
owns the app's data and nothing of the daemon's. Real processes, a real account (`nobody`)."""

from __future__ import annotations

import importlib.util
import os
import pwd
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from harness import FULL, events, wait_for
from proto4d import appuser, config

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs the tests to run as root")
NOBODY = pwd.getpwnam("nobody") if os.geteuid() == 0 else None


def as_nobody(code: str) -> subprocess.CompletedProcess[str]:
    """Python code run as nobody (proto4d importable: the test reads appuser's own answer there)."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(appuser.__file__).parents[1])}
    return subprocess.run([python_for_nobody(), "-c", code], capture_output=True, text=True, timeout=30,
                          user="nobody", group=NOBODY.pw_gid, extra_groups=[], cwd="/", env=env)


def python_for_nobody() -> str:
    """An interpreter `nobody` can run: the venvs are built from it and link back to it."""
    for cand in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if Path(cand).exists() and appuser.lookup("nobody").cannot_run(Path(cand)) is None:
            return cand
    pytest.skip("no Python 3 here that the nobody account can run (the lab's interpreter is under /root)")


def reachable(path: Path) -> None:
    """What an operator does for a root the app user lives under: every directory above it searchable
    (pytest makes its temporary directories 0700), and proto4d's own package readable (the app imports
    the drain shim from it; a checkout may sit in a 0700 directory)."""
    for top in (path, Path(appuser.__file__).resolve().parent):
        for d in [top, *top.parents]:
            if d.exists():
                os.chmod(d, os.stat(d).st_mode | 0o001)


class Uids:
    """The user of every process running from under `where`, seen while a thread watches."""

    def __init__(self, where: Path) -> None:
        self.where = str(where)
        self.seen: dict[int, int] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            for p in psutil.process_iter(["pid", "cwd", "uids"]):
                if (p.info["cwd"] or "").startswith(self.where) and p.info["uids"]:
                    self.seen[p.pid] = p.info["uids"].effective
            self.stop.wait(0.02)

    def __enter__(self) -> Uids:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)


def test_the_app_and_its_canary_run_as_app_user_and_cannot_touch_the_daemons_files(make_daemon, origin):
    d = make_daemon(app={"user": "nobody"}, python=python_for_nobody())
    d.seed_venv = False  # the daemon builds the venv, for an app that cannot write into it
    reachable(d.base)
    d.start()
    s = d.status()
    app = psutil.Process(s["app"]["pid"])
    assert app.uids().effective == NOBODY.pw_uid
    # Its packages were compiled when the venv was built: no start of an app that cannot write
    # __pycache__ there compiles its dependencies again.
    sources = list((d.root / "venvs").glob("*/lib/python3*/site-packages/uvicorn/*.py"))
    assert sources, "no uvicorn in the release venv"
    uncompiled = [p for p in sources if not os.path.exists(importlib.util.cache_from_source(str(p)))]
    assert uncompiled == [], uncompiled
    assert d.get("/env?key=USER")["value"] == "nobody"
    assert d.get("/file?name=.env")["text"].startswith("TUTOR_SECRET=")  # its own secrets, readable to it
    assert os.stat(d.root / "shared" / ".env").st_uid == NOBODY.pw_uid
    assert os.stat(d.root / "shared" / "data").st_uid == NOBODY.pw_uid  # where it writes is its own

    origin.commit("2")
    before = d.status()["app"]["pid"]
    with Uids(d.root) as seen:  # every process run from under root: the canary (on copies or promoted) too
        r = d.update("--force", "--wait")
    assert r.returncode == 0, r.stdout + r.stderr
    assert set(seen.seen) - {before} and set(seen.seen.values()) == {NOBODY.pw_uid}, seen.seen
    s = d.status()
    assert psutil.Process(s["app"]["pid"]).uids().effective == NOBODY.pw_uid
    assert d.get("/version")["version"] == "2"

    # What the app cannot do: ask for an update, edit a release, read the daemon's state.
    release = (d.root / "current").resolve()
    for what, code in (
        ("drop a request", f"open({str(d.root / 'update.request')!r}, 'w')"),
        ("edit its release", f"open({str(release / 'main.py')!r}, 'a')"),
        ("add to its release", f"open({str(release / 'new.py')!r}, 'w')"),
        ("read the status", f"open({str(d.root / 'state' / 'status.json')!r}).read()"),
        ("read the journal", f"open({str(d.root / 'state' / 'journal.json')!r}).read()"),
        ("read the daemon's log", f"open({str(d.root / 'logs' / 'proto4d.log')!r}).read()"),
    ):
        proc = as_nobody(code)
        assert proc.returncode != 0 and "PermissionError" in proc.stderr, (what, proc.stderr)
    assert not (d.root / "update.request").exists()


def test_an_unknown_app_user_is_refused_by_the_config_and_never_runs_as_the_daemon(tmp_path, make_daemon):
    reachable(tmp_path)
    text = f"root: state\npython: {sys.executable}\napp: {{repo: x, user: no-such-user-here}}\n"
    with pytest.raises(config.ConfigError) as info:
        config.parse(text, "x.yaml", base_dir=tmp_path)
    assert info.value.key == "app.user" and "a user that exists on this machine" in str(info.value)
    # A daemon that is not root cannot switch: the start fails with that reason.
    proc = as_nobody("from proto4d import appuser; print(appuser.resolve('root').problem())")
    assert proc.returncode == 0, proc.stderr
    assert "not root, so it cannot start the app as another user" in proc.stdout
    # An account removed after the config was read: the start fails, naming it.
    gone = appuser.resolve("no-such-user-here")
    assert gone is not None and "no such user" in (gone.problem() or "")
    # A file behind a private directory (the shim of a proto4d installed under a 0700 home) is named.
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "proto4d_drain.py").write_text("")
    why = appuser.lookup("nobody").cannot_read(private / "proto4d_drain.py")
    assert why is not None and str(private) in why and "install proto4d where every user can read it" in why
    # The daemon's own user is no switch at all.
    assert appuser.resolve("root") is None and appuser.resolve("") is None


def test_an_interpreter_the_app_user_cannot_reach_is_named_in_the_failed_start(make_daemon):
    hidden = appuser.lookup("nobody").cannot_run(Path(sys.executable))
    if hidden is None:
        pytest.skip(f"{sys.executable} is reachable by nobody here")
    d = make_daemon(app={"user": "nobody"})
    reachable(d.base)
    d.start(wait_healthy=False)
    exited = wait_for(lambda: events(d, "app.exited"), 60, "the failed start")
    assert "cannot reach" in exited[0]["last_output"] and "the `python` key" in exited[0]["last_output"], exited[0]
    assert not d.app_pids()


@pytest.mark.long
@pytest.mark.skipif(not FULL, reason="a second SQLAlchemy venv from the system Python: runs in ./dev proofs")
def test_a_database_app_migrates_and_writes_as_its_user_across_an_update(tmp_path):
    """SQLite in WAL mode as `nobody`: the first release's migration, rows written under load, a
    migration on the canary's copy and live at the switch, the daemon's snapshot (as root) in between."""
    from harness import Daemon
    from test_data_e2e import Writers, db_origin, ids_in, migration, revision

    origin = db_origin(tmp_path)
    d = Daemon(tmp_path, origin, python=python_for_nobody(),
               app={"user": "nobody", "migrate": ["{python}", "-m", "alembic", "upgrade", "head"],
                    "shared": [".env", "data"]},
               health={"checks": [{"path": "/health", "status": [200]}], "start_timeout_s": 40})
    reachable(d.base)
    try:
        d.start()
        db = d.root / "shared" / "data" / "app.db"
        assert revision(db) == "0001" and os.stat(db).st_uid == NOBODY.pw_uid
        with Writers(d.port) as w:
            w.wait(10)
            origin.commit("2", files=migration("0002_hint.py"))
            r = d.update("--force", "--wait")
            w.wait(10)
        assert r.returncode == 0, r.stdout + r.stderr
        assert revision(db) == "0002" and w.failed == []
        assert set(w.acked) <= ids_in(db)
        for p in db.parent.iterdir():  # the database and its WAL files stay the app's, whoever touched them
            assert os.stat(p).st_uid == NOBODY.pw_uid, p
        assert psutil.Process(d.status()["app"]["pid"]).uids().effective == NOBODY.pw_uid
    finally:
        d.cleanup()
