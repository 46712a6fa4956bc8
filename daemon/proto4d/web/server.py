"""The HTTP side of `proto4d web`: the page, its JSON, the update logs (read-only) and /metrics.

Stdlib `ThreadingHTTPServer`: a handful of readers at most, every answer computed from files in
milliseconds, and no extra dependency. GET and HEAD only; nothing here changes anything.
With `web.token` set every request needs it (an `Authorization: Bearer` header, or `?token=`
once, which sets a cookie); without one the server only listens on loopback (config refuses
otherwise) and checks the Host header so a page elsewhere cannot read it by DNS rebinding.
"""

from __future__ import annotations

import argparse
import hmac
import json
import re
import signal
import socket
import sys
import threading
import urllib.parse
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from proto4d import config as configmod
from proto4d.web import history
from proto4d.web.state import StateReader, update_log_path

STATIC = Path(__file__).with_name("static")
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
COOKIE = "proto4d_token"
# Escape sequences and other control characters (tab and newline stay) from logs shown as text.
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def plain(text: str) -> str:
    return _CONTROL.sub("", text)


class WebServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, cfg: configmod.Config, reader: StateReader) -> None:
        self.cfg = cfg
        self.reader = reader
        from proto4d.web import metrics
        self.registry = metrics.registry(metrics.StateCollector(reader.snapshot, reader.updates.all))
        self.address_family = socket.AF_INET6 if ":" in cfg.web.host else socket.AF_INET
        super().__init__((cfg.web.host, cfg.web.port), Handler)
        self.port = self.server_address[1]
        self.hosts = {f"{h}:{self.port}" for h in ("127.0.0.1", "localhost", "[::1]", cfg.web.host)}


class Handler(BaseHTTPRequestHandler):
    server: WebServer
    protocol_version = "HTTP/1.1"
    server_version = "proto4d-web"
    sys_version = ""
    _head = False

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a page polling every 2 s would fill any log; errors are answered, not logged

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _not_allowed(self) -> None:
        self.close_connection = True  # its body is never read
        self._send(405, b"read-only: GET and HEAD only\n", "text/plain; charset=utf-8", extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = _not_allowed

    # -- routing

    def _route(self, head: bool) -> None:
        self._head = head
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        token = self.server.cfg.web.token
        if token:
            given = query.get("token", [""])[0]
            if given and hmac.compare_digest(given.encode(), token.encode()):
                # Remember it in a cookie and drop it from the address bar (and from any history).
                self._send(303, b"", "text/plain", extra={
                    "Location": url.path or "/",
                    "Set-Cookie": f"{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"})
                return
            if not self._authorised(token):
                self._send(401, b"a token is required (web.token): ?token=... once, or Authorization: Bearer\n",
                           "text/plain; charset=utf-8", extra={"WWW-Authenticate": "Bearer"})
                return
        elif self.headers.get("Host", "") not in self.server.hosts:
            self._send(421, b"unknown Host\n", "text/plain; charset=utf-8")
            return
        path = url.path
        try:
            if path in ("/", "/index.html"):
                self._file(STATIC / "index.html")
            elif path.startswith("/static/"):
                name = path[len("/static/"):]
                files = {p.name for p in STATIC.iterdir()}
                if name in files:
                    self._file(STATIC / name)
                else:
                    self._send(404, b"not found\n", "text/plain; charset=utf-8")
            elif path == "/api/state":
                self._json(self.server.reader.snapshot())
            elif path == "/api/history":
                span = query.get("span", ["24h"])[0]
                if span not in history.SPANS:
                    self._send(400, f"span: expected one of {', '.join(history.SPANS)}\n".encode(),
                               "text/plain; charset=utf-8")
                    return
                self._json(self.server.reader.history(span))
            elif path.startswith("/logs/"):
                self._update_log(urllib.parse.unquote(path[len("/logs/"):]))
            elif path == "/metrics":
                from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
                self._send(200, generate_latest(self.server.registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._send(200, b"ok\n", "text/plain; charset=utf-8")
            else:
                self._send(404, b"not found\n", "text/plain; charset=utf-8")
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # one bad file must not take the page down: say what, keep serving
            self._send(500, f"proto4d web: {type(e).__name__}: {e}\n".encode(), "text/plain; charset=utf-8")

    def _authorised(self, token: str) -> bool:
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer ") and hmac.compare_digest(auth[7:].strip().encode(), token.encode()):
            return True
        cookie = SimpleCookie()
        try:
            cookie.load(self.headers.get("Cookie", ""))
        except Exception:
            return False
        morsel = cookie.get(COOKIE)
        return morsel is not None and hmac.compare_digest(morsel.value.encode(), token.encode())

    def _update_log(self, name: str) -> None:
        p = update_log_path(self.server.reader.paths, name)
        if p is None:
            self._send(404, b"no such update log\n", "text/plain; charset=utf-8")
            return
        text = p.read_bytes()[-2_000_000:].decode("utf-8", errors="replace")
        self._send(200, plain(text).encode("utf-8"), "text/plain; charset=utf-8")

    def _file(self, p: Path) -> None:
        self._send(200, p.read_bytes(), TYPES.get(p.suffix, "application/octet-stream"))

    def _json(self, obj: Any) -> None:
        self._send(200, json.dumps(obj, separators=(",", ":")).encode(), "application/json")

    def _send(self, code: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", CSP)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not self._head:
            self.wfile.write(body)


def serve(cfg: configmod.Config) -> WebServer:
    return WebServer(cfg, StateReader(cfg))


def cmd_web(args: argparse.Namespace) -> int:
    cfg = configmod.load(args.config)
    if args.port is not None:
        cfg = _with_port(cfg, args.port)
    try:
        server = serve(cfg)
    except OSError as e:
        print(f"proto4d web: cannot listen on {cfg.web.host}:{cfg.web.port} (web.listen in {cfg.source}): "
              f"{e.strerror or e}", file=sys.stderr)
        return 1
    host = f"[{cfg.web.host}]" if ":" in cfg.web.host else cfg.web.host
    print(f"proto4d web: the status page on http://{host}:{server.port}/ and /metrics "
          f"(reading {cfg.root}){'; token required' if cfg.web.token else ''}", file=sys.stderr, flush=True)

    def stop(*_: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
    return 0


def _with_port(cfg: configmod.Config, port: int) -> configmod.Config:
    import dataclasses
    return dataclasses.replace(cfg, web=dataclasses.replace(cfg.web, port=port))
