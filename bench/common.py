"""Shared parts of the benchmarks: the origin, a real daemon, load, statistics, tables, targets.

Everything runs on loopback. The origin is a bare git repository with the bundled sample app
(tests/harness.py's Origin), the daemon is `python -m proto4d run` (tests/harness.py's Daemon),
the load is proto4d.demo.loadgen (threads, keep-alive and fresh-connection users, GET and POST).
Only venv builds reach the network (PyPI).
"""

from __future__ import annotations

import bisect
import contextlib
import datetime as dt
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

from proto4d.demo.loadgen import Load, Mix, Result, percentile

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"


def _load_harness() -> Any:
    """tests/harness.py, imported by path (the same Origin and Daemon the e2e tests use)."""
    if "harness" in sys.modules:
        return sys.modules["harness"]
    spec = importlib.util.spec_from_file_location("harness", ROOT / "tests" / "harness.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["harness"] = mod
    spec.loader.exec_module(mod)
    return mod


harness = _load_harness()
Origin = harness.Origin
Daemon = harness.Daemon
wait_for = harness.wait_for
free_port = harness.free_port

# uv builds the release venvs from its cache; never let it fetch an interpreter.
os.environ.setdefault("UV_PYTHON_DOWNLOADS", "never")
# These machines run the benchmarks as root, which `proto4d run` refuses unless told.
if os.geteuid() == 0:
    os.environ.setdefault("PROTO4D_ALLOW_ROOT", "1")

# The two uvicorn lines: the sample app's own pin (h11), and what Proto4 pins (httptools via [standard]).
UVICORN_REQUIREMENTS = {
    "0.54": "uvicorn==0.54.0\nh11==0.16.0\n",
    "0.24": "uvicorn[standard]==0.24.0\n",
}
UVICORN_LABEL = {"0.54": "0.54.0 (h11)", "0.24": "0.24.0 [standard] (httptools)"}


# --------------------------------------------------------------------------- machine


def uv_path() -> str | None:
    beside = Path(sys.executable).parent / "uv"
    return str(beside) if beside.is_file() else shutil.which("uv")


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    if not cpu:
        cpu = platform.processor() or platform.machine()
    os_name = platform.platform()
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = f"{line.split('=', 1)[1].strip(chr(34))} (kernel {platform.release()})"
    uv = uv_path()
    uv_version = ""
    if uv:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            uv_version = subprocess.run([uv, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    proto4d = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "daemon"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        proto4d = head + (" + uncommitted changes in daemon/" if dirty else "")
    return {"cpu": cpu, "cores": cores, "ram_gb": round(psutil.virtual_memory().total / 2**30, 1), "os": os_name,
            "python": sys.version.split()[0], "uv": uv_version, "proto4d": proto4d}


def machine_line(m: dict[str, Any]) -> str:
    return (f"{m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM, {m['os']}, Python {m['python']}"
            + (f", {m['uv']}" if m.get("uv") else "") + (f"; proto4d {m['proto4d']}" if m.get("proto4d") else ""))


def pypi_only_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """pip as on a plain machine: PyPI only. This machine's pip.conf may add local wheel mirrors and
    find-links, which would make a "cold" pip install read local files instead of downloading."""
    env = dict(base if base is not None else os.environ)
    for k in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL", "PIP_CONSTRAINT", "PIP_NO_INDEX"):
        env.pop(k, None)
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


# --------------------------------------------------------------------------- the origin and the daemon


def make_origin(base: Path, uvicorn: str = "0.54") -> Any:
    """A bare origin with the sample app at version 1 on the given uvicorn line."""
    base.mkdir(parents=True, exist_ok=True)
    origin = Origin(base)
    origin.commit("1", requirements=UVICORN_REQUIREMENTS[uvicorn])
    return origin


def new_daemon(base: Path, origin: Any, **overrides: Any) -> Any:
    """A daemon configured like the shipped defaults where it matters for the figures (activity
    sampled every 5 s), with a short watch so many updates fit in a run."""
    base.mkdir(parents=True, exist_ok=True)
    cfg: dict[str, Any] = {
        "activity": {"interval_s": 5, "window_s": 300},
        "update": {"watch_s": 0.5, "drain_timeout_s": 15},
        "health": {"interval_s": 0.5},
    }
    harness.deep_update(cfg, overrides)
    return Daemon(base, origin, **cfg)


def trigger_update(d: Any, reason: str = "bench", force: bool = True, wake: bool = False,
                   action: str = "update") -> tuple[str, float]:
    """Drop `update.request` the way `proto4d update --force` does (atomic link); return (id, when).

    wake: then send the daemon SIGUSR2, as the CLI does; without it the request waits for the
    daemon's next look at the file (every second), as after `touch update.request`.
    """
    req_id = f"bench-{time.strftime('%H%M%S')}-{os.urandom(3).hex()}"
    doc = {"id": req_id, "action": action, "force": force, "reason": reason, "requested_by": "bench"}
    data = yaml.safe_dump(doc, sort_keys=False).encode()
    tmp = d.root / f".update.request.bench.{os.getpid()}.{req_id}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                at = time.time()
                os.link(tmp, d.root / "update.request")
                if wake:
                    os.kill(d.proc.pid, signal.SIGUSR2)
                return req_id, at
            except FileExistsError:
                if time.monotonic() > deadline:
                    raise RuntimeError("a previous update.request was never picked up") from None
                time.sleep(0.02)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def answer_of(d: Any, req_id: str) -> dict[str, Any] | None:
    """The final answer to update `req_id`, None while there is none (one look: wait_answer's poll)."""
    d.assert_alive()
    data = json.loads((d.root / "state" / "answers" / f"{req_id}.json").read_text())
    return data if data.get("final") else None


def wait_answer(d: Any, req_id: str, timeout: float = 180) -> dict[str, Any]:
    return wait_for(lambda: answer_of(d, req_id), timeout, f"the answer to update {req_id}", interval=0.02)


def journal_for(d: Any, req_id: str) -> dict[str, Any]:
    """The journal of update `req_id` (read right after its answer, before the next update)."""
    j = d.journal()
    if j.get("id") != req_id:
        return {}
    return j


def step_times(journal: dict[str, Any]) -> dict[str, float]:
    """state -> wall-clock time the daemon entered it (the first time)."""
    out: dict[str, float] = {}
    for s in journal.get("steps", []):
        out.setdefault(s["state"], float(s["at"]))
    return out


def wait_pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def app_log_start_times(app_log: Path, ready: str = "Uvicorn running on") -> list[tuple[str, float, float]]:
    """(role, when ready, seconds from the process's first line in logs/app.log to its ready line) per process.

    Lines look like `2026-11-26T06:04:15.123 app[1234] INFO: ...` (the daemon's own prefix)."""
    first: dict[tuple[str, str], float] = {}
    out: list[tuple[str, float, float]] = []
    done: set[tuple[str, str]] = set()
    rx = re.compile(r"^(\S+) (\w+)\[(\d+)\] (.*)$")
    with contextlib.suppress(OSError):
        for line in app_log.read_text(errors="replace").splitlines():
            m = rx.match(line)
            if not m:
                continue
            try:
                ts = dt.datetime.fromisoformat(m.group(1)).timestamp()
            except ValueError:
                continue
            key = (m.group(2), m.group(3))
            first.setdefault(key, ts)
            if ready in m.group(4) and key not in done:
                done.add(key)
                out.append((key[0], ts, ts - first[key]))
    return out


def spawn_ready_seconds(python: Path, cwd: Path, argv_tail: Sequence[str] = (), timeout: float = 60,
                        ready: str = "Uvicorn running on") -> float:
    """Seconds from spawning `python -m uvicorn main:app` (on a free loopback port) to its ready line."""
    port = free_port()
    argv = [str(python), "-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port", str(port), *argv_tail]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        assert proc.stdout is not None
        deadline = t0 + timeout
        for raw in proc.stdout:
            if ready.encode() in raw:
                return time.monotonic() - t0
            if time.monotonic() > deadline:
                break
        raise RuntimeError(f"{' '.join(argv)} did not print {ready!r}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()


# --------------------------------------------------------------------------- load


@dataclass(frozen=True)
class Group:
    """Some users of one kind; `first_address` tags their X-Forwarded-For so results say which kind."""

    kind: str  # "keep-alive" | "fresh"
    users: int
    mix: Mix
    first_address: int


MIXES: dict[str, tuple[Group, ...]] = {
    # ~70-90 req/s: students with think time; 5 % of requests are LLM-call stand-ins of 0.5-3 s.
    "normal": (
        Group("keep-alive", 10, Mix(get=0.6, slow=0.05, post=0.35, slow_ms=(500, 3000), think_s=(0.02, 0.1),
                                   keepalive=True), 10),
        Group("fresh", 4, Mix(get=0.6, slow=0.05, post=0.35, slow_ms=(500, 3000), think_s=(0.05, 0.15),
                              keepalive=False), 200),
    ),
    # As fast as the machine goes: many keep-alive clients with no think time (plus two fresh-connection ones).
    "stress": (
        Group("keep-alive", 24, Mix(get=0.6, slow=0.0, post=0.4, think_s=(0.0, 0.0), keepalive=True), 10),
        Group("fresh", 2, Mix(get=0.6, slow=0.0, post=0.4, think_s=(0.0, 0.0), keepalive=False), 200),
    ),
}


def address_kind(groups: Iterable[Group]) -> dict[str, str]:
    out = {}
    for g in groups:
        for i in range(g.users):
            n = g.first_address + i
            out[f"10.0.{n // 250}.{n % 250 + 1}"] = g.kind
    return out


class LoadSet:
    """Several proto4d.demo.loadgen.Load groups against one port, started and stopped together."""

    def __init__(self, port: int, groups: Sequence[Group], timeout: float = 30.0) -> None:
        self.groups = tuple(groups)
        self.loads = [Load("127.0.0.1", port, users=g.users, mix=g.mix, timeout=timeout,
                           first_address=g.first_address) for g in self.groups]
        self.kind_of = address_kind(self.groups)
        self.started = 0.0
        self.stopped = 0.0

    def start(self) -> LoadSet:
        self.started = time.time()
        for load in self.loads:
            load.start()
        return self

    def stop(self) -> None:
        for load in self.loads:
            load._stop.set()
        for load in self.loads:
            load.stop()
        self.stopped = time.time()

    def pause(self) -> None:
        for load in self.loads:
            load.pause()

    def resume(self) -> None:
        for load in self.loads:
            load.resume()

    def count(self) -> int:
        return sum(len(load.results) for load in self.loads)  # len() of a list is atomic enough here

    def results(self) -> list[Result]:
        out: list[Result] = []
        for load in self.loads:
            out.extend(load.snapshot())
        out.sort(key=lambda r: r.at)
        return out


def slow_ms(path: str) -> int | None:
    if not path.startswith("/slow"):
        return None
    m = re.search(r"ms=(\d+)", path)
    return int(m.group(1)) if m else 500


def window_max(fast: list[Any], starts: list[float], a: float, b: float) -> float:
    """The worst latency of the fast requests overlapping [a, b] (`fast` sorted by start, `starts` theirs)."""
    worst = 0.0
    for r in fast[bisect.bisect_left(starts, a - 30):bisect.bisect_right(starts, b)]:
        if r.at < b and r.at + r.latency > a:
            worst = max(worst, r.latency)
    return worst


def sign_test(pairs: list[tuple[float, float]]) -> dict[str, Any]:
    """(worse, better) pairs: in how many the first was worse, the sign test's two-sided p for "no
    effect", and the median ratio."""
    n = sum(1 for sw, rest in pairs if sw != rest)  # a tie says nothing either way
    worse = sum(1 for sw, rest in pairs if sw > rest)
    tail = min(worse, n - worse)
    p = min(1.0, 2 * sum(math.comb(n, k) for k in range(tail + 1)) / 2 ** n) if n else None
    ratios = [sw / rest for sw, rest in pairs]
    return {"n": n, "worse": worse, "p_sign": round(p, 4) if p is not None else None,
            "median_ratio": round(statistics.median(ratios), 2) if ratios else None}


def is_fast(r: Result) -> bool:
    return not r.path.startswith("/slow")


def lat_stats(values_s: Sequence[float]) -> dict[str, float | int]:
    """n, p50, p99, max in milliseconds."""
    vals = list(values_s)
    if not vals:
        return {"n": 0, "p50": 0.0, "p99": 0.0, "max": 0.0}
    return {"n": len(vals), "p50": round(percentile(vals, 50) * 1000, 2), "p99": round(percentile(vals, 99) * 1000, 2),
            "max": round(max(vals) * 1000, 2)}


def overlaps(r: Result, windows: Sequence[tuple[float, float]]) -> bool:
    """Does the request's [start, end] overlap any window? `windows` sorted by start and disjoint."""
    end = r.at + r.latency
    i = bisect.bisect_left(windows, (end, float("-inf"))) - 1  # the last window starting before the request ends
    return i >= 0 and windows[i][1] > r.at


def inside(r: Result, a: float, b: float) -> bool:
    return r.at >= a and r.at + r.latency <= b


# --------------------------------------------------------------------------- output


def fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "-"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for row in cells[1:]:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    return "\n".join(lines)


@dataclass
class Target:
    name: str
    value: float | None
    limit: float
    unit: str = ""
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value <= self.limit

    def verdict(self) -> str:
        if self.value is None:
            return "NOT MEASURED"
        if self.met:
            return "MET"
        over = self.value - self.limit
        rel = f", {self.value / self.limit:.2f}x the limit" if self.limit > 0 else ""
        return f"MISSED by {fmt(over, 2)}{self.unit}{rel}"

    def row(self) -> list[str]:
        return [self.name, f"{fmt(self.value, 2)}{self.unit}" if self.value is not None else "-",
                f"<= {fmt(self.limit, 2)}{self.unit}", self.verdict(), self.note]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "limit": self.limit, "unit": self.unit, "met": self.met,
                "verdict": self.verdict(), "note": self.note}


def add_run_args(p: Any, what: str = "each measurement") -> None:
    """The options every benchmark shares: waiting for a quiet machine, keeping the scratch dir."""
    p.add_argument("--quiet-wait", type=float, default=0, metavar="S",
                   help=f"before {what}, wait up to S s for other processes on the machine to go quiet")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory (daemon roots and logs)")


def print_targets(targets: Sequence[Target], path: Path) -> None:
    print("\n### Targets\n")
    print(targets_table(targets))
    print(f"\nJSON: {path.relative_to(ROOT)}")


def targets_table(targets: Sequence[Target]) -> str:
    return md_table(["target", "measured", "limit", "verdict", "note"], [t.row() for t in targets])


def write_json(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def log(text: str) -> None:
    """Progress goes to stderr; the tables go to stdout."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def workdir(keep: bool, prefix: str) -> tuple[Path, Any]:
    """A scratch directory for origins, daemons and venvs; removed at the end unless kept."""
    base = Path(tempfile.mkdtemp(prefix=f"proto4d-bench-{prefix}-"))

    def cleanup() -> None:
        if keep:
            log(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)

    return base, cleanup


def dir_bytes(path: Path) -> int:
    """Bytes in the files under `path` (links not followed; files that vanish meanwhile skipped)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def production_python(base: Path) -> str:
    """A venv with proto4d installed from this tree the way an operator does it: `pip install .`.

    The dev venv also holds click, pygments and rich (for uvicorn and pytest), which httpx's CLI
    hooks import when present: a daemon run from it weighs a few MB more than an installed one.
    """
    venv = base / "daemon-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(ROOT)],
                   check=True, timeout=900)
    return str(py)


def add_install_arg(p: Any) -> None:
    p.add_argument("--install", choices=["production", "dev"], default="production",
                   help="the daemon's interpreter: a fresh venv with `pip install .` (default) or this dev venv")


def command_line() -> str:
    return "./dev bench " + Path(sys.argv[0]).stem + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")


def raise_nofile(want: int) -> int:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _tree_cpu() -> float:
    """CPU seconds of this process and every descendant, live or reaped."""
    total = 0.0
    procs = [psutil.Process()]
    with contextlib.suppress(psutil.Error):
        procs += psutil.Process().children(recursive=True)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def _machine_busy() -> float:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)


class BusyMeter:
    """How much of the machine other processes (not this bench and its children) used meanwhile.

    The figures are only as good as the machine is quiet: this says how quiet it was."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.busy0 = _machine_busy()
        self.ours0 = _tree_cpu()
        self.load0 = os.getloadavg()[0]

    def read(self) -> dict[str, float]:
        wall = max(1e-6, time.monotonic() - self.t0)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        busy = _machine_busy() - self.busy0
        ours = _tree_cpu() - self.ours0
        return {"wall_s": round(wall, 1), "ours_cores": round(ours / wall, 2),
                "others_cores": round(max(0.0, busy - ours) / wall, 2), "machine_cores": cores,
                "loadavg_start": round(self.load0, 2), "loadavg_end": round(os.getloadavg()[0], 2)}


def others_line(b: dict[str, float]) -> str:
    return (f"other processes on the machine used {b['others_cores']:.2f} of {b['machine_cores']} cores on average "
            f"during the run (this bench and its children: {b['ours_cores']:.2f})")


def wait_quiet(max_wait: float, threshold: float = 0.15, window: float = 5.0) -> float:
    """Wait (up to max_wait s) until the machine's other load stays under `threshold` cores for `window` s.
    Returns the other load seen last."""
    deadline = time.monotonic() + max_wait
    while True:
        m = BusyMeter()
        time.sleep(window)
        others = m.read()["others_cores"]
        if others <= threshold or time.monotonic() >= deadline:
            if others > threshold:
                log(f"the machine is still busy ({others:.2f} cores used by other processes); going on anyway")
            return others
        log(f"waiting for a quiet machine: other processes use {others:.2f} cores ...")


class Ticker:
    """Prints a line every `every` seconds while a long wait runs (so a quiet bench is not a hung one)."""

    def __init__(self, text: str, every: float = 30) -> None:
        self.text = text
        self.every = every
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.wait(self.every):
            log(f"{self.text} ... {time.monotonic() - t0:.0f} s")

    def __enter__(self) -> Ticker:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
