"""HTTP health checks against the app (httpx), and the record of the daemon's own probes.

Every probe goes out on a fresh connection (`Connection: close`, so no idle probe connection
is ever caught by a drain) with a `proto4d-probe` user agent, and its local port is
remembered: the access log shows that port, which is how the activity sampler tells the
daemon's probes from users when both arrive from 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx

from proto4d import __version__
from proto4d.config import Check

USER_AGENT = f"proto4d-probe/{__version__}"


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

    def probe_ports(self) -> set[int]:
        now = time.monotonic()
        stale = [p for p, t in self._ports.items() if now - t > self._keep]
        for p in stale:
            del self._ports[p]
        return set(self._ports)

    async def check(self, host: str, port: int, checks: Sequence[Check], timeout: float) -> HealthReport:
        base = f"http://{_bracket(host)}:{port}"
        results = []
        async with httpx.AsyncClient(trust_env=False, timeout=timeout, follow_redirects=False,
                                     headers={"User-Agent": USER_AGENT, "Connection": "close"}) as client:
            for chk in checks:
                results.append(await self._one(client, base + chk.path, chk.path, chk.status))
        return HealthReport(all(r.ok for r in results), tuple(results))

    async def _one(self, client: httpx.AsyncClient, url: str, label: str, accept: Sequence[int]) -> CheckResult:
        t = time.monotonic()
        try:
            async with client.stream("GET", url) as r:
                stream = r.extensions.get("network_stream")
                if stream is not None:
                    local = stream.get_extra_info("client_addr")
                    if isinstance(local, tuple) and len(local) >= 2:
                        self._ports[int(local[1])] = time.monotonic()
                await r.aread()
                return CheckResult(label, r.status_code in accept, r.status_code, None,
                                   (time.monotonic() - t) * 1000)
        except httpx.HTTPError as e:
            return CheckResult(label, False, None, _describe_error(e), (time.monotonic() - t) * 1000)

    async def external(self, url: str, timeout: float) -> CheckResult:
        async with httpx.AsyncClient(trust_env=False, timeout=timeout, headers={"User-Agent": USER_AGENT}) as client:
            t = time.monotonic()
            try:
                r = await client.get(url)
                return CheckResult(url, r.status_code < 500, r.status_code, None, (time.monotonic() - t) * 1000)
            except httpx.HTTPError as e:
                return CheckResult(url, False, None, _describe_error(e), (time.monotonic() - t) * 1000)

    async def wait_healthy(self, host: str, port: int, checks: Sequence[Check], timeout: float, per_try: float,
                           alive: Callable[[], bool], interval: float = 0.1) -> HealthReport:
        """Poll until every check passes, the deadline passes, or `alive()` says the process died."""
        deadline = time.monotonic() + timeout
        report = HealthReport(False)
        while True:
            if not alive():
                return HealthReport(False, report.results)
            report = await self.check(host, port, checks, min(per_try, max(0.2, deadline - time.monotonic())))
            if report.ok or time.monotonic() >= deadline:
                return report
            await asyncio.sleep(interval)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _describe_error(e: httpx.HTTPError) -> str:
    name = type(e).__name__
    text = str(e).strip()
    if isinstance(e, httpx.ConnectError):
        return "connection refused" if "refused" in text.lower() or "111" in text else f"cannot connect ({text})"
    if isinstance(e, httpx.TimeoutException):
        return "timed out"
    if isinstance(e, httpx.RemoteProtocolError):
        return "connection closed without an answer"
    return f"{name}: {text}" if text else name
