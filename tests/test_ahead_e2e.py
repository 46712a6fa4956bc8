"""update.prepare_ahead_s end to end: a real daemon, while nobody is on, fetches the real origin, prepares
the new head's release, and the update that follows takes it (nothing exported or installed in the
update); a release prepared ahead that no longer fits is prepared again; a head moved past is
removed; an update that comes while a preparation runs waits for it; a daemon killed inside the
preparation leaves nothing behind.
"""

from __future__ import annotations

import json
import signal

import pytest

from harness import answer, events, request_id, wait_for
from test_killpoints_e2e import FAULTS_ENV, request

pytestmark = pytest.mark.e2e

AHEAD = {"update": {"prepare_ahead_s": 1}}


def ready_for(d, sha: str, timeout: float = 60) -> dict:
    return d.wait_status(lambda s: s["ahead"] if s["ahead"]["state"] == "ready" and s["ahead"]["commit"] == sha
                         else None, timeout, f"{sha[:7]} prepared ahead")["ahead"]


def release_info(d, name: str) -> dict:
    return json.loads((d.root / "releases" / name / "release.json").read_text())


def pinned(d, name: str) -> bool:
    import subprocess
    r = subprocess.run(["git", "--git-dir", str(d.root / "state" / "repo.git"), "rev-parse", "--verify", "-q",
                        f"refs/proto4d/releases/{name}"], capture_output=True, text=True, check=False)
    return r.returncode == 0


def paused_in_a_preparation(make_daemon, origin):
    """A daemon whose preparation ahead of a pushed v2 is paused in its export: (daemon, v2's commit)."""
    d = make_daemon(**AHEAD).start(env=FAULTS_ENV)
    (d.root / "state" / "pause-at").write_text("ahead_export")
    sha = origin.commit("2")
    wait_for((d.root / "state" / "paused-at-ahead_export").exists, 60, "the preparation paused in its export")
    return d, sha


def test_a_new_head_is_prepared_while_nobody_is_on_and_its_update_takes_it(make_daemon, origin):
    d = make_daemon(**AHEAD).start()
    serving = d.status()["app"]["release"]
    sha = origin.commit("2")
    ahead = ready_for(d, sha)
    info = release_info(d, ahead["release"])
    assert info["outcome"] == "prepared" and info["commit"] == sha and info["ahead"]["inputs"]["shared"] == [
        ".env", "data"]
    assert (d.root / "releases" / ahead["release"] / ".env").is_symlink(), "shared paths are linked ahead"
    assert d.get()["version"] == "1", "nothing serves it before an update"
    assert d.status()["app"]["release"] == serving
    assert "ahead    " in d.cli("status").stdout
    pending = d.cli("pending")
    assert f"prepared ahead: {ahead['release']}" in pending.stdout, pending.stdout + pending.stderr
    assert json.loads(d.cli("pending", "--json").stdout)["ahead"] == ahead["release"]

    r = d.update("--force", "--wait")
    assert r.returncode == 0, r.stdout + r.stderr
    rid = request_id(r.stdout)
    assert answer(d, rid)["state"] == "done", answer(d, rid)
    assert d.get()["version"] == "2"
    s = d.status()
    assert s["app"]["release"] == ahead["release"], "the release prepared ahead serves"
    journal = d.journal()
    assert journal.get("prepared_ahead") is True, journal
    log_text = (d.root / journal["log"]).read_text()
    assert "was prepared ahead" in log_text and f"export {sha[:7]}" not in log_text, log_text
    # After the update the head is what serves: the next look finds nothing to prepare, removes nothing.
    d.wait_status(lambda s: "is what serves" in s["ahead"]["note"], 30, "the next look")
    assert (d.root / "releases" / ahead["release"]).is_dir()


def test_a_head_moved_past_is_removed_and_the_new_one_prepared(make_daemon, origin):
    d = make_daemon(**AHEAD).start()
    first = ready_for(d, origin.commit("2"))
    assert pinned(d, first["release"])
    second = ready_for(d, origin.commit("3"))
    assert second["release"] != first["release"]
    assert not (d.root / "releases" / first["release"]).exists(), "the head the branch moved past is removed"
    assert not pinned(d, first["release"])
    (removed,) = events(d, "ahead.removed")
    assert removed["release"] == first["release"]
    r = d.update("--force", "--wait")
    assert r.returncode == 0 and d.get()["version"] == "3", r.stdout + r.stderr
    assert d.status()["app"]["release"] == second["release"]


def test_a_release_prepared_under_another_config_is_prepared_again(make_daemon, origin):
    d = make_daemon(**AHEAD).start()
    sha = origin.commit("2")
    ahead = ready_for(d, sha)
    # The config changes (a new shared path) and no look runs any more: the update must not take a
    # release whose links were made for the old list.
    d.cfg["update"]["prepare_ahead_s"] = 0
    d.cfg["app"]["shared"] = [".env", "data", "uploads"]
    d.write_config()
    d.proc.send_signal(signal.SIGHUP)
    d.wait_status(lambda s: not s["ahead"]["enabled"], 20, "the reload")
    r = d.update("--force", "--wait")
    assert r.returncode == 0, r.stdout + r.stderr
    assert d.get()["version"] == "2"
    journal = d.journal()
    log_text = (d.root / journal["log"]).read_text()
    assert "is not used: changed since it was prepared: app.shared; preparing again" in log_text, log_text
    assert not journal.get("prepared_ahead")
    new = d.status()["app"]["release"]
    # (its name may be the removed one's again: names are by the second)
    assert "ahead" not in release_info(d, new), "the update prepared its own"
    assert ahead["release"] == new or not (d.root / "releases" / ahead["release"]).exists()
    assert (d.root / "releases" / new / "uploads").is_symlink()


def test_a_failed_preparation_is_not_tried_again_until_the_config_changes(make_daemon, origin):
    d = make_daemon(**AHEAD).start()
    sha = origin.commit("2", files={"requirements.txt": ""})
    (origin.app / "requirements.txt").unlink()
    from harness import git
    git(origin.work, "add", "-A")
    git(origin.work, "commit", "-q", "-m", "no requirements file")
    git(origin.work, "push", "-q", "--force", "origin", "HEAD:main")
    sha = git(origin.work, "rev-parse", "HEAD")
    st = d.wait_status(lambda s: s["ahead"] if s["ahead"]["state"] == "failed" else None, 60, "the failure")["ahead"]
    assert st["commit"] == sha and "requirements" in st["note"], st
    first = st["looked_at"]
    # Looks go on (one a second here) and say why they leave it; none prepares it again.
    d.wait_status(lambda s: s["ahead"]["looked_at"] != first and "failed" in s["ahead"]["note"], 30,
                  "a later look")
    assert len(events(d, "ahead.failed")) == 1
    assert not [p for p in (d.root / "releases").iterdir() if p.name.startswith(".tmp-")]


def test_an_update_during_a_preparation_waits_for_it_and_takes_it(make_daemon, origin):
    d, sha = paused_in_a_preparation(make_daemon, origin)
    state = d.root / "state"
    rid = request(d, "update")
    wait_for(lambda: "waiting for the release of" in (d.root / d.journal()["log"]).read_text()
             if d.journal().get("id") == rid else False, 30, "the update waiting for the preparation")
    assert d.journal()["state"] == "requested"
    (state / "pause-at").unlink()
    (state / "paused-at-ahead_export").unlink()
    wait_for(lambda: answer(d, rid)["state"] == "done", 90, "the update done")
    assert d.get()["version"] == "2"
    rel = d.status()["app"]["release"]
    assert release_info(d, rel)["commit"] == sha and d.journal().get("prepared_ahead") is True


def test_a_daemon_killed_inside_a_preparation_leaves_nothing_behind(make_daemon, origin):
    d, sha = paused_in_a_preparation(make_daemon, origin)
    state = d.root / "state"
    assert [p for p in (d.root / "releases").iterdir() if p.name.startswith(".tmp-")], "its temp dir exists"
    d.kill()
    (state / "pause-at").unlink()
    (state / "paused-at-ahead_export").unlink()
    d.start()
    # the next daemon removes the half-made tree at its start and prepares the head again
    ahead = ready_for(d, sha)
    assert not [p for p in (d.root / "releases").iterdir() if p.name.startswith(".")]
    assert d.get()["version"] == "1" and d.app_pids() == [d.status()["app"]["pid"]]
    r = d.update("--force", "--wait")
    assert r.returncode == 0 and d.status()["app"]["release"] == ahead["release"], r.stdout + r.stderr


def test_a_rollback_does_not_wait_for_a_preparation(make_daemon, origin):
    d = make_daemon(**AHEAD).start(env=FAULTS_ENV)
    state = d.root / "state"
    ready_for(d, origin.commit("2"))
    r = d.update("--force", "--wait")
    assert r.returncode == 0 and d.get()["version"] == "2", r.stdout + r.stderr
    (state / "pause-at").write_text("ahead_export")
    sha3 = origin.commit("3")
    wait_for((state / "paused-at-ahead_export").exists, 60, "the preparation of v3 paused in its export")
    rid = request(d, "rollback")
    # the paused export gives way only to its cancel token: a rollback that waited would never finish
    wait_for(lambda: answer(d, rid)["state"] == "done", 60, "the rollback done")
    (state / "pause-at").unlink()
    assert d.get()["version"] == "1"
    log_text = (d.root / d.journal()["log"]).read_text()
    assert f"stopping the preparation of {sha3[:7]} ahead" in log_text, log_text
    (stopped,) = events(d, "ahead.stopped")
    assert stopped["commit"] == sha3[:12]
