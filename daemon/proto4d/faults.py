"""Named points inside an update where the fault suite stops the daemon dead.

Only a daemon started with `PROTO4D_FAULTS=1` listens: then, when `state/pause-at` names a
point, the daemon writes `state/paused-at-<point>` on reaching it and blocks there, so a
test can SIGKILL it at exactly that step of a real update (no mock: everything else is the
real code). Without the variable a point costs one dictionary lookup.
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
    if os.environ.get("PROTO4D_FAULTS") != "1" or _state_dir is None:
        return False
    try:
        return (_state_dir / "pause-at").read_text().strip() == name
    except OSError:
        return False


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
