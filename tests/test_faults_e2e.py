"""Faults around the switch, each a real process and a real fault, under real keep-alive HTTP load.

Before the switch (fetch, ref, history, install, disk, canary) the live process must be
untouched: same pid, same release, `current` unchanged, nothing half-built left behind, and
not one failed request during the whole update. After the switch (a version that stops being
healthy, crashes, answers 5xx, or an old process that will not go) the daemon rolls back by
itself or kills what overstays, and the load loses nothing but what a dying process takes
with it.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import errno
import hashlib
import http.client
import io
import json
import os
import resource
import signal
import subprocess
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from harness import answer, events, git, request_id, rows, wait_for
from proto4d.demo.loadgen import Load, Mix

pytestmark = pytest.mark.e2e

USERS = 4


# --------------------------------------------------------------------------- helpers


def serving(d) -> dict:
    app = d.status()["app"]
    assert app["pid"] and app["healthy"], app
    return {"pid": app["pid"], "release": app["release"], "commit": app["commit"]}


def current(d) -> str:
    return (d.root / "current").resolve().name


def finished(d, timeout: float = 60) -> dict:
    """The last update's summary, once the daemon is idle again."""
    s = d.wait_status(lambda s: s["update"]["state"] == "idle" and s["update"].get("last"), timeout,
                      "the update to finish")
    return s["update"]["last"]


def leftovers(d) -> list[str]:
    """Half-built releases or venvs (temp dirs of a build that did not finish)."""
    out = []
    for sub in ("releases", "venvs"):
        base = d.root / sub
        out += [f"{sub}/{p.name}" for p in base.iterdir() if p.name.startswith(".")] if base.is_dir() else []
    return out


def event_time(e: dict) -> float:
    return dt.datetime.fromisoformat(e["timestamp"]).timestamp()


def journal_at(d, state: str) -> float:
    """When the journal entered `state` (the last time)."""
    return [st["at"] for st in d.journal()["steps"] if st["state"] == state][-1]


@contextlib.contextmanager
def load_on(d, users: int = USERS, failures_expected: bool = False, **mix) -> Iterator[Load]:
    """Keep-alive GETs, slow GETs and POSTs for the whole block, and a while after it: serving must go on.
    Not one request may fail unless the test says it expects some (and then checks which).
    Each user pauses 10-30 ms between requests (still some 80 requests a second, every switch and abort
    under way with requests in flight): without a pause the load takes whatever CPU is free, a quarter of
    the 2-core machine per test, from the other tests of the suite."""
    mix.setdefault("think_s", (0.01, 0.03))
    load = Load("127.0.0.1", d.port, users=users, mix=Mix(slow_ms=(20, 200), **mix))
    load.start()
    try:
        assert load.wait_requests(30, 20), "the load never got going"
        yield load
        t = time.time()
        wait_for(lambda: load.count(since=t) >= 20, 20, "requests after the update")
    finally:
        load.stop()
    assert any(r.method == "POST" for r in load.snapshot())
    if not failures_expected:
        assert load.failures() == [], load.failures()[:5]


class PidWatch:
    """Every app process seen while it runs (a canary or a hung process lives only a few seconds)."""

    def __init__(self, d) -> None:
        self.d = d
        self.seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.seen.update(self.d.app_pids())
            self._stop.wait(0.05)

    def __enter__(self) -> PidWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def assert_untouched(d, before: dict, load: Load, outcome: str, fragment: str) -> dict:
    """The update ended before the switch: the live process, its release and `current` are as they were."""
    last = finished(d)
    assert last["state"] == outcome, last
    assert fragment in last["message"], last["message"]
    after = serving(d)
    assert (after["pid"], after["release"]) == (before["pid"], before["release"]), (before, after)
    assert current(d) == before["release"]
    assert load.failures() == [], load.failures()[:5]
    wait_for(lambda: d.app_pids() == [before["pid"]], 15, f"only the live process (have {d.app_pids()})")
    assert leftovers(d) == []
    assert [p.name for p in (d.root / "releases").iterdir()] == [before["release"]], "the new release is gone"
    return last


def assert_rolled_back(d, before: dict, r: subprocess.CompletedProcess[str], fragment: str) -> dict:
    assert r.returncode == 1, r.stdout + r.stderr
    assert "ROLLED_BACK" in r.stdout, r.stdout
    last = finished(d)
    assert last["state"] == "rolled_back" and fragment in last["message"], last
    s = d.wait_healthy(release=before["release"])
    assert s["app"]["release"] == before["release"] and s["app"]["commit"] == before["commit"]
    assert current(d) == before["release"]
    assert d.get()["version"] == "1"
    wait_for(lambda: d.app_pids() == [d.status()["app"]["pid"]], 20, f"one app process (have {d.app_pids()})")
    rels = {x["name"]: x for x in json.loads(d.cli("releases", "--json").stdout)}
    assert [x["outcome"] for x in rels.values() if not x["current"]] == ["rolled_back"], rels
    return last


def assert_failed_in_the_watch(d) -> None:
    """The canary and the verification passed: it was the watch that caught it."""
    steps = [st["state"] for st in d.journal()["steps"]]
    assert steps[-6:] == ["canary", "switching", "verifying", "watching", "rolling_back", "rolled_back"], steps


def assert_only_at(failed: list, instant: float, users: int = USERS) -> None:
    """The failures are requests a dying process took with it: at most one per user, all at its death."""
    assert len(failed) <= users, failed
    for f in failed:
        assert f.status is None, f  # a connection lost, never an answer
        assert instant - 1.0 <= f.at + f.latency <= instant + 1.0, (instant, f)


# --------------------------------------------------------------------------- before the switch


def test_origin_unreachable_aborts_and_the_live_service_is_untouched(make_daemon, origin):
    d = make_daemon().start()
    before = serving(d)
    origin.commit("2")
    moved = origin.bare.with_name("origin-away.git")
    with load_on(d) as load:
        origin.bare.rename(moved)
        r = d.update("--force", "--wait")
        assert r.returncode == 1, r.stdout
        assert "ABORTED" in r.stdout and "cannot fetch" in r.stdout
        last = assert_untouched(d, before, load, "aborted", f"cannot fetch {origin.bare}")
        assert "does not appear to be a git repository" in last["message"], last["message"]
        # The origin comes back: the mirror was not damaged and the same update goes through.
        moved.rename(origin.bare)
        r = d.update("--force", "--wait")
        assert r.returncode == 0, r.stdout
    assert d.get()["version"] == "2"
    assert load.failures() == []


def test_a_deleted_tag_is_rejected_naming_it(make_daemon, origin):
    d = make_daemon().start()
    before = serving(d)
    # A tagged commit beside the branch; the mirror learns the tag, then the origin drops it.
    git(origin.work, "checkout", "-q", "-b", "side")
    origin.commit("2", push=False)
    origin.tag("v2")
    git(origin.work, "checkout", "-q", "main")
    assert d.update("--wait").returncode == 0  # nothing new on main: a no-op that fetches the tag
    assert "v2" in git(d.root / "state" / "repo.git", "tag").split()
    git(origin.work, "push", "-q", "origin", ":refs/tags/v2")
    with load_on(d) as load:
        r = d.update("--force", "--wait", "--ref", "v2")
        assert r.returncode == 1, r.stdout
        last = finished(d)
        assert last["state"] == "rejected" and "'v2'" in last["message"], last
        assert serving(d) == before and current(d) == before["release"]
    assert load.failures() == []
    assert d.app_pids() == [before["pid"]] and leftovers(d) == []


def test_a_branch_deleted_while_the_update_waits_aborts_naming_it(make_daemon, origin):
    now = dt.datetime.now(dt.UTC)
    avoid = f"{(now - dt.timedelta(hours=1)):%H:%M}-{(now + dt.timedelta(hours=1)):%H:%M}"
    d = make_daemon(safety={"quiet_for_s": 0, "red_rpm": 0, "yellow_max_users": 10},
                    schedule={"timezone": "UTC", "avoid": [avoid]}).start()
    before = serving(d)
    git(origin.work, "checkout", "-q", "-b", "feature")
    origin.commit("2", push=False)
    git(origin.work, "push", "-q", "origin", "feature")
    with load_on(d) as load:
        r = d.update("--ref", "feature", "--reason", "try the feature")
        assert r.returncode == 0, r.stdout + r.stderr
        rid = request_id(r.stdout)
        d.wait_status(lambda s: s["update"]["state"] == "waiting" and "avoid" in s["update"]["waiting_for"], 20,
                      "the update to wait for the end of the avoid window")
        git(origin.work, "push", "-q", "origin", "--delete", "feature")
        d.cfg["schedule"]["avoid"] = []
        d.write_config()
        d.signal(signal.SIGHUP)  # the window is lifted: the update goes ahead (yellow: notice, grace, go)
        wait_for(lambda: answer(d, rid)["final"], 60, "the update's answer")
        assert answer(d, rid)["state"] == "aborted", answer(d, rid)
        assert_untouched(d, before, load, "aborted", "'feature'")
    assert "no longer" in answer(d, rid)["message"]
    assert "noticed" in [st["state"] for st in d.journal()["steps"]]


def test_history_rewritten_is_refused_under_load(make_daemon, origin):
    d = make_daemon().start()
    before = serving(d)
    sha = origin.rewrite_history("9")
    with load_on(d) as load:
        r = d.update("--force", "--wait")
        assert r.returncode == 1, r.stdout
        last = assert_untouched(d, before, load, "aborted", "history rewritten")
    assert sha[:7] in last["message"] and f"--ref {sha[:12]}" in last["message"]


def test_requirements_that_fail_to_install_abort_under_load(make_daemon, origin):
    d = make_daemon().start()
    before = serving(d)
    venvs = sorted(p.name for p in (d.root / "venvs").iterdir())
    origin.commit("2", requirements="uvicorn==0.54.0\nh11==0.16.0\nproto4d-no-such-package-xyz==1.0\n")
    with load_on(d) as load:
        r = d.update("--force", "--wait")
        assert r.returncode == 1, r.stdout
        assert_untouched(d, before, load, "aborted", "proto4d-no-such-package-xyz")
    assert sorted(p.name for p in (d.root / "venvs").iterdir()) == venvs


# -- disk full: writes that fail for real

BIG = 16 << 20  # what the new version writes: a release file, or a file its venv installs
LIMIT = 4 << 20  # RLIMIT_FSIZE: far above anything the daemon itself writes in a test, far below BIG


def big_wheel(path: Path) -> Path:
    """A wheel that installs one BIG file of zeros (the wheel itself is a few KB)."""
    name = "proto4d_bigdata"
    files = {f"{name}/__init__.py": b"", f"{name}/blob.bin": bytes(BIG),
             f"{name}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
             f"{name}-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                            b"Tag: py3-none-any\n"}
    record = io.StringIO()
    for fname, data in files.items():
        digest = hashlib.sha256(data).digest()
        record.write(f"{fname},sha256={base64.urlsafe_b64encode(digest).rstrip(b'=').decode()},{len(data)}\n")
    record.write(f"{name}-1.0.dist-info/RECORD,,\n")
    files[f"{name}-1.0.dist-info/RECORD"] = record.getvalue().encode()
    wheel = path / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for fname, data in files.items():
            z.writestr(fname, data)
    return wheel


def commit_big(origin, stage: str, tmp_path: Path) -> None:
    if stage == "export":
        origin.commit("2", files={"data/blob.bin": "\0" * BIG})
    else:
        wheel = big_wheel(tmp_path)
        origin.commit("2", requirements=f"uvicorn==0.54.0\nh11==0.16.0\nproto4d_bigdata @ {wheel.as_uri()}\n")


def set_fsize(pid: int, limit: int) -> None:
    """The soft limit only: lowering and raising it again needs no privilege (the hard one stays)."""
    proc = psutil.Process(pid)
    hard = proc.rlimit(psutil.RLIMIT_FSIZE)[1]
    proc.rlimit(psutil.RLIMIT_FSIZE, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


@pytest.mark.parametrize("stage", rows(["export", "venv"], ["venv"]))
def test_file_size_limit_while_preparing_aborts_and_leaves_nothing(make_daemon, origin, tmp_path, stage):
    """RLIMIT_FSIZE on the daemon (inherited by git, uv and pip): a write past it fails with EFBIG (CPython
    ignores SIGXFSZ) or kills the helper (subprocesses get SIGXFSZ back by default). No privilege needed."""
    d = make_daemon().start()
    before = serving(d)
    venvs = sorted(p.name for p in (d.root / "venvs").iterdir())
    commit_big(origin, stage, tmp_path)
    with load_on(d) as load:
        set_fsize(d.proc.pid, LIMIT)
        r = d.update("--force", "--wait")
        assert r.returncode == 1, r.stdout
        fragment = "cannot write the release tree" if stage == "export" else "installing requirements.txt failed"
        last = assert_untouched(d, before, load, "aborted", fragment)
        # EFBIG in the daemon's own writes; SIGXFSZ kills a helper (uv) that writes past the limit.
        assert ("too large" if stage == "export" else "killed by SIGXFSZ") in last["message"], last["message"]
        assert sorted(p.name for p in (d.root / "venvs").iterdir()) == venvs
        # The disk has room again: the very same update goes through (the failure was the write, and
        # nothing it left behind gets in the way).
        set_fsize(d.proc.pid, resource.RLIM_INFINITY)
        r = d.update("--force", "--wait")
        assert r.returncode == 0, r.stdout
    assert load.failures() == []
    assert d.get()["version"] == "2"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """`root` on a tmpfs of its own, so it can really fill up (ENOSPC). Needs mount rights (root with
    CAP_SYS_ADMIN); without them the test is skipped and the RLIMIT_FSIZE variant above still runs."""
    root = tmp_path / "root"
    root.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0755", "proto4d-test", str(root)],
                           capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("no `mount` program here to make a small filesystem (mount -t tmpfs)")
    if r.returncode != 0:
        pytest.skip(f"`mount -t tmpfs` refused here (exit {r.returncode}: {r.stderr.strip()}): making a small "
                    "filesystem needs root with CAP_SYS_ADMIN")
    try:
        yield root
    finally:
        if subprocess.run(["umount", str(root)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(root)], capture_output=True)


def fill(root: Path, leave: int) -> Path:
    """Take all the free space of `root`'s filesystem but `leave` bytes (the daemon writes meanwhile)."""
    filler = root / "filler"
    size = 0
    with open(filler, "wb") as f:
        while True:
            st = os.statvfs(root)
            want = st.f_bavail * st.f_frsize - leave
            if want <= 0:
                return filler
            chunk = max(4096, want // 2) if want > (1 << 20) else want
            try:
                os.posix_fallocate(f.fileno(), size, chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                if chunk <= 4096:
                    return filler
                continue
            size += chunk


@pytest.mark.parametrize("stage", rows(["export", "venv"], ["export"]))
def test_disk_full_while_preparing_aborts_and_leaves_nothing(small_disk, make_daemon, origin, tmp_path, stage):
    # the update's own preparation: nothing prepared ahead (update.prepare_ahead_s) while the disk fills
    d = make_daemon(update={"prepare_ahead_s": 0}).start()
    assert d.root == small_disk
    before = serving(d)
    commit_big(origin, stage, tmp_path)
    with load_on(d) as load:
        filler = fill(small_disk, 3 << 20)
        r = d.update("--force", "--wait")
        assert r.returncode == 1, r.stdout
        fragment = "cannot write the release tree" if stage == "export" else "installing requirements.txt failed"
        last = assert_untouched(d, before, load, "aborted", fragment)
        assert "No space left on device" in last["message"], last["message"]
        d.assert_alive()
        filler.unlink()
        r = d.update("--force", "--wait")
        assert r.returncode == 0, r.stdout
    assert load.failures() == []
    assert d.get()["version"] == "2"


@pytest.mark.long
def test_a_full_disk_never_stops_the_service(small_disk, make_daemon, origin):
    """The whole disk full, so the daemon's own journal, status and logs cannot be written either, under
    heavy load: the app keeps serving and the daemon keeps reading its output (and so still sees its
    users); an update asked meanwhile touches nothing; once there is room again status tells the truth
    and the next update goes through."""
    d = make_daemon().start()
    before = serving(d)
    origin.commit("2")
    with load_on(d, users=8, get=0.8, slow=0.0, post=0.2, think_s=(0.0, 0.0)) as load:  # as fast as it goes
        filler = fill(small_disk, 0)
        t_full = time.time()
        r = d.update("--force")
        assert r.returncode == 1 and "No space left" in r.stderr, r.stdout + r.stderr
        d.signal(signal.SIGUSR1)  # a signal needs no disk
        wait_for(lambda: "update.failed" in d.log_path.read_text(errors="replace"), 30,
                 "the update to fail on the full disk")
        # Far more app output than a pipe holds (64 KiB) while the disk stays full: an app blocked on its
        # stdout would stop answering long before 4,000 requests (each an access line and app output).
        wait_for(lambda: load.count(since=t_full) >= 4000, 60, "heavy load on the full disk")
        filler.unlink()
        t_back = time.time()
        # The flood was for the full disk; from here the 8 users only need to be seen, at the suite's usual
        # pace (full speed took both cores from the other tests for the window's length).
        load.mix.think_s = (0.01, 0.03)
        s = d.wait_status(lambda s: s["update"]["state"] == "idle" and (s["update"]["last"] or {}).get("state"),
                          20, "status written again")
        assert s["update"]["last"]["state"] == "aborted" and "No space left" in s["update"]["last"]["message"]
        # Users are counted from the app's access lines: a window of them all written after the disk came back.
        window = d.cfg["activity"]["window_s"]
        d.wait_status(lambda s: event_time({"timestamp": s["activity"]["sampled_at"]}) > t_back + window + 1
                      and s["activity"]["users"] == 8, window + 20, "the daemon to see the 8 users again")
        assert serving(d) == before and current(d) == before["release"]
        assert leftovers(d) == [] and d.app_pids() == [before["pid"]]
        r = d.update("--force", "--wait")
        assert r.returncode == 0, r.stdout
    assert load.failures() == [], load.failures()[:5]
    assert d.get()["version"] == "2"


def test_canary_that_never_gets_ready_is_aborted_and_killed(make_daemon, origin):
    d = make_daemon(health={"start_timeout_s": 6}).start()
    before = serving(d)
    origin.commit("2", mode="hang_at_start")
    with load_on(d) as load, PidWatch(d) as watch:
        r = d.update("--force", "--wait")
        assert r.returncode == 1, r.stdout
        assert_untouched(d, before, load, "aborted", "canary")
    hung = watch.seen - {before["pid"]}
    assert hung, "the canary process was never seen"
    assert not [p for p in hung if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_new_version_that_hangs_on_start_without_canary_is_rolled_back(make_daemon, origin):
    d = make_daemon(health={"start_timeout_s": 6}, update={"canary": False}).start()
    before = serving(d)
    origin.commit("2", mode="hang_at_start")
    with load_on(d) as load, PidWatch(d) as watch:
        r = d.update("--force", "--wait")
        assert r.returncode == 1, r.stdout
        last = finished(d)
        assert last["state"] == "rolled_back" and "did not become ready" in last["message"], last
        # The old process was never asked to go: the very same one still serves.
        assert serving(d) == before and current(d) == before["release"]
        wait_for(lambda: d.app_pids() == [before["pid"]], 15, f"only the old process (have {d.app_pids()})")
    assert load.failures() == []
    hung = watch.seen - {before["pid"]}
    assert hung, "the hung process was never seen"
    steps = [st["state"] for st in d.journal()["steps"]]
    assert "canary" not in steps and steps[-3:] == ["switching", "rolling_back", "rolled_back"], steps


# --------------------------------------------------------------------------- after the switch


def test_unhealthy_after_the_switch_is_rolled_back_by_the_watch(make_daemon, origin):
    d = make_daemon(update={"watch_s": 12}).start()
    before = serving(d)
    origin.commit("2", mode="unhealthy_after 5")
    with load_on(d) as load:
        r = d.update("--force", "--wait")
        assert_rolled_back(d, before, r, "health checks failed during the watch")
    assert_failed_in_the_watch(d)
    assert load.failures() == [], load.failures()[:5]


def test_crash_in_the_watch_window_is_rolled_back(make_daemon, origin):
    d = make_daemon(update={"watch_s": 10}).start()
    before = serving(d)
    origin.commit("2", mode="crash_after 4")
    with load_on(d, failures_expected=True) as load:
        r = d.update("--force", "--wait")
        assert_rolled_back(d, before, r, "crashed during the watch")
    assert_failed_in_the_watch(d)
    crash = [e for e in events(d, "app.exited") if e.get("release") != before["release"]]
    assert len(crash) == 1, crash
    assert_only_at(load.failures(), event_time(crash[0]))


def test_a_version_answering_5xx_is_rolled_back_by_the_error_share(make_daemon, origin):
    d = make_daemon(update={"watch_s": 10, "max_5xx_ratio": 0.2, "min_5xx_clients": 1},  # the load is one client
                    health={"checks": [{"path": "/health", "status": [200]}]}).start()
    before = serving(d)
    origin.commit("2", mode="errors")
    with load_on(d, failures_expected=True) as load:
        r = d.update("--force", "--wait")
        last = assert_rolled_back(d, before, r, "answered 5xx since the switch")
    assert "max_5xx_ratio" in last["message"]
    assert_failed_in_the_watch(d)
    switching, back = journal_at(d, "switching"), journal_at(d, "rolled_back")
    failed = load.failures()
    assert failed, "the 5xx version never answered a user"
    # Every failure is a 500 from the new version while it served (or drained: its idle keep-alive connections
    # are still answered for the shim's 1 s grace); not one connection was lost.
    assert {f.status for f in failed} == {500}, failed[:5]
    assert all(switching <= f.at <= back + 2 for f in failed), (switching, back, failed[:3])


def test_a_drain_past_its_timeout_kills_the_old_and_loses_only_its_long_request(make_daemon, origin):
    d = make_daemon(update={"drain_timeout_s": 2.5}).start()
    before = serving(d)
    origin.commit("2")
    long: dict = {}

    def long_request(conn: http.client.HTTPConnection) -> None:
        t = time.time()
        try:
            conn.request("GET", "/slow?ms=60000", headers={"User-Agent": "long-client"})
            long["status"] = conn.getresponse().status
        except (OSError, http.client.HTTPException) as e:
            long["error"] = f"{type(e).__name__}: {e}"
        long["took"] = time.time() - t
        long["ended"] = time.time()

    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=90)
    conn.connect()
    local = conn.sock.getsockname()[1]
    t = threading.Thread(target=long_request, args=(conn,), daemon=True)
    t.start()
    old = psutil.Process(before["pid"])
    wait_for(lambda: any(c.raddr and c.raddr.port == local for c in old.net_connections(kind="tcp")), 10,
             "the old process to hold the long request")
    with load_on(d) as load:
        r = d.update("--force", "--wait")
        assert r.returncode == 0, r.stdout
        assert finished(d)["state"] == "done"
        drained = wait_for(lambda: events(d, "app.drained", pid=before["pid"]), 20, "the old process drained")
        t.join(20)
    assert drained[0]["killed"] is True, drained
    assert 2.5 <= drained[0]["seconds"] < 8, drained
    assert "error" in long and "status" not in long, long
    assert abs(long["ended"] - event_time(drained[0])) < 1.5, (long, drained)
    assert not psutil.pid_exists(before["pid"]) or old.status() == psutil.STATUS_ZOMBIE
    assert load.failures() == [], load.failures()[:5]
    s = d.status()
    assert s["app"]["release"] != before["release"] and d.get()["version"] == "2"
    assert d.app_pids() == [s["app"]["pid"]]


def test_an_old_process_ignoring_sigterm_is_killed_with_its_group(make_daemon, origin):
    origin.commit("1", mode="ignore_sigterm child")
    d = make_daemon(update={"drain_timeout_s": 2.5}).start()
    before = serving(d)
    child = d.get()["child"]
    assert child and psutil.Process(child).status() != psutil.STATUS_ZOMBIE
    assert os.getpgid(child) == before["pid"], "the child is in the app's process group"
    origin.commit("2")
    with load_on(d, failures_expected=True) as load:
        r = d.update("--force", "--wait")
        assert r.returncode == 0, r.stdout
        assert finished(d)["state"] == "done"
        drained = wait_for(lambda: events(d, "app.drained", pid=before["pid"]), 20, "the old process drained")
    assert drained[0]["killed"] is True and drained[0]["how"] == "killed by SIGKILL", drained
    assert 2.5 <= drained[0]["seconds"] < 8, drained
    for pid in (before["pid"], child):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid
    s = d.status()
    assert d.get()["version"] == "2" and d.app_pids() == [s["app"]["pid"]]
    # It never stopped serving its keep-alive connections, so what it held when SIGKILLed went with it.
    assert_only_at(load.failures(), event_time(drained[0]))
