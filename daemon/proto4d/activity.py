"""Activity sampling: who is using the app right now, and what it costs.

Fed line by line with the app's output (access-log lines become requests in a sliding
window) and sampled every `activity.interval_s`: established connections on the port held
by the app's process tree, whether the tunnel process runs, CPU and RSS of the tree. The
decisions made from a sample live in policy.py; this module only measures.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import ipaddress
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import psutil

from proto4d import accesslog, fsutil, policy
from proto4d.config import ActivityConfig, SafetyConfig

SETTLE_S = 0.25
# While no tunnel process is known, all processes are looked through at most this often: a tunnel
# started meanwhile shows as up within this long (one that stops shows at the next sample).
TUNNEL_RESCAN_S = 30.0


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


class Sampler:
    def __init__(self, cfg: ActivityConfig, safety: SafetyConfig, port: int, custom_regex: str,
                 probe_ports: Any, clock: Callable[[], float] = time.monotonic, host: str = "") -> None:
        self.cfg = cfg
        self.safety = safety
        self.port = port
        self.conn_kind = connection_kind(host)
        self.custom = re.compile(custom_regex) if custom_regex else None
        self.probe_ports = probe_ports  # callable -> set of local ports the daemon's probes used
        self.window = accesslog.RequestWindow(cfg.window_s, cfg.ignore_paths)
        self._pending: collections.deque[tuple[float, accesslog.AccessRecord]] = collections.deque(maxlen=100_000)
        self._procs: dict[int, psutil.Process] = {}
        self._tunnel: psutil.Process | None = None
        self._tunnel_scanned: float | None = None  # clock() of the last walk through every process
        self.tunnel_checked_at: float | None = None  # wall time the tunnel was last looked at (status)
        self._clock = clock
        self.last: dict[str, Any] = {}
        self.last_verdict: policy.Verdict | None = None

    def reconfigure(self, cfg: ActivityConfig, safety: SafetyConfig, port: int, custom_regex: str,
                    host: str = "") -> None:
        self.conn_kind = connection_kind(host)
        if cfg.tunnel_process != self.cfg.tunnel_process:
            self._tunnel, self._tunnel_scanned = None, None  # another name: look for it at the next sample
        self.cfg, self.safety, self.port = cfg, safety, port
        self.custom = re.compile(custom_regex) if custom_regex else None
        self.window.reconfigure(cfg.window_s, cfg.ignore_paths)

    # -- access log

    def feed(self, line: str, now: float | None = None) -> accesslog.AccessRecord | None:
        req = accesslog.parse_line(line, self.custom)
        if req is not None:
            self._pending.append((now if now is not None else time.time(), req))
        return req

    def feed_record(self, req: accesslog.AccessRecord, now: float | None = None) -> None:
        """A record from the drain shim's access channel (already parsed and checked)."""
        self._pending.append((now if now is not None else time.time(), req))

    def _settle(self, now: float) -> None:
        """Move parsed requests into the window, leaving out the daemon's own probes.

        uvicorn logs a request as its response starts, so the log line can reach us before the
        probe that sent it has learnt (and recorded) its local port: decide only for lines a
        little older than that race.
        """
        if not self._pending:
            return
        ports = self.probe_ports()
        while self._pending and self._pending[0][0] <= now - SETTLE_S:
            ts, req = self._pending.popleft()
            if not accesslog.is_probe(req, ports):
                self.window.add(ts, req)

    def errors_since(self, since: float) -> tuple[int, int]:
        self._settle(time.time())
        return self.window.errors_since(since)

    def errors_detail(self, since: float) -> accesslog.ErrorCount:
        self._settle(time.time())
        return self.window.errors_detail(since)

    # -- processes

    def _tree(self, roots: Iterable[int]) -> list[psutil.Process]:
        procs: list[psutil.Process] = []
        seen: set[int] = set()
        for pid in roots:
            try:
                root = self._cached(pid)
                below = descendants(pid)
                members = [root, *(root.children(recursive=True) if below is None else ())]
            except psutil.Error:
                continue
            for p in members:
                if p.pid not in seen:
                    seen.add(p.pid)
                    procs.append(self._cached(p.pid, p))
            for child in below or ():
                if child not in seen:
                    with contextlib.suppress(psutil.Error):
                        procs.append(self._cached(child))
                        seen.add(child)
        for pid in list(self._procs):
            if pid not in seen:
                del self._procs[pid]
        return procs

    def _cached(self, pid: int, proc: psutil.Process | None = None) -> psutil.Process:
        # cpu_percent() measures since the previous call on the same Process object: keep them.
        p = self._procs.get(pid)
        if p is None or not p.is_running():
            p = proc or psutil.Process(pid)
            self._procs[pid] = p
        return p

    def _resources(self, procs: list[psutil.Process]) -> tuple[int, float, int]:
        conns: set[tuple] = set()
        cpu = 0.0
        rss = 0
        for p in procs:
            try:
                with p.oneshot():
                    cpu += p.cpu_percent(None)
                    rss += p.memory_info().rss
                for c in p.net_connections(kind=self.conn_kind):
                    if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == self.port and c.raddr:
                        conns.add((c.laddr, c.raddr))
            except psutil.Error:
                continue
        return len(conns), cpu, rss

    def _tunnel_running(self) -> bool | None:
        """Whether `activity.tunnel_process` runs: the process once found is watched by its pid alone
        (a read of its own /proc entry per sample); only while none is known are all processes looked
        through, at most every TUNNEL_RESCAN_S (every sample, that walk was most of the idle CPU). A
        tunnel that stops is seen at the next sample; one that starts, within TUNNEL_RESCAN_S."""
        name = self.cfg.tunnel_process
        if not name:
            return None
        now = self._clock()
        if self._tunnel is not None:
            with contextlib.suppress(psutil.Error):
                if self._tunnel.is_running() and self._tunnel.status() != psutil.STATUS_ZOMBIE:
                    self.tunnel_checked_at = time.time()
                    return True
            # Gone: a service manager restarting it gives the new one another pid, so look at once.
            self._tunnel = None
        elif self._tunnel_scanned is not None and now - self._tunnel_scanned < TUNNEL_RESCAN_S:
            return False
        self._tunnel_scanned = now
        self.tunnel_checked_at = time.time()
        self._tunnel = find_process(name)
        return self._tunnel is not None

    # -- the sample

    def sample(self, app_pids: Iterable[int], app_up: bool, now: float | None = None) -> dict[str, Any]:
        now = now if now is not None else time.time()
        self._settle(now)
        procs = self._tree(app_pids)
        connections, cpu, rss = self._resources(procs)
        stats = self.window.stats(now)
        tunnel = self._tunnel_running()
        snap = policy.Snapshot(users=stats.users, requests_window=stats.requests, rpm=stats.rpm,
                               connections=connections, last_request=stats.last_request, tunnel=tunnel,
                               app_up=app_up, window_s=self.cfg.window_s,
                               tunnel_process=self.cfg.tunnel_process)
        verdict = policy.verdict(snap, self.safety)
        self.last_verdict = verdict
        clients = list(stats.clients.items())[:50]  # already busiest first
        self.last = {
            "verdict": verdict.color,
            "reasons": list(verdict.reasons),
            "users": stats.users,
            "requests_window": stats.requests,
            "rpm": round(stats.rpm, 1),
            "connections": connections,
            "last_request": iso(stats.last_request),
            "tunnel": tunnel,
            "tunnel_checked_at": iso(self.tunnel_checked_at) if tunnel is not None else None,
            "tunnel_rescan_s": TUNNEL_RESCAN_S,
            "cpu_percent": round(cpu, 1),
            "rss_bytes": rss,
            "processes": len(procs),
            "window_s": self.cfg.window_s,
            "clients": [{"address": a, "requests": n} for a, n in clients],
            "errors_5xx": stats.errors_5xx,
            "sampled_at": iso(now),
        }
        return self.last


def connection_kind(host: str) -> str:
    """psutil's `kind` for the connections accepted on the app's socket, bound to `host`.

    An IPv4 socket's connections are all in /proc/net/tcp, an IPv6 one's (v4-mapped included) in
    tcp6; on Linux each of those reads walks the kernel's whole TCP hash (milliseconds, however few
    sockets this machine has), so reading one table, not both, halves what a sample costs. A name
    is bound as IPv4 (listener.py); no host known: both.
    """
    if not host:
        return "tcp"
    try:
        return "tcp6" if ipaddress.ip_address(host).version == 6 else "tcp4"
    except ValueError:
        return "tcp4"


_KERNEL_CHILDREN = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


def descendants(pid: int) -> list[int] | None:
    """The pids below `pid`, from the kernel's own lists (Linux: /proc/<pid>/task/<tid>/children);
    None where there are none (other systems, a kernel without CONFIG_PROC_CHILDREN).

    psutil's children() builds a parent map from every /proc/<pid>/stat on the machine at each call,
    so an idle sample cost grew with everything else running; this grows with the app's tree only.
    A child is listed under the thread that forked it, so every thread's list is read.
    """
    if not _KERNEL_CHILDREN:
        return None
    out: list[int] = []
    seen = {pid}
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tids = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue  # gone meanwhile
        for tid in tids:
            try:
                with open(f"/proc/{parent}/task/{tid}/children", "rb") as f:
                    listed = f.read().split()
            except OSError:
                continue
            for raw in listed:
                child = int(raw)
                if child not in seen:
                    seen.add(child)
                    out.append(child)
                    todo.append(child)
    return out


def find_process(name: str) -> psutil.Process | None:
    """A live process named `name`, or None.

    On Linux the names are read from /proc/<pid>/comm directly: psutil.process_iter builds a Process
    and reads /proc/<pid>/stat for each of them, about ten times the cost. comm holds at most 15
    characters, so a longer name is compared in full (psutil restores it) only for a prefix match.
    """
    if sys.platform.startswith("linux"):
        want = name.encode()[:15]
        try:
            pids = [e for e in os.listdir("/proc") if e.isdigit()]
        except OSError:
            pids = []
        for pid in pids:
            try:
                fd = os.open(f"/proc/{pid}/comm", os.O_RDONLY)
            except OSError:
                continue
            try:
                comm = os.read(fd, 64).rstrip(b"\n")
            except OSError:
                continue
            finally:
                os.close(fd)
            if comm == want:
                with contextlib.suppress(psutil.Error):
                    p = psutil.Process(int(pid))
                    if p.name() == name and p.status() != psutil.STATUS_ZOMBIE:
                        return p
        return None
    for p in psutil.process_iter(["name"]):
        if p.info["name"] == name:
            with contextlib.suppress(psutil.Error):
                if p.status() != psutil.STATUS_ZOMBIE:
                    return p
    return None


ROLLUP_S = 300            # one line of activity_5m.jsonl per 5 minutes
ROLLUP_MAX_BYTES = 256 << 10  # ~15 days of 5-minute lines; trimmed to half past this


class History:
    """`state/activity.jsonl`: one line per sample, kept under `history_max_bytes` by dropping the
    oldest half when it grows past the limit (rewritten via a temp file).

    At 5 s sampling the default 5 MiB holds one to two days, so each 5 minutes also leaves one small
    line in `state/activity_5m.jsonl` (the peak users and requests/min): the status page's 7 days.
    """

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.rollup_path = path.with_name("activity_5m.jsonl")
        self._bucket: tuple[int, int, float] | None = None  # (start, peak users, peak rpm)

    def append(self, sample: dict[str, Any], now: float | None = None) -> None:
        row = {k: sample.get(k) for k in ("sampled_at", "verdict", "users", "requests_window", "rpm", "connections",
                                          "tunnel", "cpu_percent", "rss_bytes")}
        line = json.dumps(row, separators=(",", ":")) + "\n"
        with open(self.path, "a", encoding="utf-8", opener=fsutil.private_opener) as f:
            f.write(line)
            size = f.tell()
        if size > self.max_bytes:
            self._trim()
        self._roll(now if now is not None else time.time(), int(row["users"] or 0), float(row["rpm"] or 0.0))

    def _roll(self, now: float, users: int, rpm: float) -> None:
        start = int(now) // ROLLUP_S * ROLLUP_S
        b = self._bucket
        if b is not None and b[0] == start:
            self._bucket = (start, max(b[1], users), max(b[2], rpm))
            return
        self._bucket = (start, users, rpm)
        if b is None:
            return
        line = json.dumps({"t": b[0], "users": b[1], "rpm": round(b[2], 1)}, separators=(",", ":")) + "\n"
        with contextlib.suppress(OSError), open(self.rollup_path, "a", encoding="utf-8") as f:
            f.write(line)
            if f.tell() > ROLLUP_MAX_BYTES:
                f.close()
                data = self.rollup_path.read_bytes()
                keep = data[len(data) - ROLLUP_MAX_BYTES // 2:]
                fsutil.atomic_write(self.rollup_path, keep[keep.find(b"\n") + 1:], durable=False)

    def _trim(self) -> None:
        with open(self.path, "rb") as f:
            data = f.read()
        keep = data[len(data) - self.max_bytes // 2:]
        nl = keep.find(b"\n")
        fsutil.atomic_write(self.path, keep[nl + 1:] if nl >= 0 else b"", durable=False)

    def tail(self, n: int) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 400 * n))
                lines = f.read().splitlines()[-n:]
        except OSError:
            return []
        out = []
        for raw in lines:
            with contextlib.suppress(ValueError):
                out.append(json.loads(raw))
        return out
