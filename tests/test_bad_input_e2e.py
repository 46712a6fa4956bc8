"""Bad input end to end: what an operator, a script or a stranger can hand the daemon, and what it does.

1. Invalid configurations sent by SIGHUP (the rows of tests/test_config.py's table): refused with
   one log line naming the file, the key and what was expected; the daemon keeps running, serving
   and reporting on its old config; a good reload still works after all of them.
2. Bad request files: rejected with a reason (status and log), consumed, and no update happens;
   the trust rules (owner, mode, symlink, the root directory's mode) are `TRUST_CASES`.
3. Request storms and concurrent `proto4d update` calls: one update at a time, every request
   answered.
4. Signals at every state of an update: HUP, USR1, TERM and INT do what `SIGNAL_TABLE` says.

Real daemon, real git origin, real uvicorn, real signals; every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness import answer, answers, events, request_id, rows, wait_for
from proto4d.demo.loadgen import Load, Mix
from test_config import BAD as BAD_CONFIGS
from test_config import check_message

pytestmark = pytest.mark.e2e

FAULTS_ENV = {"PROTO4D_FAULTS": "1"}


# --------------------------------------------------------------------------- helpers


def written_age(s: dict[str, Any]) -> float:
    return time.time() - dt.datetime.fromisoformat(s["written_at"]).timestamp()


def drop(root: Path, make: Callable[[Path], None]) -> None:
    """Put a request in place in one step (make it under a temp name, rename it), as a careful writer does:
    the daemon polls, and must never see a half-written file."""
    tmp = root / f".drop-{os.urandom(4).hex()}"
    make(tmp)
    os.rename(tmp, root / "update.request")


def write(data: bytes, mode: int | None = None, owner: int | None = None) -> Callable[[Path], None]:
    def make(p: Path) -> None:
        p.write_bytes(data)
        if mode is not None:
            os.chmod(p, mode)
        if owner is not None:
            os.chown(p, owner, owner)
    return make


# =========================================================================== 1. config by SIGHUP


def fill_config(text: str | bytes, d, plain: Path) -> bytes:
    """A row of tests/test_config.py's table, aimed at this daemon (its root, its origin)."""
    data = text if isinstance(text, bytes) else text.encode()
    for mark, value in ((b"@ROOT@", d.root), (b"@REPO@", d.origin.bare), (b"@PY@", sys.executable),
                        (b"@FILE@", plain)):
        data = data.replace(mark, json.dumps(str(value)).encode())
    return data


def put_config(row, path: Path, d, plain: Path) -> None:
    """Replace the config file by what the row describes (a file, a directory, a FIFO, a symlink...)."""
    if path.is_dir() and not path.is_symlink():
        path.rmdir()
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    if row.kind == "dir":
        path.mkdir()
    elif row.kind == "missing":
        pass
    elif row.kind == "fifo":
        os.mkfifo(path)
    elif row.kind == "dangling":
        path.symlink_to(path.parent / "nowhere.yaml")
    elif row.kind == "loop":
        path.symlink_to(path.name)
    else:
        path.write_bytes(fill_config(row.text, d, plain))


def sighup_rows() -> list:
    # chmod 000 means nothing to root (the tests' user in CI); the FIFO/dangling/loop rows are the unreadable ones.
    return [r for r in BAD_CONFIGS if not (r.kind == "chmod000" and os.geteuid() == 0)]


def test_invalid_configs_sent_by_sighup_leave_the_daemon_on_its_old_config(make_daemon):
    rows = sighup_rows()
    assert len(rows) >= 30
    d = make_daemon()
    d.start()
    plain = d.base / "plain.txt"
    plain.write_text("not a directory, not executable\n")
    # A good reload first, so "the old config" is one the daemon was told by SIGHUP.
    d.cfg["activity"]["interval_s"] = 0.4
    d.write_config()
    d.signal(signal.SIGHUP)
    d.wait_status(lambda s: s["daemon"]["interval_s"] == 0.4, 10, "the good reload")
    assert events(d, "reload.applied")
    good_text = d.config_path.read_bytes()
    pid, release = d.status()["app"]["pid"], d.status()["app"]["release"]

    failures = []
    for row in rows:
        seen = len(events(d, "reload.refused"))
        put_config(row, d.config_path, d, plain)
        t = time.time()
        d.signal(signal.SIGHUP)
        try:
            # A deadline, not a pace: nested-too-deep takes the parser seconds of CPU, and more on a loaded machine.
            refused = wait_for(lambda seen=seen: events(d, "reload.refused")[seen:], 30, f"reload.refused for {row.id}")
            assert len(refused) == 1, refused
            error = refused[0]["error"]
            check_message(error, row, d.config_path)  # names the file, the key, the line and what was expected
            assert refused[0]["kept"] == str(d.config_path)
            # Running, serving, fresh, and still on the old config.
            # (While the file is read, in a thread, the status goes on and says `reloading`.)
            s = d.wait_status(lambda s, t=t: dt.datetime.fromisoformat(s["written_at"]).timestamp() >= int(t)
                              and s["daemon"]["state"] == "running", 5, "a status written after the refusal")
            assert written_age(s) < 3, s["daemon"]
            assert s["daemon"]["interval_s"] == 0.4
            assert (s["app"]["pid"], s["app"]["release"], s["app"]["healthy"]) == (pid, release, True)
            assert d.get("/health")["status"] == 200
        except AssertionError as e:
            failures.append(f"{row.id}: {e}")
    assert failures == [], "\n".join(failures)

    # SIGHUPs in a row while a slow file is read: one reload at a time, and the daemon ends running.
    slow = next(r for r in rows if r.id == "nested-too-deep")
    put_config(slow, d.config_path, d, plain)
    seen = len(events(d, "reload.refused"))
    d.signal(signal.SIGHUP)
    d.wait_status(lambda s: s["daemon"]["state"] == "reloading", 10, "the slow reload under way")
    d.signal(signal.SIGHUP)  # a second one while the first still reads the file
    wait_for(lambda: len(events(d, "reload.refused")) >= seen + 2, 60, "both refusals")
    d.wait_status(lambda s: s["daemon"]["state"] == "running", 10, "running after both")
    extra = 2

    # After all of them: the CLI sees a fresh status, and a good reload still works.
    put_config(type(rows[0])("good", good_text), d.config_path, d, plain)
    st = json.loads(d.cli("status", "--json").stdout)
    assert "problem" not in st and st["daemon"]["state"] == "running"
    applied = len(events(d, "reload.applied"))
    d.cfg["activity"]["interval_s"] = 0.3
    d.write_config()
    d.signal(signal.SIGHUP)
    d.wait_status(lambda s: s["daemon"]["interval_s"] == 0.3, 10, "the good reload after the bad ones")
    assert len(events(d, "reload.applied")) == applied + 1
    assert len(events(d, "reload.refused")) == len(rows) + extra
    assert d.status()["app"]["pid"] == pid
    assert d.stop() == 0


# =========================================================================== 2. bad request files


@dataclass(frozen=True)
class BadRequest:
    id: str
    make: Callable[[Path], None]
    needle: str  # what the reason (status, log, answer) must say
    root_mode: int | None = None  # the root directory's mode while the request is read


def _symlink(target: Path | str) -> Callable[[Path], None]:
    return lambda p: p.symlink_to(target)


def _symlink_to_planted(p: Path) -> None:
    """A symlink to a good request file that the daemon's user owns, beside root (`planted.request`)."""
    p.symlink_to(p.parent.parent / "planted.request")


def _hard_link_to_a_consumed_request(p: Path) -> None:
    """An old request the daemon consumed (daemon-owned, one link in state/requests/) linked back."""
    old = p.parent / "state" / "requests" / "20200101-000000-abcdef.request.taken"
    old.write_text("force: true\nreason: replayed\n")
    os.link(old, p)


def _dir_with_a_file(p: Path) -> None:
    p.mkdir()
    (p / "ref").write_text("main\n")


CONTENT_CASES = [
    BadRequest("nul-bytes", write(b"ref: main\x00\x01\x02\n"), "binary (contains NUL bytes)"),
    BadRequest("random-bytes", write(random.Random(5).randbytes(4096)), "binary"),
    BadRequest("not-utf8", write(bytes(range(0x80, 0x100)) * 8), "not UTF-8"),
    BadRequest("huge", write(b"reason: padding\n" + b"# " + b"x" * 20_000 + b"\n"), "at most 16384 are accepted"),
    BadRequest("invalid-yaml", write(b"ref: [main\nforce: true\n"), "not valid YAML"),
    BadRequest("yaml-list", write(b"- ref: main\n- force: true\n"), "must be empty or a YAML mapping"),
    BadRequest("unknown-keys", write(b"reff: main\nbranch: dev\n"), "unknown key(s) in the request file: branch, reff"),
    BadRequest("force-a-string", write(b'force: "yes"\n'), "force: expected true or false, got 'yes'"),
    BadRequest("ref-a-list", write(b"ref: [main, dev]\nforce: true\n"), "ref: expected a branch, tag or commit"),
    BadRequest("ref-shell", write(b"ref: main;touch /tmp/proto4d-pwned\n"), "ref: expected a branch, tag or commit"),
]

# The trust rules of the request file (test_security.py refers to these).
TRUST_CASES = [
    BadRequest("symlink-to-etc-hostname", _symlink("/etc/hostname"), "is a symlink (to /etc/hostname)"),
    BadRequest("symlink-to-a-good-request", _symlink_to_planted, "is a symlink (to "),
    BadRequest("fifo", os.mkfifo, "is not a regular file"),
    BadRequest("directory", _dir_with_a_file, "is not a regular file"),
    BadRequest("not-owned-by-the-daemon-user", write(b"force: true\n", owner=65534), "owned by uid 65534"),
    BadRequest("world-writable-file", write(b"force: true\n", mode=0o666), "world-writable"),
    BadRequest("root-writable-by-others", write(b"force: true\n"), "writable by group or others (mode 757)",
               root_mode=0o757),
    BadRequest("root-writable-by-group", write(b"force: true\n"), "writable by group or others (mode 775)",
               root_mode=0o775),
    BadRequest("root-sticky-and-writable-by-others", write(b"force: true\n"),
               "writable by group or others (mode 1777)", root_mode=0o1777),
    BadRequest("hard-link-to-a-consumed-request", _hard_link_to_a_consumed_request, "has 2 hard links"),
]

RESOLVE_CASES = [
    BadRequest("ref-not-in-the-origin", write(b"ref: no-such-branch\nforce: true\n"),
               "ref 'no-such-branch' does not exist in"),
    BadRequest("rollback-to-a-release-not-retained",
               write(b"action: rollback\nrelease: proto4_20200101_000000_0000000\n"),
               "release 'proto4_20200101_000000_0000000' is not retained"),
]


def expect_rejected(d, case: BadRequest, cli: bool = True) -> dict[str, Any]:
    """Drop the request; check it is consumed and rejected with the reason, and that nothing is updated.
    `cli`: also read the rejection through `proto4d status --json`."""
    before = d.status()
    releases = sorted(p.name for p in (d.root / "releases").iterdir())
    last = (before["update"]["last_rejected"] or {}).get("id")
    try:
        if case.root_mode is not None:
            os.chmod(d.root, case.root_mode)
        drop(d.root, case.make)
        wait_for(lambda: not os.path.lexists(d.root / "update.request"), 10, "the request consumed")
        s = d.wait_status(lambda s: (s["update"]["last_rejected"] or {}).get("id") not in (None, last)
                          and s["update"]["state"] == "idle", 20, "the rejection")
    finally:
        os.chmod(d.root, 0o755)
    rejected = s["update"]["last_rejected"]
    assert case.needle in rejected["reason"], rejected
    if cli:
        shown = json.loads(d.cli("status", "--json").stdout)
        assert shown["update"]["last_rejected"]["reason"] == rejected["reason"]
    logged = [e for e in events(d, "request.rejected") if e.get("id") == rejected["id"]]
    assert len(logged) == 1 and case.needle in logged[0]["reason"], logged
    # status.json is written a moment before the answer file (both at the end of the run)
    wait_for(lambda: answer(d, rejected["id"])["state"] == "rejected", 10, "the answer: rejected")
    # No update: the same process serves the same release; no release was added.
    assert (s["app"]["pid"], s["app"]["release"]) == (before["app"]["pid"], before["app"]["release"])
    assert sorted(p.name for p in (d.root / "releases").iterdir()) == releases
    return rejected


def check_cases(d, cases: list[BadRequest]) -> None:
    failures = []
    for i, case in enumerate(cases):
        try:
            # `status --json` prints status.json as it is (json.dumps): read through the CLI once per table,
            # not once per row (a CLI process is 0.3 s of CPU; the rows' reasons are checked in the file).
            expect_rejected(d, case, cli=i == len(cases) - 1)
        except AssertionError as e:
            failures.append(f"{case.id}: {e}")
    assert failures == [], "\n".join(failures)


@pytest.mark.long
def test_malformed_request_files_are_rejected_and_empty_or_good_ones_accepted(make_daemon, origin):
    d = make_daemon().start()
    check_cases(d, CONTENT_CASES)
    assert not Path("/tmp/proto4d-pwned").exists()
    # The contrary: an empty file and a good YAML file are requests like any other.
    received = len(events(d, "request.received"))
    (d.root / "update.request").touch()
    wait_for(lambda: len(events(d, "request.received")) > received, 10, "the empty request received")
    rid = events(d, "request.received")[-1]["id"]
    wait_for(lambda: answer(d, rid)["final"], 20, "its answer")
    assert answer(d, rid)["state"] == "done" and "already running" in answer(d, rid)["message"]
    sha = origin.commit("2")
    drop(d.root, write(b"ref: main\nforce: true\nreason: a good request\n"))
    wait_for(lambda: len(events(d, "request.received")) > received + 1, 10, "the good request received")
    rid = events(d, "request.received")[-1]["id"]
    wait_for(lambda: answer(d, rid)["final"], 60, "its answer")
    assert answer(d, rid)["state"] == "done", answer(d, rid)
    assert d.status()["app"]["commit"] == sha


@pytest.mark.long
def test_untrusted_request_files_are_rejected_and_never_read(make_daemon):
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to another user (chown)")
    d = make_daemon().start()
    planted = d.root.parent / "planted.request"
    planted.write_text("force: true\nreason: planted\n")
    hostname = Path("/etc/hostname").read_bytes() if Path("/etc/hostname").exists() else None
    check_cases(d, TRUST_CASES)
    assert planted.read_text() == "force: true\nreason: planted\n"  # the target is left alone
    if hostname is not None:
        assert Path("/etc/hostname").read_bytes() == hostname
    assert not [e for e in events(d, "request.received")], "an untrusted request was acted on"
    # A restarted daemon does not read them either (a rejected file is never read again).
    rejected = len(events(d, "request.rejected"))
    assert d.stop() == 0
    d.start()
    d.wait_status(lambda s: s["update"]["state"] == "idle", 10, "idle after the restart")
    assert not [e for e in events(d, "request.received") + events(d, "request.recovered")]
    assert len(events(d, "request.rejected")) == rejected, "reported twice"


def test_requests_for_what_does_not_exist_are_rejected_and_a_bad_ref_never_leaves_the_cli(make_daemon):
    d = make_daemon().start()
    check_cases(d, RESOLVE_CASES)
    before = sorted(p.relative_to(d.root).as_posix() for p in d.root.iterdir())
    answers_before = set(answers(d))
    r = d.update("--ref", "bad ref with spaces")
    assert r.returncode == 2, r
    assert r.stdout == ""
    assert r.stderr.strip() == "proto4d: ref: expected a branch, tag or commit name, got 'bad ref with spaces'"
    assert sorted(p.relative_to(d.root).as_posix() for p in d.root.iterdir()) == before  # no request, no temp file
    assert set(answers(d)) == answers_before


# =========================================================================== 3. storms


def test_a_storm_of_requests_runs_one_update_at_a_time_and_answers_each(make_daemon, origin):
    d = make_daemon(update={"watch_s": 3}).start()
    origin.commit("2")
    first = request_id(d.update("--force").stdout)
    d.wait_status(lambda s: s["update"]["state"] in ("canary", "switching", "verifying", "watching"), 30,
                  "the first update under way")
    sha3 = origin.commit("3")

    # Watch the process table while the storm runs: one update at a time means at most two app
    # processes (the serving one and a canary, or the old one draining and the new one).
    peak = {"apps": 0, "tmp_releases": 0}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak["apps"] = max(peak["apps"], len(d.app_pids()))
            tmp = [p for p in (d.root / "releases").iterdir() if p.name.startswith(".tmp-")]
            peak["tmp_releases"] = max(peak["tmp_releases"], len(tmp))
            stop.wait(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    env = {k: v for k, v in os.environ.items() if k != "PROTO4D_CONFIG"}
    procs = [subprocess.Popen([sys.executable, "-m", "proto4d", "update", "--force", "--reason", f"storm {i}",
                               "--config", str(d.config_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env, cwd=d.base) for i in range(20)]
    for _ in range(40):  # a burst of touches meanwhile, paced like a script in a loop
        (d.root / "update.request").touch()
        time.sleep(0.02)
    results = [(p.wait(90), *p.communicate()) for p in procs]
    cli_ids = []
    for rc, out, err in results:
        assert rc in (0, 1), (rc, out, err)
        rid = request_id(out)
        cli_ids.append(rid)
        assert re.search(r"^(accepted|queued|superseded|done|aborted|rolled_back): ", out, re.M), (out, err)
    assert len(set(cli_ids)) == 20

    # Every request (the CLI's, the touches', the first) gets a final answer; the branch head ends serving.
    wait_for(lambda: all(answer(d, rid)["final"] for rid in [first, *cli_ids]), 120, "every CLI request answered")
    d.wait_status(lambda s: s["update"]["state"] == "idle" and s["update"]["queued"] is None
                  and s["app"]["commit"] == sha3 and s["app"]["healthy"], 120, "the branch head serving, idle")
    stop.set()
    watcher.join(5)
    final = answers(d)
    assert all(a["final"] for a in final.values()), [a for a in final.values() if not a["final"]]
    received = [e["id"] for e in events(d, "request.received")]
    assert set(received) <= set(final) and len(received) > 21, len(received)  # touches were requests too
    states = [final[rid]["state"] for rid in cli_ids]
    assert set(states) <= {"done", "superseded"}, states
    assert answer(d, first)["state"] == "done"

    # One update at a time: the runs' spans in the daemon's log never overlap.
    spans: dict[str, list[float]] = {}
    for e in d.log_events():
        if e.get("event") in ("update.step", "update.finished") and e.get("id"):
            ts = dt.datetime.fromisoformat(e["timestamp"]).timestamp()
            spans.setdefault(e["id"], [ts, ts])[1] = ts
    ordered = sorted(spans.values())
    assert len(ordered) >= 2
    for (_a0, a1), (b0, _b1) in itertools.pairwise(ordered):
        assert b0 >= a1, f"two updates overlapped: {ordered}"
    assert len(list((d.root / "logs").glob("update_*.log"))) == len(ordered)
    # At most: the serving process, the previous one still draining, and the next update's canary.
    # Two updates at once would mean two canaries or two new processes: four or more.
    assert peak["apps"] <= 3 and peak["tmp_releases"] <= 1, peak
    assert d.get()["version"] == "3"


# =========================================================================== 4. signals at every state

# state -> signal -> what happens (the README's table; the tests below assert exactly this)
SIGNAL_TABLE = {
    "waiting": {
        "HUP": "config reloaded; the update keeps waiting (same id)",
        "USR1": "new request accepted; it replaces the waiting one (answered superseded) and waits in turn",
        "TERM": "exit 0, app stopped; the journal keeps the request: after a restart it resumes (same id)",
    },
    "noticed": {
        "HUP": "config reloaded; the update keeps its notice and grace (same id)",
        "USR1": "new request accepted; it replaces the noticed one, whose notice goes; it posts its own",
        "TERM": "exit 0, app stopped, notice withdrawn; after a restart the request resumes (same id)",
    },
    "preparing": {
        "HUP": "config reloaded; preparing goes on, the update ends done",
        "USR1": "new request queued; it runs after the current one",
        "TERM": "exit 0 at once: the update is aborted before the exit (live service never touched)",
    },
    "switching": {
        "HUP": "config reloaded; the switch goes on, the update ends done",
        "USR1": "new request queued; it runs after the current one",
        "TERM": "exit 0, old and new processes both stopped; after a restart: rolled back to the old release",
    },
    "watching": {
        "HUP": "config reloaded; the watch goes on, the update ends done",
        "USR1": "new request queued; it runs after the current one",
        "TERM": "exit 0, app stopped; after a restart: rolled back to the old release",
    },
}
for _row in SIGNAL_TABLE.values():
    _row["INT"] = _row["TERM"]  # SIGINT (and SIGQUIT) stop the daemon exactly as SIGTERM does
PAUSE_AT = {"preparing": "export", "switching": "new_started", "watching": "watch"}


def signal_table_markdown() -> str:
    rows = ["| state | " + " | ".join(f"SIG{sig}" for sig in ("HUP", "USR1", "TERM", "INT")) + " |",
            "|---|---|---|---|---|"]
    rows += [f"| {state} | " + " | ".join(row[sig] for sig in ("HUP", "USR1", "TERM", "INT")) + " |"
             for state, row in SIGNAL_TABLE.items()]
    return "\n".join(rows)


def test_the_signal_table_covers_every_state_and_signal():
    assert list(SIGNAL_TABLE) == ["waiting", "noticed", "preparing", "switching", "watching"]
    assert all(set(row) == {"HUP", "USR1", "TERM", "INT"} for row in SIGNAL_TABLE.values())
    assert signal_table_markdown().count("\n") == 6
PENDING_STATES = ("waiting", "noticed")
LOAD = {"waiting": 4, "noticed": 1}  # simulated users: 4 is red, 1 is yellow (yellow_max_users 2)


def signal_daemon(make_daemon):
    return make_daemon(safety={"quiet_for_s": 3, "red_rpm": 0}, update={"notice_grace_s": 120, "watch_s": 1})


@contextlib.contextmanager
def users_for(state: str, d):
    if state not in LOAD:
        yield None
        return
    with Load("127.0.0.1", d.port, users=LOAD[state], mix=Mix(think_s=(0.05, 0.1), slow_ms=(10, 50))) as load:
        yield load


def reach(d, state: str) -> str:
    """Start an update and hold it in `state`; return its request id."""
    if state in PENDING_STATES:
        color = "red" if state == "waiting" else "yellow"
        d.wait_status(lambda s: s["activity"]["verdict"] == color, 20, color)
        rid = request_id(d.update().stdout)
    else:
        (d.root / "state" / "pause-at").write_text(PAUSE_AT[state])
        rid = request_id(d.update("--force").stdout)
        wait_for((d.root / "state" / f"paused-at-{PAUSE_AT[state]}").exists, 60, f"the pause at {PAUSE_AT[state]}")
    d.wait_status(lambda s: s["update"]["state"] == state and s["update"]["id"] == rid, 30, state)
    return rid


def release_pause(d, state: str) -> None:
    if state in PAUSE_AT:
        (d.root / "state" / "pause-at").unlink()
        (d.root / "state" / f"paused-at-{PAUSE_AT[state]}").unlink()


def usr1_request(d, seen: int) -> str:
    got = wait_for(lambda: [e for e in events(d, "request.received") if e.get("by") == "SIGUSR1"][seen:], 10,
                   "the SIGUSR1 request")
    return got[0]["id"]


@pytest.mark.long
@pytest.mark.parametrize("state", rows(list(SIGNAL_TABLE), ["waiting", "watching"]))
def test_hup_and_usr1_during_an_update(make_daemon, origin, state):
    d = signal_daemon(make_daemon).start(env=FAULTS_ENV)
    old = d.status()["app"]
    sha2 = origin.commit("2")
    with users_for(state, d) as load:
        rid = reach(d, state)
        # HUP: the config is reloaded, the update is where it was.
        applied = len(events(d, "reload.applied"))
        d.cfg["activity"]["interval_s"] = 0.4
        d.write_config()
        d.signal(signal.SIGHUP)
        wait_for(lambda: len(events(d, "reload.applied")) > applied, 10, "reload.applied")
        s = d.wait_status(lambda s: s["daemon"]["interval_s"] == 0.4, 10, "the new interval in force")
        assert (s["update"]["state"], s["update"]["id"], s["daemon"]["state"]) == (state, rid, "running")
        # USR1: a new request, answered at once.
        d.signal(signal.SIGUSR1)
        uid = usr1_request(d, 0)
        if state in PENDING_STATES:
            wait_for(lambda: answer(d, rid)["state"] == "superseded", 10, "the waiting request superseded")
            assert answer(d, uid)["state"] == "accepted"
            assert answer(d, rid)["message"] == f"superseded by request {uid} before anything was touched"
            s = d.wait_status(lambda s: s["update"]["id"] == uid and s["update"]["state"] == state, 30,
                              f"the new request {state}")
            if state == "noticed":
                assert json.loads((d.root / "notice.json").read_text())["update_id"] == uid
        else:
            wait_for(lambda: answer(d, uid)["state"] == "queued", 10, "the SIGUSR1 request queued")
            assert d.status()["update"]["id"] == rid
        # The update goes on.
        release_pause(d, state)
        if load is not None:
            load.stop()
    last = uid if state in PENDING_STATES else rid
    wait_for(lambda: answer(d, last)["final"], 90, "the update's end")
    assert answer(d, last)["state"] == "done", answer(d, last)
    wait_for(lambda: answer(d, uid)["final"], 60, "the SIGUSR1 request's end")
    assert answer(d, uid)["state"] == "done"
    s = d.wait_status(lambda s: s["update"]["state"] == "idle" and s["app"]["healthy"], 30, "idle")
    assert s["app"]["commit"] == sha2 and s["app"]["release"] != old["release"]
    assert not (d.root / "notice.json").exists()


def stop_with(d, sig: int) -> None:
    d.signal(sig)
    assert d.proc.wait(60) == 0, d.tail()
    assert d.app_pids() == [], "an app process outlived the daemon"
    assert d.status()["daemon"]["state"] == "stopped"


@pytest.mark.parametrize("state", rows(list(SIGNAL_TABLE), ["noticed", "switching"]))
def test_term_and_int_during_an_update(make_daemon, origin, state):
    d = signal_daemon(make_daemon)
    # About the update's own steps (paused in its own export): no release prepared ahead
    # (update.prepare_ahead_s, on with PROTO4D_TEST_AHEAD=1) takes that work away or adds a temp dir of its own.
    d.cfg["update"]["prepare_ahead_s"] = 0
    d.write_config()
    d.start(env=FAULTS_ENV)
    old = d.status()["app"]
    origin.commit("2")
    with users_for(state, d):
        rid = reach(d, state)
        for sig in (signal.SIGTERM, signal.SIGINT):
            stop_with(d, sig)
            assert not (d.root / "notice.json").exists()
            if state in PENDING_STATES:
                # Still pending in the journal: the next start resumes the same request.
                assert d.journal()["id"] == rid and d.journal()["state"] == state
                assert not answer(d, rid)["final"]
                d.start(env=FAULTS_ENV, wait_healthy=False)
                d.wait_status(lambda s, rid=rid: s["update"]["id"] == rid and s["update"]["state"] == state, 60,
                              f"the request resumed, {state}")
                continue
            if state == "preparing":
                # Aborted before the daemon exited: the live service was never touched.
                assert answer(d, rid)["state"] == "aborted" and d.journal()["state"] == "aborted"
                outcome = "aborted"
            else:
                assert d.journal()["state"] == state and not answer(d, rid)["final"]
                outcome = "rolled_back"
            release_pause(d, state)
            d.start(env=FAULTS_ENV, wait_healthy=False)
            wait_for(lambda rid=rid: answer(d, rid)["final"], 60, "the interrupted update settled")
            assert answer(d, rid)["state"] == outcome and d.journal()["state"] == outcome
            d.wait_healthy(release=old["release"])
            assert (d.root / "current").resolve().name == old["release"]
            assert d.get()["version"] == "1"
            assert not [p for p in (d.root / "releases").iterdir() if p.name.startswith(".")]
            if sig == signal.SIGTERM:
                rid = reach(d, state)  # again, for SIGINT
    if state in PENDING_STATES:
        assert d.stop() == 0
