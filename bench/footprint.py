"""Footprint: the idle daemon's memory and CPU, and what one activity sample costs with many connections.

Part 1, idle: a real daemon serving the sample app, nobody using it, `activity.interval_s` 5 (the
default) and 1. After a settle time, the daemon's own process (not the app) is watched for
--seconds: CPU = (user + system CPU seconds spent in the window) / wall seconds; RSS and USS at
the end. The daemon runs from a production install (a venv with `pip install .`, the core
dependencies only), as an operator installs it: the dev venv also holds click, pygments and rich,
which httpx's CLI hooks import when present. At interval 5 the daemon is measured twice: on its
first start (it fetched and built the first release, as after any update; the git work and the
export run in helper processes, so the daemon never loads GitPython or tarfile) and restarted on an
existing release (what runs after a reboot until the next update). A stand-in tunnel process named
`cloudflared` runs, as on the Mac mini, so the tunnel check finds it and then watches only its pid
(--no-tunnel leaves it out: the check then looks through every process every 30 s).

Part 2, one sample: 10 / 100 / 1,000 established keep-alive connections to the app (opened here
with plain sockets, one request each, then idle; the app runs with --timeout-keep-alive 600 so
they stay open). `proto4d.activity.Sampler.sample()` is timed in this process against the real
app pid, built from the daemon's own config and fed the app's access log, as the daemon does
every interval.

Part 3, where it goes (--profile, default on when a target is missed): the RSS of the daemon's
imports one by one, and a cProfile of an idle daemon (which functions the idle CPU goes to).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile  # noqa: F401 - the profile run uses `python -m cProfile`
import io
import os
import pstats
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

import common
from common import Target, fmt, log, md_table
from proto4d import config as configmod
from proto4d.activity import Sampler

KEEPALIVE_COMMAND = ["{python}", "-m", "uvicorn", "main:app", "--fd", "{fd}", "--timeout-keep-alive", "600"]
LOG_PREFIX = re.compile(r"^\S+ \w+\[\d+\] ")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="./dev bench footprint", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Quick default: 60 s per interval, 20 samples per connection count (about 5 minutes, with the\n"
               "profile that runs when an idle target is missed).\n"
               "README figures: --readme (= --seconds 120 --samples 40).")
    p.add_argument("--seconds", type=float, default=60, help="idle measurement per interval (default 60)")
    p.add_argument("--settle-s", type=float, default=10, help="wait after the app is healthy before measuring")
    p.add_argument("--intervals", default="5,1", help="activity.interval_s values (default 5,1)")
    p.add_argument("--connections", default="10,100,1000", help="connection counts for part 2")
    p.add_argument("--samples", type=int, default=20, help="timed samples per connection count (default 20)")
    p.add_argument("--no-tunnel", action="store_true",
                   help="no stand-in cloudflared process (the daemon still watches for one, as configured by default)")
    common.add_install_arg(p)
    p.add_argument("--daemon-python", metavar="PATH",
                   help="run the daemon with this interpreter, which has proto4d installed already (instead of "
                        "--install); e.g. one built before entering a network namespace of its own "
                        "(`unshare -n`: the machine's other TCP sockets, which every sample reads on Linux, stay out)")
    p.add_argument("--profile", choices=["auto", "always", "never"], default="auto",
                   help="part 3: auto = only when an idle target is missed (default)")
    p.add_argument("--profile-seconds", type=float, default=60, help="length of the profiled idle run")
    p.add_argument("--readme", action="store_true", help="the README run: --seconds 120 --samples 40")
    common.add_run_args(p, "each measurement")
    args = p.parse_args(argv)
    if args.readme:
        args.seconds = max(args.seconds, 120)
        args.samples = max(args.samples, 40)
    args.interval_list = [float(x) for x in args.intervals.split(",") if x.strip()]
    args.conn_list = [int(x) for x in args.connections.split(",") if x.strip()]
    return args


# --------------------------------------------------------------------------- the stand-in tunnel


class Tunnel:
    """A process named `cloudflared` (a copy of `sleep`), so the tunnel check finds one as in production."""

    def __init__(self, base: Path) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        exe = shutil.which("sleep")
        if exe is None:
            return
        target = base / "bin" / "cloudflared"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(exe, target)
        self.proc = subprocess.Popen([str(target), "100000"], stdin=subprocess.DEVNULL, start_new_session=True)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def tcp_sockets() -> dict[str, int]:
    """TCP sockets in this network namespace by state (what psutil reads through /proc/net/tcp*)."""
    states = {"01": "established", "06": "time_wait", "0A": "listen"}
    out = {"total": 0, "established": 0, "time_wait": 0, "listen": 0}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(name) as f:
            next(f, None)
            for line in f:
                parts = line.split()
                if len(parts) > 3:
                    out["total"] += 1
                    key = states.get(parts[3])
                    if key:
                        out[key] += 1
    return out


def wait_quiet_network(limit: int = 200, timeout: float = 70) -> dict[str, int]:
    """Let TIME_WAIT sockets of earlier runs expire (Linux keeps them 60 s): each one costs every sample."""
    deadline = time.monotonic() + timeout
    counts = tcp_sockets()
    if counts["total"] > limit:
        log(f"  {counts['total']} TCP sockets on the machine ({counts['time_wait']} in TIME_WAIT); waiting for them "
            "to expire before measuring ...")
    while counts["total"] > limit and time.monotonic() < deadline:
        time.sleep(2)
        counts = tcp_sockets()
    return counts


def activity_cfg(interval: float) -> dict[str, Any]:
    # The tunnel check is configured as in production either way: --no-tunnel measures the check
    # when the tunnel process is not running (not a daemon told to watch none).
    return {"interval_s": interval, "window_s": max(300.0, interval), "tunnel_process": "cloudflared"}


# --------------------------------------------------------------------------- part 1


def idle(args: argparse.Namespace, base: Path, origin: Any, interval: float, python: str,
         restart: bool = False) -> dict[str, Any]:
    name = f"idle-{interval:g}" + ("-restart" if restart else "")
    d = common.new_daemon(base / name, origin, activity=activity_cfg(interval))
    d.daemon_python = python
    try:
        d.start(timeout=300)
        if restart:
            d.stop(60)
            d.start(timeout=300)
        time.sleep(args.settle_s)
        sockets = wait_quiet_network()
        if args.quiet_wait:
            common.wait_quiet(args.quiet_wait)
        meter = common.BusyMeter()
        p = psutil.Process(d.proc.pid)
        history = d.root / "state" / "activity.jsonl"
        lines0 = len(history.read_text().splitlines()) if history.exists() else 0
        c0, w0, x0 = p.cpu_times(), time.monotonic(), p.num_ctx_switches()
        time.sleep(args.seconds)
        c1, w1, x1 = p.cpu_times(), time.monotonic(), p.num_ctx_switches()
        lines1 = len(history.read_text().splitlines()) if history.exists() else 0
        mem = p.memory_full_info()
        cpu_s = (c1.user - c0.user) + (c1.system - c0.system)
        wall = w1 - w0
        return {"interval_s": interval, "start": "restart" if restart else "first",
                "seconds": round(wall, 1), "cpu_s": round(cpu_s, 3),
                "cpu_user_s": round(c1.user - c0.user, 3), "cpu_system_s": round(c1.system - c0.system, 3),
                "cpu_percent": round(100 * cpu_s / wall, 3), "rss_mb": round(mem.rss / 2**20, 1),
                "uss_mb": round(mem.uss / 2**20, 1), "samples": lines1 - lines0,
                "ctx_switches": (x1.voluntary - x0.voluntary) + (x1.involuntary - x0.involuntary),
                "threads": p.num_threads(), "machine_load": meter.read(), "tcp_sockets_before": sockets["total"],
                "tcp_sockets_after": tcp_sockets()["total"]}
    finally:
        with contextlib.suppress(Exception):
            d.stop(60)
        d.cleanup()


# --------------------------------------------------------------------------- part 2


def open_connections(port: int, n: int, start: int) -> list[socket.socket]:
    """n keep-alive connections, each after one complete request (a distinct X-Forwarded-For)."""
    out = []
    for i in range(start, start + n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(f"GET / HTTP/1.1\r\nHost: bench\r\nX-Forwarded-For: 10.9.{i // 250}.{i % 250 + 1}\r\n"
                  "User-Agent: proto4d-bench\r\n\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise RuntimeError("the app closed a connection during set-up")
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        m = re.search(rb"content-length:\s*(\d+)", head, re.I)
        length = int(m.group(1)) if m else 0
        while len(body) < length:
            body += s.recv(65536)
        out.append(s)
    return out


def samples(args: argparse.Namespace, base: Path, origin: Any) -> list[dict[str, Any]]:
    limit = common.raise_nofile(max(args.conn_list) * 2 + 512)
    log(f"part 2: RLIMIT_NOFILE soft limit {limit}")
    d = common.new_daemon(base / "samples", origin, activity=activity_cfg(5),
                          app={"command": KEEPALIVE_COMMAND})
    socks: list[socket.socket] = []
    out = []
    try:
        d.start(timeout=300)
        cfg = configmod.load(str(d.config_path))
        pid = d.status()["app"]["pid"]
        wait_quiet_network()
        if args.quiet_wait:
            common.wait_quiet(args.quiet_wait)
        meter = common.BusyMeter()
        for n in sorted(args.conn_list):
            if n > len(socks):
                socks += open_connections(d.port, n - len(socks), len(socks))
            time.sleep(1.0)
            sampler = Sampler(cfg.activity, cfg.safety, cfg.listen.port, cfg.app.access_log_regex, set,
                              host=cfg.listen.host)
            log_path = d.root / "logs" / "app.log"
            time.sleep(0.5)  # the daemon flushes app.log every 0.2 s
            fed = 0
            for line in log_path.read_text(errors="replace").splitlines():
                if sampler.feed(LOG_PREFIX.sub("", line)) is not None:
                    fed += 1
            sampler.sample([pid], app_up=True)  # the first sample primes cpu_percent and the process cache
            times = []
            last: dict[str, Any] = {}
            for _ in range(args.samples):
                t = time.perf_counter()
                last = sampler.sample([pid], app_up=True)
                times.append(time.perf_counter() - t)
                time.sleep(0.02)
            proc = psutil.Process(pid)
            conn_t, read_t = [], []
            for _ in range(min(10, args.samples)):
                t = time.perf_counter()
                proc.net_connections(kind="tcp")
                conn_t.append(time.perf_counter() - t)
                t = time.perf_counter()
                for name in ("/proc/net/tcp", "/proc/net/tcp6"):
                    with open(name, "rb") as f:
                        f.read()
                read_t.append(time.perf_counter() - t)
            row = {"connections": n, "seen": last.get("connections"), "users": last.get("users"),
                   "net_connections_ms": round(statistics.median(conn_t) * 1000, 2),
                   "read_proc_net_tcp_ms": round(statistics.median(read_t) * 1000, 2),
                   "tcp_sockets": tcp_sockets(),
                   "requests_fed": fed, "median_ms": round(statistics.median(times) * 1000, 2),
                   "max_ms": round(max(times) * 1000, 2), "min_ms": round(min(times) * 1000, 2),
                   "samples": len(times)}
            log(f"  {n} connections: median {row['median_ms']} ms, max {row['max_ms']} ms "
                f"(the sample saw {row['seen']} connections, {row['users']} users)")
            row["machine_load"] = meter.read()
            out.append(row)
    finally:
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()
        with contextlib.suppress(Exception):
            d.stop(60)
        d.cleanup()
    return out


# --------------------------------------------------------------------------- part 3


IMPORT_STEPS = [
    ("interpreter", ""),
    ("asyncio, without OpenSSL (as `proto4d run` imports it)", "from proto4d import lean; lean.daemon_imports()"),
    ("psutil", "import psutil"),
    ("yaml", "import yaml"),
    ("structlog + logging", "import structlog, logging.handlers"),
    ("zoneinfo + tzdata", "import zoneinfo; zoneinfo.ZoneInfo('Asia/Seoul')"),
    ("proto4d.supervisor (the rest)", "import proto4d.supervisor"),
    # ssl and httpx (a webhook, health.external_url) no longer load in the daemon: bench/outbound.py
]


def import_rss(python: str) -> list[dict[str, Any]]:
    """RSS after each import, in one fresh interpreter (read from /proc/self/statm, not psutil)."""
    script = ["import os, sys", "page = os.sysconf('SC_PAGE_SIZE')",
              "def rss():\n    return int(open('/proc/self/statm').read().split()[1]) * page"]
    for name, stmt in IMPORT_STEPS:
        script.append(stmt or "pass")
        script.append(f"print({name!r}, rss())")
    r = subprocess.run([python, "-c", "\n".join(script)], capture_output=True, text=True, timeout=120,
                       check=True, cwd=common.ROOT)
    out, prev = [], 0
    for line in r.stdout.splitlines():
        name, _, value = line.rpartition(" ")
        rss = int(value)
        out.append({"step": name.strip("'"), "rss_mb": round(rss / 2**20, 1),
                    "delta_mb": round((rss - prev) / 2**20, 1) if prev else None})
        prev = rss
    return out


def profile_idle(args: argparse.Namespace, base: Path, origin: Any, interval: float, python: str) -> dict[str, Any]:
    """Run an idle daemon under cProfile and report where its CPU goes after start-up."""
    d = common.new_daemon(base / f"profile-{interval:g}", origin, activity=activity_cfg(interval))
    prof = base / f"daemon-{interval:g}.prof"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PROTO4D_CONFIG", None)
    with open(d.log_path, "ab") as err:
        d.proc = subprocess.Popen([python, "-m", "cProfile", "-o", str(prof), "-m", "proto4d", "run",
                                   "--config", str(d.config_path)], stdout=err, stderr=err, stdin=subprocess.DEVNULL,
                                  env=env, start_new_session=True, cwd=d.base)
    try:
        d.wait_healthy(timeout=300)
        time.sleep(args.settle_s)
        p = psutil.Process(d.proc.pid)
        c0 = p.cpu_times()
        t0 = time.monotonic()
        time.sleep(args.profile_seconds)
        c1 = p.cpu_times()
        wall = time.monotonic() - t0
        d.proc.send_signal(signal.SIGTERM)
        d.proc.wait(60)
    finally:
        d.cleanup()
    stats = pstats.Stats(str(prof), stream=io.StringIO())
    interesting = ("sample", "write_status", "append", "check_request_file", "_request_loop", "_sample_loop",
                   "_resources", "net_connections", "_tunnel_running", "atomic_write", "status", "stats",
                   "status_line", "_settle", "_tree", "cpu_percent", "memory_info", "dumps", "verdict")
    rows = []
    for (file, line, func), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if func in interesting and ("proto4d" in file or "psutil" in file or "json" in file):
            rows.append({"function": f"{Path(file).name}:{line}({func})", "calls": nc,
                         "tottime_ms": round(tt * 1000, 1), "cumtime_ms": round(ct * 1000, 1)})
    rows.sort(key=lambda r: -r["cumtime_ms"])
    top = []
    stats.sort_stats("tottime")
    for key in stats.fcn_list[:15]:  # type: ignore[attr-defined]
        _cc, nc, tt, ct, _ = stats.stats[key]  # type: ignore[attr-defined]
        top.append({"function": f"{Path(key[0]).name}:{key[1]}({key[2]})", "calls": nc,
                    "tottime_ms": round(tt * 1000, 1), "cumtime_ms": round(ct * 1000, 1)})
    return {"interval_s": interval, "profiled_window_s": round(wall, 1),
            "cpu_percent_under_profiler": round(100 * ((c1.user - c0.user) + (c1.system - c0.system)) / wall, 3),
            "loop_functions": rows[:20], "top_tottime_whole_run": top,
            "note": "cProfile covers the whole run (start-up included); the per-call costs of the loop functions "
                    "are what matter: cumtime / calls"}


def per_sample_split(rows: list[dict[str, Any]]) -> dict[str, float] | None:
    """cpu(interval) = base + cost / interval: two intervals give the cost of one sample and the base."""
    if len(rows) < 2:
        return None
    a, b = sorted(rows, key=lambda r: r["interval_s"])[:2]
    ra, rb = 1 / a["interval_s"], 1 / b["interval_s"]
    if ra == rb:
        return None
    cost = (a["cpu_percent"] - b["cpu_percent"]) / 100 / (ra - rb)  # CPU seconds per sample
    base = a["cpu_percent"] - 100 * cost * ra
    return {"ms_per_sample": round(cost * 1000, 2), "base_percent": round(base, 3)}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = common.machine()
    base, cleanup = common.workdir(args.keep, "footprint")
    started = time.time()
    tunnel = None if args.no_tunnel else Tunnel(base)
    idle_rows: list[dict[str, Any]] = []
    sample_rows: list[dict[str, Any]] = []
    rss_rows: list[dict[str, Any]] = []
    profiles: list[dict[str, Any]] = []
    try:
        origin = common.make_origin(base / "origin")
        if args.daemon_python:
            python = args.daemon_python
        elif args.install == "production":
            log("the daemon's production install: venv + pip install . ...")
            python = common.production_python(base)
        else:
            python = sys.executable
        for interval in args.interval_list:
            for restart in (False, True) if interval == 5 else (False,):
                log(f"part 1: idle daemon at activity.interval_s {interval:g}{' (restarted)' if restart else ''}: "
                    f"settle {args.settle_s:g} s, measure {args.seconds:g} s ...")
                row = idle(args, base, origin, interval, python, restart)
                log(f"  {row['cpu_percent']} % of a core, RSS {row['rss_mb']} MiB, {row['samples']} samples")
                idle_rows.append(row)
        log("part 2: one sample with open connections ...")
        sample_rows = samples(args, base, origin)
        at5 = next((r for r in idle_rows if r["interval_s"] == 5), None)
        missed = at5 is not None and (at5["rss_mb"] > 30 or at5["cpu_percent"] > 0.2)
        if args.profile == "always" or (args.profile == "auto" and missed):
            log("part 3: the RSS of each import ...")
            rss_rows = import_rss(python)
            log(f"part 3: cProfile of an idle daemon for {args.profile_seconds:g} s ...")
            profiles.append(profile_idle(args, base, origin, 5, python))
    finally:
        if tunnel is not None:
            tunnel.stop()
        cleanup()

    tgts: list[Target] = []
    at5 = next((r for r in idle_rows if r["interval_s"] == 5), None)
    again = next((r for r in idle_rows if r["interval_s"] == 5 and r["start"] == "restart"), None)
    if at5:
        tgts.append(Target("idle daemon RSS (interval_s 5, after the first release or an update)", at5["rss_mb"], 30,
                           " MiB", f"USS {at5['uss_mb']} MiB; {args.install} install"))
    if again:
        tgts.append(Target("idle daemon RSS (interval_s 5, restarted on an existing release)", again["rss_mb"], 30,
                           " MiB", f"USS {again['uss_mb']} MiB; {args.install} install"))
        tgts.append(Target("idle daemon CPU (interval_s 5)", at5["cpu_percent"], 0.2, " %",
                           f"{at5['cpu_s']} CPU s in {at5['seconds']} s"))
    s1000 = next((r for r in sample_rows if r["connections"] == 1000), None)
    if s1000:
        tgts.append(Target("one sample with 1,000 connections (median)", s1000["median_ms"], 20, " ms",
                           f"max {s1000['max_ms']} ms"))

    split = per_sample_split([r for r in idle_rows if r["start"] == "first"])
    data = {"bench": "footprint", "command": common.command_line(), "machine": machine, "started_at": started,
            "seconds": round(time.time() - started, 1), "args": vars(args), "idle": idle_rows, "idle_split": split,
            "samples": sample_rows, "import_rss": rss_rows, "profiles": profiles,
            "targets": [t.to_dict() for t in tgts]}
    path = common.write_json("footprint", data)
    print("\n## Footprint\n")
    print(f"Machine: {common.machine_line(machine)}")
    print(f"Command: `{common.command_line()}`\n")
    print(f"Idle daemon (its own process; {args.seconds:g} s after {args.settle_s:g} s of settling; "
          f"{'a stand-in cloudflared runs' if not args.no_tunnel else 'tunnel_process cloudflared, none running'}):\n")
    print(md_table(["activity.interval_s", "daemon", "CPU % of a core", "CPU s (user/system)", "RSS MiB", "USS MiB",
                    "samples taken", "context switches", "TCP sockets on the machine", "others' load (cores)"],
                   [[fmt(r["interval_s"], 0), "restarted on a release" if r["start"] == "restart" else "first start",
                     fmt(r["cpu_percent"], 3),
                     f"{r['cpu_s']:.2f} ({r['cpu_user_s']:.2f}/{r['cpu_system_s']:.2f})", fmt(r["rss_mb"]),
                     fmt(r["uss_mb"]), r["samples"], r["ctx_switches"], r["tcp_sockets_before"],
                     fmt(r["machine_load"]["others_cores"], 2)] for r in idle_rows]))
    if split:
        print(f"\nFrom the two intervals: one sample tick costs about {split['ms_per_sample']:.1f} ms of CPU in the "
              f"daemon; without sampling the daemon would use about {split['base_percent']:.3f} % of a core "
              "(request-file polling every second, timers, status writes).")
    print(f"\nOne activity sample (Sampler.sample() in-process against the app pid, {args.samples} samples):\n")
    print(md_table(["connections", "seen by the sample", "median ms", "max ms", "min ms",
                    "of which psutil net_connections ms", "reading /proc/net/tcp* alone ms",
                    "TCP sockets on the machine", "others' load (cores)"],
                   [[r["connections"], r["seen"], fmt(r["median_ms"], 2), fmt(r["max_ms"], 2), fmt(r["min_ms"], 2),
                     fmt(r["net_connections_ms"], 2), fmt(r["read_proc_net_tcp_ms"], 2), r["tcp_sockets"]["total"],
                     fmt(r["machine_load"]["others_cores"], 2)] for r in sample_rows]))
    print("\n(On Linux psutil reads the whole /proc/net/tcp table of the machine for each process it asks about, so "
          "a sample's cost grows with every TCP socket on the machine, TIME_WAIT included, not only the app's.)")
    if rss_rows:
        print("\nWhere the RSS goes (one fresh interpreter, importing the daemon's dependencies in order):\n")
        print(md_table(["import", "RSS MiB", "+MiB"], [[r["step"], fmt(r["rss_mb"]), fmt(r["delta_mb"])]
                                                      for r in rss_rows]))
    for prof in profiles:
        print(f"\nWhere the idle CPU goes (cProfile, interval_s {prof['interval_s']:g}, "
              f"{prof['profiled_window_s']:g} s idle; {prof['cpu_percent_under_profiler']} % of a core under the "
              "profiler; whole run):\n")
        print(md_table(["function", "calls", "tottime ms", "cumtime ms", "ms per call"],
                       [[r["function"], r["calls"], fmt(r["tottime_ms"]), fmt(r["cumtime_ms"]),
                         fmt(r["cumtime_ms"] / max(1, r["calls"]), 3)] for r in prof["loop_functions"][:12]]))
    common.print_targets(tgts, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
