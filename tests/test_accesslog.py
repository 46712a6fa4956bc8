"""Table tests for proto4d.accesslog: parsing real log lines, probes, ignored paths, the window."""

from __future__ import annotations

import re

import pytest

from proto4d.accesslog import (
    AccessRecord,
    ErrorCount,
    RequestWindow,
    WindowStats,
    is_loopback,
    is_probe,
    parse_channel_record,
    parse_line,
    path_ignored,
    rollback_for_5xx,
    split_hostport,
)

ESC = "\x1b"


def colour(text: str, code: str) -> str:
    return f"{ESC}[{code}m{text}{ESC}[0m"


def R(client: str, port: int | None, method: str, path: str, query: str, status: int,
      ua: str | None = None) -> AccessRecord:
    return AccessRecord(client, port, method, path, query, status, ua)


# --------------------------------------------------------------------------- parse_line, built-in formats

PARSE_ROWS = [
    # uvicorn 0.54 default, no colours
    ("uv054 basic", 'INFO:     127.0.0.1:54321 - "GET /x?y=1 HTTP/1.1" 200 OK',
     R("127.0.0.1", 54321, "GET", "/x", "y=1", 200)),
    ("uv054 multi-word phrase", 'INFO:     10.0.0.5:40000 - "GET /missing HTTP/1.1" 404 Not Found',
     R("10.0.0.5", 40000, "GET", "/missing", "", 404)),
    ("uv054 500", 'INFO:     10.0.0.5:40001 - "POST /api/chat HTTP/1.1" 500 Internal Server Error',
     R("10.0.0.5", 40001, "POST", "/api/chat", "", 500)),
    ("unknown status: empty phrase and trailing space", 'INFO:     10.0.0.5:40002 - "GET / HTTP/1.1" 599 ',
     R("10.0.0.5", 40002, "GET", "/", "", 599)),
    ("no phrase at all (0.24 style custom fmt)", 'INFO:     10.0.0.5:40003 - "GET / HTTP/1.1" 204',
     R("10.0.0.5", 40003, "GET", "/", "", 204)),
    ("uvicorn 0.24 line", 'INFO:     192.168.1.20:61000 - "GET /static/app.js HTTP/1.1" 304 Not Modified',
     R("192.168.1.20", 61000, "GET", "/static/app.js", "", 304)),
    ("HTTP/1.0", 'INFO:     127.0.0.1:5000 - "HEAD / HTTP/1.0" 200 OK',
     R("127.0.0.1", 5000, "HEAD", "/", "", 200)),
    ("HTTP/2", 'INFO:     127.0.0.1:5001 - "GET /h2 HTTP/2" 200 OK',
     R("127.0.0.1", 5001, "GET", "/h2", "", 200)),
    ("proxy headers: port 0", 'INFO:     203.0.113.7:0 - "GET /session?id=9&x= HTTP/1.1" 200 OK',
     R("203.0.113.7", 0, "GET", "/session", "id=9&x=", 200)),
    ("IPv6 as uvicorn writes it (no brackets)", 'INFO:     ::1:54321 - "GET / HTTP/1.1" 200 OK',
     R("::1", 54321, "GET", "/", "", 200)),
    ("IPv6 bracketed", 'INFO:     [::1]:54321 - "GET / HTTP/1.1" 200 OK',
     R("::1", 54321, "GET", "/", "", 200)),
    ("IPv6 global bracketed", 'INFO:     [2001:db8::7]:443 - "DELETE /item/3 HTTP/1.1" 204 No Content',
     R("2001:db8::7", 443, "DELETE", "/item/3", "", 204)),
    ("IPv6 global unbracketed", 'INFO:     2001:db8::7:50123 - "GET / HTTP/1.1" 200 OK',
     R("2001:db8::7", 50123, "GET", "/", "", 200)),
    ("IPv4-mapped IPv6", 'INFO:     ::ffff:198.51.100.4:8081 - "GET / HTTP/1.1" 200 OK',
     R("::ffff:198.51.100.4", 8081, "GET", "/", "", 200)),
    ("colours as uvicorn 0.54 prints them",
     colour("INFO", "32") + ":     127.0.0.1:54321 - \"" + f"{ESC}[1mGET /x?y=1 HTTP/1.1{ESC}[0m" + "\" "
     + colour("200 OK", "32"),
     R("127.0.0.1", 54321, "GET", "/x", "y=1", 200)),
    ("colours, 5xx bright red",
     colour("INFO", "32") + ":     10.1.1.1:1234 - \"" + f"{ESC}[1mPOST /boom HTTP/1.1{ESC}[0m" + "\" "
     + colour("503 Service Unavailable", "91"),
     R("10.1.1.1", 1234, "POST", "/boom", "", 503)),
    ("timestamp prefix from a log config",
     '2026-11-26 03:00:00,123 INFO:     127.0.0.1:54321 - "GET /x HTTP/1.1" 200 OK',
     R("127.0.0.1", 54321, "GET", "/x", "", 200)),
    ("logging-style prefix with ' - ' separators",
     '2026-11-26 03:00:00,123 - uvicorn.access - INFO - 172.16.0.9:3333 - "PUT /a/b?c HTTP/1.1" 201 Created',
     R("172.16.0.9", 3333, "PUT", "/a/b", "c", 201)),
    ("a prefix with its own ' - \"'",
     '2026-11-26 03:00:00 - "uvicorn.access" - INFO:     127.0.0.1:7 - "GET /p HTTP/1.1" 200 OK',
     R("127.0.0.1", 7, "GET", "/p", "", 200)),
    ("gunicorn running uvicorn workers",
     '[2026-11-26 03:00:00 +0900] [4242] [INFO] 10.0.0.8:5151 - "GET /w HTTP/1.1" 200',
     R("10.0.0.8", 5151, "GET", "/w", "", 200)),
    ("tab before the client", 'INFO:\t127.0.0.1:9 - "GET / HTTP/1.1" 200 OK',
     R("127.0.0.1", 9, "GET", "/", "", 200)),
    ("trailing newline", 'INFO:     127.0.0.1:9 - "GET / HTTP/1.1" 200 OK\n',
     R("127.0.0.1", 9, "GET", "/", "", 200)),
    ("unix socket: empty client", 'INFO:      - "GET / HTTP/1.1" 200 OK',
     R("", None, "GET", "/", "", 200)),
    ("quote inside the query string", 'INFO:     127.0.0.1:9 - "GET /s?q="hi" HTTP/1.1" 200 OK',
     R("127.0.0.1", 9, "GET", "/s", 'q="hi"', 200)),
    ("percent-encoded path stays encoded", 'INFO:     127.0.0.1:9 - "GET /caf%C3%A9 HTTP/1.1" 200 OK',
     R("127.0.0.1", 9, "GET", "/caf%C3%A9", "", 200)),
    ("empty query after '?'", 'INFO:     127.0.0.1:9 - "GET /x? HTTP/1.1" 200 OK',
     R("127.0.0.1", 9, "GET", "/x", "", 200)),
    ("WebSocket accepted", 'INFO:     127.0.0.1:50000 - "WebSocket /ws?room=3" [accepted]',
     R("127.0.0.1", 50000, "WEBSOCKET", "/ws", "room=3", 101)),
    ("WebSocket refused", 'INFO:     127.0.0.1:50001 - "WebSocket /ws" 403',
     R("127.0.0.1", 50001, "WEBSOCKET", "/ws", "", 403)),
    # gunicorn's default access format
    ("status at the bottom of the range", 'INFO:     10.0.0.5:1 - "GET / HTTP/1.1" 100 Continue',
     R("10.0.0.5", 1, "GET", "/", "", 100)),
    ("a phrase with an apostrophe", "INFO:     10.0.0.5:1 - \"GET / HTTP/1.1\" 418 I'm a Teapot",
     R("10.0.0.5", 1, "GET", "/", "", 418)),
    ("gunicorn default",
     '127.0.0.1 - - [26/Nov/2026:03:00:00 +0900] "GET / HTTP/1.1" 200 123 "-" "curl/8.5.0"',
     R("127.0.0.1", None, "GET", "/", "", 200, "curl/8.5.0")),
    ("gunicorn with query, user and a browser UA",
     '198.51.100.23 - alice [26/Nov/2026:03:00:01 +0900] "GET /api/x?page=2 HTTP/1.1" 502 0 '
     '"https://socratic.llmclass.org/" "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) Safari/605.1.15"',
     R("198.51.100.23", None, "GET", "/api/x", "page=2", 502,
       "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) Safari/605.1.15")),
    ("gunicorn size '-' puts ' - \"' before the referer",
     '10.0.0.1 - - [26/Nov/2026:03:00:02 +0900] "GET /empty HTTP/1.0" 304 - "-" "proto4d-probe/0.1"',
     R("10.0.0.1", None, "GET", "/empty", "", 304, "proto4d-probe/0.1")),
    ("gunicorn IPv6", '::1 - - [26/Nov/2026:03:00:03 +0900] "POST /login HTTP/1.1" 303 0 "-" "curl/8.5.0"',
     R("::1", None, "POST", "/login", "", 303, "curl/8.5.0")),
    ("common log format (no referer, no UA)",
     '10.0.0.2 - - [26/Nov/2026:03:00:04 +0900] "GET /plain HTTP/1.1" 200 17',
     R("10.0.0.2", None, "GET", "/plain", "", 200, None)),
    ("gunicorn behind a timestamped handler",
     '[2026-11-26 03:00:05 +0900] 10.0.0.3 - - [26/Nov/2026:03:00:05 +0900] "GET / HTTP/1.1" 200 5 "-" "x"',
     R("10.0.0.3", None, "GET", "/", "", 200, "x")),
]

JUNK_ROWS = [
    "INFO:     Started server process [12345]",
    "INFO:     Waiting for application startup.",
    "INFO:     Application startup complete.",
    "INFO:     Uvicorn running on socket ('0.0.0.0', 8000) (Press CTRL+C to quit)",
    "INFO:     Uvicorn running on http://127.0.0.1:8000 (Press CTRL+C to quit)",
    colour("INFO", "32") + ":     Uvicorn running on " + f"{ESC}[1mhttp://0.0.0.0:8000{ESC}[0m"
    + " (Press CTRL+C to quit)",
    "INFO:     Shutting down",
    "INFO:     connection open",
    "ERROR:    Exception in ASGI application",
    "Traceback (most recent call last):",
    '  File "/srv/app/.venv/lib/python3.11/site-packages/uvicorn/protocols/http/h11_impl.py", line 403, '
    'in run_asgi',
    '    result = await app(  # type: ignore[func-returns-value]',
    'httpx.HTTPStatusError: Client error \'404 Not Found\' for url \'http://x/ - "GET / HTTP/1.1"\'',
    'raise ValueError("bad - \\"GET\\" thing")',
    "[2026-11-26 03:00:00 +0900] [123] [INFO] Booting worker with pid: 123",
    '[2026-11-26 03:00:00 +0900] [123] [INFO] Listening at: http://0.0.0.0:8000 (123)',
    'INFO:     127.0.0.1:5 - "GET / HTTP/1.1" abc',
    'INFO:     127.0.0.1:5 - "GET / FTP/1.1" 200 OK',
    'INFO:     127.0.0.1:5 - "GET / HTTP/1.1" 20000',
    "",
    "\n",
    '"quoted but nothing else"',
    'print("hello") - "x"',
    '127.0.0.1 - - [26/Nov/2026:03:00:00 +0900] "garbage" 200 1 "-" "-"',
]

# What an app printing a student's text could make of a line: none of these is a request.
SPOOF_ROWS = [
    ("inside a chat message", 'chat from kim: 203.0.113.9:5 - "GET / HTTP/1.1" 500 Internal Server Error'),
    ("an app's own prefix", 'tutor> INFO:     203.0.113.9:5 - "GET / HTTP/1.1" 500 Internal Server Error'),
    ("text after the status", 'INFO:     203.0.113.9:5 - "GET / HTTP/1.1" 500 Internal Server Error, said the bot'),
    ("a name for the client", 'INFO:     student-42:5 - "GET / HTTP/1.1" 200 OK'),
    ("a hostname for the client", 'INFO:     evil.example:5 - "GET / HTTP/1.1" 200 OK'),
    ("five groups of digits", 'INFO:     1.2.3.4.5:5 - "GET / HTTP/1.1" 200 OK'),
    ("octets out of range", 'INFO:     300.2.3.4:5 - "GET / HTTP/1.1" 200 OK'),
    ("no port", 'INFO:     203.0.113.9 - "GET / HTTP/1.1" 200 OK'),
    ("port out of range", 'INFO:     203.0.113.9:70000 - "GET / HTTP/1.1" 200 OK'),
    ("status 600", 'INFO:     203.0.113.9:5 - "GET / HTTP/1.1" 600'),
    ("status 099", 'INFO:     203.0.113.9:5 - "GET / HTTP/1.1" 099'),
    ("ERROR level", 'ERROR:    203.0.113.9:5 - "GET / HTTP/1.1" 500 Internal Server Error'),
    ("lower-case method", 'INFO:     203.0.113.9:5 - "get / HTTP/1.1" 500'),
    ("a target that is no path", 'INFO:     203.0.113.9:5 - "GET hello HTTP/1.1" 500'),
    ("two records on one line",
     'INFO:     1.1.1.1:5 - "GET / HTTP/1.1" 200 OK INFO:     2.2.2.2:5 - "GET / HTTP/1.1" 500'),
    ("gunicorn with a name for the host", 'kim - - [26/Nov/2026:03:00:00 +0900] "GET / HTTP/1.1" 500 0 "-" "x"'),
    ("gunicorn inside a message", 'said: 10.0.0.1 - - [26/Nov/2026:03:00:00 +0900] "GET / HTTP/1.1" 500 0'),
    ("gunicorn with text after", '10.0.0.1 - - [26/Nov/2026:03:00:00 +0900] "GET / HTTP/1.1" 500 0 "-" "x" and more'),
]


@pytest.mark.parametrize("line", [r[1] for r in SPOOF_ROWS], ids=[r[0] for r in SPOOF_ROWS])
def test_a_look_alike_is_no_request(line: str) -> None:
    assert parse_line(line) is None


def test_a_line_in_exactly_the_servers_format_is_counted() -> None:
    # The documented limit of a parser: only the shim's access channel tells these apart.
    assert parse_line('INFO:     203.0.113.9:5 - "GET / HTTP/1.1" 500 Internal Server Error') is not None


def test_a_custom_regex_still_needs_an_address_and_a_status_in_range() -> None:
    pattern = re.compile(r'^(?P<client>\S+) (?P<method>\w+) (?P<path>\S+) (?P<status>\d+)$')
    assert parse_line("203.0.113.9 GET / 200", pattern) is not None
    assert parse_line("kim GET / 200", pattern) is None
    assert parse_line("203.0.113.9 GET / 999", pattern) is None


@pytest.mark.parametrize(("line", "expected"), [r[1:] for r in PARSE_ROWS], ids=[r[0] for r in PARSE_ROWS])
def test_parse_line(line: str, expected: AccessRecord) -> None:
    assert parse_line(line) == expected


@pytest.mark.parametrize("line", JUNK_ROWS)
def test_parse_line_junk(line: str) -> None:
    assert parse_line(line) is None


# --------------------------------------------------------------------------- parse_line, custom regex

CADDY_LIKE = re.compile(r'^(?P<client>\S+) (?P<method>[A-Z]+) (?P<path>\S+) -> (?P<status>\d{3})'
                        r'(?: ua="(?P<ua>[^"]*)")?$')
WITH_PORT = re.compile(r'client=(?P<client>\S+) port=(?P<port>\d+) req="(?P<method>\w+) (?P<path>[^ ?"]+)'
                       r'(?P<query>\?[^ "]*)?" status=(?P<status>\d+) agent="(?P<user_agent>[^"]*)"')
NO_PORT_GROUP = re.compile(r'^(?P<client>\S+) "(?P<method>\w+) (?P<path>\S+)" (?P<status>\S+)$')

CUSTOM_ROWS = [
    ("custom: path with query is split", CADDY_LIKE, "203.0.113.9 GET /a?b=1 -> 200",
     R("203.0.113.9", None, "GET", "/a", "b=1", 200)),
    ("custom: ua group", CADDY_LIKE, '203.0.113.9 POST /p -> 201 ua="curl/8"',
     R("203.0.113.9", None, "POST", "/p", "", 201, "curl/8")),
    ("custom: port, query and user_agent groups", WITH_PORT,
     'client=10.9.8.7 port=4321 req="GET /q?z=2" status=503 agent="k6/0.5"',
     R("10.9.8.7", 4321, "GET", "/q", "z=2", 503, "k6/0.5")),
    ("custom: bracketed client with port group", WITH_PORT,
     'client=[::1] port=4321 req="GET /q" status=200 agent="a"',
     R("::1", 4321, "GET", "/q", "", 200, "a")),
    ("custom without a port group: host:port is split", NO_PORT_GROUP, '127.0.0.1:6000 "GET /" 200',
     R("127.0.0.1", 6000, "GET", "/", "", 200)),
    ("custom without a port group: bare IPv6 stays whole", NO_PORT_GROUP, '2001:db8::1 "GET /" 200',
     R("2001:db8::1", None, "GET", "/", "", 200)),
    ("custom without a port group: [v6]:port", NO_PORT_GROUP, '[2001:db8::1]:77 "GET /" 200',
     R("2001:db8::1", 77, "GET", "/", "", 200)),
    ("custom is tried first (wins over uvicorn)",
     re.compile(r'(?P<client>\d+\.\d+\.\d+\.\d+):\d+ - "(?P<method>\w+) (?P<path>\S+) [^"]*" '
                r'(?P<status>\d+)'),
     'INFO:     127.0.0.1:54321 - "GET /x?y=1 HTTP/1.1" 200 OK',
     R("127.0.0.1", None, "GET", "/x", "y=1", 200)),
    ("custom that does not match falls back to the built-ins", CADDY_LIKE,
     'INFO:     127.0.0.1:54321 - "GET /x HTTP/1.1" 200 OK',
     R("127.0.0.1", 54321, "GET", "/x", "", 200)),
    ("custom with a non-numeric status falls back (and the built-ins see junk)", NO_PORT_GROUP,
     '127.0.0.1:6000 "GET /" OK', None),
    ("custom sees the line without colours", CADDY_LIKE, colour("203.0.113.9 GET /c -> 200", "1"),
     R("203.0.113.9", None, "GET", "/c", "", 200)),
]


@pytest.mark.parametrize(("pattern", "line", "expected"), [r[1:] for r in CUSTOM_ROWS],
                         ids=[r[0] for r in CUSTOM_ROWS])
def test_parse_line_custom(pattern: re.Pattern[str], line: str, expected: AccessRecord | None) -> None:
    assert parse_line(line, pattern) == expected


@pytest.mark.parametrize(("token", "expected"), [
    ("127.0.0.1:5000", ("127.0.0.1", 5000)),
    ("[::1]:5000", ("::1", 5000)),
    ("::1:5000", ("::1", 5000)),
    ("[::1]", ("::1", None)),
    ("10.0.0.1", ("10.0.0.1", None)),
    ("host.example:80", ("host.example", 80)),
    ("host:", ("host:", None)),
    (":80", (":80", None)),
    ("1.2.3.4:٣", ("1.2.3.4:٣", None)),  # non-ASCII digits are not a port
])
def test_split_hostport(token: str, expected: tuple[str, int | None]) -> None:
    assert split_hostport(token) == expected


# --------------------------------------------------------------------------- probes and ignored paths


@pytest.mark.parametrize(("req", "ports", "expected"), [
    (R("127.0.0.1", 50001, "GET", "/health", "", 200), {50001}, True),
    (R("127.0.0.1", 50002, "GET", "/health", "", 200), {50001}, False),  # a tunnel visitor on loopback
    (R("::1", 50001, "GET", "/", "", 200), {50001}, True),
    (R("127.0.0.2", 50001, "GET", "/", "", 200), {50001}, True),
    (R("::ffff:127.0.0.1", 50001, "GET", "/", "", 200), {50001}, True),
    (R("203.0.113.7", 50001, "GET", "/", "", 200), {50001}, False),  # same port, not loopback
    (R("127.0.0.1", 0, "GET", "/", "", 200), {0}, False),  # port 0 = proxy headers, never a probe
    (R("127.0.0.1", None, "GET", "/", "", 200), {50001}, False),
    (R("203.0.113.7", None, "GET", "/", "", 200, "proto4d-probe/0.1.0"), (), True),
    (R("203.0.113.7", None, "GET", "/", "", 200, "proto4d-probe"), (), True),
    (R("203.0.113.7", None, "GET", "/", "", 200, "curl/8 proto4d-probe"), (), False),
    (R("203.0.113.7", None, "GET", "/", "", 200, "Proto4d-Probe"), (), False),
])
def test_is_probe(req: AccessRecord, ports: set[int], expected: bool) -> None:
    assert is_probe(req, ports) is expected


@pytest.mark.parametrize(("client", "expected"), [
    ("127.0.0.1", True), ("127.255.0.3", True), ("::1", True), ("localhost", True),
    ("::ffff:127.0.0.1", True), ("0:0:0:0:0:0:0:1", True),
    ("128.0.0.1", False), ("10.127.0.1", False), ("::2", False), ("", False), ("1127.0.0.1", False),
])
def test_is_loopback(client: str, expected: bool) -> None:
    assert is_loopback(client) is expected


@pytest.mark.parametrize(("path", "ignore", "expected"), [
    ("/health", ["/health"], True),
    ("/health/db", ["/health"], True),
    ("/healthz", ["/health"], False),
    ("/healthz", ["/health*"], True),
    ("/health", ["/health*"], True),
    ("/static/app.js", ["/static/"], True),
    ("/static", ["/static/"], True),
    ("/staticky", ["/static/"], False),
    ("/", ["/"], True),
    ("/api", ["/"], False),  # "/" alone does not swallow everything
    ("/api", ["/*"], True),
    ("/metrics", ["/health", "/metrics"], True),
    ("/api/chat", ["/health", "/metrics"], False),
    ("/api/chat", [], False),
    ("/Health", ["/health"], False),  # paths are case-sensitive
])
def test_path_ignored(path: str, ignore: list[str], expected: bool) -> None:
    assert path_ignored(path, ignore) is expected


# --------------------------------------------------------------------------- RequestWindow


def req(client: str = "203.0.113.1", path: str = "/", status: int = 200) -> AccessRecord:
    return AccessRecord(client, 0, "GET", path, "", status)


T0 = 1_800_000_000.0


def test_window_eviction_at_the_edge() -> None:
    w = RequestWindow(300)
    w.add(T0, req("a"))
    w.add(T0 + 10, req("b"))
    # exactly window_s old is still inside
    s = w.stats(T0 + 300)
    assert (s.requests, s.users) == (2, 2)
    s = w.stats(T0 + 300.001)
    assert (s.requests, s.users, s.clients) == (1, 1, {"b": 1})
    s = w.stats(T0 + 310.001)
    assert (s.requests, s.users, s.clients, s.errors_5xx) == (0, 0, {}, 0)
    assert len(w) == 0
    # the last request survives eviction: `status` tells how long it has been quiet
    assert s.last_request == T0 + 10


@pytest.mark.parametrize(("window_s", "ages", "now_offset", "rpm"), [
    (300, [0, 30, 59.999], 60, 3.0),  # all within the last minute
    (300, [0], 60, 1.0),  # exactly 60 s old counts
    (300, [0], 60.001, 0.0),  # just older does not count for rpm...
    (300, [0, 61, 62], 120, 2.0),
    (30, [0, 10, 20], 30, 6.0),  # a 30 s window: 3 requests in 30 s = 6 per minute
    (30, [0], 30.001, 0.0),
    (300, [], 60, 0.0),
])
def test_window_rpm(window_s: float, ages: list[float], now_offset: float, rpm: float) -> None:
    w = RequestWindow(window_s)
    for a in ages:
        w.add(T0 + a, req())
    assert w.stats(T0 + now_offset).rpm == pytest.approx(rpm)


def test_window_rpm_counts_window_but_not_rpm() -> None:
    w = RequestWindow(300)
    w.add(T0, req())
    s = w.stats(T0 + 60.001)
    assert (s.requests, s.rpm) == (1, 0.0)


def test_window_distinct_users_and_client_order() -> None:
    w = RequestWindow(300)
    for i, c in enumerate(["x", "y", "y", "z", "y", "x", "::1"]):
        w.add(T0 + i, req(c))
    s = w.stats(T0 + 10)
    assert s.users == 4
    assert s.requests == 7
    assert list(s.clients.items()) == [("y", 3), ("x", 2), ("::1", 1), ("z", 1)]
    assert s.last_request == T0 + 6


def test_window_ignore_paths_and_5xx() -> None:
    w = RequestWindow(300, ignore_paths=["/health"])
    w.add(T0, req("a", "/health", 503))  # ignored in stats, counted by errors_since
    w.add(T0 + 1, req("b", "/api", 500))
    w.add(T0 + 2, req("b", "/api", 200))
    w.add(T0 + 3, req("c", "/health/db", 200))
    w.add(T0 + 4, req("b", "/api", 404))
    s = w.stats(T0 + 5)
    assert s == WindowStats(requests=3, rpm=3.0, users=1, clients={"b": 3}, last_request=T0 + 4, errors_5xx=1)
    assert w.errors_since(T0) == (5, 2)
    assert w.errors_since(T0 + 0.5) == (4, 1)
    assert w.errors_since(T0 + 2) == (3, 0)
    assert w.errors_since(T0 + 5) == (0, 0)


def test_window_only_ignored_requests_is_no_user() -> None:
    w = RequestWindow(300, ignore_paths=["/health"])
    w.add(T0, req("a", "/health"))
    s = w.stats(T0 + 1)
    assert (s.requests, s.users, s.last_request, s.rpm) == (0, 0, None, 0.0)


def test_window_errors_since_sees_only_what_is_retained() -> None:
    w = RequestWindow(60)
    w.add(T0, req(status=500))
    w.add(T0 + 100, req(status=502))
    w.stats(T0 + 120)  # evicts the first
    assert w.errors_since(T0 - 1) == (1, 1)


def test_window_5xx_leave_with_their_requests() -> None:
    w = RequestWindow(10)
    w.add(T0, req(status=500))
    w.add(T0 + 5, req(status=503))
    assert w.stats(T0 + 5).errors_5xx == 2
    assert w.stats(T0 + 11).errors_5xx == 1
    assert w.stats(T0 + 16).errors_5xx == 0


def test_window_bounded_memory() -> None:
    w = RequestWindow(300, max_records=100)
    for i in range(250):
        w.add(T0 + i * 0.01, req(f"c{i}", status=500 if i < 200 else 200))
    assert len(w) == 100
    s = w.stats(T0 + 3)
    assert s.requests == 100
    assert s.users == 100
    assert "c149" not in s.clients and "c150" in s.clients
    assert s.errors_5xx == 50  # c150..c199


def test_window_timestamps_going_backwards_are_clamped() -> None:
    w = RequestWindow(10)
    w.add(T0 + 5, req("a"))
    w.add(T0 + 1, req("b"))  # read later, counted at T0 + 5
    s = w.stats(T0 + 15)
    assert s.clients == {"a": 1, "b": 1}
    assert w.stats(T0 + 15.001).requests == 0


def test_window_reconfigure() -> None:
    w = RequestWindow(300, ignore_paths=["/health"])
    w.add(T0, req("a", "/health"))
    w.add(T0 + 100, req("b", "/api"))
    w.add(T0 + 200, req("c", "/metrics", 500))
    assert w.stats(T0 + 250).users == 2
    # /health counts now, /metrics no longer
    w.reconfigure(300, ["/metrics"])
    s = w.stats(T0 + 250)
    assert (s.users, sorted(s.clients), s.errors_5xx, s.last_request) == (2, ["a", "b"], 0, T0 + 100)
    # a shorter window applies at the next stats
    w.reconfigure(100, ["/metrics"])
    s = w.stats(T0 + 250)
    assert (s.requests, s.users) == (0, 0)
    assert w.errors_since(0) == (1, 1)  # /metrics 500 is retained and counted here
    # a longer window cannot bring back what was evicted
    w.reconfigure(1000, [])
    s = w.stats(T0 + 250)
    assert (s.requests, s.users, s.errors_5xx) == (1, 1, 1)


@pytest.mark.parametrize(("window_s", "max_records"), [(0, 10), (-1, 10), (10, 0)])
def test_window_rejects_bad_arguments(window_s: float, max_records: int) -> None:
    with pytest.raises(ValueError):
        RequestWindow(window_s, max_records=max_records)


def test_parse_then_window() -> None:
    """The pieces together, the way the daemon uses them: parse, drop probes, add, read stats."""
    lines = [
        (T0, 'INFO:     127.0.0.1:50001 - "GET /health HTTP/1.1" 200 OK'),  # the daemon's probe
        (T0 + 1, 'INFO:     203.0.113.7:0 - "GET / HTTP/1.1" 200 OK'),
        (T0 + 2, 'INFO:     198.51.100.2:0 - "POST /api/chat HTTP/1.1" 200 OK'),
        (T0 + 3, 'INFO:     127.0.0.1:40000 - "GET /health HTTP/1.1" 200 OK'),  # monitor, ignored path
        (T0 + 4, "INFO:     Application startup complete."),
        (T0 + 5, 'INFO:     203.0.113.7:0 - "GET /api/x HTTP/1.1" 500 Internal Server Error'),
    ]
    w = RequestWindow(300, ignore_paths=["/health"])
    for ts, line in lines:
        r = parse_line(line)
        if r is not None and not is_probe(r, {50001}):
            w.add(ts, r)
    s = w.stats(T0 + 10)
    assert (s.users, s.requests, s.errors_5xx) == (2, 3, 1)
    assert s.clients == {"203.0.113.7": 2, "198.51.100.2": 1}
    assert w.errors_since(T0) == (4, 1)


# --------------------------------------------------------------------------- the 5xx rollback rule


@pytest.mark.parametrize(("count", "expected"), [
    (ErrorCount(5, 5, 1), False),  # five failing requests from one client: one person, or one forger
    (ErrorCount(100, 100, 1), False),
    (ErrorCount(5, 5, 2), True),
    (ErrorCount(4, 4, 4), False),  # fewer than min_requests
    (ErrorCount(20, 4, 4), False),  # fewer than min_errors
    (ErrorCount(20, 5, 3), True),  # 25 % > 20 %
    (ErrorCount(25, 5, 3), False),  # exactly 20 % is not above it
    (ErrorCount(0, 0, 0), False),
])
def test_rollback_for_5xx(count: ErrorCount, expected: bool) -> None:
    why = rollback_for_5xx(count, 0.2)
    assert (why is not None) is expected
    if why:
        assert "update.max_5xx_ratio" in why and f"to {count.error_clients} clients" in why


def test_errors_detail_counts_distinct_clients_of_5xx_answers() -> None:
    w = RequestWindow(300)
    for i, (client, status) in enumerate([("a", 500), ("a", 502), ("b", 200), ("c", 503), ("c", 200)]):
        w.add(T0 + i, req(client, status=status))
    assert w.errors_detail(T0) == ErrorCount(5, 3, 2)
    assert w.errors_detail(T0 + 2) == ErrorCount(3, 1, 1)


# --------------------------------------------------------------------------- the shim's access channel


@pytest.mark.parametrize(("line", "expected"), [
    (b'{"c":"127.0.0.1:5000","m":"GET","t":"/x?y=1","s":200}', R("127.0.0.1", 5000, "GET", "/x", "y=1", 200)),
    (b'{"c":"203.0.113.7:0","m":"POST","t":"/api","s":502}\n', AccessRecord("203.0.113.7", 0, "POST", "/api", "", 502)),
    (b'{"c":"::1:5000","m":"GET","t":"/","s":200}', AccessRecord("::1", 5000, "GET", "/", "", 200)),
    (b'{"c":"","m":"GET","t":"/","s":200}', AccessRecord("", None, "GET", "/", "", 200)),
    (b'{"v":1}', None),
    (b'{"c":"kim:5","m":"GET","t":"/","s":200}', None),
    (b'{"c":"1.2.3.4","m":"GET","t":"/","s":200}', None),  # uvicorn always gives a port
    (b'{"c":"1.2.3.4:5","m":"GET","t":"/","s":600}', None),
    (b'{"c":"1.2.3.4:5","m":"GET","t":"/","s":true}', None),
    (b'{"c":"1.2.3.4:5","m":"GET","t":"/","s":"200"}', None),
    (b'{"c":"1.2.3.4:5","m":"G T","t":"/","s":200}', None),
    (b'[1,2]', None),
    (b'not json', None),
    (b'[' * 5000, None),
])
def test_parse_channel_record(line: bytes, expected: AccessRecord | None) -> None:
    assert parse_channel_record(line) == expected
