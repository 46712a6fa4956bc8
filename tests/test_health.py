"""The health probe against real loopback servers: what it reports for each way an answer can go wrong."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import pytest

from proto4d.config import Check
from proto4d.health import Prober

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _serve(handler: Handler) -> tuple[asyncio.Server, int, list[bytes]]:
    seen: list[bytes] = []

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            line = await reader.readline()
            if not line:
                break
            head += line
        seen.append(head)
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], seen


def _answer(raw: bytes) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(raw)
        await writer.drain()
    return handler


async def _hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(30)


async def _probe(handler: Handler | None, checks: list[Check], timeout: float = 2.0) -> tuple[Prober, object, list]:
    prober = Prober()
    if handler is None:
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return prober, await prober.check("127.0.0.1", port, checks, timeout), []
    server, port, seen = await _serve(handler)
    async with server:
        report = await prober.check("127.0.0.1", port, checks, timeout)
    return prober, report, seen


OK_BODY = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok"


@pytest.mark.parametrize(("raw", "accept", "ok", "status", "error"), [
    (OK_BODY, (200,), True, 200, None),
    (b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy", (200,), False, 503, None),
    (b"HTTP/1.1 204 No Content\r\n\r\n", (200, 204), True, 204, None),
    (b"HTTP/1.0 200 OK\r\n\r\nno length, ends at close", (200,), True, 200, None),
    (b"", (200,), False, None, "connection closed without an answer"),
    (b"SSH-2.0-OpenSSH_9.6\r\n", (200,), False, None, "not an HTTP answer"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort", (200,), False, None, "in the middle of the answer"),
])
def test_answers(raw: bytes, accept: tuple[int, ...], ok: bool, status: int | None, error: str | None) -> None:
    _, report, seen = asyncio.run(_probe(_answer(raw), [Check("/health", accept)]))
    (r,) = report.results
    assert (report.ok, r.ok, r.status) == (ok, ok, status), r
    if error is None:
        assert r.error is None
    else:
        assert r.error is not None and error in r.error
    request = seen[0].decode()
    assert request.startswith("GET /health HTTP/1.1\r\n")
    assert "connection: close" in request.lower() and "user-agent: proto4d-probe/" in request.lower()


def test_refused_and_hang() -> None:
    _, report, _ = asyncio.run(_probe(None, [Check("/health", (200,))]))
    assert not report.ok and report.results[0].error == "connection refused"
    _, report, _ = asyncio.run(_probe(_hang, [Check("/health", (200,))], timeout=0.3))
    assert not report.ok and report.results[0].error == "timed out"
    assert report.results[0].ms < 2000


def test_every_check_runs_and_probe_ports_are_remembered() -> None:
    prober, report, seen = asyncio.run(_probe(_answer(OK_BODY), [Check("/health", (200,)), Check("/é?x=1", (200,))]))
    assert report.ok and len(report.results) == 2
    assert seen[1].startswith(b"GET /%C3%A9?x=1 HTTP/1.1\r\n")  # non-ASCII escaped, the query kept
    # the sampler tells probes from users by these local ports
    assert len(prober.probe_ports()) == 2


def test_external_url_goes_through_httpx_and_fails_softly() -> None:
    async def run() -> list:
        out = []
        for raw in (OK_BODY, b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"):
            server, port, _ = await _serve(_answer(raw))
            async with server:
                out.append(await Prober().external(f"http://127.0.0.1:{port}/", 2.0))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out.append(await Prober().external(f"http://127.0.0.1:{port}/", 2.0))
        return out

    up, down, refused = asyncio.run(run())
    assert (up.ok, up.status) == (True, 200)
    assert (down.ok, down.status) == (False, 503)
    assert (refused.ok, refused.status, refused.error) == (False, None, "connection refused")


def test_wait_healthy_notices_a_death_during_a_check_without_waiting_its_timeout() -> None:
    """An inherited listening socket accepts for a dead app too: the check would wait its whole timeout."""
    async def main() -> tuple[float, bool]:
        with socket.socket() as held:  # listens, never accepts: like the daemon's socket after the app died
            held.bind(("127.0.0.1", 0))
            held.listen(8)
            port = held.getsockname()[1]
            died_at = asyncio.get_running_loop().time() + 0.2
            t = asyncio.get_running_loop().time()
            report = await Prober().wait_healthy("127.0.0.1", port, [Check("/health", (200,))], timeout=30,
                                                 per_try=10, alive=lambda: asyncio.get_running_loop().time()
                                                 < died_at)
            return asyncio.get_running_loop().time() - t, report.ok

    took, ok = asyncio.run(main())
    assert not ok
    assert took < 2, f"took {took:.2f} s: the check's 10 s timeout was waited out"
