"""The staged release: its record (`state/stage.json`) and its lifetime (StageBook).

`proto4d stage` leaves one release running, verified, on the preview address (`stage.listen`) until
it is promoted, discarded or expires (`stage.ttl_s`, counted from when it was staged, so a reload
that shortens it applies at once). The record is what `status`, the status page and a restarted
daemon read; the process itself is the runner's (runner.Staged). A daemon that restarts ends every
app process of the previous one, the staged one included: the record then only says what to
clean up (the release directory if it never served, the copies of the data it ran on).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from proto4d import fsutil, log, releases
from proto4d.activity import iso
from proto4d.config import Config
from proto4d.paths import Paths
from proto4d.runner import Runner


@dataclass
class StageRecord:
    id: str  # the request that staged it
    release: str
    commit: str
    ref: str  # what was asked for (the branch when none was named)
    url: str
    staged_at: float  # wall clock
    promotable: bool  # promoted in place (one start) or, on copies of the data, started again
    data_dir: str = ""  # the copies it runs on ("" when it runs on production's shared paths)
    pid: int = 0

    def expires_at(self, ttl_s: float) -> float:
        return self.staged_at + ttl_s

    def expired(self, now: float, ttl_s: float) -> bool:
        return now >= self.expires_at(ttl_s)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageRecord:
        return cls(id=str(d["id"]), release=str(d["release"]), commit=str(d["commit"]), ref=str(d.get("ref") or ""),
                   url=str(d.get("url") or ""), staged_at=float(d["staged_at"]), promotable=bool(d.get("promotable")),
                   data_dir=str(d.get("data_dir") or ""), pid=int(d.get("pid") or 0))


def path(paths: Paths) -> Path:
    return paths.state / "stage.json"


def save(paths: Paths, rec: StageRecord) -> None:
    fsutil.atomic_write_json(path(paths), rec.to_dict())


def load(paths: Paths) -> StageRecord | None:
    """The record, or None when nothing is staged (or the file is unreadable: it is only bookkeeping)."""
    try:
        return StageRecord.from_dict(json.loads(path(paths).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def clear(paths: Paths) -> None:
    with contextlib.suppress(FileNotFoundError):
        path(paths).unlink()


class StageBook:
    """The one staged release: its record, its process (through the runner), and ending it."""

    def __init__(self, paths: Paths, runner: Runner, mirror: releases.Mirror,
                 status_changed: Callable[[], None]) -> None:
        self.paths = paths
        self.runner = runner
        self.mirror = mirror
        self.status_changed = status_changed
        self.record: StageRecord | None = None
        self.changed = asyncio.Event()  # a stage was set: its expiry is looked at
        self.log = log.get("proto4d.stage")
        self._said_exited = False

    def set(self, rec: StageRecord) -> None:
        save(self.paths, rec)  # durable before status says so: a restart finds what to clean up
        self.record = rec
        self.changed.set()
        self._said_exited = False
        self.log.info("stage.ready", release=rec.release, commit=rec.commit[:12], url=rec.url, pid=rec.pid,
                      promotable=rec.promotable)
        self.status_changed()

    def note_for(self, action: str) -> str:
        """What a request of `action` does to the staged release, for its answer ("" when nothing is staged)."""
        rec = self.record
        if rec is None:
            return ""
        name = f"the staged release {rec.release} ({rec.commit[:7]})"
        if action == "update":
            return (f"; {name} is promoted if this update deploys the same commit, else discarded when this "
                    "update starts preparing")
        if action == "stage":
            return f"; {name} is discarded when this one starts preparing, unless it is the same commit"
        if action in ("rollback", "restart"):
            return f"; {name} stays staged"
        return ""

    def exited(self) -> str:
        """How the staged process ended ("" while it runs)."""
        staged = self.runner.staged
        if self.record is None:
            return ""
        if staged is None or staged.release.name != self.record.release:
            return "it is no longer running"
        return "" if staged.proc.alive else staged.proc.exit_description()

    def consume(self) -> StageRecord | None:
        """A promotion takes the staged release: the record goes, the release stays (the update owns it now)."""
        rec, self.record = self.record, None
        clear(self.paths)
        self.status_changed()
        return rec

    def remove_copies(self, rec: StageRecord) -> None:
        if rec.data_dir:
            with contextlib.suppress(OSError):
                fsutil.remove_tree(Path(rec.data_dir))

    async def discard(self, why: str) -> StageRecord | None:
        """End the staged release: its process, its copies of the data, its release directory (unless it
        is what serves), its record."""
        rec, self.record = self.record, None  # at once: nothing may promote it while it is being ended
        await self.runner.discard_staged()
        if rec is None:
            return None
        await asyncio.to_thread(self._remove, rec)
        clear(self.paths)
        self.log.info("stage.discarded", release=rec.release, commit=rec.commit[:12], why=why)
        self.status_changed()
        return rec

    def _remove(self, rec: StageRecord) -> None:
        self.remove_copies(rec)
        if rec.release and rec.release != self.paths.current_release() and self.paths.release(rec.release).exists():
            with contextlib.suppress(OSError):
                fsutil.remove_tree(self.paths.release(rec.release))
            self.mirror.unpin(rec.release)

    def recover(self) -> None:
        """At start-up: a record left by a previous daemon names a release whose process ended with it."""
        rec = load(self.paths)
        if rec is None:
            clear(self.paths)
            return
        self._remove(rec)
        clear(self.paths)
        self.log.warning("stage.lost", release=rec.release, commit=rec.commit[:12],
                         why="the daemon restarted and its app processes, the staged one included, ended with it; "
                             "stage it again with `proto4d stage`")

    def status(self, cfg: Config, now: float | None = None) -> dict[str, Any] | None:
        rec = self.record
        if rec is None:
            return None
        now = time.time() if now is None else now
        exited = self.exited()
        if exited and not self._said_exited:
            self._said_exited = True
            self.log.warning("stage.exited", release=rec.release, how=exited)
        return {"id": rec.id, "release": rec.release, "commit": rec.commit, "ref": rec.ref, "url": rec.url,
                "staged_at": iso(rec.staged_at), "expires_at": iso(rec.expires_at(cfg.stage.ttl_s)),
                "promotable": rec.promotable, "on_copies": bool(rec.data_dir), "pid": rec.pid,
                "running": not exited, "exited": exited}
