"""The attacks of issue 11 against a real daemon and a real app (the sample app under uvicorn, through the
drain shim): what the app prints, what a request carries, and what the app can see of the daemon.

ATTACKS is the table: each row is something a student (through the app's output) or a request can do,
and the figure in `status` it must NOT move (or, for forwarded clients, must move by exactly that much).
All rows run against one daemon, so the whole table costs one start.
"""

from __future__ import annotations

import http.client
import json
import os
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from harness import wait_for

pytestmark = pytest.mark.e2e

FAKE_USERS = "\n".join(f'INFO:     198.51.100.{i}:4{i:04d} - "GET /lesson HTTP/1.1" 200 OK' for i in range(1, 40))
FAKE_5XX = "\n".join(f'INFO:     203.0.113.{i}:5{i:04d} - "POST /api/chat HTTP/1.1" 500 Internal Server Error'
                     for i in range(1, 40))
EMBEDDED = 'student kim says: 192.0.2.7:5555 - "GET / HTTP/1.1" 503 Service Unavailable'
ESCAPES = "\x1b]0;owned\x07\x1b[2J\x9b31m\x1b]52;c;cm0gLXJmIH4=\x07 hello"


def request(port: int, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body=body, headers={"User-Agent": "test-client", **(headers or {})})
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


def say(text: str) -> Callable[[int], None]:
    def act(port: int) -> None:
        assert request(port, "POST", "/say", text.encode()) == 200
    return act


def forwarded(*headers: dict[str, str]) -> Callable[[int], None]:
    def act(port: int) -> None:
        for h in headers:
            assert request(port, "GET", "/version", headers=h) == 200
    return act


@dataclass(frozen=True)
class Attack:
    id: str
    act: Callable[[int], None]
    new_clients: frozenset[str]  # the client addresses this row may add (beyond 127.0.0.1)


ATTACKS = [
    Attack("app prints 39 fake users in uvicorn's exact format", say(FAKE_USERS), frozenset()),
    Attack("app prints 39 fake 5xx answers in uvicorn's exact format", say(FAKE_5XX), frozenset()),
    Attack("app prints a look-alike inside a chat line", say(EMBEDDED), frozenset()),
    Attack("app prints terminal escapes (title, clear, clipboard)", say(ESCAPES), frozenset()),
    Attack("two students forwarded by the tunnel (X-Forwarded-For + CF-Connecting-IP)",
           forwarded({"X-Forwarded-For": "203.0.113.21", "CF-Connecting-IP": "203.0.113.21"},
                     {"X-Forwarded-For": "203.0.113.22", "CF-Connecting-IP": "203.0.113.22"},
                     {"X-Forwarded-For": "203.0.113.22", "CF-Connecting-IP": "203.0.113.22"}),
           frozenset({"203.0.113.21", "203.0.113.22"})),
    Attack("a forwarded header that is no address", forwarded({"X-Forwarded-For": "kim; DROP TABLE"}), frozenset()),
]


def activity(d: Any) -> dict[str, Any]:
    return d.status()["activity"]


def activity_with(d: Any, addresses: set[str]) -> dict[str, Any] | None:
    act = activity(d)
    return act if addresses <= {c["address"] for c in act["clients"]} else None


def test_the_attack_table(make_daemon):
    d = make_daemon(activity={"window_s": 60}).start(
        env={"SSH_AUTH_SOCK": "/tmp/agent.sock", "PROTO4D_TEST_SECRET": "daemon-only", "AWS_SECRET_ACCESS_KEY": "k"})
    wait_for(lambda: any(e.get("event") == "app.ready" for e in d.log_events()), 10, "app.ready")
    d.wait_status(lambda s: s["app"]["access_records"] == "the drain shim's channel", 10, "the shim's channel")

    seen: set[str] = set()
    failures = []
    for attack in ATTACKS:
        sampled = activity(d)["sampled_at"]
        attack.act(d.port)
        # Wait until a sample has seen this row's requests (they settle for 0.25 s, then the next sample).
        act = d.wait_status(lambda s, sampled=sampled: s["activity"]["sampled_at"] != sampled
                            and s["activity"]["requests_window"] > 0, 10, f"a sample after {attack.id}")["activity"]
        act = wait_for(lambda attack=attack: activity_with(d, set(attack.new_clients)), 5,
                       f"the clients of {attack.id}")
        clients = {c["address"] for c in act["clients"]}
        added = clients - seen - {"127.0.0.1"}
        if added != attack.new_clients:
            failures.append(f"{attack.id}: added clients {sorted(added)}, expected {sorted(attack.new_clients)}")
        if act["errors_5xx"] != 0:
            failures.append(f"{attack.id}: {act['errors_5xx']} 5xx answers counted; the app answered none")
        seen |= clients
    assert failures == [], "\n".join(failures)
    assert activity(d)["users"] == 3  # the two forwarded students and the test client on loopback

    # The fake lines and the escapes are in app.log as printed (the log is faithful) ...
    app_log = (d.root / "logs" / "app.log").read_text(errors="replace")
    assert "198.51.100.39:40039" in app_log and "\x1b]0;owned" in app_log
    # ... and reach no view.
    for args in (("status",), ("activity",), ("releases",)):
        out = d.cli(*args).stdout
        assert "\x1b" not in out and "\x9b" not in out and "\x07" not in out, (args, out)

    # The app sees none of the daemon's environment beyond the allowlist.
    for key, expected in (("SSH_AUTH_SOCK", None), ("PROTO4D_TEST_SECRET", None), ("AWS_SECRET_ACCESS_KEY", None),
                          ("PROTO4D_ACCESS_FD", None), ("HOME", os.environ.get("HOME"))):
        got = d.get(f"/env?key={key}")["value"]
        assert got == expected, (key, got)
    assert d.get("/env?key=PROTO4D_RELEASE")["value"] == d.status()["app"]["release"]

    # State and logs are private to the daemon's user.
    for rel in ("state/status.json", "logs/app.log", "logs/proto4d.log", "state/journal.json"):
        p = d.root / rel
        if p.exists():
            assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, (rel, oct(p.stat().st_mode))
    assert d.stop() == 0


def test_without_the_shim_only_exact_format_lines_can_be_forged(make_daemon):
    """app.drain: sigterm runs uvicorn without the shim, so there is no channel: the anchored parser
    refuses look-alikes inside longer lines but cannot refuse a line in the exact format (README)."""
    d = make_daemon(activity={"window_s": 60}, app={"drain": "sigterm"}).start()
    assert d.status()["app"]["access_records"] == "parsed from the app's output"
    assert "access   records parsed from the app's output" in d.cli("status").stdout
    say(EMBEDDED + "\n" + "tutor> " + FAKE_5XX.splitlines()[0])(d.port)
    say('INFO:     192.0.2.99:1234 - "GET / HTTP/1.1" 200 OK')(d.port)
    act = wait_for(lambda: activity_with(d, {"192.0.2.99"}), 10, "the exact-format line counted")
    assert {c["address"] for c in act["clients"]} == {"127.0.0.1", "192.0.2.99"}
    assert act["errors_5xx"] == 0
    out = subprocess.run(["cat", str(d.root / "state" / "status.json")], capture_output=True, text=True).stdout
    assert json.loads(out)["activity"]["users"] == 2
    assert d.stop() == 0
