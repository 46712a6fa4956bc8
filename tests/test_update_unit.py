"""The update state machine, recovery, backoff and journal, in milliseconds.

UpdateRun runs against a fake runner (no processes: it records what it is asked and answers
what the test says), a fake mirror, a fake release builder and a clock the test moves. The
files it writes are real: the journal, the answers, release.json, `current`. The end-to-end
suite keeps the real proofs (processes, sockets, signals); these pin the decisions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from proto4d import config as configmod
from proto4d import fsutil, releases, staging, states
from proto4d.accesslog import ErrorCount
from proto4d.child import Backoff
from proto4d.health import CheckResult, HealthReport
from proto4d.inbox import Request, read_answer
from proto4d.paths import Paths
from proto4d.policy import Verdict
from proto4d.runner import PromotionFailed, Staged, SwitchFailed
from proto4d.update import Journal, UpdateDeps, UpdateManager, UpdateRun

OLD_SHA = "a" * 40
NEW_SHA = "b" * 40
NEXT_SHA7 = NEW_SHA[:7]
GOOD = HealthReport(True, (CheckResult("/health", True, 200, None, 1.0),))
BAD = HealthReport(False, (CheckResult("/health", False, 500, None, 1.0),))


# --------------------------------------------------------------------------- fakes


class FakeProc:
    def __init__(self, release: str) -> None:
        self.release = release
        self.alive = True
        self.pid = 4242

    def exit_description(self) -> str:
        return "exited with status 1"

    def last_lines(self) -> str:
        return "Traceback: boom"


class FakeRunner:
    """The runner's surface the update uses, with scripted answers and a record of every call."""

    def __init__(self, release: releases.Release) -> None:
        self.release: releases.Release | None = release
        self.state = states.RUNNING
        self.proc: FakeProc | None = FakeProc(release.name)
        self.crashed = asyncio.Event()
        self.production_port = 8000
        self.drain_kind = "drain shim"
        self.hold = False
        self.healthy: bool | None = None
        self.calls: list[Any] = []
        self.fail_handoff: set[str] = set()  # release names whose new process never becomes ready
        self.canary_report = GOOD
        self.health: dict[str, HealthReport] = {}  # release name -> what its checks say (default GOOD)
        self.on_check: Any = None  # called before each watch check
        self.wait_healthy_error: Exception | None = None  # a bug inside wait_healthy, for the internal-error paths
        self.blocker = "the fake runner runs no drain shim"  # promotion_blocker(); "" = canaries may be promoted
        self.candidate: releases.Release | None = None  # the verified canary kept for promotion
        self.promote_error = ""  # promote() raises PromotionFailed with this
        self.staged: Staged | None = None  # `proto4d stage`: the release on the preview address

    def promotion_blocker(self) -> str:
        return self.blocker

    async def promote(self, release: releases.Release) -> FakeProc:
        self.calls.append(("promote", release.name))
        cand, self.candidate = self.candidate, None
        if self.promote_error or cand is None:
            raise PromotionFailed(self.promote_error or "no candidate")
        self.release, self.proc, self.state = release, FakeProc(release.name), states.RUNNING
        return self.proc

    async def discard_candidate(self) -> None:
        if self.candidate is not None:
            self.calls.append(("discard", self.candidate.name))
        self.candidate = None

    def hold_for_switch(self) -> None:
        self.hold = True
        self.crashed.clear()
        self.calls.append("hold")

    def release_hold(self) -> None:
        self.hold = False
        self.calls.append("release_hold")

    def serving_alive(self) -> bool:
        return self.proc is not None and self.proc.alive

    async def handoff(self, release: releases.Release) -> FakeProc:
        self.calls.append(("handoff", release.name))
        if release.name in self.fail_handoff:
            raise SwitchFailed(f"the new process of {release.name} did not become ready: no ready line")
        self.release, self.proc, self.state = release, FakeProc(release.name), states.RUNNING
        return self.proc

    async def stop_then_start(self, release: releases.Release) -> tuple[FakeProc, float]:
        self.calls.append(("stop_then_start", release.name))
        self.release, self.proc = release, FakeProc(release.name)
        return self.proc, 0.5

    async def canary(self, release: releases.Release, *, promote: bool = False,
                     stage: tuple[str, int] | None = None) -> tuple[HealthReport, str]:
        self.calls.append(("canary_promotable" if promote else "canary", release.name)
                          + (("stage",) if stage else ()))
        if stage is not None and self.canary_report.ok:
            self.staged = Staged(FakeProc(release.name), release, release if promote else None,  # type: ignore
                                 ("127.0.0.1", stage[1]))
        elif promote and self.canary_report.ok:
            self.candidate = release
        return self.canary_report, ""

    def offer_staged(self, release: releases.Release) -> bool:
        if self.staged is None or self.staged.candidate is None:
            return False
        self.calls.append(("offer_staged", release.name))
        self.candidate, self.staged = release, None
        return True

    async def discard_staged(self) -> Staged | None:
        staged, self.staged = self.staged, None
        if staged is not None:
            self.calls.append(("discard_staged", staged.release.name))
        return staged

    async def wait_healthy(self, **kw: Any) -> HealthReport:
        if self.wait_healthy_error is not None:
            raise self.wait_healthy_error
        return self.health.get(self.release.name if self.release else "", GOOD)

    async def check(self) -> HealthReport:
        if self.on_check is not None:
            self.on_check(self)
        return self.health.get(self.release.name if self.release else "", GOOD)

    def mark_healthy(self, ok: bool) -> None:
        self.healthy = ok

    def fall_back(self, release: releases.Release, why: str) -> None:
        self.calls.append(("fall_back", release.name))
        self.release = release


class FakeMirror:
    def __init__(self) -> None:
        self.refs = {"main": NEW_SHA, "v1": OLD_SHA}
        self.unpinned: list[str] = []

    def fetch(self, cancel: Any = None) -> None:
        pass

    def branch_head(self, branch: str) -> str | None:
        return self.refs.get(branch)

    def resolve(self, ref: str) -> str | None:
        return self.refs.get(ref)

    def log_between(self, old: str | None, new: str) -> list[str]:
        return [f"{new[:7]} the change"]

    def has_commit(self, sha: str) -> bool:
        return True

    def is_ancestor(self, old: str, new: str) -> bool:
        return True

    def unpin(self, name: str) -> None:
        self.unpinned.append(name)


class FakeSampler:
    def __init__(self) -> None:
        self.last_verdict = Verdict("green", ("nobody there",))
        self.errors = (0, 0)
        self.error_clients = 2

    def errors_since(self, since: float) -> tuple[int, int]:
        return self.errors

    def errors_detail(self, since: float) -> ErrorCount:
        return ErrorCount(*self.errors, self.error_clients if self.errors[1] else 0)


class FakeWebhook:
    def __init__(self) -> None:
        self.events: list[str] = []

    def send(self, event: str, payload: dict[str, Any]) -> None:
        self.events.append(event)


class FakeClock:
    """Every monotonic read moves time on by `step`: a 120 s watch is a handful of rounds, no waiting."""

    def __init__(self, step: float = 5.0) -> None:
        self.mono = 0.0
        self.step = step

    def time(self) -> float:
        return 1_800_000_000.0 + self.mono

    def monotonic(self) -> float:
        self.mono += self.step
        return self.mono


def write_release(paths: Paths, name: str, sha: str, outcome: str = "verified") -> releases.Release:
    path = paths.release(name)
    path.mkdir(parents=True)
    info = {"commit": sha, "ref": "main", "venv": "v" * 16, "created_at": 1_700_000_000.0, "outcome": outcome}
    fsutil.atomic_write_json(path / "release.json", info)
    return releases.Release(name, path, info)


class World:
    """A root on disk with release `old` serving, and the update's deps made of fakes."""

    def __init__(self, tmp: Path) -> None:
        root = tmp / "root"
        text = (f"root: {root}\npython: {sys.executable}\napp: {{repo: {tmp / 'origin.git'}, requirements: ''}}\n"
                "update: {watch_s: 120, canary: true}\n")
        cfg = configmod.parse(text, "unit.yaml", base_dir=tmp)
        self.cfg = dataclasses.replace(cfg, health=dataclasses.replace(cfg.health, interval_s=0.001))
        self.paths = Paths(root)
        self.paths.make_dirs()
        self.old = write_release(self.paths, "proto4_old", OLD_SHA)
        releases.switch_current(self.paths, self.old.name)
        self.runner = FakeRunner(self.old)
        self.mirror = FakeMirror()
        self.sampler = FakeSampler()
        self.webhook = FakeWebhook()
        self.clock = FakeClock()
        self.pruned = 0
        self.prepared: list[str] = []
        self.stage = staging.StageBook(self.paths, self.runner, self.mirror, lambda: None)  # type: ignore[arg-type]

        def prepare(cfg: Any, paths: Paths, mirror: Any, sha: str, ref: str, **kw: Any) -> releases.Prepared:
            rel = write_release(paths, f"proto4_new_{sha[:7]}", sha, outcome="prepared")
            self.prepared.append(rel.name)
            return releases.Prepared(rel, releases.VenvResult(rel.venv, paths.venvs / rel.venv, True, "uv", 0.0))

        self.prune_error: Exception | None = None

        def prune() -> None:
            self.pruned += 1
            if self.prune_error is not None:
                raise self.prune_error

        async def wait_sample(timeout: float) -> None:
            await asyncio.sleep(0)

        self.deps = UpdateDeps(config=lambda: self.cfg, paths=self.paths, runner=self.runner,  # type: ignore[arg-type]
                               mirror=self.mirror, prober=None, registry=None,  # type: ignore[arg-type]
                               sampler=self.sampler, green_since=lambda: 0.0,  # type: ignore[arg-type]
                               wait_sample=wait_sample, webhook=lambda: self.webhook,  # type: ignore[arg-type]
                               status_changed=lambda: None, prune=prune, stopping=lambda: False,
                               clock=self.clock, prepare_release=prepare)  # type: ignore[arg-type]

    def set_config(self, **sections: dict[str, Any]) -> None:
        for name, values in sections.items():
            self.cfg = dataclasses.replace(self.cfg, **{name: dataclasses.replace(getattr(self.cfg, name), **values)})

    def add_database(self) -> None:
        """A SQLite database under shared/ (found by its header, as app.databases' default does)."""
        import sqlite3
        (self.paths.shared / "data").mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.paths.shared / "data" / "app.db")
        con.execute("CREATE TABLE answers (id INTEGER PRIMARY KEY)")
        con.commit()
        con.close()
        self.set_config(app={"shared": ("data",)})

    def run(self, **req: Any) -> UpdateRun:
        self.runner.crashed = asyncio.Event()  # each run has its own event loop here
        run = UpdateRun(self.deps, Request(id=req.pop("id", "u1"), **req), self.stage)
        asyncio.run(asyncio.wait_for(run.execute(), 10))
        run.publish_answer()
        return run

    def journal_steps(self) -> list[str]:
        return [s["state"] for s in json.loads(self.paths.journal.read_text())["steps"]]

    def current(self) -> str | None:
        return self.paths.current_release()


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


# --------------------------------------------------------------------------- the run


def test_a_canary_that_may_be_promoted_is_the_process_that_serves(world):
    """No database, no migration, a shim: one start. The verified canary is promoted at the switch."""
    world.runner.blocker = ""
    run = world.run(force=True)
    new = f"proto4_new_{NEW_SHA[:7]}"
    assert run.state == "done", run.message
    assert world.runner.calls[:3] == [("canary_promotable", new), "hold", ("promote", new)]
    assert not any(isinstance(c, tuple) and c[0] == "handoff" for c in world.runner.calls)
    assert world.current() == new
    story = run.log_path.read_text()
    assert "promoted in place" in story and "two starts" not in story


def test_a_failed_promotion_starts_the_release_again_and_says_so(world):
    world.runner.blocker = ""
    world.runner.promote_error = "refused RuntimeError: no listener"
    run = world.run(force=True)
    new = f"proto4_new_{NEW_SHA[:7]}"
    assert run.state == "done", run.message
    assert world.runner.calls[:4] == [("canary_promotable", new), "hold", ("promote", new), ("handoff", new)]
    assert "promotion in place failed (refused RuntimeError: no listener)" in run.log_path.read_text()


@pytest.mark.parametrize(("setup", "words"), [
    (lambda w: setattr(w.runner, "blocker", "the drain shim does not run this server (gunicorn)"), "gunicorn"),
    (lambda w: w.set_config(update={"promote": "never"}), "update.promote is never"),
    (lambda w: w.add_database(), "the canary runs on copies of data/app.db"),
])
def test_two_starts_when_the_rule_says_so_and_the_log_says_why(world, setup, words):
    world.runner.blocker = ""
    setup(world)
    run = world.run(force=True)
    new = f"proto4_new_{NEW_SHA[:7]}"
    assert run.state == "done", run.message
    assert world.runner.calls[:3] == [("canary", new), "hold", ("handoff", new)]
    story = run.log_path.read_text()
    assert "two starts (a canary, then production on the shared socket): " in story and words in story, story


def test_a_forced_update_goes_through_every_step_and_is_verified(world):
    run = world.run(force=True)
    new = f"proto4_new_{NEW_SHA[:7]}"
    assert world.journal_steps() == ["requested", "preparing", "canary", "switching", "verifying", "watching",
                                     "done"]
    assert run.state == "done"
    assert world.current() == new
    assert world.runner.calls[:3] == [("canary", new), "hold", ("handoff", new)]
    assert world.runner.calls[-1] == "release_hold" and not world.runner.hold
    assert world.runner.healthy is True
    info = json.loads((world.paths.release(new) / "release.json").read_text())
    assert info["outcome"] == "verified" and info["previous"] == "proto4_old"
    answer = read_answer(world.paths, "u1")
    assert answer["state"] == "done" and answer["final"] and answer["verified"] and answer["release"] == new
    assert world.pruned == 1
    assert world.webhook.events == ["requested", "started", "done"]
    assert not world.cfg.notice_path.exists()


def test_an_unforced_update_waits_for_the_verdict_first(world):
    world.run()
    assert world.journal_steps()[:3] == ["requested", "waiting", "preparing"]
    assert world.webhook.events[:2] == ["requested", "waiting"]


def test_the_new_process_never_ready_rolls_back_to_the_old_release(world):
    new = f"proto4_new_{NEW_SHA[:7]}"
    world.runner.fail_handoff.add(new)
    run = world.run(force=True)
    assert world.journal_steps()[-3:] == ["switching", "rolling_back", "rolled_back"]
    assert run.state == "rolled_back" and "did not become ready" in run.message
    assert world.current() == "proto4_old"
    assert json.loads((world.paths.release(new) / "release.json").read_text())["outcome"] == "rolled_back"
    assert read_answer(world.paths, "u1")["state"] == "rolled_back"


def test_a_crash_during_the_watch_rolls_back_with_a_handoff_to_the_old_release(world):
    def crash(runner: FakeRunner) -> None:
        runner.proc.alive = False
        runner.crashed.set()

    world.runner.on_check = crash
    run = world.run(force=True)
    assert world.journal_steps()[-3:] == ["watching", "rolling_back", "rolled_back"]
    assert "crashed during the watch" in run.message
    assert world.runner.calls.count(("handoff", "proto4_old")) == 1
    assert world.current() == "proto4_old" and world.runner.release.name == "proto4_old"


def test_one_failed_check_is_forgiven_two_in_a_row_roll_back(world):
    new = f"proto4_new_{NEW_SHA[:7]}"
    rounds = iter([BAD, GOOD, BAD, GOOD, GOOD, GOOD, GOOD, GOOD, GOOD, GOOD, GOOD, GOOD, GOOD, GOOD, GOOD, GOOD])

    def script(runner: FakeRunner) -> None:
        runner.health[new] = next(rounds, GOOD)

    world.runner.on_check = script
    assert world.run(force=True).state == "done"

    world2 = World(world.paths.root.parent / "again")
    world2.runner.on_check = lambda r: r.health.__setitem__(new, BAD)
    run = world2.run(force=True)
    assert run.state == "rolled_back" and "health checks failed during the watch" in run.message


def test_too_many_5xx_answers_since_the_switch_roll_back(world):
    world.sampler.errors = (10, 5)
    run = world.run(force=True)
    assert run.state == "rolled_back"
    assert "5 of 10 requests answered 5xx" in run.message


def test_5xx_answers_to_one_client_do_not_roll_back(world):
    world.sampler.errors, world.sampler.error_clients = (10, 10), 1  # update.min_5xx_clients is 2
    assert world.run(force=True).state == "done"


def test_a_failed_canary_aborts_and_removes_the_release_that_never_served(world):
    world.runner.canary_report = BAD
    run = world.run(force=True)
    new = f"proto4_new_{NEW_SHA[:7]}"
    assert world.journal_steps() == ["requested", "preparing", "canary", "aborted"]
    assert "the canary of" in run.message
    assert not world.paths.release(new).exists() and world.mirror.unpinned == [new]
    assert not any(c == "hold" or (isinstance(c, tuple) and c[0] == "handoff") for c in world.runner.calls)
    assert world.current() == "proto4_old"


def test_an_unknown_ref_is_rejected_and_nothing_is_touched(world):
    run = world.run(ref="no-such-tag", force=True)
    assert world.journal_steps() == ["requested", "rejected"]
    assert run.rejected is not None and "no-such-tag" in run.rejected["reason"]
    assert world.prepared == [] and world.current() == "proto4_old"
    assert read_answer(world.paths, "u1")["state"] == "rejected"


def test_the_commit_already_running_is_a_successful_noop(world):
    world.mirror.refs["main"] = OLD_SHA
    run = world.run(force=True)
    assert world.journal_steps() == ["requested", "done"]
    assert "already running" in run.message and world.prepared == []


def test_a_rollback_request_goes_to_the_previous_release_without_preparing(world):
    world.run(force=True)
    run = world.run(id="r1", action="rollback")
    assert run.state == "done" and world.current() == "proto4_old"
    assert world.prepared == [f"proto4_new_{NEW_SHA[:7]}"]  # the update's only
    assert "waiting" not in world.journal_steps()


def test_retention_failing_after_done_does_not_roll_the_update_back(world):
    world.prune_error = PermissionError(13, "Permission denied", "venvs/old")
    run = world.run(force=True)
    assert run.state == "done" and world.journal_steps()[-1] == "done"
    assert world.current() == f"proto4_new_{NEW_SHA[:7]}"
    assert ("handoff", "proto4_old") not in world.runner.calls


def test_an_internal_error_in_the_rollback_of_a_switch_that_never_happened_aborts(world):
    world.runner.fail_handoff.add(f"proto4_new_{NEXT_SHA7}")
    world.runner.wait_healthy_error = RuntimeError("a bug")
    run = world.run(force=True)
    assert world.journal_steps()[-3:] == ["switching", "rolling_back", "aborted"]
    assert run.state == "aborted" and "internal error before the switch: RuntimeError: a bug" in run.message
    assert world.current() == "proto4_old"  # the old process never stopped serving


def test_the_manager_survives_an_update_whose_own_handlers_fail(world):
    async def main() -> dict:
        m = UpdateManager(world.deps)
        m.start()
        world.runner.crashed = asyncio.Event()
        world.paths.journal.mkdir()  # the journal cannot be written at all: not even `requested`
        m.submit(Request(id="f1", force=True))
        for _ in range(200):
            await asyncio.sleep(0.005)
            if m.run is None and m.last:
                break
        world.paths.journal.rmdir()
        m.submit(Request(id="f2", force=True))  # the loop goes on: the next request runs
        for _ in range(400):
            await asyncio.sleep(0.005)
            if m.last.get("id") == "f2":
                break
        await m.stop()
        return m.last

    last = asyncio.run(asyncio.wait_for(main(), 10))
    assert last["id"] == "f2" and last["state"] == "done", last


def test_an_illegal_transition_is_refused(world):
    run = UpdateRun(world.deps, Request(id="u9"))
    with pytest.raises(states.IllegalTransition):
        run._enter(states.WATCHING)  # straight from requested to watching: a bug, not a state
    assert run.state == "requested"


# --------------------------------------------------------------------------- the manager


def test_manager_replaces_a_waiting_request_and_queues_behind_a_running_one(world):
    m = UpdateManager(world.deps)
    m.submit(Request(id="q1"))
    m.submit(Request(id="q2"))
    assert m.queued.id == "q2"
    assert read_answer(world.paths, "q1")["state"] == "superseded"
    assert read_answer(world.paths, "q2")["state"] == "accepted"


@pytest.mark.parametrize("state, outcome, current", [
    ("requested", None, "proto4_old"), ("waiting", None, "proto4_old"), ("noticed", None, "proto4_old"),
    ("preparing", "aborted", "proto4_old"), ("canary", "aborted", "proto4_old"),
    ("switching", "rolled_back", "proto4_old"), ("verifying", "rolled_back", "proto4_old"),
    ("watching", "rolled_back", "proto4_old"), ("rolling_back", "rolled_back", "proto4_old"),
])
def test_recover_settles_every_unfinished_state(world, state, outcome, current):
    new = write_release(world.paths, "proto4_new", NEW_SHA, outcome="prepared")
    if state in states.AFTER_SWITCH:
        releases.switch_current(world.paths, new.name)  # the switch had happened
    fsutil.atomic_write_json(world.paths.journal, {
        "id": "j1", "state": state, "request": Request(id="j1", force=True).to_dict(), "steps": [],
        "old_release": "proto4_old", "new_release": new.name})
    m = UpdateManager(world.deps)
    resume = m.recover()
    if outcome is None:
        assert resume is not None and resume.id == "j1" and resume.force
        assert Journal.read(world.paths.journal)["state"] == state
        return
    assert resume is None
    assert Journal.read(world.paths.journal)["state"] == outcome
    assert read_answer(world.paths, "j1")["state"] == outcome
    assert m.last["state"] == outcome
    assert world.current() == current
    if outcome == "aborted":
        assert not new.path.exists()  # half-prepared: removed
    else:
        assert json.loads((new.path / "release.json").read_text())["outcome"] == "rolled_back"


def test_recover_leaves_a_final_journal_alone(world):
    fsutil.atomic_write_json(world.paths.journal, {"id": "j2", "state": "done", "steps": []})
    assert UpdateManager(world.deps).recover() is None
    assert read_answer(world.paths, "j2") is None


# --------------------------------------------------------------------------- journal and backoff


def test_journal_is_written_before_each_step_and_keeps_every_step(tmp_path):
    j = Journal(tmp_path / "journal.json")
    j.start(Request(id="x1"), old_release="a")
    j.write("preparing")
    j.note(new_release="b")
    j.write("aborted", message="m")
    data = Journal.read(tmp_path / "journal.json")
    assert data["state"] == "aborted" and data["old_release"] == "a" and data["new_release"] == "b"
    assert [s["state"] for s in data["steps"]] == ["requested", "preparing", "aborted"]
    assert not list(tmp_path.glob(".*")), "no temp file left beside the journal"


@pytest.mark.parametrize("content", [None, "", "{not json", "[]", '{"id": "x"}'])
def test_journal_read_ignores_what_is_not_a_journal(tmp_path, content):
    p = tmp_path / "journal.json"
    if content is not None:
        p.write_text(content)
    assert Journal.read(p) is None


def test_backoff_doubles_up_to_the_cap_and_a_stable_run_resets_it():
    b = Backoff(stable_s=60, max_fast_failures=100, maximum_s=8)
    assert [b.on_exit(1.0)[1] for _ in range(6)] == [1, 2, 4, 8, 8, 8]
    assert b.on_exit(61.0) == ("restart", 1.0)  # it ran long enough: the count starts over
    b.reset()
    assert b.failures == 0


def test_backoff_gives_up_after_max_fast_failures_in_a_row():
    b = Backoff(stable_s=60, max_fast_failures=3)
    assert [b.on_exit(0.5)[0] for _ in range(3)] == ["restart", "restart", "fatal"]
    b = Backoff(stable_s=60, max_fast_failures=3)
    actions = [b.on_exit(t)[0] for t in (0.5, 0.5, 120.0, 0.5)]
    assert actions == ["restart"] * 4  # the stable run broke the streak: its own exit counts as the first
    assert b.failures == 2


# --------------------------------------------------------------------------- stage, promote, discard


def test_a_stage_runs_on_the_preview_address_at_once_and_touches_nothing_of_production(world):
    world.runner.blocker = ""
    world.sampler.last_verdict = Verdict("red", ("12 users",))  # a stage does not wait for quiet
    run = world.run(id="s1", action="stage")
    new = f"proto4_new_{NEW_SHA[:7]}"
    assert run.state == "staged", run.message
    assert world.journal_steps() == ["requested", "preparing", "canary", "staged"]
    assert world.runner.calls == [("canary_promotable", new, "stage"), "release_hold"], "no hold, no switch"
    assert world.current() == "proto4_old" and world.runner.release.name == "proto4_old"
    rec = staging.load(world.paths)
    assert rec == world.stage.record and rec.commit == NEW_SHA and rec.promotable and rec.url.endswith(":8001/")
    assert read_answer(world.paths, "s1")["state"] == "staged" and "staged" in world.webhook.events
    assert not world.cfg.notice_path.exists(), "no notice: students are not affected"


def test_promote_waits_for_its_moment_then_promotes_the_staged_process_without_a_second_start(world):
    world.runner.blocker = ""
    world.run(id="s1", action="stage")
    world.runner.calls.clear()
    run = world.run(id="p1", action="promote")
    new = f"proto4_new_{NEW_SHA[:7]}"
    assert run.state == "done", run.message
    assert world.journal_steps()[:3] == ["requested", "waiting", "preparing"]
    assert world.journal_steps()[3] == "switching", "no canary: it passed its checks when it was staged"
    assert world.runner.calls[:3] == [("offer_staged", new), "hold", ("promote", new)]
    assert world.prepared == [new], "prepared once, when staged"
    assert world.current() == new and world.stage.record is None and staging.load(world.paths) is None


def test_promote_with_nothing_staged_is_rejected_and_a_dead_stage_aborts(world):
    run = world.run(id="p0", action="promote", force=True)
    assert run.state == "rejected" and "nothing is staged" in run.message
    world.runner.blocker = ""
    world.run(id="s1", action="stage")
    world.runner.staged.proc.alive = False
    run = world.run(id="p1", action="promote", force=True)
    new = f"proto4_new_{NEW_SHA[:7]}"
    assert run.state == "aborted" and "cannot be promoted" in run.message and "exited" in run.message, run.message
    assert world.current() == "proto4_old" and not world.paths.release(new).exists()
    assert world.stage.record is None and staging.load(world.paths) is None


def test_an_update_of_the_staged_commit_promotes_it_and_of_another_commit_discards_it(world):
    world.runner.blocker = ""
    world.run(id="s1", action="stage")
    run = world.run(id="u1", force=True)
    new = f"proto4_new_{NEW_SHA[:7]}"
    assert run.state == "done" and ("promote", new) in world.runner.calls and world.prepared == [new]
    assert "is this commit: promoting it" in run.log_path.read_text()

    world.mirror.refs["main"] = "c" * 40
    world.run(id="s2", action="stage")
    staged = world.stage.record.release
    world.mirror.refs["main"] = "d" * 40
    run = world.run(id="u2", force=True)
    assert run.state == "done", run.message
    assert ("discard_staged", staged) in world.runner.calls and not world.paths.release(staged).exists()
    assert world.current() == "proto4_new_ddddddd" and world.stage.record is None


def test_with_a_database_the_stage_runs_on_copies_and_its_promotion_starts_the_release_again(world):
    world.runner.blocker = ""
    world.add_database()
    run = world.run(id="s1", action="stage")
    new = f"proto4_new_{NEW_SHA[:7]}"
    assert run.state == "staged", run.message
    rec = world.stage.record
    assert not rec.promotable and rec.data_dir and (Path(rec.data_dir) / "tree").exists()
    world.runner.calls.clear()
    run = world.run(id="p1", action="promote", force=True)
    assert run.state == "done", run.message
    assert world.runner.calls[:4] == [("discard_staged", new), ("canary", new), "hold", ("handoff", new)]
    assert not Path(rec.data_dir).exists(), "the staged copies go with the staged process"


def test_a_stage_never_replaces_an_update_waiting_for_its_moment(world):
    async def main() -> tuple[str, str]:
        m = UpdateManager(world.deps)
        world.sampler.last_verdict = Verdict("red", ("12 users",))
        world.runner.crashed = asyncio.Event()
        m.start()
        m.submit(Request(id="u1"))
        for _ in range(400):
            await asyncio.sleep(0.005)
            if m.run is not None and m.run.state == "waiting":
                break
        m.submit(Request(id="s1", action="stage"))
        a, b = read_answer(world.paths, "u1")["state"], read_answer(world.paths, "s1")["state"]
        await m.stop()
        return a, b

    u1, s1 = asyncio.run(asyncio.wait_for(main(), 10))
    assert u1 != "superseded" and s1 == "queued", (u1, s1)
