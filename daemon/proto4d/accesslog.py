"""Access-log lines -> request records, and a sliding window over them. Pure: no I/O, no clock.

This module owns what counts as "a request" in the app's output: parsing uvicorn's and
gunicorn's default access formats (or an operator's regex), telling the daemon's own probes
apart, matching `activity.ignore_paths`, and aggregating the records of the last
`activity.window_s` into the figures the verdict is computed from (users, requests per
minute, last request, 5xx answers). Time is always a parameter, so all of it is table-tested.

`parse_line` runs on every line the app prints, so it does the cheap substring checks
first and only runs a regex on lines that look like access-log lines.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
import sys
from collections import deque
from collections.abc import Container, Sequence
from dataclasses import dataclass

__all__ = [
    "AccessRecord",
    "ErrorCount",
    "RequestWindow",
    "WindowStats",
    "is_loopback",
    "is_probe",
    "parse_channel_record",
    "parse_line",
    "path_ignored",
    "rollback_for_5xx",
]

PROBE_USER_AGENT = "proto4d-probe"


@dataclass(frozen=True, slots=True)
class AccessRecord:
    client: str  # address as logged, without the port: "203.0.113.7", "::1" ("" when the server logs none)
    port: int | None  # uvicorn logs one; behind proxy headers it logs 0
    method: str  # "GET", ...; "WEBSOCKET" for uvicorn's WebSocket handshake lines
    path: str  # without the query string
    query: str  # without the '?', "" when none
    status: int
    user_agent: str | None = None  # only when the format carries it (gunicorn's default does)


# Both built-in formats are matched against the WHOLE line, from its first character to its last:
# an app that prints a student's text ("... - \"GET / HTTP/1.1\" 500") inside a longer line of its
# own is never a request. What may precede the record is what a logging configuration adds: a
# timestamp, the logger's name, the level. The client must be an IP address and the status a
# number from 100 to 599. A line printed in exactly the server's format cannot be told apart here
# (README, "Security"); the drain shim's access channel can.
_TIMESTAMP = r"\[?\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:[.,]\d+)?(?: ?(?:[+-]\d{2}:?\d{2}|Z|UTC))?\]?"
# uvicorn: '<levelprefix> <client>:<port> - "<METHOD> <target> HTTP/<v>" <status>[ <phrase>]', where
# <levelprefix> is "INFO:" padded to 9 columns (access lines are always INFO).
_UVICORN = re.compile(
    rf"(?:{_TIMESTAMP}\s+(?:-\s+)?)?"
    r"(?:\[\d{1,10}\]\s+)?"  # gunicorn's UvicornWorker: [<pid>]
    r'(?:"?uvicorn\.access"?\s+-\s+)?'
    r"(?:INFO:|INFO\s+-|\[INFO\])[ \t]+"
    r'(?P<client>\S*?) - "'
    r"(?:(?P<method>[A-Z]{1,20}) (?P<target>(?:/|\*|https?://)\S*) HTTP/\d(?:\.\d)?|WebSocket (?P<ws>/\S*))\" "
    r"(?:(?P<status>[1-5]\d\d)(?: [A-Za-z][A-Za-z '-]{0,40})?|(?P<accepted>\[accepted\]))[ \t]*"
)
_UVICORN_ANCHOR = ' - "'
# gunicorn: '<h> <l> <u> [<t>] "<request line>" <status> <bytes> "<referer>" "<user agent>"'; the
# referer and user agent are optional so the common log format parses too. A handler may put a
# bracketed timestamp in front.
_GUNICORN = re.compile(
    r"(?:\[[^\]]{1,40}\] )?"
    r"(?P<client>[0-9A-Fa-f.:]+) \S+ \S+ \[[^\]]{1,40}\] "
    r'"(?P<method>[A-Z]{1,20}) (?P<target>(?:/|\*|https?://)\S*) HTTP/\d(?:\.\d)?" (?P<status>[1-5]\d\d) (?:\d+|-)'
    r'(?: "[^"]*" "(?P<ua>[^"]*)")?[ \t]*'
)
_GUNICORN_ANCHOR = '] "'
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def parse_line(line: str, custom: re.Pattern[str] | None = None) -> AccessRecord | None:
    """The request an access-log line records, or None when the line is something else.

    `custom` (app.access_log_regex, compiled) is tried first; it needs the named groups client,
    method, path and status, and may have port, ua or user_agent, and query. When it does not
    match, the built-in formats are tried. Whatever matched, the client must be an IP address
    (or empty: a unix socket) and the status a number from 100 to 599, or the line is no request.
    """
    if "\x1b" in line:
        line = _ANSI.sub("", line)
    line = line.rstrip("\r\n")
    if custom is not None:
        req = _parse_custom(line, custom)
        if req is not None:
            return req
    if '"' not in line:
        return None
    if _UVICORN_ANCHOR in line:
        m = _UVICORN.fullmatch(line)
        if m is not None:
            return _uvicorn(m)
    if _GUNICORN_ANCHOR in line:
        m = _GUNICORN.fullmatch(line)
        if m is not None and _is_ip(m["client"]):
            path, query = _split_target(m["target"])
            return AccessRecord(sys.intern(m["client"]), None, m["method"], path, query, int(m["status"]), m["ua"])
    return None


CHANNEL_HELLO = {"v": 1}  # the drain shim's first line on the access channel


def parse_channel_record(line: str | bytes) -> AccessRecord | None:
    """One line of the drain shim's access channel -> the request it records, or None.

    The channel is the app process's own pipe, not its output, but the line is still checked like
    any input: a JSON object with the client ("host:port" as uvicorn logs it, an IP address or
    empty), the method, the target and a status from 100 to 599.
    """
    try:
        doc = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    client_addr, method, target, status = doc.get("c"), doc.get("m"), doc.get("t"), doc.get("s")
    if not (isinstance(client_addr, str) and isinstance(method, str) and isinstance(target, str)
            and type(status) is int and 100 <= status <= 599):
        return None
    if client_addr:
        client, port = split_hostport(client_addr)
        if port is None or port > 65535 or not _is_ip(client):
            return None
    else:
        client, port = "", None
    if not (method.isascii() and method.isalpha() and len(method) <= 20):
        return None
    path, query = _split_target(target)
    return AccessRecord(client, port, method.upper(), path, query, status)


def _uvicorn(m: re.Match[str]) -> AccessRecord | None:
    token = m["client"]
    if not token:
        # uvicorn logs an empty address when the peer has none (a unix socket)
        client, port = "", None
    else:
        client, port = split_hostport(token)
        if port is None or port > 65535 or not _is_ip(client):
            return None
    if m["ws"] is not None:
        path, query = _split_target(m["ws"])
        return AccessRecord(client, port, "WEBSOCKET", path, query, 101 if m["accepted"] else int(m["status"]))
    if m["status"] is None:
        return None  # "[accepted]" belongs to WebSocket lines only
    path, query = _split_target(m["target"])
    return AccessRecord(client, port, m["method"], path, query, int(m["status"]))


@functools.lru_cache(maxsize=4096)
def _is_ip(text: str) -> bool:
    """An IPv4 or IPv6 address (the few thousand clients of a day are cached)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _parse_custom(line: str, pattern: re.Pattern[str]) -> AccessRecord | None:
    m = pattern.search(line)
    if m is None:
        return None
    groups = m.groupdict()
    status_text = (groups.get("status") or "").strip()
    if not (status_text.isascii() and status_text.isdigit()):
        return None
    client = (groups.get("client") or "").strip()
    port: int | None = None
    port_text = groups.get("port")
    if port_text is not None:
        port_text = port_text.strip()
        port = int(port_text) if port_text.isascii() and port_text.isdigit() else None
        if client.startswith("[") and client.endswith("]"):
            client = client[1:-1]
    elif client.startswith("[") or client.count(":") == 1:
        # without a port group, split "1.2.3.4:5678" and "[::1]:5678"; a bare IPv6 address stays whole
        client, port = split_hostport(client)
    status = int(status_text)
    if not 100 <= status <= 599 or (client and not _is_ip(client)) or (port is not None and port > 65535):
        return None
    path, query = _split_target(groups.get("path") or "")
    q = groups.get("query")
    if q is not None:
        query = q[1:] if q.startswith("?") else q
    ua = groups.get("ua")
    if ua is None:
        ua = groups.get("user_agent")
    return AccessRecord(sys.intern(client), port, groups.get("method") or "", path, query, status, ua)


def split_hostport(token: str) -> tuple[str, int | None]:
    """'127.0.0.1:5000' -> ('127.0.0.1', 5000); '[::1]:5000' and uvicorn's '::1:5000' -> ('::1', 5000).

    uvicorn writes IPv6 clients without brackets, so a trailing ':<digits>' is always taken as
    the port: an IPv6 address logged without one would lose its last group.
    """
    if token.startswith("["):
        e = token.find("]")
        if e > 0:
            host, rest = token[1:e], token[e + 1:]
            if rest[:1] == ":" and rest[1:].isascii() and rest[1:].isdigit():
                return sys.intern(host), int(rest[1:])
            return sys.intern(host), None
    host, sep, p = token.rpartition(":")
    if sep and host and p.isascii() and p.isdigit():
        return sys.intern(host), int(p)
    return sys.intern(token), None


def _split_target(target: str) -> tuple[str, str]:
    q = target.find("?")
    if q < 0:
        return sys.intern(target), ""
    return sys.intern(target[:q]), target[q + 1:]


def is_loopback(client: str) -> bool:
    return (client.startswith("127.") or client in ("::1", "localhost", "0:0:0:0:0:0:0:1")
            or client.startswith("::ffff:127."))


def is_probe(req: AccessRecord, probe_ports: Container[int]) -> bool:
    """A request the daemon made itself: its user agent, or a loopback client on a port it used.

    Behind a tunnel every visitor is also a loopback client, so the port is what tells them
    apart; port 0 (uvicorn behind proxy headers) never identifies a probe.
    """
    ua = req.user_agent
    if ua is not None and ua.startswith(PROBE_USER_AGENT):
        return True
    return bool(req.port) and req.port in probe_ports and is_loopback(req.client)


def path_ignored(path: str, ignore_paths: Sequence[str]) -> bool:
    """Whether `path` is one of `ignore_paths`: exact, under an entry ("/health" covers "/health/db"),
    or starting with an entry that ends in "*" ("/static*").

    A trailing "/" on an entry is not significant; the entry "/" alone matches only "/" (it does
    not swallow every path).
    """
    for entry in ignore_paths:
        if path == entry:
            return True
        if entry.endswith("*"):
            if path.startswith(entry[:-1]):
                return True
            continue
        base = entry.rstrip("/")
        if base and (path == base or path.startswith(base + "/")):
            return True
    return False


# --------------------------------------------------------------------------- the window


@dataclass(frozen=True)
class WindowStats:
    requests: int  # in the window, ignore_paths excluded
    rpm: float  # requests per minute over the last 60 s (or the whole window when shorter)
    users: int  # distinct client addresses in the window, ignore_paths excluded
    clients: dict[str, int]  # address -> requests, busiest first
    last_request: float | None  # newest counted request seen, even when it has left the window
    errors_5xx: int  # 5xx answers among `requests`


@dataclass(frozen=True)
class ErrorCount:
    requests: int
    errors_5xx: int
    error_clients: int  # distinct client addresses among the 5xx answers


def rollback_for_5xx(count: ErrorCount, max_ratio: float, min_requests: int = 5, min_errors: int = 5,
                     min_clients: int = 2) -> str | None:
    """Why the 5xx answers since a switch call for a rollback, or None.

    The ratio alone would let one person (or an app printing fake access lines) force a rollback
    with a handful of failing requests: it takes at least `min_requests` requests, `min_errors`
    5xx answers, and 5xx answers to `min_clients` distinct clients (update.min_5xx_count and
    update.min_5xx_clients). A release that fails everyone is caught by the health checks anyway.
    """
    total, errors = count.requests, count.errors_5xx
    if total < max(1, min_requests) or errors < min_errors or count.error_clients < min_clients:
        return None
    if errors / total <= max_ratio:
        return None
    return (f"{errors} of {total} requests answered 5xx since the switch, to {count.error_clients} clients "
            f"({errors / total:.0%} > update.max_5xx_ratio {max_ratio:.0%})")


# A record: (ts, client, path, status, ignored). Tuples keep 200 000 of them small.
_Rec = tuple[float, str, str, int, bool]


class RequestWindow:
    """The requests of the last `window_s` seconds, with running counts so `stats` stays cheap.

    The caller feeds requests in the order it reads them and drops its own probes first.
    Timestamps are expected not to go backwards; an earlier one is counted at the newest time
    seen, so eviction stays in order. At most `max_records` are kept (the oldest go first), which
    bounds memory under a flood. `errors_since` only sees what is retained: a `since` older
    than the window (update.watch_s > activity.window_s) counts the retained part only.
    """

    def __init__(self, window_s: float, ignore_paths: Sequence[str] = (), max_records: int = 200_000) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s!r}")
        if max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records!r}")
        self.window_s = float(window_s)
        self.ignore_paths: tuple[str, ...] = tuple(ignore_paths)
        self.max_records = max_records
        self._recs: deque[_Rec] = deque()
        self._clients: dict[str, int] = {}
        self._count = 0
        self._errors = 0
        self._newest = float("-inf")
        self._last: float | None = None

    def __len__(self) -> int:
        return len(self._recs)

    def add(self, ts: float, req: AccessRecord) -> None:
        if ts < self._newest:
            ts = self._newest
        else:
            self._newest = ts
        ignored = bool(self.ignore_paths) and path_ignored(req.path, self.ignore_paths)
        if len(self._recs) >= self.max_records:
            self._drop(self._recs.popleft())
        self._recs.append((ts, req.client, req.path, req.status, ignored))
        if not ignored:
            self._count_in(req.client, req.status)
            self._last = ts

    def _count_in(self, client: str, status: int) -> None:
        self._count += 1
        self._clients[client] = self._clients.get(client, 0) + 1
        if status >= 500:
            self._errors += 1

    def _drop(self, rec: _Rec) -> None:
        _, client, _, status, ignored = rec
        if ignored:
            return
        self._count -= 1
        n = self._clients[client] - 1
        if n:
            self._clients[client] = n
        else:
            del self._clients[client]
        if status >= 500:
            self._errors -= 1

    def stats(self, now: float) -> WindowStats:
        """The figures for the window ending at `now`; records older than now - window_s leave for good."""
        cutoff = now - self.window_s
        recs = self._recs
        while recs and recs[0][0] < cutoff:
            self._drop(recs.popleft())
        span = min(60.0, self.window_s)
        since = now - span
        recent = 0
        for rec in reversed(recs):
            if rec[0] < since:
                break
            if not rec[4]:
                recent += 1
        clients = dict(sorted(self._clients.items(), key=lambda kv: (-kv[1], kv[0])))
        return WindowStats(
            requests=self._count,
            rpm=recent * 60.0 / span,
            users=len(clients),
            clients=clients,
            last_request=self._last,
            errors_5xx=self._errors,
        )

    def errors_since(self, since: float) -> tuple[int, int]:
        """(requests, 5xx answers) retained with ts >= since, ignore_paths included: a 5xx on
        /health matters after a switch."""
        total = errors = 0
        for rec in reversed(self._recs):
            if rec[0] < since:
                break
            total += 1
            if rec[3] >= 500:
                errors += 1
        return total, errors

    def errors_detail(self, since: float) -> ErrorCount:
        """`errors_since` with the number of distinct clients that got a 5xx."""
        total = errors = 0
        clients: set[str] = set()
        for rec in reversed(self._recs):
            if rec[0] < since:
                break
            total += 1
            if rec[3] >= 500:
                errors += 1
                clients.add(rec[1])
        return ErrorCount(total, errors, len(clients))

    def reconfigure(self, window_s: float, ignore_paths: Sequence[str]) -> None:
        """Apply a reloaded config. A shorter window takes effect at the next `stats`; a longer
        one cannot bring back what was already evicted."""
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s!r}")
        self.window_s = float(window_s)
        ignore = tuple(ignore_paths)
        if ignore == self.ignore_paths:
            return
        self.ignore_paths = ignore
        old = self._recs
        self._recs = deque()
        self._clients = {}
        self._count = self._errors = 0
        last = None
        for ts, client, path, status, _ in old:
            ignored = bool(ignore) and path_ignored(path, ignore)
            self._recs.append((ts, client, path, status, ignored))
            if not ignored:
                self._count_in(client, status)
                last = ts
        if last is not None:
            self._last = last
