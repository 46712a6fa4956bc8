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
import socket
import struct
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
        # Socket inodes of the app's tree that are no connection to count, and can never become one
        # (see _connections); None until the first look, and where /proc is not there to look.
        self._quiet: set[int] | None = None
        self._tunnel: psutil.Process | None = None
        self._tunnel_scanned: float | None = None  # clock() of the last walk through every process
        self.tunnel_checked_at: float | None = None  # wall time the tunnel was last looked at (status)
        self._clock = clock
        self.last: dict[str, Any] = {}
        self.last_verdict: policy.Verdict | None = None

    def reconfigure(self, cfg: ActivityConfig, safety: SafetyConfig, port: int, custom_regex: str,
                    host: str = "") -> None:
        if cfg.tunnel_process != self.cfg.tunnel_process:
            self._tunnel, self._tunnel_scanned = None, None  # another name: look for it at the next sample
        if (port, connection_kind(host)) != (self.port, self.conn_kind):
            self._quiet = None  # found quiet on another port or family: look again
        self.cfg, self.safety, self.port = cfg, safety, port
        self.conn_kind = connection_kind(host)
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
        cpu = 0.0
        rss = 0
        for p in procs:
            try:
                with p.oneshot():
                    cpu += p.cpu_percent(None)
                    rss += p.memory_info().rss
            except psutil.Error:
                continue
        return self._connections(procs), cpu, rss

    def _connections(self, procs: list[psutil.Process]) -> int:
        """Established connections accepted on the app's port and held by its tree.

        psutil reads them from /proc/net/tcp, for which the kernel walks its whole TCP hash (every
        bucket, every namespace's sockets): milliseconds per sample, most of the idle daemon's CPU.
        On Linux, the tree's socket inodes are read from /proc/<pid>/fd instead, and the table is
        asked only when one of them is not known to be quiet. A socket counted here is one the app
        accepted, which is a new socket (a new inode) every time; the others (the listening sockets,
        socketpairs, outgoing connections, one past ESTABLISHED) can never become one. So while the
        tree holds only sockets already found quiet, the count is 0 without asking; when it must
        ask, it asks the kernel (sock_diag) for the established sockets of the port alone, which
        skips the formatting of every socket as text. Elsewhere (macOS: psutil reads the process's
        own descriptors, no table) and when neither works, psutil as before.
        """
        inodes = socket_inodes([p.pid for p in procs]) if _PROC_FD else None
        if inodes is not None:
            quiet = self._quiet
            if quiet is not None and inodes <= quiet:
                self._quiet = quiet & inodes  # forget closed ones
                return 0
            table = established_on_port(self.port, self.conn_kind)
            if table is not None:
                self._quiet = {i for i in inodes if i not in table}
                return len({table[i] for i in inodes if i in table})
        self._quiet = None
        conns: set[tuple] = set()
        for p in procs:
            try:
                for c in p.net_connections(kind=self.conn_kind):
                    if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == self.port and c.raddr:
                        conns.add((c.laddr, c.raddr))
            except psutil.Error:
                continue
        return len(conns)

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


_PROC_FD = os.path.isdir(f"/proc/{os.getpid()}/fd")


def socket_inodes(pids: Iterable[int]) -> set[int] | None:
    """The inodes of the sockets the processes hold (/proc/<pid>/fd links `socket:[N]`), or None when a
    process's descriptors cannot be read (not gone: unreadable, e.g. another user's)."""
    out: set[int] = set()
    for pid in pids:
        base = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(base)
        except FileNotFoundError:
            continue  # gone meanwhile: it holds nothing
        except OSError:
            return None
        for fd in fds:
            try:
                target = os.readlink(f"{base}/{fd}")
            except OSError:
                continue  # closed meanwhile
            if target.startswith("socket:["):
                with contextlib.suppress(ValueError):
                    out.add(int(target[8:-1]))
    return out


# sock_diag (linux/inet_diag.h): one dump request for TCP sockets of a family, in given states, with a
# given local port; the kernel answers one inet_diag_msg per socket.
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_TCP_ESTABLISHED = 1
_NLMSG = struct.Struct("=IHHII")
# inet_diag_msg: family, state, timer, retrans; sport, dport (big-endian); src, dst (16 bytes each); ...; inode
_DIAG_MSG = struct.Struct("=BBBB2H16s16s4x8x4x4x4x4xI")


def established_on_port(port: int, kind: str) -> dict[int, tuple] | None:
    """inode -> ((local address, port), (remote address, port)) of every ESTABLISHED TCP socket whose local
    port is `port`, for the families of psutil's `kind` (tcp4, tcp6, tcp); None where sock_diag is not
    available (not Linux, refused)."""
    if not hasattr(socket, "AF_NETLINK"):
        return None
    families = {"tcp4": (socket.AF_INET,), "tcp6": (socket.AF_INET6,)}.get(kind, (socket.AF_INET, socket.AF_INET6))
    out: dict[int, tuple] = {}
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as nl:
            nl.settimeout(5)
            for seq, family in enumerate(families, 1):
                # inet_diag_req_v2: family, protocol, ext, pad, states; id: sport, dport (big-endian), src, dst,
                # interface, cookie (no cookie: all ones)
                req = (struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 1 << _TCP_ESTABLISHED)
                       + struct.pack(">HH", port, 0) + bytes(32) + struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF))
                nl.sendall(_NLMSG.pack(_NLMSG.size + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP,
                                       seq, 0) + req)
                if not _read_dump(nl, seq, family, port, out):
                    return None
    except OSError:
        return None
    return out


def _read_dump(nl: socket.socket, seq: int, family: int, port: int, out: dict[int, tuple]) -> bool:
    size = 16 if family == socket.AF_INET6 else 4
    while True:
        data = nl.recv(1 << 16)
        if not data:
            return False
        off = 0
        while off + _NLMSG.size <= len(data):
            length, kind, _flags, got_seq, _pid = _NLMSG.unpack_from(data, off)
            if length < _NLMSG.size:
                return False
            body = off + _NLMSG.size
            off += (length + 3) & ~3
            if got_seq != seq:
                continue
            if kind == _NLMSG_DONE:
                return True
            if kind == _NLMSG_ERROR:
                return False
            if length - _NLMSG.size < _DIAG_MSG.size:
                continue
            fam, state, _t, _r, sport, dport, src, dst, inode = _DIAG_MSG.unpack_from(data, body)
            sport, dport = socket.ntohs(sport), socket.ntohs(dport)
            if state != _TCP_ESTABLISHED or sport != port or fam != family:
                continue  # what the request asked the kernel to leave out
            out[inode] = ((socket.inet_ntop(family, src[:size]), sport), (socket.inet_ntop(family, dst[:size]), dport))


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
