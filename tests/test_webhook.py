"""The webhook against real local receivers: only 2xx is delivered, a redirect is refused and logged
(never followed), and one deadline bounds the whole call even when the receiver trickles its answer."""

from __future__ import annotations

import asyncio
import http.server
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from proto4d import log
from proto4d.notices import Webhook


class Receiver:
    def __init__(self, behaviour: str) -> None:
        self.posts: list[str] = []
        owner = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

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
                    self.send_response(204)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

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
