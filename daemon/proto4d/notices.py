"""What users and other systems are told: the notice file and the webhook.

The notice file (JSON: message, when, expected impact) is what the app or the hub shows
while an update is imminent. The webhook gets a JSON POST per update event; it runs in the
background, in a short-lived helper process (outbound.py: TLS and httpx never load in the daemon),
with one overall deadline (`notify.webhook_timeout_s` for the whole call, not per connect/read
phase: a receiver trickling its answer cannot hold it longer) and can never block or fail an
update. Events are delivered in the order they happened, one helper at a time (two at once let
`started` overtake `requested` at the receiver, seen in CI); each body carries `seq`, counting from 1
in the daemon's life, so a receiver can also order or spot a gap itself. Further events wait their
turn, and beyond `MAX_WAITING` waiting ones an event is dropped with a `webhook.dropped` line. Only a 2xx
answer is a delivery: a redirect is not followed (it would send the event, and the URL's token,
somewhere not configured) and is logged as a failure like any other. Its URL may carry a token,
so logs show only its scheme and host, and it reaches the helper on its stdin (never its argv or
environment, which `ps` shows).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import itertools
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from proto4d import __version__, fsutil, log, outbound

MAX_RUNNING = 1  # webhook helpers at once: one, so events arrive in the order they happened
MAX_WAITING = 8  # events waiting for a helper; more are dropped, and said so
_SEQ = itertools.count(1)  # the daemon's life


def write_notice(path: Path, *, update_id: str, message: str, when: float, impact: str) -> None:
    fsutil.atomic_write_json(path, {
        "message": message,
        "when": dt.datetime.fromtimestamp(when).astimezone().isoformat(timespec="seconds"),
        "expected_impact": impact,
        "update_id": update_id,
        "written_at": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }, mode=None)  # read by the app or the hub, maybe as another user: as the umask allows


def remove_notice(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def safe_url(url: str) -> str:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "(an invalid URL)"
    return f"{parts.scheme}://{parts.hostname or ''}{':' + str(port) if port else ''}/..."


class Webhook:
    """One sender for the daemon's life: a SIGHUP calls `configure`, so the order holds across a reload."""

    def __init__(self, url: str, timeout: float) -> None:
        self.url = ""
        self.timeout = timeout
        # Each event waits with the URL and deadline it was sent under; one worker posts them in order.
        self._queue: collections.deque[tuple[str, float, str, dict[str, Any]]] = collections.deque()
        self._worker: asyncio.Task[None] | None = None
        self._posting = 0  # the event in a helper now: 0 or 1
        self.configure(url, timeout)

    def configure(self, url: str, timeout: float) -> None:
        self.url, self.timeout = url, timeout
        if url:
            parts = urlsplit(url)
            log.redact(url, parts.path, parts.query, parts.password or "")

    def send(self, event: str, payload: dict[str, Any]) -> None:
        if not self.url:
            return
        seq = next(_SEQ)  # a dropped event keeps its number: the receiver sees the gap
        if len(self._queue) + self._posting >= MAX_RUNNING + MAX_WAITING:
            log.get().warning("webhook.dropped", event_name=event, url=safe_url(self.url),
                              why=f"{MAX_WAITING} events already wait for the {MAX_RUNNING} in flight")
            return
        body = log.scrub_obj({"event": event, "seq": seq, "at": time.time(),
                              "source": f"proto4d/{__version__}", **payload})
        self._queue.append((self.url, self.timeout, event, body))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        while self._queue:
            url, timeout, event, body = self._queue.popleft()
            self._posting = 1
            try:
                await self._post(url, timeout, event, body)
            finally:
                self._posting = 0

    async def _post(self, url: str, timeout: float, event: str, body: dict[str, Any]) -> None:
        try:
            r = await outbound.request("POST", url, timeout, body=body)
        except Exception as e:  # never let a webhook break anything
            log.get().warning("webhook.failed", event_name=event, url=safe_url(url), error=type(e).__name__)
            return
        if r.timed_out:
            log.get().warning("webhook.failed", event_name=event, url=safe_url(url),
                              error=f"no answer within notify.webhook_timeout_s ({timeout:g} s)")
        elif r.status is None:
            log.get().warning("webhook.failed", event_name=event, url=safe_url(url), error=r.error)
        elif 300 <= r.status < 400:
            log.get().warning("webhook.failed", event_name=event, url=safe_url(url), status=r.status,
                              error="redirect refused", location=safe_url(r.location or ""))
        elif not 200 <= r.status < 300:
            log.get().warning("webhook.failed", event_name=event, url=safe_url(url), status=r.status)

    async def flush(self, timeout: float = 2.0) -> None:
        if self._worker is not None and not self._worker.done():
            await asyncio.wait({self._worker}, timeout=timeout)
