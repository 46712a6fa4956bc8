"""`proto4d stage`, `promote`, `discard` end to end: a real daemon, real releases on the preview address.

A teacher tries the staged release on stage.listen while students stay on production; `promote` then
moves that very process to production in place (one start), under load, with no failed request. With
students' data (an SQLite database under shared/) the staged process runs on copies and a promotion
starts the release again. A stage ends by `discard`, by its expiry, by an update of another commit,
and with the daemon (a restart cleans up what the staged process left).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import sqlite3

import psutil
import pytest

from harness import answer, events, request_id, wait_for
from proto4d.demo.loadgen import Load, Mix
from proto4d.listener import free_port

pytestmark = pytest.mark.e2e


def get(port: int, path: str = "/version") -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return {"status": r.status, **json.loads(r.read())}
    finally:
        conn.close()


def answers_at(port: int) -> bool:
    try:
        get(port, "/health")
        return True
    except OSError:
        return False


def staged(d) -> dict | None:
    return d.status().get("stage")


def classes(pid: int) -> set[int]:
    """The scheduling classes of every thread of `pid` (Linux schedules threads, each with its own)."""
    return {os.sched_getscheduler(t.id) for t in psutil.Process(pid).threads()}


LINUX = hasattr(os, "SCHED_IDLE")


def test_stage_try_promote_in_place_discard_expire_and_an_update_of_the_same_commit(make_daemon, origin):
    stage_port = free_port()
    d = make_daemon(stage={"listen": {"host": "127.0.0.1", "port": stage_port}}).start()
    prod = d.status()["app"]

    # Nothing to promote or discard yet; the running commit is not staged.
    r = d.cli("promote", "--force", "--wait")
    assert r.returncode == 1 and "nothing is staged" in r.stdout + r.stderr, r.stdout + r.stderr
    r = d.cli("discard", "--wait")
    assert r.returncode == 1 and "nothing is staged" in r.stdout + r.stderr, r.stdout + r.stderr
    r = d.cli("stage", "--wait")
    assert r.returncode == 1 and "nothing to stage" in r.stdout, r.stdout

    sha2 = origin.commit("2")
    r = d.cli("stage", "--wait")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "staged" in r.stdout and f"http://127.0.0.1:{stage_port}/" in r.stdout, r.stdout
    st = staged(d)
    assert st["commit"] == sha2 and st["running"] and st["promotable"] and not st["on_copies"], st
    assert get(stage_port)["version"] == "2" and d.get()["version"] == "1"  # the teacher's preview; students on 1
    s = d.status()
    assert s["app"]["pid"] == prod["pid"] and s["app"]["release"] == prod["release"], "production untouched"
    assert f"staged   {st['release']}" in d.cli("status").stdout
    assert (d.root / "state" / "stage.json").exists()
    staged_pid = st["pid"]
    if LINUX:  # waiting to be promoted, it takes no CPU from production's requests; production keeps its class
        assert classes(staged_pid) == {os.SCHED_IDLE} and classes(prod["pid"]) == {os.SCHED_OTHER}

    # Promote under load: the process the teacher tried becomes production, no request fails.
    with Load("127.0.0.1", d.port, users=4, mix=Mix(slow_ms=(10, 150))) as load:
        assert load.wait_requests(30, 20)
        r = d.cli("promote", "--force", "--wait", timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        n = load.count()
        wait_for(lambda: load.count() > n + 20, 20, "requests after the promotion")
    assert load.failures() == [], load.failures()[:5]
    s = d.status()
    assert s["app"]["commit"] == sha2 and s["app"]["pid"] == staged_pid, "promoted in place: one start"
    assert d.get()["version"] == "2"
    if LINUX:  # production's class again, every thread of it, before it served anyone
        assert classes(staged_pid) == {os.SCHED_OTHER}
    assert s["stage"] is None and not (d.root / "state" / "stage.json").exists()
    wait_for(lambda: not answers_at(stage_port), 10, "the preview address closed once promoted")
    assert "promoted in place" in r.stdout, r.stdout

    # Stage 3, discard it: its process ends, its release goes, production is untouched.
    origin.commit("3")
    assert d.cli("stage", "--wait").returncode == 0
    st = staged(d)
    r = d.cli("discard", "--wait")
    assert r.returncode == 0 and "discarded" in r.stdout, r.stdout + r.stderr
    assert not psutil.pid_exists(st["pid"]) or psutil.Process(st["pid"]).status() == psutil.STATUS_ZOMBIE
    assert not (d.root / "releases" / st["release"]).exists() and staged(d) is None
    assert d.get()["version"] == "2" and d.status()["app"]["pid"] == staged_pid

    # Stage it again, then shorten stage.ttl_s by SIGHUP: it expires at once.
    assert d.cli("stage", "--wait").returncode == 0
    st = staged(d)
    d.cfg["stage"]["ttl_s"] = 1
    d.write_config()
    d.signal(signal.SIGHUP)
    d.wait_status(lambda s: s["stage"] is None, 20, "the stage expired")
    wait_for(lambda: [e for e in events(d, "stage.discarded") if "stage.ttl_s" in e.get("why", "")], 10,
             "the expiry logged")
    assert not (d.root / "releases" / st["release"]).exists()
    d.cfg["stage"]["ttl_s"] = 3600
    d.write_config()
    d.signal(signal.SIGHUP)

    # An update of the staged commit promotes the staged process; of another commit, discards it.
    sha4 = origin.commit("4")
    assert d.cli("stage", "--wait").returncode == 0
    st4 = staged(d)
    r = d.update("--force")
    rid = request_id(r.stdout)
    assert "is promoted if this update deploys the same commit" in r.stdout, r.stdout
    wait_for(lambda: answer(d, rid)["final"], 60, "the update's final answer")
    assert answer(d, rid)["state"] == "done", answer(d, rid)
    s = d.status()
    assert s["app"]["commit"] == sha4 and s["app"]["pid"] == st4["pid"] and s["stage"] is None

    origin.commit("5")
    assert d.cli("stage", "--wait").returncode == 0
    st5 = staged(d)
    sha6 = origin.commit("6")
    r = d.update("--force", "--wait")
    assert r.returncode == 0 and "discarded the staged release" in r.stdout, r.stdout
    s = d.status()
    assert s["app"]["commit"] == sha6 and s["stage"] is None
    assert not (d.root / "releases" / st5["release"]).exists()


def test_with_a_database_the_stage_runs_on_copies_a_restart_cleans_it_and_promote_starts_again(make_daemon, origin):
    stage_port = free_port()
    d = make_daemon(stage={"listen": {"host": "127.0.0.1", "port": stage_port}})
    db = d.root / "shared" / "data" / "app.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(db) as c:
        c.execute("create table answers (id integer primary key, body text)")
        c.execute("insert into answers (body) values ('kept')")
    before = db.read_bytes()
    d.start()

    # The preview address is busy: the stage is aborted with the holder named, nothing left behind.
    origin.commit("2")
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", stage_port))
        busy.listen()
        r = d.cli("stage", "--wait")
    assert r.returncode == 1 and "stage.listen" in r.stdout and "already in use" in r.stdout, r.stdout
    assert len(list((d.root / "releases").iterdir())) == 1

    r = d.cli("stage", "--wait")
    assert r.returncode == 0, r.stdout + r.stderr
    st = staged(d)
    assert st["on_copies"] and not st["promotable"], st
    assert "copies of the data" in r.stdout
    assert get(stage_port)["version"] == "2"
    rec = json.loads((d.root / "state" / "stage.json").read_text())
    assert os.path.isdir(rec["data_dir"]) and rec["data_dir"].startswith(str(d.root / "state"))

    # SIGKILL the daemon: the next one ends the orphaned staged process and removes what it left.
    d.kill()
    d.start()
    assert events(d, "stage.lost"), d.tail()
    assert staged(d) is None and not (d.root / "state" / "stage.json").exists()
    assert not os.path.exists(rec["data_dir"]) and not (d.root / "releases" / st["release"]).exists()
    wait_for(lambda: not answers_at(stage_port), 10, "the orphaned staged process ended")

    # Stage again and promote: the release runs its canary on copies again and starts on the shared socket.
    assert d.cli("stage", "--wait").returncode == 0
    st = staged(d)
    with Load("127.0.0.1", d.port, users=3) as load:
        assert load.wait_requests(20, 20)
        r = d.cli("promote", "--force", "--wait", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert load.failures() == [], load.failures()[:5]
    s = d.status()
    assert s["app"]["release"] == st["release"] and s["app"]["pid"] != st["pid"], "two starts with a database"
    assert "ran on copies of the data" in r.stdout, r.stdout
    assert db.read_bytes()[:100] == before[:100]  # production's database was never the staged process's
    with sqlite3.connect(db) as c:
        assert c.execute("select body from answers").fetchall() == [("kept",)]
