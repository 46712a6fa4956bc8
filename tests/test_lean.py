"""OpenSSL and httpx stay out of the resident daemon for its whole life (lean.py, issue 12: the daemon's
RSS ≤ 30 MiB), and TLS still works: the webhook and `health.external_url` run in a helper process
(outbound.py), against a real TLS server on loopback with a certificate made here. The import checks
run in a fresh interpreter, as `proto4d run` does; the last test runs a real daemon."""

from __future__ import annotations

import http.server
import json
import shutil
import ssl
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest

from harness import wait_for
from proto4d import outbound

OPENSSL_AND_HTTPX = ("ssl", "_ssl", "_hashlib", "httpx")

LEAN_THEN_TLS = textwrap.dedent("""
    import sys
    from proto4d import lean
    assert lean.daemon_imports()
    import proto4d.supervisor, proto4d.update, proto4d.releases
    loaded = [m for m in ("ssl", "_ssl", "_hashlib", "httpx") if sys.modules.get(m) is not None]
    assert loaded == [], f"OpenSSL or httpx loaded by the daemon's imports: {loaded}"
    import hashlib, hmac
    assert hashlib.sha256(b"abc").hexdigest().startswith("ba7816bf")  # the built-in sha256
    assert hmac.compare_digest(b"a", b"a") and not hmac.compare_digest(b"a", b"b")
    for name in ("ssl", "httpx"):  # refused for good: a slip fails loudly instead of costing memory for good
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise AssertionError(f"{name} imported in the daemon")

    # A webhook POST and an external check over TLS: through the helper process.
    import asyncio
    from proto4d import outbound

    async def main() -> None:
        post = await outbound.request("POST", sys.argv[1] + "/hook", 10, body={"event": "done"})
        get = await outbound.request("GET", sys.argv[1] + "/ext", 10, user_agent="proto4d-probe/test")
        assert (post.status, post.error, get.status, get.error) == (200, None, 200, None), (post, get)

    asyncio.run(main())
    loaded = [m for m in ("ssl", "_ssl", "_hashlib", "httpx") if sys.modules.get(m) is not None]
    assert loaded == [], f"loaded after TLS was used: {loaded}"
    print("tls ok")
""")


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl program to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


class TLSReceiver:
    """HTTPS on loopback: records every request; a POST whose event is in `hold` waits for `release`."""

    def __init__(self, cert: Path, key: Path, hold: tuple[str, ...] = ()) -> None:
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.released = threading.Event()
        owner = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def answer(self, body: Any) -> None:
                with owner.lock:
                    owner.requests.append({"method": self.command, "path": self.path, "body": body,
                                           "agent": self.headers.get("User-Agent", "")})
                if isinstance(body, dict) and body.get("event") in hold:
                    owner.released.wait(60)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self) -> None:
                self.answer(json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0))))

            def do_GET(self) -> None:
                self.answer(None)

            def log_message(self, *args: Any) -> None:
                pass

        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[str]:
        with self.lock:
            return [r["body"]["event"] for r in self.requests if r["method"] == "POST"]

    def gets(self) -> list[str]:
        with self.lock:
            return [r["path"] for r in self.requests if r["method"] == "GET"]

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def tls_receiver(certificate: tuple[Path, Path]):
    rx = TLSReceiver(*certificate, hold=("requested",))
    yield rx
    rx.close()


def test_the_daemon_imports_no_openssl_and_tls_works_through_the_helper(certificate, tls_receiver):
    env = {**__import__("os").environ, outbound.TEST_CAFILE_ENV: str(certificate[0])}
    tls_receiver.released.set()
    r = subprocess.run([sys.executable, "-c", LEAN_THEN_TLS, tls_receiver.url], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "tls ok", r.stdout + r.stderr
    assert tls_receiver.events() == ["done"] and tls_receiver.gets() == ["/ext"]
    assert tls_receiver.requests[1]["agent"] == "proto4d-probe/test"


def test_the_certificate_is_verified(tls_receiver):
    """Without the test's CA the helper refuses the self-signed certificate: verification is on."""
    import asyncio

    tls_receiver.released.set()
    answer = asyncio.run(outbound.request("GET", tls_receiver.url + "/ext", 10))
    assert answer.status is None and "CERTIFICATE_VERIFY_FAILED" in (answer.error or ""), answer
    assert tls_receiver.requests == []


def test_too_late_is_said_and_changes_nothing():
    r = subprocess.run([sys.executable, "-c", "import asyncio, sys\nfrom proto4d import lean\n"
                        "print(lean.daemon_imports(), sys.modules.get('ssl') is not None)"],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["False", "True"], r.stdout + r.stderr


def helpers_of(daemon: psutil.Process) -> list[psutil.Process]:
    """The daemon's outbound helpers running now (other children come and go: git, the app, zombies)."""
    out = []
    for p in daemon.children():
        try:
            if any(a.endswith("outbound.py") for a in p.cmdline()):
                out.append(p)
        except psutil.Error:
            continue
    return out


def openssl_mapped(pid: int) -> list[str]:
    maps = Path(f"/proc/{pid}/maps")
    loaded = {line.split()[-1] for line in maps.read_text().splitlines() if "/" in line}
    return sorted(p for p in loaded if "_ssl." in p or "_hashlib." in p or "libssl" in p or "libcrypto" in p)


@pytest.mark.e2e
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/<pid>/maps")
def test_a_daemon_with_a_tls_webhook_and_external_url_never_maps_openssl(make_daemon, origin, certificate,
                                                                         tls_receiver):
    token, query, ext = "tok-tls-3c9e1f7a", "qk-tls-8b2d4e6f", "ext-path-5a7c9e"
    hook = f"{tls_receiver.url}/hook/{token}?key={query}"
    d = make_daemon(notify={"webhook_url": hook, "webhook_timeout_s": 20},
                    health={"external_url": f"{tls_receiver.url}/{ext}"})
    d.start(env={outbound.TEST_CAFILE_ENV: str(certificate[0])})
    sha = origin.commit("2")
    r = d.cli("update", "--force")
    assert r.returncode == 0, r.stdout + r.stderr

    # "requested" is held by the receiver: its helper is running now. Neither it nor the daemon shows the
    # URL's token in its argv or environment (what `ps e` shows), and the update goes on meanwhile.
    wait_for(lambda: "requested" in tls_receiver.events(), 30, "the requested event")
    daemon = psutil.Process(d.proc.pid)
    helpers = helpers_of(daemon)
    assert helpers, "no helper runs while the receiver holds an event"
    for p in (daemon, *helpers):
        shown = " ".join(p.cmdline()) + " " + " ".join(f"{k}={v}" for k, v in p.environ().items())
        assert token not in shown and query not in shown and ext not in shown, shown
    d.wait_status(lambda s: s["app"]["commit"] == sha and s["update"]["state"] == "idle", 120, "the update's end")
    tls_receiver.released.set()

    wait_for(lambda: {"requested", "started", "done"} <= set(tls_receiver.events()), 30, "the webhook events")
    assert tls_receiver.gets() == [f"/{ext}"]
    story = (d.root / d.status()["update"]["last"]["log"]).read_text()
    assert "external: " in story and "-> HTTP 200" in story, story
    assert not [e for e in d.log_events() if e.get("event") in ("webhook.failed", "webhook.dropped")]
    wait_for(lambda: not helpers_of(daemon), 20, "the helpers' end")
    assert openssl_mapped(d.proc.pid) == []
    assert token not in (d.root / "logs" / "proto4d.log").read_text()
