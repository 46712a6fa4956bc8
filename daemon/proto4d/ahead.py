"""The release prepared ahead: while nobody is on, the branch head's release is exported, its venv
built or found, its shared paths linked and its preflight run, so that the update that follows only
checks it again and switches.

Why: on a small machine every process an update runs beside the serving app lifts its slowest
request, whatever its scheduling class (bench/RESULTS.md, "this VM's floor"): the export's
interpreter and git, a venv's build. The spare (spare.py) took the canary's start out of the switch;
this takes the preparation out too, into a moment when nobody is on to feel it, and a venv build of
minutes out of the update altogether. The update still fetches, and takes the release only when it is
the commit it resolved and everything it was built from is unchanged (`unfit`); anything else is
prepared as before, so a release prepared ahead can make an update faster, never different.

This module owns when to look (`due`, pure), the look (fetch, branch head, prepare: one at a time,
never beside an update: the manager settles it before each run), whether a release prepared ahead
may stand for an update's commit (`unfit`, pure over release.json and the config), and removing the
releases prepared ahead that nothing will use. What it prepared is on disk (release.json's `ahead`,
outcome "prepared"), so a restarted daemon finds it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from proto4d import faults, fsutil, log, releases
from proto4d.activity import iso
from proto4d.config import Config
from proto4d.paths import Paths
from proto4d.procs import Cancel, Cancelled, PidRegistry

AHEAD = "ahead"  # release.json: {"at": wall clock, "inputs": inputs(cfg)}

IDLE, LOOKING, PREPARING, READY, FAILED = "idle", "looking", "preparing", "ready", "failed"


def inputs(cfg: Config) -> dict[str, Any]:
    """What a release's tree, links and venv come from beside its commit and the venv's key: a release
    prepared ahead under other values is prepared again."""
    return {"subdir": cfg.app.subdir, "workdir": cfg.app.workdir, "requirements": cfg.app.requirements,
            "shared": list(cfg.app.shared), "bytecode": bool(cfg.app.user)}


def due(*, now: float, last: float | None, every_s: float, green: bool, busy: bool) -> bool:
    """Whether to look for a new head now: only while nobody is on and nothing else prepares."""
    return every_s > 0 and green and not busy and (last is None or now - last >= every_s)


def unfit(info: Mapping[str, Any], *, commit: str, want: Mapping[str, Any], venv_key: str) -> str:
    """Why the release described by `info` cannot stand for an update to `commit` ("" = it can)."""
    ahead = info.get(AHEAD)
    if not isinstance(ahead, dict):
        return "it was not prepared ahead"
    if info.get("outcome") != "prepared":
        return f"it has run since (outcome {info.get('outcome')})"
    if info.get("commit") != commit:
        return f"it is commit {str(info.get('commit'))[:7]}, the update's is {commit[:7]}"
    had = ahead.get("inputs")
    if not isinstance(had, dict):
        return "its record does not say what it was prepared from"
    if had != dict(want):
        changed = sorted(set(want) | set(had), key=lambda k: (k not in want, k))
        return "changed since it was prepared: " + ", ".join(
            ("app.user" if k == "bytecode" else f"app.{k}") for k in changed if had.get(k) != want.get(k))
    if info.get("venv") != venv_key:
        return "its venv is not the one the requirements and `python` give now"
    return ""


def venv_key_now(cfg: Config, release: Path) -> str:
    """The venv key ensure_venv would give the release's requirements now (the interpreter's identity
    is remembered while its file is unchanged: usually no process)."""
    req = (release / cfg.app.requirements).read_bytes() if cfg.app.requirements else b""
    real, version = releases.python_identity(cfg.python)
    return releases.venv_key(req, real, version)


def is_ahead(rel: releases.Release) -> bool:
    return isinstance(rel.info.get(AHEAD), dict) and rel.outcome == "prepared"


class Ahead:
    """The one look (or preparation) at a time, its state for `status`, and handing its release over."""

    def __init__(self, *, config: Callable[[], Config], paths: Paths, mirror: releases.Mirror,
                 registry: PidRegistry, running_commit: Callable[[], str | None],
                 staged_release: Callable[[], str | None], status_changed: Callable[[], None],
                 prepare: Callable[..., releases.Prepared] = releases.prepare_release) -> None:
        self.config = config
        self.paths = paths
        self.mirror = mirror
        self.registry = registry
        self.running_commit = running_commit
        self.staged_release = staged_release
        self.status_changed = status_changed
        self.prepare = prepare
        self.log = log.get("proto4d.ahead")
        self.state = IDLE
        self.commit = ""
        self.release = ""
        self.note = ""  # what the last look found, in words
        self.looked_at: float | None = None  # wall clock
        self._last: float | None = None  # monotonic
        self._task: asyncio.Task[None] | None = None
        self._cancel: Cancel | None = None
        # Commits whose preparation failed, with why: not tried again until the config changes (a venv
        # whose requirements do not install would otherwise be built again at every look).
        self._failed: dict[str, tuple[dict[str, Any], str]] = {}

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    def tick(self, *, green: bool, busy: bool) -> None:
        """Called every sample."""
        now = time.monotonic()
        if self.busy or not due(now=now, last=self._last, every_s=self.config().update.prepare_ahead_s,
                                green=green, busy=busy):
            return
        self._last = now
        self._task = asyncio.create_task(self._look(), name="prepare-ahead")

    async def settle(self, *, wait: bool, say: Callable[[str], None]) -> None:
        """Before an update runs: let a preparation finish (`wait`: its release is likely the update's) or
        stop it (a rollback must not wait for a venv's build). Either way nothing of it runs beside the
        update: the mirror and the venvs are one."""
        task = self._task
        if task is None or task.done():
            return
        what = f"{self.commit[:7]} " if self.commit else ""
        if self.state != PREPARING:
            # a fetch is not killed: a git killed mid-fetch leaves lock files that fail the next fetch
            say("  waiting for the look for a new head (a fetch) to finish")
        elif wait:
            say(f"  waiting for the release of {what}being prepared ahead to be ready")
        else:
            say(f"  stopping the preparation of {what}ahead: this comes first")
            self.stop_soon()
        # asyncio.wait: a cancelled update must not cancel the task, whose thread would go on unawaited.
        await asyncio.wait({task})

    def stop_soon(self) -> None:
        if self._cancel is not None:
            self._cancel.cancel()

    async def stop(self) -> None:
        task = self._task
        if task is None:
            return
        self.stop_soon()
        with contextlib.suppress(Exception):
            await asyncio.wait({task}, timeout=30)

    async def _look(self) -> None:
        cfg = self.config()
        cancel = self._cancel = Cancel()
        self.looked_at = time.time()
        head = ""
        with faults.scoped("ahead_"):  # this task's fetch and export (its worker threads), no other task's
            try:
                self._set(LOOKING)
                await asyncio.to_thread(self.mirror.fetch, cancel)
                head = await asyncio.to_thread(self.mirror.branch_head, cfg.app.branch) or ""
                why_not = await asyncio.to_thread(self._why_not, cfg, head)
                found = await asyncio.to_thread(self._keep_only, cfg, "" if why_not else head)
                if why_not:
                    self._set(IDLE, note=why_not)
                    return
                if found:
                    self._set(READY, commit=head, release=found, note="prepared ahead at an earlier look")
                    return
                self._set(PREPARING, commit=head)
                self.log.info("ahead.preparing", commit=head[:12])
                t = time.monotonic()
                prepared = await asyncio.to_thread(
                    self.prepare, cfg, self.paths, self.mirror, head, cfg.app.branch, progress=self._progress,
                    cancel=cancel, registry=self.registry, extra={AHEAD: {"at": time.time(), "inputs": inputs(cfg)}})
                seconds = round(time.monotonic() - t, 2)
                self._set(READY, commit=head, release=prepared.release.name, note=f"prepared in {seconds} s")
                self.log.info("ahead.ready", release=prepared.release.name, commit=head[:12], seconds=seconds)
            except Cancelled:
                self._set(IDLE, note="stopped: a rollback, a restart or the daemon's stop came first")
                self.log.info("ahead.stopped", commit=head[:12])
            except (releases.ReleaseError, OSError) as e:
                why = str(e) if isinstance(e, releases.ReleaseError) else f"{e.strerror or e} ({e.filename or ''})"
                if head:
                    self._failed[head] = (inputs(cfg), why)
                self._set(FAILED, commit=head, note=why)
                self.log.warning("ahead.failed", commit=head[:12], error=why,
                                 then="the update prepares it again; not tried ahead again until the config changes")
            except Exception:  # a bug here must not stop the sampling that started it
                self.log.exception("ahead.crashed")
                self._set(FAILED, commit=head, note="internal error (see the daemon's log)")
            finally:
                self._cancel = None

    def _why_not(self, cfg: Config, head: str) -> str:
        """Why the head is not prepared ahead ("" = it is to be)."""
        if not head:
            return f"branch {cfg.app.branch!r} does not exist in the repository"
        running = self.running_commit()
        if head == running:
            return f"the branch head {head[:7]} is what serves"
        if running and self.mirror.has_commit(running) and not self.mirror.is_ancestor(running, head):
            return (f"history rewritten: the branch head {head[:7]} does not descend from the running commit "
                    f"{running[:7]} (an update refuses it unless named with --ref)")
        staged = self.staged_release()
        if staged:
            rel = releases.read_release(self.paths, staged)
            if rel is not None and rel.commit == head:
                return f"the branch head {head[:7]} is staged ({staged})"
        failed = self._failed.get(head)
        if failed is not None and failed[0] == inputs(cfg):
            return f"preparing {head[:7]} ahead failed: {failed[1]}"
        return ""


    def _unfit(self, cfg: Config, rel: releases.Release, commit: str) -> str:
        try:
            key = venv_key_now(cfg, rel.path)
        except (OSError, releases.ReleaseError) as e:
            return f"its venv key cannot be worked out: {e}"
        why = unfit(rel.info, commit=commit, want=inputs(cfg), venv_key=key)
        if not why and not (self.paths.venvs / rel.venv / "venv.json").is_file():
            why = f"its venv {rel.venv} is gone"
        return why

    def _keep_only(self, cfg: Config, head: str) -> str:
        """The release prepared ahead for `head` that still fits ("" = none, or no head to prepare); every
        other release prepared ahead that nothing will use (a head the branch moved past) is removed."""
        current, staged = self.paths.current_release(), self.staged_release()
        found = ""
        for rel in releases.list_releases(self.paths):
            if not is_ahead(rel) or rel.name in (current, staged):
                continue
            why = self._unfit(cfg, rel, head) if head and rel.commit == head else "no longer the branch head"
            if why or found:
                self._remove(rel, why or "a second one for the same head")
            else:
                found = rel.name
        return found

    def _remove(self, rel: releases.Release, why: str) -> None:
        with contextlib.suppress(OSError):
            fsutil.remove_tree(rel.path)
        self.mirror.unpin(rel.name)
        self.log.info("ahead.removed", release=rel.name, commit=rel.commit[:12], why=why)

    def take(self, cfg: Config, commit: str, say: Callable[[str], None]) -> releases.Release | None:
        """The release prepared ahead for `commit`, checked again for this update; None when there is none
        that fits (one that does not is removed, said in the update's log). Runs in a worker thread, while
        no look runs (settled)."""
        for rel in releases.list_releases(self.paths):
            if not is_ahead(rel) or rel.commit != commit:
                continue
            why = self._unfit(cfg, rel, commit)
            if not why:
                req_file = rel.path / cfg.app.requirements if cfg.app.requirements else None
                problems = releases.preflight(cfg, self.paths, rel.path, self.paths.venvs / rel.venv, req_file)
                why = "preflight: " + "; ".join(problems) if problems else ""
            if why:
                self._remove(rel, why)
                say(f"  the release prepared ahead, {rel.name}, is not used: {why}; preparing again")
                continue
            at = rel.info[AHEAD].get("at")
            say(f"  {rel.name} was prepared ahead" + (f" at {time.strftime('%H:%M:%S', time.localtime(at))}"
                                                      if isinstance(at, (int, float)) else "")
                + " while nobody was on: checked again, nothing to export or install")
            if self.release == rel.name:  # a worker thread: the status is written at the update's next step
                self.state, self.release, self.note = IDLE, "", f"{rel.name} taken by an update"
            return rel
        return None

    def _set(self, state: str, *, commit: str = "", release: str = "", note: str = "") -> None:
        self.state, self.commit, self.release, self.note = state, commit, release, note
        self.status_changed()

    def _progress(self, text: str) -> None:
        if not releases.is_installer_output(text):
            self.log.info("ahead.step", step=text)

    def status(self) -> dict[str, Any]:
        every = self.config().update.prepare_ahead_s
        return {"state": IDLE if every <= 0 and not self.busy else self.state, "enabled": every > 0,
                "every_s": every, "commit": self.commit, "release": self.release, "note": self.note,
                "looked_at": iso(self.looked_at) if self.looked_at else None}
