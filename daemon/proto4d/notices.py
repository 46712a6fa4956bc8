"""What users and other systems are told: the notice file and the webhook.

The notice file (JSON: message, when, expected impact) is what the app or the hub shows
while an update is imminent. The webhook gets a JSON POST per update event; it runs in the
background, in a short-lived helper process (outbound.py: TLS and httpx never load in the daemon),
with one overall deadline (`notify.webhook_timeout_s` for the whole call, not per connect/read
phase: a receiver trickling its answer cannot hold it longer) and can never block or fail an
update. At most `MAX_RUNNING` helpers run at once; further events wait their turn in order, and
beyond `MAX_WAITING` waiting ones an event is dropped with a `webhook.dropped` line. Only a 2xx
answer is a delivery: a redirect is not followed (it would send the event, and the URL's token,
somewhere not configured) and is logged as a failure like any other. Its URL may carry a token,
so logs show only its scheme and host, and it reaches the helper on its stdin (never its argv or
environment, which `ps` shows).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from proto4d import __version__, fsutil, log, outbound

MAX_RUNNING = 2  # webhook helpers at once (each is an interpreter with httpx for a moment)
MAX_WAITING = 8  # events waiting for a helper; more are dropped, and said so


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
    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(MAX_RUNNING)
        if url:
            parts = urlsplit(url)
            log.redact(url, parts.path, parts.query, parts.password or "")

    def send(self, event: str, payload: dict[str, Any]) -> None:
        if not self.url:
            return
        if len(self._tasks) >= MAX_RUNNING + MAX_WAITING:
            log.get().warning("webhook.dropped", event_name=event, url=safe_url(self.url),
                              why=f"{MAX_WAITING} events already wait for the {MAX_RUNNING} in flight")
            return
        body = log.scrub_obj({"event": event, "at": time.time(), "source": f"proto4d/{__version__}", **payload})
        task = asyncio.get_running_loop().create_task(self._post(event, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, event: str, body: dict[str, Any]) -> None:
        try:
            async with self._slots:
                r = await outbound.request("POST", self.url, self.timeout, body=body)
        except Exception as e:  # never let a webhook break anything
            log.get().warning("webhook.failed", event_name=event, url=safe_url(self.url), error=type(e).__name__)
            return
        if r.timed_out:
            log.get().warning("webhook.failed", event_name=event, url=safe_url(self.url),
                              error=f"no answer within notify.webhook_timeout_s ({self.timeout:g} s)")
        elif r.status is None:
            log.get().warning("webhook.failed", event_name=event, url=safe_url(self.url), error=r.error)
        elif 300 <= r.status < 400:
            log.get().warning("webhook.failed", event_name=event, url=safe_url(self.url), status=r.status,
                              error="redirect refused", location=safe_url(r.location or ""))
        elif not 200 <= r.status < 300:
            log.get().warning("webhook.failed", event_name=event, url=safe_url(self.url), status=r.status)

    async def flush(self, timeout: float = 2.0) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
