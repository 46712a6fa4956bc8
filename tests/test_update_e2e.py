"""The safe update end to end: real origin, real daemon, real uvicorn children, real HTTP load."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from harness import FULL, answer, request_id, wait_for
from proto4d.demo.loadgen import Load, Mix

pytestmark = pytest.mark.e2e


def test_update_under_keepalive_load_drops_no_request(make_daemon, origin):
    d = make_daemon().start()
    old_release = d.status()["app"]["release"]
    sha = origin.commit("2")
    with Load("127.0.0.1", d.port, users=6, mix=Mix(slow_ms=(20, 200))) as load:
        assert load.wait_requests(50, 20)
        r = d.update("--force", "--wait", "--reason", "under load")
        assert r.returncode == 0, r.stdout + r.stderr
        t_done = time.time()
        wait_for(lambda: load.count(since=t_done) > 30, 20, "requests after the switch")
    assert load.failures() == [], load.failures()[:5]
    s = d.status()
    assert s["app"]["commit"] == sha and s["app"]["release"] != old_release
    versions = {r.status for r in load.snapshot()}
    assert versions == {200}
    assert any(r.method == "POST" for r in load.snapshot())
    assert d.get()["version"] == "2"
    assert "DONE" in r.stdout and "switching" in r.stdout and "verifying" in r.stdout
    rels = json.loads(d.cli("releases", "--json").stdout)
    assert [x["current"] for x in rels] == [True, False]
    assert rels[0]["outcome"] == "verified" and rels[1]["name"] == old_release
    story = (d.root / s["update"]["last"]["log"]).read_text()  # the update's own log tells it step by step
    assert f"to {sha[:7]}" in story and "canary done" in story and "outcome: DONE" in story, story
    # The resident daemon after an update: no OpenSSL mapped (lean.py; GitPython and tarfile, pure Python, are
    # proven out of it in test_mirror.py).
    maps = Path(f"/proc/{d.proc.pid}/maps")
    if maps.exists():
        loaded = {line.split()[-1] for line in maps.read_text().splitlines() if "/" in line}
        assert not [p for p in loaded if "_ssl." in p or "_hashlib." in p or "libssl" in p], sorted(loaded)
    # One start: the process that serves is the canary that passed the checks, promoted in place.
    assert "promoted in place" in story and "two starts" not in story, story
    promoted = [e for e in d.log_events() if e.get("event") == "switch.promoted"]
    assert promoted and promoted[-1]["pid"] == s["app"]["pid"], promoted
    if hasattr(os, "SCHED_IDLE") and os.geteuid() == 0:  # the log says where canaries start, once
        said = [e["canary_start"] for e in d.log_events() if e.get("event") == "daemon.starting"]
        assert said == ["background class"], said
    app_log = (d.root / "logs" / "app.log").read_text()
    assert f"canary[{s['app']['pid']}]" in app_log and "proto4d-drain: promoted" in app_log


def test_a_canary_whose_start_drags_on_in_the_background_class_gets_the_normal_one(make_daemon, origin):
    """The canary starts in the background class; a start still unfinished at a third of
    health.start_timeout_s (a saturated machine starving it) finishes in the normal class, and the
    promoted process serves in it."""
    d = make_daemon(health={"start_timeout_s": 9}).start()
    origin.commit("2", mode="slow_start 4.5")
    r = d.update("--force", "--wait", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    moved = [e for e in d.log_events() if e.get("event") == "canary.foreground"]
    assert len(moved) == 1 and moved[0]["after_s"] == 3.0 and "error" not in moved[0], moved
    s = d.status()
    promoted = [e for e in d.log_events() if e.get("event") == "switch.promoted"]
    assert promoted[-1]["pid"] == moved[0]["pid"] == s["app"]["pid"]
    if hasattr(os, "SCHED_IDLE"):
        import psutil

        assert {os.sched_getscheduler(t.id) for t in psutil.Process(s["app"]["pid"]).threads()} == {os.SCHED_OTHER}


def test_version_that_cannot_start_is_aborted_and_the_old_keeps_serving(make_daemon, origin):
    d = make_daemon().start()
    before = d.status()["app"]
    origin.commit("2", mode="crash_at_start")
    with Load("127.0.0.1", d.port, users=3) as load:
        r = d.update("--force", "--wait")
    assert r.returncode == 1, r.stdout
    assert "ABORTED" in r.stdout and "canary" in r.stdout
    s = d.wait_status(lambda s: s["update"]["state"] == "idle", 10, "the update over")
    assert s["app"]["release"] == before["release"] and s["app"]["pid"] == before["pid"]
    assert s["update"]["last"]["state"] == "aborted"
    assert load.failures() == []
    assert [p.name for p in (d.root / "releases").iterdir()] == [before["release"]], "the aborted release is removed"


# The same proof as test_faults_e2e.py's test_crash_in_the_watch_window_is_rolled_back, which checks more (the
# journal's steps, the failures anchored to the crash's own instant): the default suite runs that one.
@pytest.mark.skipif(not FULL, reason="./dev proofs only; test_faults_e2e.py::"
                    "test_crash_in_the_watch_window_is_rolled_back covers it in the default suite")
def test_version_that_crashes_after_the_switch_is_rolled_back_by_the_watch(make_daemon, origin):
    d = make_daemon(update={"watch_s": 8}).start()
    before = d.status()["app"]
    origin.commit("2", mode="crash_after 2.5")
    with Load("127.0.0.1", d.port, users=3, mix=Mix(slow_ms=(10, 100))) as load:
        r = d.update("--force", "--wait")
        t_end = time.time()
        wait_for(lambda: load.count(since=t_end) > 10, 20, "requests after the rollback")
    assert r.returncode == 1, r.stdout
    assert "ROLLED_BACK" in r.stdout and "crashed during the watch" in r.stdout
    s = d.status()
    assert s["app"]["release"] == before["release"] and s["app"]["healthy"]
    assert (d.root / "current").resolve().name == before["release"]
    # A process that dies takes its in-flight requests with it (no server can answer those); every
    # other request, including all those queued while the old release came back, must succeed.
    failed = load.failures()
    assert len(failed) <= 3, failed
    ends = [f.at + f.latency for f in failed]
    assert not ends or max(ends) - min(ends) < 0.5, failed
    rels = {x["name"]: x for x in json.loads(d.cli("releases", "--json").stdout)}
    assert [x["outcome"] for x in rels.values() if not x["current"]] == ["rolled_back"]


def test_unhealthy_version_fails_the_canary(make_daemon, origin):
    d = make_daemon().start()
    # The canary answers 503 until start_timeout_s runs out: 5 s, set once the first start (which may be
    # slow on a loaded machine) is done.
    d.cfg["health"]["start_timeout_s"] = 5
    d.write_config()
    d.signal(signal.SIGHUP)
    wait_for(lambda: any(e.get("event") == "reload.applied" for e in d.log_events()), 15, "the reload")
    origin.commit("2", mode="unhealthy")
    r = d.update("--force", "--wait")
    assert r.returncode == 1 and "503" in r.stdout and "ABORTED" in r.stdout


def test_history_rewrite_is_refused_unless_the_ref_is_named(make_daemon, origin):
    d = make_daemon().start()
    before = d.status()["app"]["release"]
    sha = origin.rewrite_history("9")
    r = d.update("--force", "--wait")
    assert r.returncode == 1
    assert "history rewritten" in r.stdout
    assert d.status()["app"]["release"] == before
    r = d.update("--force", "--wait", "--ref", sha[:10])
    assert r.returncode == 0, r.stdout
    assert d.status()["app"]["commit"] == sha


# The same proof as test_faults_e2e.py's test_requirements_that_fail_to_install_abort_under_load (under load, and
# it also checks `current`, the venvs and every temp dir): the default suite runs that one.
@pytest.mark.skipif(not FULL, reason="./dev proofs only; test_faults_e2e.py::"
                    "test_requirements_that_fail_to_install_abort_under_load covers it in the default suite")
def test_bad_requirements_abort_before_anything_is_touched(make_daemon, origin):
    d = make_daemon().start()
    before = d.status()["app"]
    origin.commit("2", requirements="uvicorn==0.54.0\nh11\nproto4d-no-such-package-xyz==1.0\n")
    r = d.update("--force", "--wait")
    assert r.returncode == 1
    assert "ABORTED" in r.stdout and "proto4d-no-such-package-xyz" in r.stdout
    after = d.status()["app"]
    assert after["pid"] == before["pid"] and after["release"] == before["release"]
    assert not [p for p in (d.root / "venvs").iterdir() if p.name.startswith(".build")]
    assert not [p for p in (d.root / "releases").iterdir() if p.name.startswith(".tmp")]


def test_a_missing_env_key_aborts_naming_the_key(make_daemon, origin):
    d = make_daemon().start()
    origin.commit("2", files={".env.example": "TUTOR_SECRET=\nOPENAI_API_KEY=\n"})
    r = d.update("--force", "--wait")
    assert r.returncode == 1
    assert "OPENAI_API_KEY" in r.stdout and "TUTOR_SECRET" not in r.stdout.split("missing")[-1]
    assert "s3cr3t-value-for-tests" not in r.stdout


def test_a_changed_requirement_builds_a_new_venv_and_the_old_one_stays_for_rollback(make_daemon, origin):
    d = make_daemon().start()
    old = d.status()["app"]["release"]
    origin.commit("2", requirements="uvicorn==0.54.0\nh11==0.16.0\n# v2 changes the requirements\n")
    r = d.update("--force", "--wait")
    assert r.returncode == 0, r.stdout
    assert "building with" in r.stdout
    venvs = [p.name for p in (d.root / "venvs").iterdir()]
    assert len(venvs) == 2
    r = d.cli("rollback", "--wait")
    assert r.returncode == 0, r.stdout + r.stderr
    assert d.status()["app"]["release"] == old
    assert d.get()["version"] == "1"


def test_yellow_posts_the_notice_then_updates(make_daemon, origin):
    d = make_daemon(update={"notice_grace_s": 3}).start()
    origin.commit("2")
    notice = d.root / "notice.json"
    with Load("127.0.0.1", d.port, users=1, mix=Mix(think_s=(0.05, 0.1))) as load:
        d.wait_status(lambda s: s["activity"]["verdict"] == "yellow", 20, "yellow")
        r = d.update()
        assert r.returncode == 0, r.stderr
        rid = request_id(r.stdout)
        text = wait_for(lambda: notice.exists() and notice.read_text(), 20, "the notice file")
        data = json.loads(text)
        assert {"message", "when", "expected_impact"} <= set(data)
        s = d.wait_status(lambda s: s["update"]["state"] == "noticed", 10, "noticed")
        assert "grace" in s["update"]["waiting_for"] and s["update"]["until"]
        wait_for(lambda: answer(d, rid)["final"], 60, "the update's answer")
    assert answer(d, rid)["state"] == "done"
    assert not notice.exists(), "the notice goes once the update is over"
    assert load.failures() == []
    steps = [st["state"] for st in d.journal()["steps"]]
    assert steps.index("noticed") < steps.index("preparing")


@pytest.mark.long
def test_red_waits_and_status_says_for_what(make_daemon, origin):
    d = make_daemon(schedule={"timezone": "UTC", "preferred": []}).start()
    old_release = d.status()["app"]["release"]
    origin.commit("2")
    with Load("127.0.0.1", d.port, users=4, mix=Mix(think_s=(0.05, 0.1))):
        d.wait_status(lambda s: s["activity"]["verdict"] == "red", 20, "red")
        r = d.update()
        rid = request_id(r.stdout)
        s = d.wait_status(lambda s: s["update"]["state"] == "waiting" and s["update"]["waiting_for"], 20, "waiting")
        assert s["activity"]["users"] == 4 and "4 users" in " ".join(s["activity"]["reasons"]), s["activity"]
        time.sleep(2)  # a while of red: the update must still be waiting
        s = d.status()
        assert s["update"]["state"] == "waiting" and s["app"]["release"] == old_release, s
        assert not answer(d, rid)["final"]
        text = d.cli("status").stdout
        assert "waiting for:" in text
    # Users gone: green after the activity window, and the waiting update goes ahead.
    wait_for(lambda: answer(d, rid)["final"], 60, "the update after the users left")
    assert answer(d, rid)["state"] == "done"


@pytest.mark.long
def test_requests_while_an_update_runs_are_answered_and_queued(make_daemon, origin):
    d = make_daemon(update={"watch_s": 6}).start()
    # Both versions are pushed first: while update 1 runs only the two CLI calls have to fit in its watch,
    # not a git commit too (on a loaded machine that did not fit in 4 s).
    sha2 = origin.commit("2")
    sha3 = origin.commit("3")
    r1 = d.update("--force", "--ref", sha2)
    id1 = request_id(r1.stdout)
    d.wait_status(lambda s: s["update"]["state"] in ("switching", "verifying", "watching"), 30, "update 1 running")
    r2 = d.update("--force")
    id2 = request_id(r2.stdout)
    assert answer(d, id2)["state"] == "queued"
    r3 = d.update("--force")
    id3 = request_id(r3.stdout)
    assert wait_for(lambda: answer(d, id2)["state"] == "superseded", 10, "2 superseded by 3")
    wait_for(lambda: answer(d, id3)["final"], 90, "3 done")
    assert answer(d, id1)["state"] == "done" and answer(d, id3)["state"] == "done"
    assert d.status()["app"]["commit"] == sha3


# Its three rows (invalid YAML, an unknown key, a ref not in the origin) are rows of test_bad_input_e2e.py's
# CONTENT_CASES and RESOLVE_CASES, which the default suite runs with more checks (answer, log, CLI).
@pytest.mark.skipif(not FULL, reason="./dev proofs only; test_bad_input_e2e.py::test_malformed_request_files_are_"
                    "rejected_and_empty_or_good_ones_accepted and ::test_requests_for_what_does_not_exist_are_rejected_"
                    "and_a_bad_ref_never_leaves_the_cli cover it in the default suite")
def test_bad_request_files_are_rejected_with_the_reason(make_daemon):
    d = make_daemon().start()
    before = d.status()["app"]["release"]
    req = d.root / "update.request"
    req.write_text("ref: [unclosed\n")
    s = d.wait_status(lambda s: s["update"]["last_rejected"], 10, "a rejection")
    assert "YAML" in s["update"]["last_rejected"]["reason"]
    req.write_text("reff: main\n")
    s = d.wait_status(lambda s: "reff" in (s["update"]["last_rejected"] or {}).get("reason", ""), 10, "unknown key")
    req.write_text("ref: no-such-branch\nforce: true\n")
    s = d.wait_status(lambda s: "no-such-branch" in (s["update"]["last_rejected"] or {}).get("reason", ""), 20,
                      "a bad ref rejected")
    assert s["app"]["release"] == before and not req.exists()


def test_sigusr1_and_an_empty_request_file_update_to_the_branch_head(make_daemon, origin):
    d = make_daemon().start()
    sha2 = origin.commit("2")
    d.signal(signal.SIGUSR1)
    d.wait_status(lambda s: s["app"]["commit"] == sha2 and s["update"]["state"] == "idle"
                  and s["update"]["last"]["state"] == "done", 60, "the SIGUSR1 update")
    sha3 = origin.commit("3")
    (d.root / "update.request").touch()
    d.wait_status(lambda s: s["app"]["commit"] == sha3 and s["update"]["state"] == "idle", 60, "the touch update")
    assert len(list((d.root / "logs").glob("update_*.log"))) == 2


def test_update_wait_is_already_done_when_nothing_changed(make_daemon):
    d = make_daemon().start()
    r = d.update("--wait")
    assert r.returncode == 0 and "already running" in r.stdout


def test_update_log_tells_the_story(make_daemon, origin):
    d = make_daemon().start()
    origin.commit("2", message="v2: a clearer hint")
    r = d.update("--force", "--wait", "--reason", "weekly fix")
    assert r.returncode == 0
    logs = sorted((d.root / "logs").glob("update_*.log"))
    text = logs[-1].read_text()
    for needle in ("weekly fix", "v2: a clearer hint", "preparing ...", "canary ...", "switching ...",
                   "verifying ...", "watching ...", "outcome: DONE", "done in"):
        assert needle in text, needle
    events = [e for e in d.log_events() if e.get("event") == "update.step"]
    assert [e["step"] for e in events][-5:] == ["preparing", "canary", "switching", "verifying", "watching"]


@pytest.mark.long
def test_retention_keeps_current_previous_and_the_newest(make_daemon, origin):
    d = make_daemon(update={"keep_min": 2, "keep_days": 0, "watch_s": 0.5}).start()
    names = [d.status()["app"]["release"]]
    for v in ("2", "3", "4"):
        origin.commit(v)
        assert d.update("--force", "--wait").returncode == 0
        names.append(d.status()["app"]["release"])
    kept = sorted(p.name for p in (d.root / "releases").iterdir())
    assert kept == sorted(names[-2:]), (kept, names)
    assert os.readlink(d.root / "current").endswith(names[-1])


@pytest.mark.long
def test_the_weekly_schedule_files_a_request_by_itself(make_daemon, origin):
    import datetime as dt

    now = dt.datetime.now(dt.UTC)
    due = (now + dt.timedelta(seconds=65 if now.second > 50 else 60)).replace(second=0, microsecond=0)
    weekly = f"{due.strftime('%a').lower()} {due.strftime('%H:%M')}"
    d = make_daemon(schedule={"timezone": "UTC", "weekly": weekly}).start()
    sha = origin.commit("2")
    s = d.wait_status(lambda s: s["app"]["commit"] == sha and s["update"]["state"] == "idle", 150,
                      f"the weekly update at {weekly}")
    assert s["update"]["last"]["reason"].startswith("weekly schedule")
    assert (d.root / "state" / "weekly.last").read_text().startswith(due.isoformat()[:16])


def test_a_reload_that_moves_the_port_after_the_canary_falls_back_to_a_start_on_the_new_socket(make_daemon, origin):
    """The verified canary holds the socket of its start; a reload that moves listen.port before the switch
    makes the promotion refuse (the canary would keep serving the old port), and the release starts again
    on the new socket: the two-start path, said in the update log."""
    from harness import free_port
    from test_killpoints_e2e import FAULTS_ENV
    d = make_daemon().start(env=FAULTS_ENV)
    origin.commit("2")
    (d.root / "state" / "pause-at").write_text("canary_done")
    r = d.update("--force")
    rid = request_id(r.stdout)
    marker = d.root / "state" / "paused-at-canary_done"
    wait_for(marker.exists, 60, "the verified canary")
    d.cfg["listen"]["port"] = free_port()
    d.write_config()
    d.signal(signal.SIGHUP)
    wait_for(lambda: [e for e in d.log_events() if e.get("event") in ("reload.applied", "reload.pending")], 10,
             "the reload")
    (d.root / "state" / "pause-at").unlink()
    marker.unlink()
    wait_for(lambda: answer(d, rid)["final"], 60, "the update's answer")
    assert answer(d, rid)["state"] == "done", answer(d, rid)
    d.port = d.cfg["listen"]["port"]
    assert d.get()["version"] == "2"
    story = (d.root / d.status()["update"]["last"]["log"]).read_text()
    assert "promotion in place failed (the listening address changed" in story, story
