"""Named points inside an update where the fault suite stops the daemon dead.

With `PROTO4D_PAUSE_AT=<point>` in its environment the daemon, on reaching that point,
writes `state/paused-at-<point>` and blocks there, so a test can SIGKILL it at exactly that
step of a real update (no mock: the rest of the run is the real code). Unset, a point costs
one dictionary lookup.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

POINTS = ("consumed", "fetch", "export", "venv", "canary_done", "new_started", "current_renamed", "verify", "watch",
          "rollback_started", "rollback_renamed")

_state_dir: Path | None = None


def configure(state_dir: Path) -> None:
    global _state_dir
    _state_dir = state_dir


def _armed(name: str) -> bool:
    return os.environ.get("PROTO4D_PAUSE_AT") == name and _state_dir is not None


def _mark(name: str) -> None:
    assert _state_dir is not None
    (_state_dir / f"paused-at-{name}").write_text(str(os.getpid()))


def point_sync(name: str) -> None:
    """For worker threads (git, export, venv build)."""
    if _armed(name):
        _mark(name)
        while True:
            time.sleep(3600)


async def point(name: str) -> None:
    if _armed(name):
        _mark(name)
        await asyncio.Event().wait()
