"""Named points inside an update where the fault suite stops the daemon dead.

Only a daemon started with `PROTO4D_FAULTS=1` listens: then, when `state/pause-at` names a
point, the daemon writes `state/paused-at-<point>` on reaching it and blocks there, so a
test can SIGKILL it at exactly that step of a real update (no mock: everything else is the
real code). Without the variable a point costs one dictionary lookup.

A paused point goes on when the test removes `state/paused-at-<point>` (remove `pause-at`
first, or the next pass through the same point pauses again), and a point in a worker
thread also gives way when the operation's cancel token fires (the daemon stopping), as the
real blocking work there does: a paused daemon still answers SIGTERM.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proto4d.procs import Cancel

POINTS = ("consumed", "fetch", "export", "venv", "canary_done", "snapshot_taken", "migrated", "new_started",
          "current_renamed", "verify", "watch", "rollback_started", "rollback_renamed", "forked_app", "forked_canary",
          "spare_became", "ahead_fetch", "ahead_export", "ahead_venv")

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


def _mark(name: str) -> Path:
    assert _state_dir is not None
    marker = _state_dir / f"paused-at-{name}"
    marker.write_text(str(os.getpid()))
    return marker


# A context variable, not a thread-local: asyncio.to_thread runs its function in a copy of the calling
# task's context, so a scope set in a task reaches its worker threads and no other task.
_scope: contextvars.ContextVar[str] = contextvars.ContextVar("proto4d_fault_scope", default="")


@contextlib.contextmanager
def scoped(prefix: str) -> Iterator[None]:
    """The points passed inside (in this task and the worker threads it starts) are named
    `<prefix><point>`: the same fetch and export run for an update and, while nobody is on, for a
    release prepared ahead (`ahead_fetch`), and a test pauses the one it means."""
    token = _scope.set(prefix)
    try:
        yield
    finally:
        _scope.reset(token)


def point_sync(name: str, cancel: Cancel | None = None) -> None:
    """For worker threads (git, export, venv build)."""
    name = _scope.get() + name
    if _armed(name):
        marker = _mark(name)
        while marker.exists() and not (cancel is not None and cancel.cancelled):
            time.sleep(0.05)


async def point(name: str) -> None:
    if _armed(name):
        import asyncio  # here, not at import: the CLI's `status` imports this module's names
        marker = _mark(name)
        while marker.exists():
            await asyncio.sleep(0.05)
