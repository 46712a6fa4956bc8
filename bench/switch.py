"""Switch under load: failed requests and latency while the app is updated, four ways, in one run.

  (a) drain       proto4d as shipped when users have been on since the last update (app.spare off here:
                  no spare warms then): the verified canary is promoted in place onto the shared socket
                  (one start per release), the old process drains through the drain shim
  (a3) spare      proto4d as shipped after a quiet moment: the new head was pushed before it, so the
                  release was prepared ahead (update.prepare_ahead_s) and the canary is the spare
                  interpreter (app.spare), both while nobody was on; needs class breaks (--breaks,
                  implied), since both happen only on a green sample
  (a5) spare-late (a3) with the head pushed after the quiet moment (update.prepare_ahead_s off here): the
                  canary is the spare, the release is prepared in the update, beside the serving app
  (a4) two-start-spare  (a2) with app.spare and the release prepared ahead: the canary starts cold
                  (niced, as one that will not be promoted), the spare is the second start, on the shared
                  socket (what an app with students' data gets: its canary runs on copies)
  (a2) two-start  the same with update.promote: never: the release starts again on the shared socket
                  after its canary (the handoff of every release before issue 12)
  (b) handoff     the same handoff with stock uvicorn shutdown (app.drain: sigterm)
  (c) stop-start  proto4d with a command without {fd}: the app binds the port, old stopped before new starts
  (d) old-way     what the operator's script did, without proto4d: stop uvicorn, git pull,
                  `pip install --upgrade -r requirements.txt` into the same live venv, start, wait for /health
  (e) gunicorn    the peer users would pick instead: gunicorn with uvicorn workers
                  (`-k uvicorn.workers.UvicornWorker -w 2`), updated by git pull and SIGHUP to the master,
                  its documented graceful reload (new workers start, old ones finish their requests)
  (0) null        not run unless named: (a)'s daemon and cycle (commit, push, settle, a "switch window"
                  of --null-window-s, its twin at rest) with no update triggered. What the latency
                  comparisons say when a switch changes nothing: the bench's own noise floor.

Each variant gets N updates alternating two healthy versions, under each load mix (see common.MIXES):
normal (~70-90 req/s, users with think time, keep-alive and fresh connections, GET and POST with a
body, 5 % slow 0.5-3 s calls) and stress (keep-alive clients with no think time, as fast as it goes).
(a)-(c) are triggered through proto4d itself (update.request with force, then state/answers/<id>.json).

Latency figures are for the fast requests (GET / and POST /echo; /slow takes as long as it asks to):
"rest" = requests inside a window before the first update; "switch" = requests overlapping any
[trigger, verified] window; "paired rest" = requests overlapping a stretch at rest after each update
(its answer in, its old process gone), as long as that update's window, with the bench polling the
answer file as it does during a switch (its load runs in the same process). The latency target compares
the switch windows with the paired rest: as many seconds each, at the same moments of the run, since
a max grows with the time it is taken over and the shared host's load drifts. Every failed request of
the run is counted, wherever it falls.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import contextlib
import functools
import gzip
import http.client
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
from common import LoadSet, Target, fmt, lat_stats, log, md_table, percentile, sign_test

VARIANTS: dict[str, tuple[str, str]] = {
    "drain": ("a", "promotion in place + drain shim (as shipped, no spare: users on since the last update)"),
    "spare": ("a3", "promotion in place + drain shim + app.spare + the release prepared ahead (as shipped, "
                    "after a class break)"),
    "spare-late": ("a5", "(a3) with the release prepared in the update (the head pushed after the break)"),
    "two-start-spare": ("a4", "two starts + app.spare + prepared ahead (the spare is the start on the shared "
                              "socket)"),
    "two-start": ("a2", "handoff + drain shim, two starts (update.promote: never)"),
    "handoff": ("b", "plain handoff (app.drain: sigterm)"),
    "stop-start": ("c", "stop-then-start (no {fd})"),
    "old-way": ("d", "old way: stop, pip install --upgrade, start"),
    "gunicorn": ("e", "gunicorn + UvicornWorker, git pull + SIGHUP"),
    "null": ("0", "no update: the bench's cycle (commit, push, wait) with nothing triggered"),
}
STOP_START_COMMAND = ["{python}", "-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port", "{port}"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="./dev bench switch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Quick default: 20 updates per variant and mix on uvicorn 0.54 (about 16 minutes on 2 cores).\n"
               "README figures: --readme (= --updates 100 --uvicorn both --rest-s 60; about 2.5 hours on 2 cores; "
               "--readme --updates 50 took 75 minutes).")
    p.add_argument("--updates", type=int, default=20, help="updates per variant and mix (default 20)")
    p.add_argument("--old-way-updates", type=int, metavar="N",
                   help="updates for (d) only (default: --updates; each costs a pip run of a few seconds)")
    p.add_argument("--variants", default=",".join(v for v in VARIANTS if v not in ("null", *SPARE_VARIANTS)),
                   help=f"comma-separated subset of {','.join(VARIANTS)} (default: all but null and the spare ones, "
                        "which need class breaks)")
    p.add_argument("--mixes", default="normal,stress", help="comma-separated subset of normal,stress")
    p.add_argument("--uvicorn", default="0.54", choices=["0.54", "0.24", "both"],
                   help="the app's uvicorn line: 0.54 (the sample's pin, h11), 0.24 (uvicorn[standard]==0.24.0, "
                        "httptools, what Proto4 pins) or both (default 0.54)")
    p.add_argument("--rest-s", type=float, default=20, help="length of the at-rest window before the first update")
    p.add_argument("--watch-s", type=float, default=0.5, help="update.watch_s for the daemons (default 0.5)")
    p.add_argument("--gap-s", type=float, default=0.5,
                   help="pause after the old process has exited and before the next update (default 0.5)")
    p.add_argument("--null-window-s", type=float, default=1.0,
                   help="(0) null: the length of each window that stands in for an update (default 1.0)")
    p.add_argument("--breaks", action="store_true",
                   help="before each update a class break: every user leaves (the load pauses) until the daemon's "
                        "verdict is green (and, for (a3), its spare is warm), then the load resumes and settles for "
                        f"{BREAK_SETTLE_S:g} s; activity sampled every {BREAK_ACTIVITY['interval_s']:g} s over "
                        f"{BREAK_ACTIVITY['window_s']:g} s. Implied for (a3); give it to compare (a) the same way")
    p.add_argument("--readme", action="store_true", help="the README run: --updates 100 --uvicorn both --rest-s 60")
    common.add_run_args(p, "each run")
    args = p.parse_args(argv)
    if args.readme:
        if args.updates == 20:
            args.updates = 100
        args.uvicorn = "both"
        if args.rest_s == 20:
            args.rest_s = 60
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    args.mix_list = [m.strip() for m in args.mixes.split(",") if m.strip()]
    for v in args.variant_list:
        if v not in VARIANTS:
            p.error(f"--variants: unknown variant {v!r} (known: {', '.join(VARIANTS)})")
    for m in args.mix_list:
        if m not in common.MIXES:
            p.error(f"--mixes: unknown mix {m!r} (known: {', '.join(common.MIXES)})")
    if args.updates < 1:
        p.error("--updates must be at least 1")
    args.lines = ["0.54", "0.24"] if args.uvicorn == "both" else [args.uvicorn]
    return args


# --------------------------------------------------------------------------- (a)-(c): through proto4d


def null_update(d: Any, window_s: float) -> tuple[str, float, dict[str, Any]]:
    """(0): a window of `window_s` with the bench doing what it does during a switch (polling an answer
    file every 20 ms) and no update: (id, trigger, answer)."""
    req_id = f"null-{os.urandom(3).hex()}"
    t = time.time()
    rest_piece(window_s, poll=functools.partial(common.answer_of, d, req_id))  # no such answer: the same reads
    return req_id, t, {"state": "done", "at": time.time()}


SPARE_VARIANTS = ("spare", "spare-late", "two-start-spare")
# The head is pushed before the class break, and the break lasts until its release is prepared ahead.
AHEAD_VARIANTS = ("spare", "two-start-spare")
# Class breaks (--breaks): the daemon must see nobody on soon after the users leave.
BREAK_ACTIVITY = {"interval_s": 1.0, "window_s": 2.0}
BREAK_SETTLE_S = 2.0


def daemon_overrides(variant: str, watch_s: float, breaks: bool = False) -> dict[str, Any]:
    # update.prepare_ahead_s: every green sample looks (the break is short); 0 for the variants that stand
    # for users on since the last update, or for the daemon before the release was prepared ahead.
    over: dict[str, Any] = {"update": {"watch_s": watch_s, "prepare_ahead_s": 1 if variant in AHEAD_VARIANTS else 0}}
    if breaks or variant in SPARE_VARIANTS:
        over["activity"] = dict(BREAK_ACTIVITY)
    if variant in SPARE_VARIANTS:
        over["app"] = {"spare": True}
    if variant in ("two-start", "two-start-spare"):
        over["update"]["promote"] = "never"
    elif variant == "handoff":
        over["app"] = {"drain": "sigterm"}
    elif variant == "stop-start":
        over["app"] = {"command": STOP_START_COMMAND}
    return over


# The bench's own commit and push to the origin (four git processes at full priority on the same two
# cores) is not part of an update: on the Mac the push happens elsewhere. Triggering only once it is
# over keeps it out of the switch window, where it showed as the "pickup" phase's raised p99.
COMMIT_SETTLE_S = 0.5


class Version:
    """Alternates the two healthy versions the updates deploy."""

    def __init__(self, origin: Any) -> None:
        self.origin = origin
        self.n = 0

    def next(self) -> str:
        self.n += 1
        version = "2" if self.n % 2 else "3"
        return self.origin.commit(version)


def run_proto4d(variant: str, mix: str, origin: Any, base: Path, args: argparse.Namespace) -> dict[str, Any]:
    breaks = args.breaks or variant in SPARE_VARIANTS
    d = common.new_daemon(base, origin, **daemon_overrides(variant, args.watch_s, breaks))
    versions = Version(origin)
    updates: list[dict[str, Any]] = []
    paired: list[tuple[float, float]] = []
    try:
        d.start(timeout=300)
        drain = d.status()["app"].get("drain", "")
        load = LoadSet(d.port, common.MIXES[mix]).start()
        try:
            time.sleep(2)
            rest = (time.time(), 0.0)
            time.sleep(args.rest_s)
            rest = (rest[0], time.time())
            break_s: list[float] = []
            for i in range(args.updates):
                if variant in AHEAD_VARIANTS:  # pushed while users are on; prepared in the break that follows
                    sha = versions.next()
                    pushed = time.time()
                if breaks:
                    break_s.append(class_break(d, load, want_spare=variant in SPARE_VARIANTS,
                                               want_ahead=sha if variant in AHEAD_VARIANTS else ""))
                if variant not in AHEAD_VARIANTS:
                    versions.next()
                    pushed = time.time()
                time.sleep(COMMIT_SETTLE_S)
                old_pid = d.status()["app"]["pid"]
                if variant == "null":
                    old_pid = None
                    req_id, t_trigger, answer = null_update(d, args.null_window_s)
                else:
                    req_id, t_trigger = common.trigger_update(d, reason=f"bench {variant} {mix} {i + 1}")
                    answer = common.wait_answer(d, req_id, timeout=180)
                t_final = time.time()
                journal = {} if variant == "null" else common.journal_for(d, req_id)
                steps = common.step_times(journal) if journal else {}
                verified = steps.get("watching", answer.get("at", t_final))
                updates.append({
                    "i": i + 1, "id": req_id, "outcome": answer.get("state"), "trigger": t_trigger, "pushed": pushed,
                    "verified": verified, "final": t_final, "switching": steps.get("switching", t_trigger),
                    "steps": {k: round(v - t_trigger, 3) for k, v in steps.items()},
                    "prepared_ahead": bool(journal.get("prepared_ahead")),
                    "message": answer.get("message", "")[:200]})
                if answer.get("state") != "done":
                    log(f"  update {i + 1}: {answer.get('state')}: {answer.get('message', '')[:200]}")
                if old_pid and not common.wait_pid_gone(old_pid, 20):
                    log(f"  update {i + 1}: the old process {old_pid} is still there after 20 s")
                time.sleep(args.gap_s)
                paired.append(rest_piece(verified - t_trigger, poll=functools.partial(common.answer_of, d, req_id)))
                if (i + 1) % 10 == 0:
                    log(f"  {variant}/{mix}: {i + 1}/{args.updates} updates, {load.count():,} requests")
        finally:
            load.stop()
        drained = [e for e in d.log_events() if e.get("event") == "app.drained"]
        extra = {"drain": drain,
                 "drain_s": [e.get("seconds") for e in drained],
                 "drain_killed": sum(1 for e in drained if e.get("killed"))}
        if breaks:
            events = d.log_events()
            extra["breaks"] = {"n": len(break_s), "mean_s": round(statistics.mean(break_s), 2) if break_s else None,
                               "max_s": round(max(break_s), 2) if break_s else None,
                               "spare_became": sum(1 for e in events if e.get("event") == "spare.became"),
                               "prepared_ahead": sum(1 for u in updates if u.get("prepared_ahead")),
                               "spare_unused": [e.get("why") for e in events if e.get("event") == "spare.unused"][:5]}
        return analyse(variant, mix, load, rest, updates, extra, paired)
    finally:
        with contextlib.suppress(Exception):
            d.stop(60)
        d.cleanup()


def class_break(d: Any, load: LoadSet, want_spare: bool, want_ahead: str = "", timeout: float = 90.0) -> float:
    """Every user leaves until the daemon sees nobody on (and has its spare warm, and the release of
    `want_ahead` prepared ahead, for (a3)); then they come back and the load settles. Returns how long the
    users were away."""
    t = time.time()
    load.pause()
    try:
        def ready(s: dict[str, Any]) -> bool:
            if (s.get("activity") or {}).get("verdict") != "green":
                return False
            ahead = s.get("ahead") or {}
            if want_ahead and not (ahead.get("state") == "ready" and ahead.get("commit") == want_ahead):
                return False
            return not want_spare or ((s.get("app") or {}).get("spare") or {}).get("state") == "warm"
        d.wait_status(ready, timeout, "a green verdict" + (" and a warm spare" if want_spare else "")
                      + (f" and {want_ahead[:7]} prepared ahead" if want_ahead else ""))
    finally:
        load.resume()
    away = time.time() - t
    time.sleep(BREAK_SETTLE_S)
    return away


# --------------------------------------------------------------------------- (d): the old way, without proto4d


class OldWay:
    """A live checkout and a live venv, one uvicorn process started and stopped by hand."""

    def __init__(self, base: Path, origin: Any) -> None:
        self.base = base
        self.origin = origin
        self.live = base / "live"
        self.venv = base / "venv"
        self.port = common.free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.app_log = base / "app.log"
        self.env = common.pypi_only_env({k: v for k, v in os.environ.items()
                                         if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")})

    def pip(self, *args: str) -> float:
        t = time.monotonic()
        r = subprocess.run([str(self.venv / "bin" / "python"), "-m", "pip", "install", "-q", *args,
                            "-r", str(self.live / "requirements.txt")], capture_output=True, text=True,
                           env=self.env, timeout=600, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"pip install failed ({r.returncode}): {r.stderr[-800:]}")
        return time.monotonic() - t

    def setup(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        common.harness.git(self.base, "clone", "-q", str(self.origin.bare), str(self.live))
        subprocess.run([sys.executable, "-m", "venv", str(self.venv)], check=True, env=self.env, timeout=120)
        self.pip()  # the first install (warms pip's cache, as on the operator's machine)

    def start(self) -> None:
        with open(self.app_log, "ab") as out:
            self.proc = subprocess.Popen(
                [str(self.venv / "bin" / "python"), "-m", "uvicorn", "main:app", "--host", "127.0.0.1",
                 "--port", str(self.port)], cwd=self.live, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)

    def healthy(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the app exited with {self.proc.returncode}; see {self.app_log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the app was not healthy within {timeout} s; see {self.app_log}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def update(self) -> dict[str, float]:
        t0 = time.monotonic()
        self.stop()
        t_stop = time.monotonic()
        common.harness.git(self.live, "pull", "-q", "--ff-only")
        t_pull = time.monotonic()
        self.pip("--upgrade")
        t_pip = time.monotonic()
        self.start()
        self.wait_healthy()
        t_up = time.monotonic()
        return {"stop": t_stop - t0, "pull": t_pull - t_stop, "pip": t_pip - t_pull, "start": t_up - t_pip}

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


class Gunicorn(OldWay):
    """gunicorn's master with two uvicorn workers on a live checkout; an update is a pull and a SIGHUP."""

    WORKERS = 2

    def setup(self) -> None:
        super().setup()
        r = subprocess.run([str(self.venv / "bin" / "python"), "-m", "pip", "install", "-q", "gunicorn"],
                           capture_output=True, text=True, env=self.env, timeout=600, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"pip install gunicorn failed: {r.stderr[-800:]}")

    def start(self) -> None:
        with open(self.app_log, "ab") as out:
            self.proc = subprocess.Popen(
                [str(self.venv / "bin" / "python"), "-m", "gunicorn", "main:app", "-k",
                 "uvicorn.workers.UvicornWorker", "-w", str(self.WORKERS), "--bind", f"127.0.0.1:{self.port}",
                 "--graceful-timeout", "30", "--chdir", str(self.live)],
                cwd=self.live, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)

    def version(self) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            conn.request("GET", "/version")
            r = conn.getresponse()
            return json.loads(r.read()).get("version", "") if r.status == 200 else ""
        except (OSError, http.client.HTTPException, ValueError):
            return ""
        finally:
            conn.close()

    def workers(self) -> int:
        import psutil
        try:
            return len(psutil.Process(self.proc.pid).children()) if self.proc else 0
        except psutil.Error:
            return 0

    def update(self) -> dict[str, float]:
        t0 = time.monotonic()
        common.harness.git(self.live, "pull", "-q", "--ff-only")
        want = (self.live / "VERSION").read_text().strip()
        t_pull = time.monotonic()
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        # Verified: five answers in a row from the new version, and only the new workers left.
        deadline, streak = time.monotonic() + 60, 0
        while streak < 5 or self.workers() != self.WORKERS:
            streak = streak + 1 if self.version() == want else 0
            if time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn did not serve version {want} within 60 s; see {self.app_log}")
            time.sleep(0.02)
        return {"pull": t_pull - t0, "reload": time.monotonic() - t_pull}


def run_old_way(mix: str, origin: Any, base: Path, args: argparse.Namespace,
                kind: type[OldWay] = OldWay) -> dict[str, Any]:
    old = kind(base, origin)
    versions = Version(origin)
    updates: list[dict[str, Any]] = []
    n = args.updates if kind is Gunicorn else (args.old_way_updates or args.updates)
    paired: list[tuple[float, float]] = []
    try:
        old.setup()
        old.start()
        old.wait_healthy()
        load = LoadSet(old.port, common.MIXES[mix]).start()
        try:
            time.sleep(2)
            rest = (time.time(), 0.0)
            time.sleep(args.rest_s)
            rest = (rest[0], time.time())
            for i in range(n):
                versions.next()
                time.sleep(COMMIT_SETTLE_S)
                t_trigger = time.time()
                try:
                    steps = old.update()
                    outcome = "done"
                except (RuntimeError, subprocess.SubprocessError) as e:
                    steps, outcome = {}, f"failed: {e}"
                    log(f"  old way update {i + 1}: {e}")
                    old.start()
                    old.wait_healthy()
                verified = time.time()
                updates.append({"i": i + 1, "outcome": outcome, "trigger": t_trigger, "verified": verified,
                                "final": verified, "switching": t_trigger,
                                "steps": {k: round(v, 3) for k, v in steps.items()}})
                time.sleep(args.gap_s)
                paired.append(rest_piece(verified - t_trigger))
                if (i + 1) % 10 == 0:
                    name = "gunicorn" if kind is Gunicorn else "old-way"
                    log(f"  {name}/{mix}: {i + 1}/{n} updates, {load.count():,} requests")
        finally:
            load.stop()
        pip_s = [u["steps"].get("pip") for u in updates if u["steps"].get("pip") is not None]
        extra = {"pip_s": {"mean": round(sum(pip_s) / len(pip_s), 2) if pip_s else None,
                           "max": round(max(pip_s), 2) if pip_s else None}}
        return analyse("gunicorn" if kind is Gunicorn else "old-way", mix, load, rest, updates, extra, paired)
    finally:
        old.stop()
        old.cleanup()


# --------------------------------------------------------------------------- analysis


def rest_piece(length: float, poll: Callable[[], object] | None = None) -> tuple[float, float]:
    """A stretch at rest as long as the update before it took, once that update is over and its old
    process gone: the switch windows' own twin, at the same moments of the run (the host's load drifts).

    `poll`: what the bench itself does during a switch window (reading the answer file every 20 ms,
    in the process whose threads are the load), done here too, so that its own share of the GIL and
    the CPU is on both sides of the ratio."""
    a = time.time()
    end = a + max(0.0, length)
    while poll is not None and time.time() < end:
        with contextlib.suppress(Exception):
            poll()
        time.sleep(0.02)
    time.sleep(max(0.0, end - time.time()))
    return a, time.time()


def analyse(variant: str, mix: str, load: LoadSet, rest: tuple[float, float], updates: list[dict[str, Any]],
            extra: dict[str, Any], paired: list[tuple[float, float]]) -> dict[str, Any]:
    results = load.results()
    duration = load.stopped - load.started
    raw = dump_raw(variant, mix, results, updates, paired, rest)
    windows = [(u["trigger"], u["verified"]) for u in updates]
    handoffs = [(u["switching"], u["verified"]) for u in updates]
    triggers = [u["trigger"] for u in updates] + [float("inf")]

    fast_rest = [r.latency for r in results if r.ok and common.is_fast(r) and common.inside(r, *rest)]
    fast_switch = [r.latency for r in results if r.ok and common.is_fast(r) and common.overlaps(r, windows)]
    fast_handoff = [r.latency for r in results if r.ok and common.is_fast(r) and common.overlaps(r, handoffs)]
    fast_paired = [r.latency for r in results if r.ok and common.is_fast(r) and common.overlaps(r, paired)]

    def excess(r: Any) -> float:
        return max(0.0, r.latency - (common.slow_ms(r.path) or 0) / 1000)

    slow_rest = [excess(r) for r in results if r.ok and not common.is_fast(r) and common.inside(r, *rest)]
    slow_switch = [excess(r) for r in results if r.ok and not common.is_fast(r) and common.overlaps(r, windows)]
    n_rest = sum(1 for r in results if common.inside(r, *rest))

    failed = [r for r in results if not r.ok]
    per_update: list[list[Any]] = [[] for _ in updates]
    at_rest = 0
    for r in failed:
        idx = next((i for i in range(len(updates)) if triggers[i] <= r.at < triggers[i + 1]), None)
        if idx is None:
            at_rest += 1
        else:
            per_update[idx].append(r)
    outages = [max(r.at + r.latency for r in fs) - min(r.at for r in fs) for fs in per_update if fs]
    errors = collections.Counter((r.error or f"HTTP {r.status}").split(":")[0] for r in failed)
    samples = [{"update": next((i + 1 for i, fs in enumerate(per_update) if r in fs), None),
                "after_trigger_s": round(r.at - next((u["trigger"] for u in reversed(updates) if u["trigger"] <= r.at),
                                                     r.at), 3),
                "method": r.method, "path": r.path, "kind": load.kind_of.get(r.user, "?"),
                "error": r.error or f"HTTP {r.status}"} for r in failed[:25]]
    t2v = [u["verified"] - u["trigger"] for u in updates]
    fast = [r for r in results if r.ok and common.is_fast(r)]  # sorted by start, as results are
    starts = [r.at for r in fast]
    phases, per_window, worst = phase_latency(fast, starts, updates)
    twins = paired_windows(fast, starts, per_window, paired)
    twins["phases"] = phase_twins(fast, starts, updates, paired)
    chunk_max = rest_chunk_maxima(results, rest, sum(t2v) / len(t2v) if t2v else 0.0)
    med_sw = statistics.median(per_window) if per_window else None
    med_rest = statistics.median(chunk_max) if chunk_max else None
    done = sum(1 for u in updates if u["outcome"] == "done")
    rest_s = lat_stats(fast_rest)
    sw_s = lat_stats(fast_switch)
    pair_s = lat_stats(fast_paired)
    return {
        "variant": variant, "label": VARIANTS[variant][1], "mix": mix,
        "updates": len(updates), "updates_done": done,
        "outcomes": dict(collections.Counter(u["outcome"] for u in updates)),
        "duration_s": round(duration, 1), "requests": len(results), "rps": round(len(results) / duration, 1),
        "ok_rps": round(sum(1 for r in results if r.ok) / duration, 1),
        "rps_rest": round(n_rest / (rest[1] - rest[0]), 1) if rest[1] > rest[0] else None,
        "failed": len(failed), "failed_get": sum(1 for r in failed if r.method == "GET"),
        "failed_post": sum(1 for r in failed if r.method == "POST"),
        "failed_keepalive": sum(1 for r in failed if load.kind_of.get(r.user) == "keep-alive"),
        "failed_fresh": sum(1 for r in failed if load.kind_of.get(r.user) == "fresh"),
        "failed_at_rest": at_rest, "failed_per_update": round(len(failed) / max(1, len(updates)), 3),
        "updates_with_failures": sum(1 for fs in per_update if fs),
        "errors": dict(errors.most_common(6)), "failure_samples": samples,
        "rest": rest_s, "switch": sw_s, "handoff": lat_stats(fast_handoff),
        "slow_excess": {"rest": lat_stats(slow_rest), "switch": lat_stats(slow_switch)},
        "ratio_max": round(sw_s["max"] / rest_s["max"], 2) if rest_s["max"] else None,
        "ratio_p99": round(sw_s["p99"] / rest_s["p99"], 2) if rest_s["p99"] else None,
        "rest_paired": pair_s,
        "ratio_max_paired": round(sw_s["max"] / pair_s["max"], 2) if pair_s["max"] else None,
        "ratio_p99_paired": round(sw_s["p99"] / pair_s["p99"], 2) if pair_s["p99"] else None,
        "window_max_ms": {"switch_median": round(med_sw * 1000, 2) if med_sw is not None else None,
                          "rest_median": round(med_rest * 1000, 2) if med_rest is not None else None,
                          "rest_windows": len(chunk_max)},
        "ratio_window_max": round(med_sw / med_rest, 2) if med_sw and med_rest else None,
        "twins": twins,
        "worst_in_switches": worst,
        "phases": phases,
        "trigger_to_verified_s": {"mean": round(sum(t2v) / len(t2v), 2) if t2v else None,
                                  "max": round(max(t2v), 2) if t2v else None},
        "outage_s": {"mean": round(sum(outages) / len(outages), 2) if outages else 0.0,
                     "max": round(max(outages), 2) if outages else 0.0},
        "rest_window": [rest[0], rest[1]],
        "raw": str(raw),
        "update_list": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in u.items()} for u in updates],
        **extra,
    }


def dump_raw(variant: str, mix: str, results: list[Any], updates: list[dict[str, Any]],
             paired: list[tuple[float, float]], rest: tuple[float, float]) -> Path:
    """Every request's start, latency and outcome beside the run's windows (gzip JSON, git-ignored with
    the results): a question the tables did not ask can be answered without another hour of load."""
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    path = common.RESULTS / f"switch-{time.strftime('%Y%m%d-%H%M%S')}-{variant}-{mix}-raw.json.gz"
    doc = {"fields": ["at", "latency", "ok", "fast", "method"],
           "requests": [[round(r.at, 6), round(r.latency, 6), r.ok, common.is_fast(r), r.method] for r in results],
           "updates": updates, "paired": paired, "rest": rest}
    with gzip.open(path, "wt") as f:
        json.dump(doc, f)
    return path


PHASES = (("pickup", None, "requested"), ("fetch", "requested", "preparing"), ("prepare", "preparing", "canary"),
          ("canary", "canary", "switching"), ("handoff", "switching", "verifying"), ("verify", "verifying", "watching"))


def phase_latency(fast: list[Any], starts: list[float], updates: list[dict[str, Any]]
                  ) -> tuple[dict[str, Any], list[float], list[dict[str, Any]]]:
    """Fast-request latency by the update phase each request completed in, each window's max, and the
    worst requests of all the windows (which update, when, in which phase).

    The phases come from the daemon's journal (for (d) there are none: the whole window is "stop-start")."""
    by_phase: dict[str, list[float]] = collections.defaultdict(list)
    per_window: list[float] = []
    worst_all: list[tuple[float, int, float, float, str]] = []
    for u in updates:
        a, b = u["trigger"], u["verified"]
        steps = u.get("steps", {})
        bounds = []
        for name, lo, hi in PHASES:
            if hi in steps and (lo is None or lo in steps):
                bounds.append((name, a + (steps[lo] if lo else 0.0), a + steps[hi]))
        worst = 0.0
        # requests that started up to 30 s before the window may still overlap it
        for r in fast[bisect.bisect_left(starts, a - 30):bisect.bisect_right(starts, b)]:
            end = r.at + r.latency
            if not (r.at < b and end > a):
                continue
            worst = max(worst, r.latency)
            t = min(max(end, a), b)
            name = next((n for n, lo, hi in bounds if lo <= t < hi), "stop-start" if not bounds else "other")
            by_phase[name].append(r.latency)
            worst_all.append((r.latency, u["i"], r.at - a, end - a, name))
        per_window.append(worst)
    worst_list = [{"update": i, "latency_ms": round(lat * 1000, 2), "started_after_trigger_s": round(st, 3),
                   "ended_after_trigger_s": round(en, 3), "phase": name}
                  for lat, i, st, en, name in sorted(worst_all, reverse=True)[:15]]
    order = [n for n, _, _ in PHASES] + ["stop-start", "other"]
    return {n: lat_stats(by_phase[n]) for n in order if by_phase.get(n)}, per_window, worst_list


def paired_windows(fast: list[Any], starts: list[float], per_window: list[float],
                   paired: list[tuple[float, float]]) -> dict[str, Any]:
    """Each switch window against its own twin at rest (as long, right after that update): in how many
    updates the switch's worst request was worse, and the sign test's two-sided p for "no effect" (then
    about half are worse, whatever the host's noise does to the maxima themselves)."""
    pairs = [(sw, common.window_max(fast, starts, a, b)) for sw, (a, b) in zip(per_window, paired, strict=False)]
    pairs = [(sw, rest) for sw, rest in pairs if sw > 0 and rest > 0]
    return {**sign_test(pairs), **max_ratio_null(pairs)}


def max_ratio_null(pairs: list[tuple[float, float]], shuffles: int = 4000, limit: float = 1.1) -> dict[str, Any]:
    """What the target's statistic (the max over all switch windows / the max over all their twins) does
    when a switch changes nothing: each pair's two windows swapped at random (a paired permutation). How
    often it still comes out at or under `limit`, and where the observed ratio falls among the shuffles.
    A max of a few thousand requests is one request: this says how much of a verdict it can carry."""
    if not pairs:
        return {}
    rng = random.Random(12)  # fixed: the same data gives the same figures
    observed = max(sw for sw, _ in pairs) / max(r for _, r in pairs)
    ratios = []
    for _ in range(shuffles):
        a = b = 0.0
        for sw, rest in pairs:
            if rng.random() < 0.5:
                sw, rest = rest, sw
            a, b = max(a, sw), max(b, rest)
        ratios.append(a / b)
    return {"null_under_limit": round(sum(1 for x in ratios if x <= limit) / shuffles, 3),
            "null_p90": round(percentile(ratios, 90), 2),
            "observed_rank": round(sum(1 for x in ratios if x < observed) / shuffles, 3)}


def phase_twins(fast: list[Any], starts: list[float], updates: list[dict[str, Any]],
                paired: list[tuple[float, float]]) -> dict[str, Any]:
    """Each phase of each update against the same stretch of its twin at rest (the same offsets from the
    twin's start): which phase, if any, makes a switch window worse than its twin."""
    pairs: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    for u, (p0, _) in zip(updates, paired, strict=False):
        a, steps = u["trigger"], u.get("steps", {})
        for name, lo, hi in PHASES:
            if hi not in steps or (lo is not None and lo not in steps):
                continue
            x, y = (steps[lo] if lo else 0.0), steps[hi]
            if y <= x:
                continue
            sw, rest = common.window_max(fast, starts, a + x, a + y), common.window_max(fast, starts, p0 + x, p0 + y)
            if sw > 0 and rest > 0:
                pairs[name].append((sw, rest))
    return {name: sign_test(pairs[name]) for name, _, _ in PHASES if pairs.get(name)}


def rest_chunk_maxima(results: list[Any], rest: tuple[float, float], length: float) -> list[float]:
    """The rest window cut into pieces as long as a mean switch window: the max of each piece.
    Comparing the median of these with the median per-update max compares like with like."""
    if length <= 0 or rest[1] <= rest[0]:
        return []
    n = int((rest[1] - rest[0]) // length)
    at_rest = [r for r in results if rest[0] <= r.at <= rest[1] and r.ok and common.is_fast(r)]
    out = []
    for k in range(n):
        a = rest[0] + k * length
        b = a + length
        lat = [r.latency for r in at_rest if common.inside(r, a, b)]
        if lat:
            out.append(max(lat))
    return out


# --------------------------------------------------------------------------- output


HEADERS = ["uvicorn", "mix", "variant", "updates ok", "requests", "req/s rest", "ok req/s", "failed (GET/POST)",
           "failed/update",
           "outage s", "p50 rest", "p99 rest", "max rest", "p50 switch", "p99 switch", "max switch",
           "max ratio", "p99 ratio", "window-max ratio", "p99 / max paired rest", "max ratio paired",
           "trigger->verified s", "others' load (cores)"]


def table(runs: list[dict[str, Any]]) -> str:
    rows = []
    for r in runs:
        key = VARIANTS[r["variant"]][0]
        rows.append([
            r["uvicorn"], r["mix"], f"({key}) {r['label']}", f"{r['updates_done']}/{r['updates']}", r["requests"],
            r["rps_rest"], r["ok_rps"], f"{r['failed']:,} ({r['failed_get']:,}/{r['failed_post']:,})",
            fmt(r["failed_per_update"], 2),
            fmt(r["outage_s"]["mean"], 2), fmt(r["rest"]["p50"]), fmt(r["rest"]["p99"]), fmt(r["rest"]["max"]),
            fmt(r["switch"]["p50"]), fmt(r["switch"]["p99"]), fmt(r["switch"]["max"]),
            fmt(r["ratio_max"], 2), fmt(r["ratio_p99"], 2), fmt(r["ratio_window_max"], 2),
            f"{fmt(r['rest_paired']['p99'])} / {fmt(r['rest_paired']['max'])}", fmt(r["ratio_max_paired"], 2),
            fmt(r["trigger_to_verified_s"]["mean"], 2),
            fmt(r["machine_load"]["others_cores"], 2)])
    return md_table(HEADERS, rows)


def phase_table(runs: list[dict[str, Any]]) -> str:
    names = [n for n, _, _ in PHASES]
    rows = []
    for r in runs:
        row = [r["uvicorn"], r["mix"], f"({VARIANTS[r['variant']][0]})",
               f"{fmt(r['rest']['p99'])} / {fmt(r['rest']['max'])}"]
        for n in names:
            st = r["phases"].get(n)
            row.append(f"{fmt(st['p99'])} / {fmt(st['max'])} ({st['n']:,})" if st else "-")
        rows.append(row)
    return md_table(["uvicorn", "mix", "variant", "rest", *names], rows)


def twins_note(t: dict[str, Any] | None) -> str:
    if not t or not t.get("n"):
        return "no switch window with a twin at rest"
    note = (f"worst request worse than in its twin at rest in {t['worse']} of {t['n']} updates (sign test "
            f"p {fmt(t['p_sign'], 3)}), median ratio {fmt(t['median_ratio'], 2)}")
    if "null_under_limit" in t:
        note += (f"; with each update's two windows swapped at random the ratio is <= 1.1 in "
                 f"{t['null_under_limit'] * 100:.0f}% of shuffles (90th percentile {fmt(t['null_p90'], 2)}x), "
                 f"the observed one above {t['observed_rank'] * 100:.0f}% of them")
    by_phase = t.get("phases") or {}
    if by_phase:
        note += "; by phase, worse than the twin's same stretch: " + ", ".join(
            f"{name} {v['worse']}/{v['n']} (p {fmt(v['p_sign'], 3)})" for name, v in by_phase.items())
    return note


def targets(runs: list[dict[str, Any]]) -> list[Target]:
    out = []
    for r in runs:
        if r["variant"] not in ("drain", "spare", "spare-late", "two-start", "two-start-spare", "null"):
            continue
        key = VARIANTS[r["variant"]][0]
        where = f"{r['mix']}, uvicorn {r['uvicorn']}"
        per100 = r["failed"] / max(1, r["updates"]) * 100
        out.append(Target(f"({key}) failed requests per 100 updates, {where}", round(per100, 2), 0, "",
                          f"{r['failed']} failed in {r['updates']} updates (GET {r['failed_get']}, "
                          f"POST {r['failed_post']})"))
        # Against the paired rest: as many seconds at rest as in switches, taken between the updates. A max
        # grows with the time it is taken over, and the host's load drifts during a run: a ratio against the
        # window before the first update (10-60 s, minutes earlier) moves with both (it is in the note).
        out.append(Target(f"({key}) max latency switch / rest, {where}", r["ratio_max_paired"], 1.1, "x",
                          f"max {fmt(r['switch']['max'])} ms during switches vs {fmt(r['rest_paired']['max'])} ms "
                          f"in as many seconds at rest between them; against the {fmt(r['rest']['max'])} ms of the "
                          f"window before the first update {fmt(r['ratio_max'], 2)}, window-max ratio "
                          f"{fmt(r['ratio_window_max'], 2)}; {twins_note(r.get('twins'))}"))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = common.machine()
    base, cleanup = common.workdir(args.keep, "switch")
    runs: list[dict[str, Any]] = []
    started = time.time()
    total_meter = common.BusyMeter()
    log(f"switch bench: {args.updates} updates x variants {args.variant_list} x mixes {args.mix_list} "
        f"x uvicorn {args.lines}; scratch {base}")
    try:
        for line in args.lines:
            origin = common.make_origin(base / f"uvicorn-{line}", line)
            for mix in args.mix_list:
                for variant in args.variant_list:
                    if args.quiet_wait:
                        common.wait_quiet(args.quiet_wait)
                    log(f"uvicorn {line} / {mix} / ({VARIANTS[variant][0]}) {variant} ...")
                    t = time.monotonic()
                    meter = common.BusyMeter()
                    where = base / f"uvicorn-{line}" / f"{variant}-{mix}"
                    if variant == "old-way":
                        run = run_old_way(mix, origin, where, args)
                    elif variant == "gunicorn":
                        run = run_old_way(mix, origin, where, args, kind=Gunicorn)
                    else:
                        run = run_proto4d(variant, mix, origin, where, args)
                    run["machine_load"] = meter.read()
                    run["uvicorn"] = common.UVICORN_LABEL[line]
                    run["uvicorn_line"] = line
                    runs.append(run)
                    log(f"  done in {time.monotonic() - t:.0f} s: {run['updates_done']}/{run['updates']} updates, "
                        f"{run['requests']:,} requests at {run['rps']} req/s, {run['failed']} failed, "
                        f"max {run['rest']['max']} ms at rest / {run['switch']['max']} ms in switches")
    finally:
        cleanup()
    tgts = targets(runs)
    busy = total_meter.read()
    data = {"bench": "switch", "machine_load": busy, "command": common.command_line(), "machine": machine,
            "started_at": started,
            "seconds": round(time.time() - started, 1),
            "args": {k: v for k, v in vars(args).items()}, "mixes": {
                m: [{"kind": g.kind, "users": g.users, "mix": vars(g.mix)} for g in common.MIXES[m]]
                for m in args.mix_list},
            "runs": runs, "targets": [t.to_dict() for t in tgts]}
    path = common.write_json("switch", data)
    print(f"\n## Switch under load ({args.updates} updates per variant and mix)\n")
    print(f"Machine: {common.machine_line(machine)}")
    print(f"Command: `{common.command_line()}`")
    print(f"Load: {common.others_line(busy)}\n")
    print(table(runs))
    print("\nLatency in ms, fast requests only (GET / and POST /echo). rest = a window of "
          f"{args.rest_s:g} s before the first update; switch = requests overlapping [trigger, verified]. "
          "outage s = mean span of an update's failed requests. req/s rest = all requests per second in the "
          "rest window; ok req/s = successful requests per second over the whole run. Clients retry at once after "
          "a failure, so for (c) and (d) the failed count says how hard clients knocked on a closed port: "
          "outage s is the comparable figure. window-max ratio = median over updates of the worst latency in "
          "each switch window / median of the worst latency in rest pieces of the same length (like with like: "
          "a max over more requests is larger by itself). paired rest = after each update is over and its old "
          "process gone, a stretch as long as that update's window: as many seconds at rest as in switches, at "
          "the same moments of the run.")
    for r in runs:
        br = r.get("breaks")
        if br:
            print(f"\nClass breaks, ({VARIANTS[r['variant']][0]}) {r['mix']}: {br['n']}, the users away "
                  f"{fmt(br['mean_s'])} s on average (at most {fmt(br['max_s'])} s); the spare became the canary in "
                  f"{br['spare_became']} updates, the release was prepared ahead in {br.get('prepared_ahead', 0)}"
                  + (f"; spare not used: {'; '.join(br['spare_unused'])}" if br["spare_unused"] else ""))
    print("\nWhere the switch latency comes from, (a) and (b): fast requests by the update phase they completed in "
          "(p99 / max ms, n):\n")
    print(phase_table([r for r in runs if r["variant"] in ("drain", "spare", "spare-late", "two-start",
                                                           "two-start-spare", "handoff")]))
    common.print_targets(tgts, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
