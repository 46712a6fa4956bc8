"""A headless Chromium driven over the Chrome DevTools protocol, for the status page's browser test.

Test-only and stdlib-only: the browser is Debian's `chromium` package, the protocol is JSON over
one websocket, and the few frames we need (text out, text/ping/close in) take fifty lines here
rather than a client library.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import shutil
import socket
import struct
import subprocess
import threading
import urllib.request
from pathlib import Path
from typing import Any

from harness import wait_for

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--mute-audio", "--remote-debugging-port=0"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class WebSocket:
    def __init__(self, url: str, timeout: float = 10) -> None:
        assert url.startswith("ws://")
        hostport, _, path = url[5:].partition("/")
        host, _, port = hostport.partition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            head += chunk
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"websocket handshake refused: {head[:200]!r}")
        self.sock.settimeout(None)
        self._send_lock = threading.Lock()

    def send(self, text: str, opcode: int = 1) -> None:
        data = text.encode()
        n = len(data)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        body = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        with self._send_lock:
            self.sock.sendall(head + mask + body)

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("websocket closed")
            buf += chunk
        return buf

    def recv(self) -> str | None:
        """The next text message, or None when the browser closed the connection."""
        parts: list[bytes] = []
        while True:
            b0, b1 = self._exact(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._exact(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._exact(8))[0]
            payload = self._exact(n)
            opcode = b0 & 0x0F
            if opcode == 8:
                return None
            if opcode == 9:
                self.send(payload.decode(errors="replace"), opcode=10)
                continue
            if opcode in (0, 1, 2):
                parts.append(payload)
                if b0 & 0x80:
                    return b"".join(parts).decode()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class Browser:
    """One Chromium with a fresh profile and one page; console errors and exceptions are collected."""

    def __init__(self, profile: Path, width: int = 1280, height: int = 900) -> None:
        exe = find_chromium()
        assert exe, "chromium is not installed (apt-get install -y chromium)"
        profile.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                                      "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        port_file = profile / "DevToolsActivePort"
        port = wait_for(lambda: port_file.exists() and port_file.read_text().split("\n")[0].strip(), 30,
                        "chromium's DevTools port")

        def page_ws() -> str | None:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                targets = json.loads(r.read())
            return next((t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page"), None)
        self.ws = WebSocket(wait_for(page_ws, 30, "chromium's page target"))
        self._id = 0
        self._replies: dict[int, queue.Queue[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self.errors: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable")

    def _read(self) -> None:
        while True:
            try:
                text = self.ws.recv()
            except (OSError, ConnectionError):
                return
            if text is None:
                return
            msg = json.loads(text)
            if "id" in msg:
                with self._lock:
                    q = self._replies.get(msg["id"])
                if q is not None:
                    q.put(msg)
                continue
            method, params = msg.get("method"), msg.get("params") or {}
            if method == "Runtime.exceptionThrown":
                d = params.get("exceptionDetails") or {}
                self.errors.append("exception: " + str((d.get("exception") or {}).get("description") or d.get("text")))
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                args = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args") or [])
                self.errors.append(f"console.{params['type']}: {args}")
            elif method == "Log.entryAdded" and (params.get("entry") or {}).get("level") == "error":
                e = params["entry"]
                self.errors.append(f"log ({e.get('source')}): {e.get('text')} {e.get('url', '')}")

    def call(self, method: str, timeout: float = 30, **params: Any) -> dict[str, Any]:
        with self._lock:
            self._id += 1
            mid = self._id
            q: queue.Queue[dict[str, Any]] = queue.Queue()
            self._replies[mid] = q
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        try:
            msg = q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"chromium did not answer {method} within {timeout} s") from None
        finally:
            with self._lock:
                self._replies.pop(mid, None)
        if "error" in msg:
            raise AssertionError(f"{method}: {msg['error']}")
        return msg.get("result") or {}

    def eval(self, expression: str) -> Any:
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise AssertionError(f"{expression}: {r['exceptionDetails'].get('text')}")
        return (r.get("result") or {}).get("value")

    def navigate(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def viewport(self, width: int, height: int, mobile: bool = False) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1 if not mobile else 2, mobile=mobile)

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("Browser.close", timeout=5)
        self.ws.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)
            self.proc.wait(10)
