"""app.spare end to end: a real daemon keeps a spare interpreter with the venv's imports done, and the
next update's canary is that process (it then imports only the app's own code), promoted in place; with
students' data (the canary runs on copies and is not promoted), the spare is the handoff's new process.

And the spare's protocol with a real interpreter: it becomes a server of the sample app on the socket
handed to it, and refuses when the release's tree would shadow a module it already imported.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import sqlite3
import sys
from pathlib import Path

import psutil
import pytest

from harness import answer, events, request_id, wait_for
from proto4d import spare
from proto4d.child import AppProcess
from proto4d.drain import SHIM_DIR

SAMPLE = Path(__file__).resolve().parent.parent / "daemon" / "proto4d" / "sample"


def warm_spare(d, timeout: float = 60) -> dict:
    return d.wait_status(lambda s: s["app"]["spare"] if (s["app"].get("spare") or {}).get("state") == "warm"
                         else None, timeout, "a warm spare")["app"]["spare"]


@pytest.mark.e2e
def test_the_warm_spare_becomes_the_next_canary_and_is_promoted(make_daemon, origin):
    d = make_daemon(app={"spare": True}).start()
    sp = warm_spare(d)  # nobody on: it warms, with what the serving process imported
    assert sp["imported"] > 20 and sp["failed"] == 0, sp
    (warm,) = events(d, "spare.warm")
    assert warm["pid"] == sp["pid"]
    assert "spare    warm, pid" in d.cli("status").stdout

    origin.commit("3")
    r = d.update("--force", "--wait")
    assert r.returncode == 0, r.stdout + r.stderr
    rid = request_id(r.stdout)
    assert answer(d, rid)["state"] == "done", answer(d, rid)
    s = d.status()
    assert d.get()["version"] == "3"
    assert s["app"]["pid"] == sp["pid"], "the spare became the canary, then production"
    (became,) = events(d, "spare.became")
    assert became["pid"] == sp["pid"] and became["role"] == "canary"
    assert not events(d, "spare.unused")
    # A new one warms for the next update, and the process the first spare became hands over like any:
    # the switch waits for it to stop accepting (its descriptors came over the spare's socket, under
    # other numbers than a cold start's), not for it to exit.
    again = warm_spare(d)
    assert again["pid"] != sp["pid"]
    origin.commit("4")
    r = d.update("--force", "--wait")
    assert r.returncode == 0 and d.get()["version"] == "4", r.stdout + r.stderr
    assert d.status()["app"]["pid"] == again["pid"]
    log = d.log_events()
    rid = request_id(r.stdout)
    switched = next(i for i, e in enumerate(log) if e.get("event") == "update.step_done"
                    and e.get("id") == rid and e.get("step") == "switching")
    drained = next(i for i, e in enumerate(log) if e.get("event") == "app.drained" and e.get("pid") == sp["pid"])
    assert switched < drained, "the switch waited for the old process to exit"


@pytest.mark.e2e
def test_with_students_data_the_spare_is_the_handoffs_new_process(make_daemon, origin):
    d = make_daemon(app={"spare": True})
    db = d.root / "shared" / "data" / "answers.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE answers (id INTEGER PRIMARY KEY, text TEXT)")
        conn.execute("INSERT INTO answers (text) VALUES ('kept')")
    d.start()
    sp = warm_spare(d)
    origin.commit("2")
    r = d.update("--force", "--wait")
    assert r.returncode == 0 and d.get()["version"] == "2", r.stdout + r.stderr
    (became,) = events(d, "spare.became")
    assert became["role"] == "app" and became["pid"] == sp["pid"] == d.status()["app"]["pid"], became
    assert not events(d, "spare.unused")
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT text FROM answers").fetchall() == [("kept",)]


@pytest.mark.e2e
def test_a_reload_ends_the_spare_and_the_next_one_starts_with_the_new_environment(make_daemon, origin):
    d = make_daemon(app={"spare": True}).start()
    sp = warm_spare(d)
    d.cfg["app"]["env"] = {"TUTOR_MODE": "exam"}
    d.write_config()
    d.signal(signal.SIGHUP)
    (ended,) = wait_for(lambda: events(d, "spare.ended"), 20, "the old spare ended")
    assert ended["pid"] == sp["pid"] and "reloaded" in ended["why"], ended
    wait_for(lambda: not psutil.pid_exists(sp["pid"]), 10, "the old spare gone")
    again = warm_spare(d)
    assert again["pid"] != sp["pid"]
    origin.commit("2")
    assert d.update("--force", "--wait").returncode == 0
    assert d.get()["version"] == "2" and d.status()["app"]["pid"] == again["pid"]
    assert d.get("/env?key=TUTOR_MODE")["value"] == "exam"
    assert not events(d, "spare.unused")


# -- the protocol, with a real interpreter and the shim


def _env() -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV") and not k.startswith(("UVICORN_", "PROTO4D_"))}
    return {**keep, "PYTHONPATH": str(SHIM_DIR), "PYTHONUNBUFFERED": "1"}


async def _spare_then(tmp_path: Path, release: Path) -> tuple[str, str, list[str]]:
    mine, theirs = socket.socketpair()
    lines: list[str] = []
    proc = AppProcess(release="r1", role="spare", argv=[sys.executable, "-m", "proto4d_drain", spare.FLAG],
                      cwd=tmp_path, env={**_env(), spare.ENV: str(theirs.fileno())}, pass_fds=(theirs.fileno(),),
                      on_line=lambda line, p: lines.append(line), registry=None, ready_pattern="Uvicorn running on")
    await proc.start()
    theirs.close()
    sp = spare.Spare(proc, mine, spare.Key.of(sys.executable, "", {}), "v1")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    try:
        await sp.warm(["uvicorn.main", "uvicorn.config", "h11", "no_such_module_here"], 30)
        assert sp.imported >= 2 and sp.failed == 1, (sp.imported, sp.failed)  # uvicorn.config came with .main
        (fd,) = await sp.send_fds([listener.fileno()])
        why = await sp.become(["main:app", "--fd", str(fd)], release, _env())
        if why:
            await proc.wait(10)
            return why, "", lines
        assert await proc.wait_ready_line(20), lines

        def get() -> str:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/version")
            return conn.getresponse().read().decode()

        body = await asyncio.to_thread(get)
        return "", body, lines
    finally:
        listener.close()
        sp.close()
        await proc.stop(5)


def _release(tmp_path: Path, version: str, extra: dict[str, str] | None = None) -> Path:
    rel = tmp_path / f"release-{version}"
    rel.mkdir()
    (rel / "main.py").write_text((SAMPLE / "main.py").read_text())
    (rel / "VERSION").write_text(version)
    for name, text in (extra or {}).items():
        (rel / name).parent.mkdir(parents=True, exist_ok=True)
        (rel / name).write_text(text)
    return rel


def test_a_spare_becomes_the_server_of_the_release_it_is_given(tmp_path):
    # A folder named like an imported package but without __init__ shadows nothing (a namespace portion).
    why, body, lines = asyncio.run(_spare_then(tmp_path, _release(tmp_path, "7", {"h11/notes.txt": "x"})))
    assert not why, why
    assert json.loads(body)["version"] == "7", body
    assert any("proto4d-drain: active" in line for line in lines), lines


@pytest.mark.parametrize("path", ["h11.py", "h11/__init__.py"])
def test_a_spare_refuses_a_release_that_would_shadow_what_it_imported(tmp_path, path):
    rel = _release(tmp_path, "8", {path: "raise SystemExit('the release own h11 ran')\n"})
    why, body, lines = asyncio.run(_spare_then(tmp_path, rel))
    assert f"{path.split('/')[0]}{'/' if '/' in path else ''} would shadow the imported module h11" in why, (why, lines)
    assert not body
