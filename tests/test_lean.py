"""OpenSSL stays out of the resident daemon until TLS is really used (lean.py, issue 12: the daemon's
RSS ≤ 30 MiB), and TLS still works once it is: asyncio's own and httpx's, against a real TLS server
on loopback with a certificate made here. Each check runs in a fresh interpreter, as `proto4d run` does."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

LEAN_THEN_TLS = textwrap.dedent("""
    import sys
    from proto4d import lean
    assert lean.daemon_imports()
    import proto4d.supervisor, proto4d.update, proto4d.releases
    loaded = [m for m in ("ssl", "_ssl", "_hashlib") if sys.modules.get(m) is not None]
    assert loaded == [], f"OpenSSL loaded by the daemon's imports: {loaded}"
    import hashlib, hmac
    assert hashlib.sha256(b"abc").hexdigest().startswith("ba7816bf")  # the built-in sha256
    assert hmac.compare_digest(b"a", b"a") and not hmac.compare_digest(b"a", b"b")

    # The first TLS use: a webhook or health.external_url.
    lean.ssl_for_asyncio()
    import asyncio, ssl, httpx
    cert, key = sys.argv[1], sys.argv[2]

    async def main() -> None:
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(cert, key)

        async def answer(reader, writer):
            await reader.readuntil(b"\\r\\n\\r\\n")
            writer.write(b"HTTP/1.1 200 OK\\r\\ncontent-length: 2\\r\\nconnection: close\\r\\n\\r\\nok")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_ctx)  # asyncio's own TLS
        port = server.sockets[0].getsockname()[1]
        client_ctx = ssl.create_default_context(cafile=cert)
        async with httpx.AsyncClient(verify=client_ctx, trust_env=False) as client:
            r = await client.get(f"https://localhost:{port}/")
        assert r.status_code == 200 and r.text == "ok", r
        server.close()
        await server.wait_closed()

    asyncio.run(main())
    print("tls ok")
""")


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl program to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_the_daemon_imports_no_openssl_and_tls_works_once_asked_for(certificate: tuple[Path, Path]):
    r = subprocess.run([sys.executable, "-c", LEAN_THEN_TLS, *map(str, certificate)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "tls ok", r.stdout + r.stderr


def test_too_late_is_said_and_changes_nothing():
    r = subprocess.run([sys.executable, "-c", "import asyncio, sys\nfrom proto4d import lean\n"
                        "print(lean.daemon_imports(), sys.modules.get('ssl') is not None)"],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["False", "True"], r.stdout + r.stderr
