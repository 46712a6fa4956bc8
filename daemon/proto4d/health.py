"""HTTP health checks against the app, and the record of the daemon's own probes.

Every probe goes out on a fresh connection (`Connection: close`, so no idle probe connection
is ever caught by a drain) with a `proto4d-probe` user agent, and its local port is
remembered: the access log shows that port, which is how the activity sampler tells the
daemon's probes from users when both arrive from 127.0.0.1.

Probes of the app speak plain HTTP/1.1 over asyncio streams: a GET on loopback needs no
client library, and keeping httpx (with ssl, h11 and its CLI hooks) out of the resident
process saves about 3 MB of its idle memory. The external URL (TLS) goes through httpx in a
short-lived helper process (outbound.py), so TLS never loads in the daemon either.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from proto4d import __version__, outbound
from proto4d.config import Check

USER_AGENT = f"proto4d-probe/{__version__}"
STATUS_LINE = re.compile(rb"^HTTP/1\.[01] (\d{3})(?: |\r?$)")
# Enough of any health answer; a bigger body is not read to its end, only the status matters.
MAX_BODY = 1 << 20
ALIVE_POLL_S = 0.05  # how often a running health check looks whether the process it waits for died
# Config paths have no whitespace; only non-ASCII is escaped in the request line.
PRINTABLE = "".join(chr(c) for c in range(33, 127))


@dataclass(frozen=True)
class CheckResult:
    path: str
    ok: bool
    status: int | None
    error: str | None
    ms: float

    def describe(self) -> str:
        got = f"HTTP {self.status}" if self.status is not None else (self.error or "no answer")
        return f"{self.path} -> {got} ({self.ms:.0f} ms)"


@dataclass(frozen=True)
class HealthReport:
    ok: bool
    results: tuple[CheckResult, ...] = field(default_factory=tuple)

    def summary(self) -> str:
        return "; ".join(r.describe() for r in self.results) or "no checks"

    def failures(self) -> str:
        bad = [r.describe() for r in self.results if not r.ok]
        return "; ".join(bad) or "none"


class Prober:
    def __init__(self, keep_ports_s: float = 900) -> None:
        self._ports: dict[int, float] = {}
        self._keep = keep_ports_s
        # The latest report and when (epoch), for status.json: the page shows the check latency.
        self.last: HealthReport | None = None
        self.last_at: float | None = None

    def probe_ports(self) -> set[int]:
        now = time.monotonic()
        stale = [p for p, t in self._ports.items() if now - t > self._keep]
        for p in stale:
            del self._ports[p]
        return set(self._ports)

    async def check(self, host: str, port: int, checks: Sequence[Check], timeout: float) -> HealthReport:
        results = [await self._one(host, port, chk.path, chk.status, timeout) for chk in checks]
        report = HealthReport(all(r.ok for r in results), tuple(results))
        self.last, self.last_at = report, time.time()
        return report

    async def _one(self, host: str, port: int, path: str, accept: Sequence[int], timeout: float) -> CheckResult:
        t = time.monotonic()

        def result(status: int | None, error: str | None) -> CheckResult:
            ok = status is not None and status in accept
            return CheckResult(path, ok, status, error, (time.monotonic() - t) * 1000)

        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port)
                local = writer.get_extra_info("sockname")
                if isinstance(local, tuple) and len(local) >= 2:
                    self._ports[int(local[1])] = time.monotonic()
                target = urllib.parse.quote(path, safe=PRINTABLE)
                writer.write(f"GET {target} HTTP/1.1\r\nHost: {_bracket(host)}:{port}\r\nUser-Agent: {USER_AGENT}\r\n"
                             "Accept: */*\r\nConnection: close\r\n\r\n".encode("ascii"))
                await writer.drain()
                line = await reader.readline()
                if not line:
                    return result(None, "connection closed without an answer")
                m = STATUS_LINE.match(line)
                if m is None:
                    return result(None, f"not an HTTP answer ({line[:40]!r})")
                # Read the answer to its end so the app never logs a reset from its own health
                # check: Content-Length when given, else up to the close asked for.
                length: int | None = None
                while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = header.partition(b":")
                    if name.strip().lower() == b"content-length" and value.strip().isdigit():
                        length = int(value.strip())
                if length is not None:
                    await reader.readexactly(min(length, MAX_BODY))
                else:
                    read = 0
                    while read < MAX_BODY and (chunk := await reader.read(65536)):
                        read += len(chunk)
                return result(int(m.group(1)), None)
        except TimeoutError:
            return result(None, "timed out")
        except ConnectionRefusedError:
            return result(None, "connection refused")
        except ValueError:  # a line longer than the stream limit
            return result(None, "not an HTTP answer (a header line over 64 KiB)")
        except asyncio.IncompleteReadError:
            return result(None, "connection closed in the middle of the answer")
        except ConnectionResetError:
            return result(None, "connection reset")
        except OSError as e:
            return result(None, f"cannot connect ({e.strerror or e})")
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError, asyncio.TimeoutError):
                    await asyncio.wait_for(writer.wait_closed(), 1)

    async def external(self, url: str, timeout: float) -> CheckResult:
        """GET the URL through a helper process (outbound.py), `timeout` for the whole call; a 3xx is not followed."""
        r = await outbound.request("GET", url, timeout, user_agent=USER_AGENT)
        return CheckResult(url, r.status is not None and r.status < 500, r.status, r.error, r.ms)

    async def wait_healthy(self, host: str, port: int, checks: Sequence[Check], timeout: float, per_try: float,
                           alive: Callable[[], bool], interval: float = 0.1) -> HealthReport:
        """Poll until every check passes, the deadline passes, or `alive()` says the process died."""
        deadline = time.monotonic() + timeout
        report = HealthReport(False)
        while True:
            if not alive():
                return HealthReport(False, report.results)
            # Raced against the process's death: on an inherited socket the kernel accepts for a dead
            # app too, and a check would wait its whole timeout for an answer that never comes.
            check = asyncio.ensure_future(
                self.check(host, port, checks, min(per_try, max(0.2, deadline - time.monotonic()))))
            try:
                while not check.done():
                    await asyncio.wait({check}, timeout=ALIVE_POLL_S)
                    if not check.done() and not alive():
                        return HealthReport(False, report.results)
            finally:
                if not check.done():
                    check.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await check
            report = check.result()
            if report.ok or time.monotonic() >= deadline:
                return report
            await asyncio.sleep(interval)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
