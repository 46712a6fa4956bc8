"""`proto4d demo`: the whole story on the bundled sample app, in a temporary directory, no set-up.

A local bare git origin gets the sample app (daemon/proto4d/sample) in three versions; a real
daemon (`python -m proto4d run`) serves it with a real uvicorn in a release venv; simulated
users (proto4d.demo.loadgen) send real HTTP over loopback. The acts:

  1. v1 serves;
  2. four busy users make the verdict red; an update to v2 is requested and waits;
  3. three users leave, one stays: yellow, the notice goes up, and after its grace the update
     prepares, canaries and switches under that user's load: no failed request;
  4. v3 crashes a couple of seconds after it starts: its canary passes, the watch sees the
     crash and the daemon rolls back to v2 by itself, with the same zero-gap switch;
  5. the retained releases and the timeline of every update event;
  6. SIGTERM: the daemon drains the app and exits 0; nothing is left behind.

Nothing but loopback is contacted, except the package index while the first release venv is
built (uvicorn, h11). The temporary directory is removed and every process ended, even on
Ctrl-C or an error; PROTO4D_DEMO_KEEP=1 keeps the directory for inspection.
Exit 0 only when the story went as expected.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import yaml

from proto4d import accesslog, releases
from proto4d.demo.loadgen import Load, Mix, Result
from proto4d.listener import free_port

SAMPLE = Path(__file__).resolve().parents[1] / "sample"
KEEP_ENV = "PROTO4D_DEMO_KEEP"

# The timings of the story. v3 crashes CRASH_AFTER_S after its app module is imported: its canary
# passes well within that (it answers 0.3-0.9 s after start on a warm venv, even on a loaded machine),
# the production process is verified right after its ready line, and the watch (WATCH_S, longer than
# the delay plus the switch) sees the crash about 2.3 s in.
CRASH_AFTER_S = 2.5
WATCH_S = 6.0
# A watch check that starts just as v3 dies waits in the listen backlog for up to HEALTH_TIMEOUT_S per
# check path; the crash (~2.3 s into the watch) plus two such waits must end well inside the watch.
HEALTH_TIMEOUT_S = 1.0
NOTICE_GRACE_S = 3.0
WINDOW_S = 4.0

FIRST_START_TIMEOUT_S = 150.0  # fetch + venv build from the package index + first start
STEP_TIMEOUT_S = 30.0
UPDATE_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0

USER_NET = "10.0."  # loadgen's X-Forwarded-For addresses: 10.0.0.<first_address + i + 1>

STEP_WORDS = {
    "waiting": "waits for a safe moment",
    "noticed": f"notice posted; the user gets {NOTICE_GRACE_S:g} s before it starts",
    "preparing": "exports the new commit into its own release dir and reuses or builds its venv; "
                 "the old version keeps serving",
    "canary": "runs the new release on a private port: every health check must pass before production "
              "is touched",
    "switching": "starts the new process on the same listening socket; the old one stops accepting and "
                 "finishes its in-flight requests",
    "verifying": "health checks on the production port",
    "watching": f"watches the new release for {WATCH_S:g} s: a crash or a failing check rolls back",
    "rolling_back": "switches back to the previous release, the same zero-gap way",
}


class DemoFailed(Exception):
    """The story did not go as expected; the message says where."""


class _Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP: unwind through the same clean-up as Ctrl-C."""


# --------------------------------------------------------------------------- output


class Out:
    def __init__(self, start: float) -> None:
        self.start = start
        self.color = sys.stdout.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
        self._lock = threading.Lock()

    def _c(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color else text

    def stamp(self, at: float | None = None) -> str:
        return f"[{(at if at is not None else time.time()) - self.start:5.1f}s]"

    def line(self, text: str = "", at: float | None = None) -> None:
        with self._lock:
            print(f"{self.stamp(at)} {text}" if text else "", flush=True)

    def plain(self, text: str) -> None:
        with self._lock:
            print(text, flush=True)

    def act(self, title: str, explain: str = "") -> None:
        with self._lock:
            print(flush=True)
            print(f"{self.stamp()} {self._c('1', '== ' + title + ' ==')}", flush=True)
            for ln in _wrap(explain, 92):
                print(f"         {ln}", flush=True)

    def block(self, text: str, prefix: str = "    | ") -> None:
        with self._lock:
            for ln in text.rstrip("\n").splitlines():
                print(f"{prefix}{ln}", flush=True)

    def good(self, text: str) -> None:
        self.line(self._c("32", text))

    def bad(self, text: str) -> None:
        self.line(self._c("31", text))

    def verdict(self, color: str) -> str:
        code = {"green": "32", "yellow": "33", "red": "31"}.get(color, "0")
        return self._c(code + ";1", color.upper())


def _wrap(text: str, width: int) -> list[str]:
    out: list[str] = []
    for para in text.splitlines():
        words, cur = para.split(), ""
        for w in words:
            if cur and len(cur) + 1 + len(w) > width:
                out.append(cur)
                cur = w
            else:
                cur = f"{cur} {w}" if cur else w
        if cur:
            out.append(cur)
    return out


# --------------------------------------------------------------------------- helpers


def _ts(event: dict[str, Any]) -> float:
    try:
        return dt.datetime.fromisoformat(str(event.get("timestamp"))).timestamp()
    except ValueError:
        return time.time()


class LogTail:
    """New JSON lines of the daemon's log since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pos = 0
        self.events: list[dict[str, Any]] = []

    def new(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                chunk = f.read()
        except OSError:
            return []
        end = chunk.rfind(b"\n")
        if end < 0:
            return []
        self.pos += end + 1
        out = []
        for raw in chunk[: end + 1].splitlines():
            with contextlib.suppress(ValueError):
                ev = json.loads(raw)
                if isinstance(ev, dict):
                    out.append(ev)
        self.events.extend(out)
        return out


def _kind(r: Result) -> str:
    """Why a request failed, in the words the story uses."""
    e = r.error
    if r.status is not None:
        return f"HTTP {r.status}"
    if "Refused" in e:
        return "refused"  # nothing accepted on the port: a gap in service
    if "timed out" in e or "Timeout" in e:
        return "timeout"
    return "dropped"  # the connection was closed or reset under the request


# --------------------------------------------------------------------------- the demo


class Demo:
    def __init__(self, out: Out, base: Path) -> None:
        self.out = out
        self.base = base
        self.bare = base / "origin.git"
        self.work = base / "work"
        self.root = base / "root"
        self.config = base / "proto4d.yaml"
        self.stderr_path = base / "daemon.stderr"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = LogTail(self.root / "logs" / "proto4d.log")
        self.loads: list[Load] = []
        self.shas: dict[str, str] = {}  # version -> commit
        self.pids: dict[int, str] = {}  # app pid -> release, as seen in the log and status
        self._last_waiting = ""
        self.status_written = time.time()
        self.results: dict[str, Any] = {}
        self.problems: list[str] = []

    # -- git origin

    def git(self, cwd: Path, *args: str) -> str:
        env = {**os.environ, "GIT_AUTHOR_NAME": "proto4d demo", "GIT_AUTHOR_EMAIL": "demo@example.invalid",
               "GIT_COMMITTER_NAME": "proto4d demo", "GIT_COMMITTER_EMAIL": "demo@example.invalid",
               "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(self.base), "GIT_TERMINAL_PROMPT": "0",
               "LC_ALL": "C"}
        env.pop("GIT_DIR", None)
        env.pop("GIT_WORK_TREE", None)
        r = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise DemoFailed(f"git {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()[-500:]}")
        return r.stdout.strip()

    def make_origin(self) -> None:
        self.git(self.base, "init", "-q", "--bare", str(self.bare))
        self.git(self.bare, "symbolic-ref", "HEAD", "refs/heads/main")
        self.git(self.base, "init", "-q", str(self.work))
        self.git(self.work, "symbolic-ref", "HEAD", "refs/heads/main")
        self.git(self.work, "remote", "add", "origin", str(self.bare))
        shutil.copytree(SAMPLE, self.work, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))

    def commit(self, version: str, mode: str, message: str) -> str:
        (self.work / "VERSION").write_text(version + "\n")
        (self.work / "mode.txt").write_text(mode + "\n")
        self.git(self.work, "add", "-A")
        self.git(self.work, "commit", "-q", "-m", message)
        self.git(self.work, "push", "-q", "origin", "HEAD:main")
        sha = self.git(self.work, "rev-parse", "HEAD")
        self.shas[version] = sha
        return sha

    def label(self, release: str | None) -> str:
        """'v2' for a release of the v2 commit."""
        if not release:
            return "?"
        for version, sha in self.shas.items():
            if release.endswith("_" + sha[:7]) or f"_{sha[:7]}_" in release:
                return f"v{version}"
        return release

    # -- config and daemon

    def write_config(self) -> None:
        cfg = {
            "root": str(self.root),
            "python": sys.executable,
            "app": {"repo": str(self.bare), "branch": "main", "requirements": "requirements.txt",
                    "command": ["{python}", "-m", "uvicorn", "main:app", "--fd", "{fd}"],
                    "shared": [".env", "data"]},
            "listen": {"host": "127.0.0.1", "port": self.port},
            "health": {"checks": [{"path": "/health", "status": [200]}, {"path": "/", "status": [200]}],
                       "start_timeout_s": 30, "timeout_s": HEALTH_TIMEOUT_S, "interval_s": 0.5},
            "activity": {"interval_s": 0.5, "window_s": WINDOW_S, "tunnel_process": ""},
            # Users decide the colour in this demo (one steady user sends well over 60 requests a minute).
            "safety": {"yellow_max_users": 2, "quiet_for_s": 1, "red_rpm": 0},
            "schedule": {"timezone": "UTC"},
            "update": {"notice_grace_s": NOTICE_GRACE_S, "watch_s": WATCH_S, "drain_timeout_s": 10,
                       "min_free_mb": 50},
        }
        self.config.write_text("# written by `proto4d demo`\n" + yaml.safe_dump(cfg, sort_keys=False))
        shared = self.root / "shared"
        shared.mkdir(parents=True)
        os.chmod(self.root, 0o755)  # requests are trusted only in a root nobody else can write
        example = SAMPLE / ".env.example"
        keys = releases.env_keys(example.read_text()) if example.is_file() else set()
        keys |= {"TUTOR_SECRET"}  # what the sample's .env.example lists
        (shared / ".env").write_text("".join(f"{k}=demo-{secrets.token_hex(8)}\n" for k in sorted(keys)))
        os.chmod(shared / ".env", 0o600)

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("PROTO4D_CONFIG", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                            "LISTEN_PID", "LISTEN_FDNAMES")}
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("UV_PYTHON_DOWNLOADS", "never")
        return env

    def start_daemon(self) -> None:
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "proto4d", "run", "--config", str(self.config)],
                                         stdout=err, stderr=err, stdin=subprocess.DEVNULL, env=self._env(),
                                         cwd=self.base, start_new_session=True)

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run([sys.executable, "-m", "proto4d", *args, "--config", str(self.config)],
                                  capture_output=True, text=True, timeout=timeout, env=self._env(), cwd=self.base,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise DemoFailed(f"`proto4d {' '.join(args)}` did not finish within {timeout:g} s") from None

    def show(self, *args: str) -> subprocess.CompletedProcess[str]:
        self.out.plain(f"    $ proto4d {shlex.join(args)}")
        r = self.cli(*args)
        self.out.block(r.stdout + (r.stderr if r.returncode else ""))
        return r

    def status(self) -> dict[str, Any] | None:
        path = self.root / "state" / "status.json"
        try:
            written = path.stat().st_mtime
            s = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        self.status_written = written
        if not isinstance(s, dict) or self.proc is None or (s.get("daemon") or {}).get("pid") != self.proc.pid:
            return None
        app = s.get("app") or {}
        if app.get("pid") and app.get("release"):
            self.pids.setdefault(int(app["pid"]), app["release"])
        return s

    def get_version(self) -> dict[str, Any]:
        """One request as the staying user (same address, so it adds no user)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", "/version", headers={"X-Forwarded-For": "10.0.0.11", "User-Agent": "proto4d-demo"})
            r = conn.getresponse()
            data = json.loads(r.read())
            return {"status": r.status, "version": data.get("version"), "pid": data.get("pid")}
        except (OSError, ValueError) as e:
            return {"error": f"{type(e).__name__}: {e}"}
        finally:
            conn.close()

    def check_daemon(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise DemoFailed(f"the daemon exited unexpectedly with code {self.proc.returncode}")

    def events(self) -> list[dict[str, Any]]:
        new = self.log.new()
        for ev in new:
            if ev.get("event") in ("app.ready", "app.drained", "app.exited") and ev.get("pid") and ev.get("release"):
                self.pids.setdefault(int(ev["pid"]), str(ev["release"]))
        return new

    def wait(self, pred: Callable[[dict[str, Any]], Any], timeout: float, what: str,
             on_event: Callable[[dict[str, Any]], None] | None = None,
             on_status: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll status.json (and the daemon's log) until `pred` holds; DemoFailed at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_daemon()
            s = self.status()
            new = self.events()
            if s is not None and on_status is not None:
                on_status(s)
            if on_event is not None:
                for ev in new:
                    on_event(ev)
            if s is not None and pred(s):
                return s
            if time.monotonic() > deadline:
                raise DemoFailed(f"timed out after {timeout:g} s waiting for {what}")
            time.sleep(0.1)

    # -- narrating the daemon's log

    def narrate(self, ev: dict[str, Any]) -> None:
        name = ev.get("event", "")
        at = _ts(ev)
        if name == "first_release.progress":
            text = str(ev.get("text", ""))
            if text.strip():
                self.out.line(f"  build: {text.strip()[:110]}", at)
        elif name == "update.waiting":
            why = str(ev.get("why"))
            gist = re.sub(r" \(in [^)]*\)", "", why)  # the grace countdown changes every second
            if gist != self._last_waiting:
                self._last_waiting = gist
                self.out.line(f"  update waiting ({self.out.verdict(str(ev.get('verdict')))}): {why}", at)
        elif name == "update.step":
            step = str(ev.get("step"))
            self.out.line(f"  update -> {step}: {STEP_WORDS.get(step, '')}".rstrip(": "), at)
        elif name == "app.drained":
            self.out.line(f"  {self.label(ev.get('release'))} (pid {ev.get('pid')}) finished its in-flight "
                          f"requests and exited in {ev.get('seconds')} s", at)
        elif name == "app.exited":
            self.out.line(f"  {self.label(ev.get('release'))} (pid {ev.get('pid')}) {ev.get('how')} after "
                          f"{ev.get('ran_s')} s", at)
        elif name == "update.finished":
            self.out.line(f"  update {str(ev.get('outcome')).upper()}: {self._relabel(str(ev.get('message')))}", at)

    def _relabel(self, text: str) -> str:
        def sub(m: re.Match[str]) -> str:
            return f"{m.group(0)} ({self.label(m.group(0))})"
        return re.sub(r"proto4_\d{8}_\d{6}_[0-9a-f]{7}(?:_\d+)?", sub, text)

    # -- load accounting

    def all_results(self) -> list[Result]:
        out: list[Result] = []
        for load in self.loads:
            out.extend(load.snapshot())
        return out

    def failures_between(self, t0: float, t1: float) -> tuple[int, list[Result]]:
        rs = [r for r in self.all_results() if t0 <= r.at <= t1]
        return len(rs), [r for r in rs if not r.ok]

    def served_by_pid(self) -> dict[int, tuple[int, float, float]]:
        """From logs/app.log: requests answered to the simulated users per app pid, first and last time."""
        out: dict[int, tuple[int, float, float]] = {}
        path = self.root / "logs" / "app.log"
        try:
            text = path.read_text(errors="replace")
        except OSError:
            return out
        for line in text.splitlines():
            parts = line.split(" ", 2)
            if len(parts) < 3 or not parts[1].startswith("app["):
                continue
            req = accesslog.parse_line(parts[2])
            if req is None or not req.client.startswith(USER_NET):
                continue
            try:
                pid = int(parts[1][4:-1])
                at = dt.datetime.fromisoformat(parts[0]).timestamp()
            except ValueError:
                continue
            n, first, last = out.get(pid, (0, at, at))
            out[pid] = (n + 1, min(first, at), max(last, at))
        return out

    def wait_access_log(self, t: float, timeout: float = 10) -> None:
        """Until logs/app.log shows a user's request answered after `t` (the daemon flushes it every 0.2 s;
        the staying user keeps sending)."""
        deadline = time.monotonic() + timeout
        while max((last for _n, _f, last in self.served_by_pid().values()), default=0.0) < t:
            if time.monotonic() > deadline:
                raise DemoFailed(f"logs/app.log shows no request answered after {self.out.stamp(t)} "
                                 f"within {timeout:g} s")
            time.sleep(0.05)

    def served_by_version(self) -> list[tuple[str, int, float, float]]:
        """[(label, requests, first, last)] in the order the processes served."""
        rows = []
        for pid, (n, first, last) in self.served_by_pid().items():
            rows.append((self.label(self.pids.get(pid)), n, first, last))
        rows.sort(key=lambda r: r[2])
        return rows

    # -- the acts

    def act_setup(self) -> None:
        self.out.act("Setting up", "A local git origin with the sample app, a config with short intervals, and the "
                                   "daemon as a real process.")
        self.make_origin()
        sha = self.commit("1", "healthy", "v1: the first version")
        self.out.line(f"origin {self.bare} holds v1 (commit {sha[:7]}, mode healthy)")
        self.write_config()
        self.out.line(f"config {self.config}: port {self.port}, activity window {WINDOW_S:g} s, notice grace "
                      f"{NOTICE_GRACE_S:g} s, watch {WATCH_S:g} s")
        self.start_daemon()
        assert self.proc is not None
        self.out.line(f"daemon started: `proto4d run` (pid {self.proc.pid}); its output goes to {self.stderr_path}")
        self.out.line("first start: fetching v1 and building its release venv (uvicorn and h11 from the package "
                      "index; a few seconds with uv, up to a minute with pip) ...")
        s = self.wait(lambda s: (s.get("app") or {}).get("healthy") and s["app"].get("state") == "running"
                      and (s.get("daemon") or {}).get("state") == "running",
                      FIRST_START_TIMEOUT_S, "the first release to start and pass its health checks",
                      on_event=self.narrate)
        self.results["v1_release"] = s["app"]["release"]
        self.out.good(f"v1 is up: release {s['app']['release']} (pid {s['app']['pid']}) on 127.0.0.1:{self.port}")

    def act_v1(self) -> None:
        self.out.act("Act 1: v1 serving", "`proto4d status` reads the daemon's status.json: the app's process and "
                                          "release, its health, who is using it, and any update in progress.")
        self.wait(lambda s: (s.get("activity") or {}).get("verdict") == "green", WINDOW_S + STEP_TIMEOUT_S,
                  "a green verdict (nobody uses v1 yet)")
        self.out.line(f"nobody uses it yet: {self.out.verdict('green')}")
        self.show("status")

    def act_busy(self) -> None:
        self.out.act("Act 2: four busy users; an update to v2 has to wait",
                     "Each simulated user sends its own X-Forwarded-For address, the way the tunnel presents "
                     "visitors; the daemon counts distinct addresses in the access log of the last "
                     f"{WINDOW_S:g} s. 0 users = green, 1-2 = yellow, 3 or more = red.")
        busy = Load("127.0.0.1", self.port, users=4, mix=Mix(think_s=(0.02, 0.1)), first_address=10)
        self.loads.append(busy)
        busy.start()
        self.results["busy"] = busy
        self.out.line("4 users start working (GET /, POST /echo, GET /slow) ...")
        self.wait(lambda s: (s.get("activity") or {}).get("verdict") == "red", STEP_TIMEOUT_S, "a red verdict")
        self.out.line(f"the verdict is {self.out.verdict('red')}:")
        self.show("activity")
        sha = self.commit("2", "healthy", "v2: a healthy new version")
        self.out.line(f"v2 committed to the origin (commit {sha[:7]}); asking for the update:")
        self.results["t_v2_request"] = time.time()
        r = self.show("update", "--reason", "demo: v2")
        m = re.search(r"\(id ([^)\s]+)\)", r.stdout)
        if r.returncode != 0 or not m:
            raise DemoFailed(f"`proto4d update` failed ({r.returncode}): {r.stdout} {r.stderr}")
        self.results["v2_id"] = m.group(1)
        self.wait(lambda s: (s.get("update") or {}).get("state") == "waiting"
                  and "red" in str((s.get("update") or {}).get("waiting_for", "")),
                  STEP_TIMEOUT_S, "the update to wait on the red verdict", on_event=self.narrate)
        # Part of the story: the users keep working for a moment, and the update keeps waiting.
        time.sleep(2.0)
        self.wait(lambda s: (s.get("update") or {}).get("state") == "waiting", 5, "the update still waiting",
                  on_event=self.narrate)
        self.out.line("2 s later the users are still busy, and the update is still waiting:")
        self.show("status")

    def act_v2(self) -> None:
        self.out.act("Act 3: users leave but one; notice, then a switch under load",
                     "Three users leave. The one who stays keeps working steadily over one keep-alive "
                     "connection (GETs, POSTs, /slow calls). With one user the verdict turns yellow: the daemon "
                     f"posts a notice, waits its grace ({NOTICE_GRACE_S:g} s), then updates under that user's "
                     "load.")
        busy: Load = self.results["busy"]
        busy.stop()
        one = Load("127.0.0.1", self.port, users=1, first_address=10,
                   mix=Mix(get=0.5, slow=0.25, post=0.25, slow_ms=(50, 300), think_s=(0.03, 0.15)))
        self.loads.append(one)
        one.start()
        self.results["one"] = one
        self.out.line(f"3 users left; user 10.0.0.11 stays. The others leave the {WINDOW_S:g} s window soon.")
        req_id = self.results["v2_id"]
        shown: dict[str, Any] = {"verdict": "red", "notice": False}

        def verdict(s: dict[str, Any]) -> None:
            act = s.get("activity") or {}
            if act.get("verdict") != shown["verdict"]:
                shown["verdict"] = act.get("verdict")
                self.out.line(f"the verdict is {self.out.verdict(str(act.get('verdict')))}: "
                              f"{'; '.join(act.get('reasons') or [])}", self.status_written)

        def watch(s: dict[str, Any]) -> bool:
            upd = s.get("update") or {}
            if upd.get("state") == "noticed" and not shown["notice"]:
                notice = self.root / "notice.json"
                with contextlib.suppress(OSError, ValueError):
                    data = json.loads(notice.read_text())
                    shown["notice"] = True
                    self.out.line(f"the notice users see ({notice.relative_to(self.base)}):")
                    self.out.block(json.dumps(data, indent=2))
            return self._final(req_id) is not None

        self.wait(watch, WINDOW_S + NOTICE_GRACE_S + WATCH_S + UPDATE_TIMEOUT_S, "the update to v2 to finish",
                  on_event=self.narrate, on_status=verdict)
        answer = self._final(req_id) or {}
        t_done = time.time()
        self.results["t_v2_done"] = t_done
        if not shown["notice"]:
            self.problems.append("the notice was not seen while the update to v2 waited on a yellow verdict")
        if answer.get("state") != "done":
            raise DemoFailed(f"the update to v2 ended {answer.get('state')}: {answer.get('message')}")
        s = self.wait(lambda s: self.label((s.get("app") or {}).get("release")) == "v2" and s["app"].get("healthy"),
                      STEP_TIMEOUT_S, "v2 serving")
        self.results["v2_release"] = s["app"]["release"]
        self.out.good(f"v2 serves: release {s['app']['release']} (pid {s['app']['pid']}), verified and watched")
        self.wait_access_log(t_done)
        total, failed = self.failures_between(self.results["t_v2_request"], t_done)
        self.results["v2_failed"] = len(failed)
        self.results["v2_requests"] = total
        self._served_lines(("v1", "v2"))
        if failed:
            self.out.bad(f"failed requests during the update to v2: {len(failed)} of {total}")
            for r in failed[:10]:
                self.out.plain(f"      {self.out.stamp(r.at)} {r.method} {r.path}: {r.error or r.status}")
            self.problems.append(f"{len(failed)} requests failed during the update to v2")
        else:
            self.out.good(f"failed requests during the update to v2: 0 of {total}")

    def _served_lines(self, labels: tuple[str, ...]) -> None:
        rows = [r for r in self.served_by_version() if r[0] in labels]
        for i, (label, n, first, last) in enumerate(rows):
            self.out.line(f"requests answered by {label}: {n:5d}  (first {self.out.stamp(first)}, "
                          f"last {self.out.stamp(last)})")
            if i > 0 and first <= rows[i - 1][3]:
                self.out.line(f"  {rows[i - 1][0]} and {label} overlapped for {rows[i - 1][3] - first:.2f} s: "
                              f"{label} answered while {rows[i - 1][0]} finished its last requests; no gap")

    def _final(self, req_id: str) -> dict[str, Any] | None:
        try:
            a = json.loads((self.root / "state" / "answers" / f"{req_id}.json").read_text())
        except (OSError, ValueError):
            return None
        return a if isinstance(a, dict) and a.get("final") else None

    def act_v3(self) -> None:
        self.out.act("Act 4: a broken v3 is rolled back by itself",
                     f"v3 crashes {CRASH_AFTER_S:g} s after it starts. Its canary passes (it answers before "
                     f"then), the switch goes through, and the {WATCH_S:g} s watch sees the crash: the daemon "
                     "switches back to v2 on its own. `--force` skips waiting for a quiet moment (never the "
                     "checks); `--wait` follows the update to its end.")
        sha = self.commit("3", f"crash_after {CRASH_AFTER_S:g}", f"v3: crashes {CRASH_AFTER_S:g} s after start")
        self.out.line(f"v3 committed (commit {sha[:7]}, mode 'crash_after {CRASH_AFTER_S:g}'); the user keeps "
                      "working:")
        t0 = time.time()
        self.results["t_v3_request"] = t0
        args = ["update", "--force", "--wait", "--reason", "demo: v3"]
        self.out.plain(f"    $ proto4d {shlex.join(args)}")
        proc = subprocess.Popen([sys.executable, "-m", "proto4d", *args, "--config", str(self.config)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env=self._env(), cwd=self.base, stdin=subprocess.DEVNULL)
        lines: list[str] = []

        def pump() -> None:
            assert proc.stdout is not None
            for ln in proc.stdout:
                lines.append(ln)
                text = self._relabel(ln.rstrip("\n"))
                self.out.block(text if len(text) <= 200 else text[:197] + "...")

        reader = threading.Thread(target=pump, daemon=True, name="update-wait-output")
        reader.start()
        deadline = time.monotonic() + UPDATE_TIMEOUT_S
        try:
            while proc.poll() is None:
                self.check_daemon()
                self.events()
                self.status()
                if time.monotonic() > deadline:
                    raise DemoFailed(f"`proto4d update --force --wait` did not finish within {UPDATE_TIMEOUT_S:g} s")
                time.sleep(0.1)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            reader.join(5)
        rc = proc.returncode
        self.out.line(f"`proto4d update --wait` exited {rc} (1 = the update did not stick: rolled back)")
        m = re.search(r"\(id ([^)\s]+)\)", "".join(lines))
        answer = self._final(m.group(1)) if m else None
        if not answer or answer.get("state") != "rolled_back":
            raise DemoFailed(f"the update to v3 ended {answer.get('state') if answer else 'without an answer'}"
                             f"{': ' + str(answer.get('message')) if answer else ''}; expected rolled_back")
        v2 = self.results["v2_release"]
        s = self.wait(lambda s: (s.get("app") or {}).get("release") == v2 and s["app"].get("healthy")
                      and (s.get("update") or {}).get("state") == "idle",
                      STEP_TIMEOUT_S, "v2 serving again after the rollback")
        t_done = time.time()
        self.results["t_v3_done"] = t_done
        self.out.good(f"rolled back: v2 ({v2}) serves again, pid {s['app']['pid']}, healthy")
        answer_v = self.get_version()
        self.out.line(f"GET /version -> {json.dumps(answer_v)}")
        if answer_v.get("version") != "2":
            self.problems.append(f"after the rollback GET /version answered {answer_v}, expected version 2")
        self.events()
        self.wait_access_log(t_done)
        self._rollback_accounting(t0, t_done)

    def _crash_time(self) -> float | None:
        for ev in self.log.events:
            if ev.get("event") == "app.exited" and self.label(ev.get("release")) == "v3":
                return _ts(ev)
        return None

    def _rollback_accounting(self, t0: float, t1: float) -> None:
        total, failed = self.failures_between(t0, t1)
        crash = self._crash_time()
        lost: list[Result] = []
        gap: list[Result] = []
        first_after_crash: set[str] = set()
        for r in sorted(failed, key=lambda r: r.at):
            end = r.at + r.latency
            # A request in flight on v3 when it died, or the next one a user sent over its kept-alive
            # connection to v3: the connection is closed under it. Crashes lose those; no switch can help.
            if (crash is not None and _kind(r) == "dropped" and crash - 1.0 <= end <= crash + 2.0
                    and r.user not in first_after_crash):
                first_after_crash.add(r.user)
                lost.append(r)
            else:
                gap.append(r)
        self.results["v3_requests"] = total
        self.results["v3_lost"] = len(lost)
        self.results["v3_failed"] = len(gap)
        self._served_lines(("v2", "v3"))
        if lost:
            self.out.line(f"requests lost when v3 crashed: {len(lost)} (in flight on v3, or sent over the user's "
                          "kept-alive connection to it, when it died; a crash loses those, no switch can save them)")
            for r in lost:
                self.out.plain(f"      {self.out.stamp(r.at)} {r.method} {r.path}: {r.error}")
        if gap:
            self.out.bad(f"failed requests during the rollback switch: {len(gap)} of {total}")
            for r in gap[:10]:
                self.out.plain(f"      {self.out.stamp(r.at)} {r.method} {r.path}: {_kind(r)}: {r.error or r.status}")
            self.problems.append(f"{len(gap)} requests failed during the rollback switch")
        else:
            self.out.good(f"failed requests during the rollback switch: 0 of {total} (requests that arrived "
                          "while nothing served waited in the daemon's listen backlog and v2 answered them)")

    def act_summary(self) -> None:
        self.out.act("Act 5: releases and timeline",
                     "Retained releases are the backups; the timeline comes from the daemon's JSON log "
                     "(logs/proto4d.log).")
        self.show("releases")
        self.events()
        self.out.plain("")
        self.out.plain("  timeline (seconds since the demo started):")
        last = ""
        crashed: set[Any] = set()
        for ev in self.log.events:
            if ev.get("event") == "app.exited":
                crashed.add(ev.get("pid"))
            elif ev.get("event") == "app.drained" and ev.get("pid") in crashed:
                continue  # the rollback retires the crashed process too: nothing left to drain
            text = self._timeline_text(ev)
            gist = re.sub(r" \(in [^)]*\)", "", text)  # the grace countdown: once is enough
            if text and gist != last:
                last = gist
                self.out.plain(f"    {self.out.stamp(_ts(ev))} {text}")

    def _timeline_text(self, ev: dict[str, Any]) -> str:
        name = str(ev.get("event", ""))
        lab = self.label
        if name == "daemon.starting":
            return f"daemon started (pid {ev.get('pid')})"
        if name == "first_release.ready":
            return f"first release prepared: {lab(ev.get('release'))}"
        if name == "app.ready":
            return f"{lab(ev.get('release'))} ready and healthy (pid {ev.get('pid')}, {ev.get('seconds')} s)"
        if name == "request.received":
            return f"request: {ev.get('what')}" + (f" ({ev.get('reason')})" if ev.get("reason") else "")
        if name == "update.waiting":
            return f"  waiting, {ev.get('verdict')}: {ev.get('why')}"
        if name == "update.step":
            return f"  step {ev.get('step')}"
        if name == "update.step_done":
            return f"    {ev.get('step')} done in {ev.get('seconds')} s"
        if name == "switch.start_new":
            return f"    {lab(ev.get('release'))} starts on the shared socket"
        if name == "app.drained":
            return f"    {lab(ev.get('release'))} drained and exited ({ev.get('seconds')} s)"
        if name == "app.exited":
            return f"    {lab(ev.get('release'))} {ev.get('how')} after {ev.get('ran_s')} s"
        if name == "update.finished":
            return f"  finished: {str(ev.get('outcome')).upper()} ({ev.get('seconds')} s)"
        if name == "daemon.stopping":
            return "daemon stopping"
        return ""

    def act_stop(self) -> None:
        self.out.act("Act 6: stop", "SIGTERM: the daemon drains the app (in-flight requests finish) and exits 0.")
        for load in self.loads:
            load.stop()
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise DemoFailed(f"the daemon did not stop within {STOP_TIMEOUT_S:g} s of SIGTERM") from None
        left = self.leftovers()
        if rc != 0:
            self.problems.append(f"the daemon exited {rc} on SIGTERM (expected 0)")
            self.out.bad(f"the daemon exited {rc}")
        else:
            self.out.good("the daemon exited 0")
        if left:
            self.problems.append(f"processes left after the daemon stopped: {left}")
            self.out.bad(f"processes left behind: {left}")
        else:
            self.out.good("no app process left")

    # -- the end

    def summary_line(self, elapsed: float) -> str:
        failed = sum(1 for r in self.all_results() if not r.ok)
        versions: dict[str, int] = {}
        for label, n, _f, _l in self.served_by_version():
            versions[label] = versions.get(label, 0) + n
        ok = sum(versions.values())  # answered to the users, as the app's access log shows
        by = ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))
        outcomes = [str(ev.get("outcome")) for ev in self.log.events if ev.get("event") == "update.finished"]
        return (f"requests served: {ok} ({by}); failed requests: {failed} "
                f"(switches: {self.results.get('v2_failed', '?')} + {self.results.get('v3_failed', '?')}, "
                f"lost in the crash: {self.results.get('v3_lost', '?')}); updates done: {outcomes.count('done')}; "
                f"rollbacks: {outcomes.count('rolled_back')}; total time: {elapsed:.1f} s")

    def leftovers(self) -> list[int]:
        """Live processes (other than this one) whose command line or working directory is in the demo dir."""
        marker = str(self.base)
        out = []
        me = os.getpid()
        for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
            try:
                if p.pid == me or p.status() == psutil.STATUS_ZOMBIE:
                    continue
                cmd = " ".join(p.info["cmdline"] or [])
                if marker in cmd or marker in (p.info["cwd"] or ""):
                    out.append(p.pid)
            except psutil.Error:
                continue
        return out

    def cleanup(self) -> None:
        for load in self.loads:
            with contextlib.suppress(Exception):
                load.stop(5)
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(10)
        # Anything still running from the demo dir (an app whose daemon was killed) goes, with its group.
        deadline = time.monotonic() + 10
        while True:
            left = self.leftovers()
            if not left or time.monotonic() > deadline:
                break
            own = os.getpgrp()
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    pgid = os.getpgid(pid)
                    if pgid != own and pgid == pid:
                        os.killpg(pgid, signal.SIGKILL)
                    else:
                        os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)


@contextlib.contextmanager
def _signals_as_interrupt() -> Iterator[None]:
    def handler(signum: int, _frame: Any) -> None:
        raise _Interrupted(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no daemon output)"


def cmd_demo(args: argparse.Namespace) -> int:
    del args
    start = time.time()
    out = Out(start)
    keep = os.environ.get(KEEP_ENV, "") not in ("", "0")
    if shutil.which("git") is None:
        print("proto4d demo: git is needed (to make the sample app's origin) and was not found on PATH",
              file=sys.stderr)
        return 1
    with _signals_as_interrupt():
        base = Path(tempfile.mkdtemp(prefix="proto4d-demo-")).resolve()
        out.plain(f"proto4d demo: the whole story on a sample app, in {base}")
        out.plain(f"(kept at the end: {KEEP_ENV} is set)" if keep else
                  f"(removed at the end; set {KEEP_ENV}=1 to keep it; Ctrl-C stops cleanly)")
        demo = Demo(out, base)
        code = 1
        stderr_tail = ""
        try:
            demo.act_setup()
            demo.act_v1()
            demo.act_busy()
            demo.act_v2()
            demo.act_v3()
            demo.act_summary()
            demo.act_stop()
            demo.results["summary"] = demo.summary_line(time.time() - start)
            code = 0 if not demo.problems else 1
        except DemoFailed as e:
            demo.problems.append(str(e))
        except KeyboardInterrupt:
            out.plain("")
            out.line("interrupted: stopping the daemon and cleaning up ...")
            code = 130
        except Exception as e:  # a bug here must still leave nothing behind, and say what happened
            import traceback

            traceback.print_exc()
            demo.problems.append(f"internal error in the demo: {type(e).__name__}: {e}")
        finally:
            # Clean-up must not be cut short by a second Ctrl-C or SIGTERM; every wait in it has a deadline.
            saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
            try:
                demo.cleanup()
                stderr_tail = _tail(demo.stderr_path)
                if keep:
                    out.plain(f"kept for inspection: {base} (remove it with: rm -rf {shlex.quote(str(base))})")
                else:
                    shutil.rmtree(base, ignore_errors=True)
            finally:
                for sig, h in saved.items():
                    signal.signal(sig, h)
    elapsed = time.time() - start
    out.plain("")
    if code == 130:
        out.plain(f"interrupted after {elapsed:.1f} s; the daemon and its app were stopped"
                  + ("" if keep else f" and {base} removed"))
        return 130
    if demo.problems:
        out.plain(out._c("31;1", "THE DEMO DID NOT GO AS EXPECTED:"))
        for p in demo.problems:
            out.plain(f"  - {p}")
        out.plain("the daemon's last output:")
        out.block(stderr_tail or "(none)", prefix="    ")
        return 1
    out.plain(out._c("32;1", "demo complete: ") + demo.results["summary"])
    out.plain(f"everything is in {base}" if keep else f"everything ran in {base}, now removed")
    return 0
