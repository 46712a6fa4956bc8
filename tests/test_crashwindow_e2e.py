"""The crash window between a fork and its record, and failures that must never leave the daemon idle.

Real daemon, real origin, real uvicorn: the daemon is SIGKILLed with a new process forked but
not yet in `state/app.pids`; an orphan that escaped the registry holds the port; the venv's
interpreter vanishes under a running release.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import psutil
import pytest

from harness import free_port, wait_for
from test_killpoints_e2e import FAULTS_ENV, request, settle_and_check, tree_digest
from test_spare_e2e import warm_spare

pytestmark = pytest.mark.e2e


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize(("promote", "point", "outcome"), [
    # one start: the new release's only process is its canary, which inherits the shared socket
    ("auto", "forked_canary", "aborted"),
    # two starts: the process forked in the switch (a database keeps the canary on copies)
    ("never", "forked_app", "rolled_back"),
])
def test_kill_between_fork_and_record_in_a_switch(make_daemon, origin, promote, point, outcome):
    """The found outage: the daemon dies right after forking the new release's process, which holds the
    shared socket. The held child never runs the app, so nothing holds the port and the restart serves
    at once."""
    # A cold start's window: a spare (app.spare) is not forked in the switch (spare_handed, below)
    d = make_daemon(update={"promote": promote}, app={"spare": False}).start(env=FAULTS_ENV)
    shared = tree_digest(d.root / "shared")
    old_pid = d.status()["app"]["pid"]
    origin.commit("2")
    (d.root / "state" / "pause-at").write_text(point)
    rid = request(d, "update")
    marker = d.root / "state" / f"paused-at-{point}"
    wait_for(marker.exists, 60, "the fork of the new process")
    held = [p for p in psutil.Process(d.proc.pid).children() if p.pid != old_pid]
    assert held, "the forked, not yet recorded child"
    recorded = [e["pid"] for e in json.loads((d.root / "state" / "app.pids").read_text())]
    assert all(p.pid not in recorded for p in held)
    d.kill()
    (d.root / "state" / "pause-at").unlink()
    marker.unlink()
    for p in held:  # the daemon's death released nobody: the held shell ends without running the app
        wait_for(lambda p=p: gone(p.pid), 10, f"held pid {p.pid} gone by itself")
    settle_and_check(d, rid, outcome, "1", shared)
    assert not [e for e in d.log_events() if e.get("event") == "listen.failed"]


def test_an_unrecorded_orphan_holding_the_port_is_recognised_and_ended(make_daemon):
    """Defence in depth: a process of ours missing from the registry (here: the registry lost) is
    recognised by what it is, ended, and the daemon serves again without anyone's help."""
    d = make_daemon().start()
    orphan = d.status()["app"]["pid"]
    d.kill()
    (d.root / "state" / "app.pids").unlink()
    d.start()
    wait_for(lambda: gone(orphan), 20, "the orphan ended")
    ev = [e for e in d.log_events() if e.get("event") == "stale.found"]
    assert any(e.get("pid") == orphan for e in ev), ev
    s = d.status()
    assert s["app"]["pid"] != orphan and d.app_pids() == [s["app"]["pid"]]
    assert d.get()["status"] == 200


def test_a_vanished_interpreter_is_a_failed_start_retried_until_it_is_back(make_daemon):
    """An exec that fails (Homebrew removed the interpreter the venv points at) is a failed start with its
    reason in status, retried with backoff: never a daemon crash, never idle."""
    d = make_daemon(app={"max_fast_failures": 100}).start()
    s = d.status()
    venv_python = d.root / "venvs" / json.loads(
        (d.root / "releases" / s["app"]["release"] / "release.json").read_text())["venv"] / "bin" / "python"
    target = os.readlink(venv_python)
    venv_python.unlink()
    venv_python.symlink_to(d.base / "no-such-python")
    os.kill(s["app"]["pid"], signal.SIGKILL)
    st = d.wait_status(lambda s: s["app"]["state"] == "backoff" and s["app"]["restarts"] >= 2, 60,
                       "failed starts retried")
    assert "could not execute" in st["app"]["last_exit"] or "not found" in st["app"]["last_exit"], st["app"]
    venv_python.unlink()
    venv_python.symlink_to(target)
    d.wait_healthy(timeout=60)
    assert d.get()["status"] == 200
    d.assert_alive()


def test_a_failed_listen_ends_a_stale_process_of_ours_and_binds(make_daemon, origin):
    """A process of ours outside the registry holds the port the next switch needs: the failed bind
    ends it (recognised by its interpreter from venvs/) and binds, without a failed update."""
    d = make_daemon().start()
    s = d.status()
    venv = json.loads((d.root / "releases" / s["app"]["release"] / "release.json").read_text())["venv"]
    new_port = free_port()
    code = ("import socket, time; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
            f"s.bind(('127.0.0.1', {new_port})); s.listen(); print('up', flush=True); time.sleep(120)")
    stray = subprocess.Popen([str(d.root / "venvs" / venv / "bin" / "python"), "-c", code], stdout=subprocess.PIPE,
                             start_new_session=True)
    try:
        assert stray.stdout is not None and stray.stdout.readline().strip() == b"up"
        d.cfg["listen"]["port"] = new_port
        d.write_config()
        d.signal(signal.SIGHUP)  # listen.port takes effect at the next switch
        wait_for(lambda: [e for e in d.log_events() if e.get("event") == "reload.pending"], 20, "reload.pending")
        origin.commit("2")
        r = d.update("--force", "--wait")
        assert r.returncode == 0, r.stdout + r.stderr
        assert stray.wait(20) is not None
        ev = [e for e in d.log_events() if e.get("event") == "stale.found"]
        assert any(e.get("pid") == stray.pid for e in ev), ev
        assert any(e.get("event") == "listen.retry" for e in d.log_events())
        d.port = new_port
        assert d.get()["version"] == "2"
    finally:
        stray.kill()
        stray.wait(10)


@pytest.mark.parametrize(("promote", "outcome"), [
    ("auto", "aborted"),  # the spare became the canary, holding the shared socket for its promotion
    ("never", "rolled_back"),  # the spare became the handoff's process, serving the shared socket
])
def test_kill_after_the_spare_became_a_release_before_it_is_recorded(make_daemon, origin, promote, outcome):
    """app.spare's own window: the spare already serves the release while the registry still calls it
    a spare. The restarted daemon ends it and serves one release; nothing else is left."""
    d = make_daemon(update={"promote": promote}, app={"spare": True}).start(env=FAULTS_ENV)
    shared = tree_digest(d.root / "shared")
    sp = warm_spare(d)
    origin.commit("2")
    (d.root / "state" / "pause-at").write_text("spare_became")
    rid = request(d, "update")
    marker = d.root / "state" / "paused-at-spare_became"
    wait_for(marker.exists, 60, "the spare becoming the release")
    assert not gone(sp["pid"])
    d.kill()
    (d.root / "state" / "pause-at").unlink()
    marker.unlink()
    settle_and_check(d, rid, outcome, "1", shared)  # only the serving process (and the new daemon's spare)
    assert gone(sp["pid"])
    assert not [e for e in d.log_events() if e.get("event") == "listen.failed"]
