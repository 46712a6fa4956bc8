"""Real parts for end-to-end tests: a local git origin with the sample app, and a real daemon.

Nothing is faked: the origin is a bare git repository on disk, the daemon is `python -m
proto4d run` in its own process group, the app is uvicorn in a venv built by uv, and every
wait is on a condition with a deadline.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import yaml

from proto4d.listener import free_port

# The default suite keeps to its 4-minute budget by running one or two representative rows of the
# long matrices (signals at every state, every uvicorn venv, every kill point); `./dev proofs` sets
# PROTO4D_FULL=1 (and `./dev killpoints` PROTO4D_KILLPOINTS=all) for every row.
FULL = os.environ.get("PROTO4D_FULL") == "1" or os.environ.get("PROTO4D_KILLPOINTS") == "all"


def rows(every: list[Any], default: list[Any]) -> list[Any]:
    """All of `every` in the full proofs, only `default` (a subset, checked) in the default suite."""
    missing = [r for r in default if r not in every]
    assert not missing, f"default rows not in the matrix: {missing}"
    return every if FULL else default

SAMPLE = Path(__file__).resolve().parents[1] / "daemon" / "proto4d" / "sample"
GIT_ENV = {"GIT_AUTHOR_NAME": "Test", "GIT_AUTHOR_EMAIL": "test@example.invalid", "GIT_COMMITTER_NAME": "Test",
           "GIT_COMMITTER_EMAIL": "test@example.invalid", "GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent"}


class DaemonDied(AssertionError):
    """The daemon under test exited: no point waiting out a deadline."""


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            value = pred()
            if value:
                return value
        except DaemonDied:
            raise
        except Exception as e:  # the condition may not be readable yet
            last_exc = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}"
                                 + (f" (last error: {last_exc})" if last_exc else ""))
        time.sleep(interval)


def has_ipv6_loopback() -> bool:
    """Whether this machine can bind ::1 (some containers have no IPv6 at all)."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, **GIT_ENV}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


class Origin:
    """A bare repository plus a work tree that commits versions of the sample app."""

    def __init__(self, base: Path, subdir: str = "") -> None:
        self.bare = base / "origin.git"
        self.work = base / "origin-work"
        self.subdir = subdir
        git(base, "init", "-q", "--bare", "-b", "main", str(self.bare))
        git(base, "init", "-q", "-b", "main", str(self.work))
        git(self.work, "remote", "add", "origin", str(self.bare))
        self.app = self.work / subdir if subdir else self.work
        shutil.copytree(SAMPLE, self.app, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))

    def commit(self, version: str, mode: str = "healthy", *, files: dict[str, str] | None = None,
               requirements: str | None = None, push: bool = True, message: str | None = None) -> str:
        (self.app / "VERSION").write_text(version + "\n")
        (self.app / "mode.txt").write_text(mode + "\n")
        if requirements is not None:
            (self.app / "requirements.txt").write_text(requirements)
        for name, text in (files or {}).items():
            p = self.app / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
        git(self.work, "add", "-A")
        git(self.work, "commit", "-q", "--allow-empty", "-m", message or f"v{version} ({mode})")
        if push:
            git(self.work, "push", "-q", "--force", "origin", "HEAD:main")
        return git(self.work, "rev-parse", "HEAD")

    def rewrite_history(self, version: str) -> str:
        """Replace the branch with a commit that does not descend from what runs (a force-push)."""
        git(self.work, "checkout", "-q", "--orphan", f"rewrite-{version}")
        return self.commit(version, message=f"rewritten history v{version}")

    def tag(self, name: str) -> None:
        git(self.work, "tag", name)
        git(self.work, "push", "-q", "origin", name)


# What the tests build once and keep between runs (uv's own cache aside): test_drain's uvicorn venvs,
# the release venvs of seed_venv.
TEST_CACHE = Path(os.environ.get("PROTO4D_TEST_CACHE") or Path.home() / ".cache" / "proto4d-tests")
VENV_CACHE = TEST_CACHE / "release-venvs"


def seed_venv(root: Path, origin: Origin, cfg: dict[str, Any]) -> None:
    """Put the venv a first start needs into `root/venvs/` before the daemon starts: built once per
    session and requirements by the product's own `ensure_venv`, then hard-linked.

    Each end-to-end test's daemon otherwise built the same venv (uv from its cache, in ~150 daemons;
    for the SQLAlchemy app with its bytecode, measured 75.9 -> 84.7 CPU-s). The daemon then takes
    its "venv reused" path, the one every update with unchanged requirements takes; building is proven
    by the tests that change requirements and by those that set `seed_venv = False`."""
    from proto4d import releases
    from proto4d.paths import Paths

    app = cfg.get("app", {})
    req_name = app.get("requirements") or "requirements.txt"
    req_file = origin.app / req_name
    python = cfg.get("python") or sys.executable
    if app.get("subdir") != origin.subdir or not req_file.is_file() or cfg.get("update", {}).get("installer") == "pip":
        return
    try:
        real, version = releases.python_identity(python)
    except Exception:
        return
    key = releases.venv_key(req_file.read_bytes(), real, version)
    dest = root / "venvs" / key
    if dest.exists():
        return
    built = VENV_CACHE / "venvs" / key
    if not (built / "venv.json").exists():
        VENV_CACHE.mkdir(parents=True, exist_ok=True)
        with open(VENV_CACHE / f".lock-{key}", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the workers' first tests start together: one builds, the rest wait
            if not (built / "venv.json").exists():
                staged = VENV_CACHE / f".req-{key}-{os.getpid()}"
                staged.write_bytes(req_file.read_bytes())
                try:
                    releases.ensure_venv(Paths(VENV_CACHE), staged, python, "auto", progress=lambda line: None)
                finally:
                    staged.unlink(missing_ok=True)

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:  # another filesystem (the fault tests' small disk): a copy, as a build would write
            shutil.copy2(src, dst)

    tmp = root / "venvs" / f".seed-{key}-{os.getpid()}"
    old_umask = os.umask(0o022)  # a test may run under umask 000; these files are not the daemon's to judge
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(built, tmp, symlinks=True, copy_function=link_or_copy)
        os.rename(tmp, dest)
    finally:
        os.umask(old_umask)


class Daemon:
    """`proto4d run` as a real process, with its config, root and logs under one directory."""

    def __init__(self, base: Path, origin: Origin, port: int | None = None, **overrides: Any) -> None:
        self.base = base
        self.root = base / "root"
        self.port = port or free_port()
        self.config_path = base / "proto4d.yaml"
        self.origin = origin
        self.cfg: dict[str, Any] = {
            "root": str(self.root),
            "python": sys.executable,
            "app": {"repo": str(origin.bare), "branch": "main", "subdir": origin.subdir,
                    "requirements": "requirements.txt",
                    "command": ["{python}", "-m", "uvicorn", "main:app", "--fd", "{fd}"],
                    "shared": [".env", "data"], "stable_s": 30, "max_fast_failures": 3,
                    # app.spare (on by default) warms one more interpreter at every idle moment: the
                    # suite keeps it to the tests about it, for its time on 2 cores;
                    # PROTO4D_TEST_SPARE=1 runs every test with it (./dev proofs does).
                    "spare": os.environ.get("PROTO4D_TEST_SPARE", "0") == "1"},
            "listen": {"host": "127.0.0.1", "port": self.port},
            "health": {"checks": [{"path": "/health", "status": [200]}, {"path": "/", "status": [200]}],
                       "start_timeout_s": 20, "interval_s": 0.5, "timeout_s": 3},
            "activity": {"interval_s": 0.5, "window_s": 5, "tunnel_process": ""},
            "safety": {"quiet_for_s": 0, "red_rpm": 0},
            # update.prepare_ahead_s (on by default) fetches and prepares a new head at idle moments: kept to
            # the tests about it, like the spare; PROTO4D_TEST_AHEAD=1 runs every test with it (./dev proofs).
            "update": {"notice_grace_s": 1, "watch_s": 2, "drain_timeout_s": 15, "min_free_mb": 1,
                       "prepare_ahead_s": 1 if os.environ.get("PROTO4D_TEST_AHEAD", "0") == "1" else 0},
            "schedule": {"timezone": "UTC"},
        }
        deep_update(self.cfg, overrides)
        self.proc: subprocess.Popen[bytes] | None = None
        self.env: dict[str, str] = {}
        # The interpreter that runs the daemon itself (the footprint bench uses a production install).
        self.daemon_python = sys.executable
        # The release venv the first start needs, hard-linked from one the session built (see seed_venv);
        # a test about building venvs sets this False.
        self.seed_venv = os.environ.get("PROTO4D_TEST_SEED_VENV", "1") != "0"
        self.write_config()
        (self.root / "shared").mkdir(parents=True, exist_ok=True)
        (self.root / "shared" / ".env").write_text("TUTOR_SECRET=s3cr3t-value-for-tests\n")
        os.chmod(self.root, 0o755)

    def write_config(self, cfg: dict[str, Any] | None = None, path: Path | None = None) -> Path:
        path = path or self.config_path
        path.write_text(yaml.safe_dump(cfg or self.cfg, sort_keys=False))
        return path

    @property
    def log_path(self) -> Path:
        return self.base / "daemon.stderr"

    def start(self, env: dict[str, str] | None = None, wait_healthy: bool = True, timeout: float = 90) -> Daemon:
        if self.seed_venv:
            seed_venv(self.root, self.origin, self.cfg)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.env.pop("PROTO4D_CONFIG", None)
        self.env.pop("NOTIFY_SOCKET", None)
        if env:
            self.env.update(env)
        with open(self.log_path, "ab") as err:
            argv = [self.daemon_python, "-m", "proto4d", "run", "--config", str(self.config_path)]
            self.proc = subprocess.Popen(argv, stdout=err, stderr=err, stdin=subprocess.DEVNULL, env=self.env,
                                         start_new_session=True, cwd=self.base)
        if wait_healthy:
            self.wait_healthy(timeout=timeout)
        return self

    def cli(self, *args: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "PROTO4D_CONFIG"}
        r = subprocess.run([sys.executable, "-m", "proto4d", *args, "--config", str(self.config_path)],
                           capture_output=True, text=True, timeout=timeout, env=env, cwd=self.base)
        if check and r.returncode != 0:
            raise AssertionError(f"proto4d {' '.join(args)} exited {r.returncode}: {r.stdout}\n{r.stderr}")
        return r

    def status(self) -> dict[str, Any]:
        return json.loads((self.root / "state" / "status.json").read_text())

    def journal(self) -> dict[str, Any]:
        return json.loads((self.root / "state" / "journal.json").read_text())

    def wait_status(self, pred: Callable[[dict[str, Any]], Any], timeout: float, what: str) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            self.assert_alive()
            s = self.status()
            if self.proc is not None and s["daemon"]["pid"] != self.proc.pid:
                return None  # what an earlier daemon wrote
            return s if pred(s) else None
        return wait_for(check, timeout, what)

    def wait_healthy(self, timeout: float = 90, release: str | None = None) -> dict[str, Any]:
        return self.wait_status(lambda s: s["app"]["healthy"] and s["app"]["state"] == "running"
                                and s["daemon"]["state"] == "running"
                                and (release is None or s["app"]["release"] == release), timeout, "a healthy app")

    def assert_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise DaemonDied(f"the daemon exited with {self.proc.returncode}:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def log_events(self) -> list[dict[str, Any]]:
        """The events of the daemon's current log file, in order.

        Read incrementally: tests poll this every 50 ms while the log grows to thousands of lines, and
        parsing it whole each time was a large share of the suite's CPU. A rotated or rewritten file
        (another inode, or shorter than what was read) is read again from its start."""
        path = self.root / "logs" / "proto4d.log"
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                ino, pos, events = getattr(self, "_log_cache", (None, 0, []))
                if ino != (st.st_dev, st.st_ino) or st.st_size < pos:
                    ino, pos, events = (st.st_dev, st.st_ino), 0, []
                f.seek(pos)
                data = f.read()
        except FileNotFoundError:
            self._log_cache: tuple[Any, int, list[dict[str, Any]]] = (None, 0, [])
            return []
        end = data.rfind(b"\n") + 1  # a line still being written is read next time, whole
        for line in data[:end].splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line.decode("utf-8", "replace")))
        self._log_cache = (ino, pos + end, events)
        return list(events)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait: the daemon drains the app and exits."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the daemon did not stop within {timeout} s:\n{self.tail()}") from None

    def kill(self) -> None:
        """SIGKILL the daemon alone (its app keeps running as an orphan, as after a real crash)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def app_pids(self, spare: bool = False) -> list[int]:
        """Every live process whose command line runs a release of this root; but for `spare`, not the
        running daemon's spare interpreter (app.spare) that its status names. A spare whose daemon
        died is its own parent's no longer, and counts: a leaked one fails the tests."""
        out = []
        marker = str(self.root)
        for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
                if (marker in cmd or marker in (p.info["cwd"] or "")) and p.pid != os.getpid() and \
                        "proto4d run" not in cmd and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p.pid)
            except psutil.Error:
                continue
        theirs = self._spare_pid() if not spare and out else None
        return [p for p in out if p != theirs]

    def _spare_pid(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None
        try:
            pid = ((self.status().get("app") or {}).get("spare") or {}).get("pid")
            return pid if isinstance(pid, int) and psutil.Process(pid).ppid() == self.proc.pid else None
        except (OSError, ValueError, psutil.Error):
            return None

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        for pid in self.app_pids(spare=True):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)

    def update(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return self.cli("update", *args, timeout=timeout)

    def get(self, path: str = "/version", timeout: float = 5) -> dict[str, Any]:
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path, headers={"User-Agent": "test-client"})
            r = conn.getresponse()
            body = r.read()
            return {"status": r.status, **json.loads(body)}
        finally:
            conn.close()


def deep_update(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = v
    return base


# --------------------------------------------------------------------------- reading what the daemon wrote


def answer(d: Daemon, rid: str) -> dict[str, Any]:
    """The answer file of request `rid` (raises while there is none yet: use inside wait_for)."""
    return json.loads((d.root / "state" / "answers" / f"{rid}.json").read_text())


def answers(d: Daemon) -> dict[str, dict[str, Any]]:
    """Every readable answer file, by request id."""
    out = {}
    for p in (d.root / "state" / "answers").glob("*.json"):
        with contextlib.suppress(ValueError, OSError):
            out[p.stem] = json.loads(p.read_text())
    return out


def request_id(out: str) -> str:
    """The request id `proto4d update/rollback` printed ("... (id X) ...")."""
    m = re.search(r"\(id ([^)]+)\)", out)
    assert m, f"no request id in: {out!r}"
    return m.group(1)


def events(d: Daemon, name: str, **match: Any) -> list[dict[str, Any]]:
    """The daemon's log events called `name` whose fields equal `match`."""
    return [e for e in d.log_events() if e.get("event") == name and all(e.get(k) == v for k, v in match.items())]
