"""The webhook against real local receivers: only 2xx is delivered, a redirect is refused and logged
(never followed), and one deadline bounds the whole call even when the receiver trickles its answer."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from harness import wait_for
from proto4d import log, notices
from proto4d.notices import Webhook


def serve(handler: type[http.server.BaseHTTPRequestHandler]) -> tuple[http.server.ThreadingHTTPServer, int]:
    """`handler` on a loopback port, in a thread of its own: (server, port)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


class Quiet(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1, no request logging, and the empty 204 every receiver here answers with."""

    protocol_version = "HTTP/1.1"

    def no_content(self) -> None:
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


class Receiver:
    def __init__(self, behaviour: str) -> None:
        self.posts: list[str] = []
        owner = self

        class H(Quiet):
            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(n)
                owner.posts.append(self.path)
                if behaviour == "redirect" and self.path.startswith("/hook"):
                    self.send_response(307)
                    self.send_header("Location", f"http://127.0.0.1:{owner.port}/elsewhere?token=leak")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif behaviour == "trickle":
                    self.send_response(200)
                    self.send_header("Content-Length", "100")
                    self.end_headers()
                    for _ in range(100):  # a byte every 0.2 s: no single read waits long
                        try:
                            self.wfile.write(b"x")
                            self.wfile.flush()
                        except OSError:
                            return
                        time.sleep(0.2)
                else:
                    self.no_content()

        self.server, self.port = serve(H)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def send_one(url: str, timeout: float, logfile: Path) -> tuple[list[dict[str, Any]], float]:
    log.setup(logfile, stderr=False)

    async def main() -> None:
        hook = Webhook(url, timeout)
        hook.send("update.done", {"id": "u1"})
        await hook.flush(timeout=30)

    t = time.monotonic()
    try:
        asyncio.run(main())
    finally:
        for h in logging.getLogger().handlers:
            h.flush()
        log.setup(None, stderr=False)
    took = time.monotonic() - t
    rows = [json.loads(x) for x in logfile.read_text().splitlines()] if logfile.exists() else []
    return [r for r in rows if r["event"] == "webhook.failed"], took


@pytest.mark.parametrize("behaviour", ["ok", "redirect", "trickle"])
def test_webhook_delivery(tmp_path: Path, behaviour: str) -> None:
    rx = Receiver(behaviour)
    try:
        failed, took = send_one(f"http://127.0.0.1:{rx.port}/hook/secret-path-token", 1.0, tmp_path / "d.log")
    finally:
        rx.close()
    assert rx.posts[:1] == ["/hook/secret-path-token"]
    if behaviour == "ok":
        assert failed == []
    elif behaviour == "redirect":
        assert rx.posts == ["/hook/secret-path-token"], "the redirect was followed"
        assert len(failed) == 1 and failed[0]["status"] == 307 and failed[0]["error"] == "redirect refused"
        assert failed[0]["location"] == f"http://127.0.0.1:{rx.port}/..."
    else:
        assert len(failed) == 1 and "webhook_timeout_s (1 s)" in failed[0]["error"], failed
        assert took < 3, f"the call took {took:.1f} s with a 1 s deadline"
    text = (tmp_path / "d.log").read_text() if (tmp_path / "d.log").exists() else ""
    assert "secret-path-token" not in text and "token=leak" not in text


class Holding:
    """A receiver that keeps every POST waiting until `release`, and counts how many wait at once."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.seqs: list[int] = []
        self.first_at = 0.0  # when the first POST arrived
        self.last_at = 0.0  # when the last one was answered
        self.waiting = 0
        self.most = 0
        self.lock = threading.Lock()
        self.released = threading.Event()
        owner = self

        class H(Quiet):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                with owner.lock:
                    owner.first_at = owner.first_at or time.monotonic()
                    owner.paths.append(body["event"])
                    owner.seqs.append(body["seq"])
                    owner.waiting += 1
                    owner.most = max(owner.most, owner.waiting)
                owner.released.wait(60)
                with owner.lock:
                    owner.waiting -= 1
                    owner.last_at = time.monotonic()
                self.no_content()

        self.server, self.port = serve(H)

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


def helpers() -> list[psutil.Process]:
    out = []
    for p in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if any(a.endswith("outbound.py") for a in p.cmdline()):
                out.append(p)
    return out


def test_one_helper_at_a_time_events_arrive_in_order_and_beyond_the_bound_are_dropped(tmp_path: Path) -> None:
    """A burst of events: one helper runs, eight wait their turn and arrive in the order sent, with `seq`
    counting up; the tenth is dropped with a log line and its number is the gap; the URL's token is in no
    helper's argv or environment."""
    rx = Holding()
    url = f"http://127.0.0.1:{rx.port}/hook/burst-token-4f2a"
    log.setup(tmp_path / "d.log", stderr=False)
    seen: dict[str, Any] = {}

    async def main() -> None:
        hook = Webhook(url, 30)
        for i in range(notices.MAX_RUNNING + notices.MAX_WAITING + 1):
            hook.send(f"e{i}", {"id": "u1"})
        while len(rx.paths) < notices.MAX_RUNNING:  # a condition on real progress, not a sleep
            await asyncio.sleep(0.05)
        running = helpers()
        seen["helpers"] = len(running)
        seen["shown"] = [" ".join(p.cmdline()) + repr(p.environ()) for p in running]
        rx.released.set()
        await hook.flush(timeout=60)
        hook.send("after", {"id": "u1"})  # the dropped event's number shows as a gap before this one
        await hook.flush(timeout=60)

    try:
        asyncio.run(asyncio.wait_for(main(), 90))
    finally:
        for h in logging.getLogger().handlers:
            h.flush()
        log.setup(None, stderr=False)
        rx.close()
    assert seen["helpers"] == notices.MAX_RUNNING, seen
    assert not [s for s in seen["shown"] if "burst-token" in s], seen["shown"]
    assert rx.most == notices.MAX_RUNNING == 1
    assert rx.paths == [f"e{i}" for i in range(notices.MAX_RUNNING + notices.MAX_WAITING)] + ["after"]
    first, sent = rx.seqs[0], notices.MAX_RUNNING + notices.MAX_WAITING
    assert rx.seqs == [*range(first, first + sent), first + sent + 1], rx.seqs
    rows = [json.loads(x) for x in (tmp_path / "d.log").read_text().splitlines()]
    dropped = [r for r in rows if r["event"] == "webhook.dropped"]
    assert [r["event_name"] for r in dropped] == [f"e{notices.MAX_RUNNING + notices.MAX_WAITING}"], rows
    assert dropped[0]["url"] == f"http://127.0.0.1:{rx.port}/..."
    assert not [r for r in rows if r["event"] == "webhook.failed"], rows
    assert "burst-token" not in (tmp_path / "d.log").read_text()


def test_a_reload_keeps_the_order_and_events_already_waiting_go_where_they_were_sent(tmp_path: Path) -> None:
    """A SIGHUP that changes the URL while events wait: those go to the old URL, in order, before the
    first event sent after the change reaches the new one (`configure`, not a second sender)."""
    old, new = Holding(), Holding()
    log.setup(tmp_path / "d.log", stderr=False)
    arrived: list[str] = []

    async def main() -> None:
        hook = Webhook(f"http://127.0.0.1:{old.port}/old", 30)
        for name in ("a", "b", "c"):
            hook.send(name, {"id": "u1"})
        while not old.paths:
            await asyncio.sleep(0.05)
        hook.configure(f"http://127.0.0.1:{new.port}/new", 30)
        hook.send("d", {"id": "u1"})
        new.released.set()  # the new URL answers at once: only the order can keep "d" behind "c"
        old.released.set()
        await hook.flush(timeout=60)
        arrived.extend(old.paths + new.paths)

    try:
        asyncio.run(asyncio.wait_for(main(), 90))
    finally:
        log.setup(None, stderr=False)
        old.close()
        new.close()
    assert old.paths == ["a", "b", "c"] and new.paths == ["d"], arrived
    assert new.seqs[0] == old.seqs[-1] + 1, (old.seqs, new.seqs)
    assert new.first_at >= old.last_at, "the event sent after the reload overtook those sent before it"


SENDER = """
import asyncio, sys
from proto4d.notices import Webhook

async def main():
    Webhook(sys.argv[1], 30).send("update.done", {"id": "u1"})
    await asyncio.Event().wait()

asyncio.run(main())
"""


def test_a_daemon_killed_during_a_delivery_leaves_no_helper(tmp_path: Path) -> None:
    """The helper holds the daemon's pipe: SIGKILL the sender mid-call and the helper ends with it."""
    rx = Holding()
    sender = subprocess.Popen([sys.executable, "-c", SENDER, f"http://127.0.0.1:{rx.port}/hook/t"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: rx.paths or sender.poll() is not None, 30, "the POST")
        assert rx.paths == ["update.done"]
        helper = [p for p in psutil.Process(sender.pid).children() if p.status() != psutil.STATUS_ZOMBIE]
        assert len(helper) == 1 and helper[0].cmdline()[-1].endswith("outbound.py"), helper
        sender.kill()
        sender.wait()
        _gone, alive = psutil.wait_procs(helper, timeout=10)
        assert alive == [], "the helper outlived its daemon"
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
        rx.close()
