"""The daemon SIGKILLed at every step of an update and of a rollback, then restarted.

Each case runs a real update, stops the daemon dead at a named point (see proto4d.faults),
restarts it, and checks what an operator relies on: exactly one release serving and
verified, `current` pointing at it, no orphan process, no half-built release or venv,
`shared/` byte-identical, and the journal, the request's answer and `status` agreeing on
what happened.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import pytest

from harness import wait_for

pytestmark = pytest.mark.e2e

# The default suite kills the daemon once at a representative point of each distinct recovery: a
# claimed request not yet journalled, a pending one, half-built release and venv, two processes up,
# `current` already renamed, an interrupted automatic rollback, a manual rollback's kept target and its
# renamed `current`. Which outcome every journal state gets is pinned in milliseconds by
# tests/test_update_unit.py. `./dev killpoints` runs every point, three times (PROTO4D_KILLPOINTS=all).
ALL = os.environ.get("PROTO4D_KILLPOINTS") == "all"
REPEAT = int(os.environ.get("PROTO4D_KILL_REPEAT", "3" if ALL else "1"))
REPRESENTATIVE = {"consumed", "fetch", "venv", "new_started", "current_renamed",  # update
                  "rollback_renamed",  # automatic rollback
                  "canary_done!manual", "current_renamed!manual"}  # manual rollback
FAULTS_ENV = {"PROTO4D_FAULTS": "1"}

# point -> (outcome after the restart, version serving after it)
UPDATE_POINTS = {
    "consumed": ("done", "2"),  # claimed but not yet journalled: acted on after the restart
    "fetch": ("done", "2"),  # still pending (nothing touched): resumed
    "export": ("aborted", "1"),
    "venv": ("aborted", "1"),
    "canary_done": ("aborted", "1"),
    "new_started": ("rolled_back", "1"),  # both processes up, the old not yet told to go
    "current_renamed": ("rolled_back", "1"),
    "verify": ("rolled_back", "1"),
    "watch": ("rolled_back", "1"),
}
ROLLBACK_POINTS = {  # an automatic rollback (v2 crashes in the watch) interrupted
    "rollback_started": ("rolled_back", "1"),
    "rollback_renamed": ("rolled_back", "1"),
}
MANUAL_ROLLBACK_POINTS = {  # `proto4d rollback` from v2 to v1 interrupted after its switch: back on v2
    "canary_done": ("aborted", "2"),
    "new_started": ("rolled_back", "2"),
    "current_renamed": ("rolled_back", "2"),
    "watch": ("rolled_back", "2"),
}


def points(table: dict[str, tuple[str, str]], suffix: str = "") -> list[str]:
    return [p for p in table if ALL or p + suffix in REPRESENTATIVE]


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
    return h.hexdigest()


def kill_at(d, point: str, trigger) -> str:
    """Arm the pause point, trigger the operation, SIGKILL the daemon there; return the request id."""
    (d.root / "state" / "pause-at").write_text(point)
    rid = trigger()
    marker = d.root / "state" / f"paused-at-{point}"
    wait_for(marker.exists, 60, f"the daemon to reach {point}")
    d.kill()
    (d.root / "state" / "pause-at").unlink()
    marker.unlink()
    return rid


def settle_and_check(d, rid: str, outcome: str, version: str, shared_before: str) -> None:
    d.start(env=FAULTS_ENV, wait_healthy=False)
    answer_path = d.root / "state" / "answers" / f"{rid}.json"
    wait_for(lambda: json.loads(answer_path.read_text())["final"], 90, f"a final answer for {rid}")
    answer = json.loads(answer_path.read_text())
    assert answer["state"] == outcome, answer
    s = d.wait_status(lambda s: s["app"]["healthy"] and s["update"]["state"] == "idle" and not s["app"]["draining"],
                      60, "one healthy release and no update running")
    # Exactly one release serving, and `current` is it.
    assert (d.root / "current").resolve().name == s["app"]["release"]
    assert d.get()["version"] == version
    info = json.loads((d.root / "releases" / s["app"]["release"] / "release.json").read_text())
    assert info["commit"] == s["app"]["commit"]
    wait_for(lambda: d.app_pids() == [s["app"]["pid"]], 30, f"only the serving process (have {d.app_pids()})")
    # Nothing half-built left behind. (With update.prepare_ahead_s, PROTO4D_TEST_AHEAD=1, a look that
    # began since may be preparing the branch head: its temp dir is work going on, renamed when done;
    # a leftover stays, and fails this.)
    def hidden() -> list[str]:
        return [f"{sub}/{p.name}" for sub in ("releases", "venvs") for p in (d.root / sub).iterdir()
                if p.name.startswith(".")]

    wait_for(lambda: not hidden() and d.status()["ahead"]["state"] not in ("looking", "preparing"), 30,
             "nothing half-built (and nothing being prepared ahead)")
    assert tree_digest(d.root / "shared") == shared_before
    # The journal, the answer and the status tell the same story.
    j = d.journal()
    assert j["id"] == rid and j["state"] == outcome, j
    last = s["update"].get("last") or {}
    assert last.get("id") == rid and last.get("state") == outcome, s["update"]


def request(d, action: str) -> str:
    """Drop a request file as `proto4d update/rollback` would (the CLI would wait for an answer that a
    daemon paused at "consumed" never gives)."""
    rid = f"kp-{os.urandom(3).hex()}"
    (d.root / "update.request").write_text(f"id: {rid}\naction: {action}\nforce: true\n")
    return rid


@pytest.mark.parametrize("attempt", range(REPEAT))
@pytest.mark.parametrize("point", points(UPDATE_POINTS))
def test_kill_during_update(make_daemon, origin, point, attempt):
    # The update's own preparation points: a release prepared ahead (update.prepare_ahead_s, on with
    # PROTO4D_TEST_AHEAD=1) would take that work out of the update; its points are test_ahead_e2e's.
    pin = {"update": {"prepare_ahead_s": 0}} if point in ("fetch", "export", "venv") else {}
    d = make_daemon(**pin).start(env=FAULTS_ENV)
    (d.root / "shared" / "data" / "answers.db").write_bytes(os.urandom(4096))
    shared = tree_digest(d.root / "shared")
    if point == "venv":
        origin.commit("2", requirements="uvicorn==0.54.0\nh11==0.16.0\n# changed: a new venv is built\n")
    else:
        origin.commit("2")
    rid = kill_at(d, point, lambda: request(d, "update"))
    outcome, version = UPDATE_POINTS[point]
    settle_and_check(d, rid, outcome, version, shared)


@pytest.mark.parametrize("attempt", range(REPEAT))
@pytest.mark.parametrize("point", points(ROLLBACK_POINTS))
def test_kill_during_automatic_rollback(make_daemon, origin, point, attempt):
    d = make_daemon(update={"watch_s": 6}).start(env=FAULTS_ENV)
    shared = tree_digest(d.root / "shared")
    origin.commit("2", mode="crash_after 1.5")
    rid = kill_at(d, point, lambda: request(d, "update"))
    outcome, version = ROLLBACK_POINTS[point]
    settle_and_check(d, rid, outcome, version, shared)


@pytest.mark.parametrize("attempt", range(REPEAT))
@pytest.mark.parametrize("point", points(MANUAL_ROLLBACK_POINTS, "!manual"))
def test_kill_during_manual_rollback(make_daemon, origin, point, attempt):
    d = make_daemon().start(env=FAULTS_ENV)
    origin.commit("2")
    assert d.update("--force", "--wait").returncode == 0
    shared = tree_digest(d.root / "shared")
    rid = kill_at(d, point, lambda: request(d, "rollback"))
    outcome, version = MANUAL_ROLLBACK_POINTS[point]
    settle_and_check(d, rid, outcome, version, shared)


def test_sigterm_during_an_update_leaves_one_release_after_restart(make_daemon, origin):
    d = make_daemon().start(env=FAULTS_ENV)
    shared = tree_digest(d.root / "shared")
    origin.commit("2")
    (d.root / "state" / "pause-at").write_text("watch")
    rid = request(d, "update")
    wait_for((d.root / "state" / "paused-at-watch").exists, 60, "the watch")
    (d.root / "state" / "pause-at").unlink()
    d.signal(signal.SIGTERM)
    assert d.proc.wait(60) == 0
    assert d.app_pids() == []
    settle_and_check(d, rid, "rolled_back", "1", shared)
