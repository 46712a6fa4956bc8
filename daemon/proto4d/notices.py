"""What users and other systems are told: the notice file and the webhook.

The notice file (JSON: message, when, expected impact) is what the app or the hub shows
while an update is imminent. The webhook gets a JSON POST per update event; it runs in the
background with a short timeout and can never block or fail an update. Its URL may carry a
token, so logs show only its scheme and host.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from proto4d import __version__, fsutil, log


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
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{':' + str(parts.port) if parts.port else ''}/..."


class Webhook:
    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self._tasks: set[asyncio.Task[None]] = set()
        if url:
            parts = urlsplit(url)
            log.redact(url, parts.path, parts.query, parts.password or "")

    def send(self, event: str, payload: dict[str, Any]) -> None:
        if not self.url:
            return
        body = log.scrub_obj({"event": event, "at": time.time(), "source": f"proto4d/{__version__}", **payload})
        task = asyncio.get_running_loop().create_task(self._post(event, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, event: str, body: dict[str, Any]) -> None:
        try:
            # Loaded by the first event, not at start: an idle daemon without a webhook never pays for it.
            import httpx
            async with httpx.AsyncClient(trust_env=False, timeout=self.timeout) as client:
                r = await client.post(self.url, json=body)
            if r.status_code >= 400:
                log.get().warning("webhook.failed", event_name=event, url=safe_url(self.url), status=r.status_code)
        except Exception as e:  # never let a webhook break anything
            log.get().warning("webhook.failed", event_name=event, url=safe_url(self.url),
                              error=type(e).__name__)

    async def flush(self, timeout: float = 2.0) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
