"""The update state machine and its journal.

    requested -> waiting -> (yellow: noticed -> grace) -> preparing -> [canary] -> switching
              -> verifying -> watching -> done
    preparing/canary fails             -> aborted      (live service never touched)
    switching/verifying/watching fails -> rolling_back -> rolled_back

`state/journal.json` is rewritten (temp + fsync + rename) before every step, so a daemon
killed anywhere comes back, reads it, and settles on one verified release: an update that
had not reached the switch is aborted, one that had is rolled back to the release that
served before it. A rollback requested by the operator is the same machine aimed at an
older release, without the waiting.

One start per release when it can be: the canary runs from the release itself, holding the shared
socket, and once verified on its private port it is promoted in place at the switch (runner.promote).
The data rule (`_two_starts_because`) decides when that is allowed; otherwise, and when the promotion
itself fails, the release starts twice (canary on copies, then a handoff), and the update log says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from proto4d import accesslog, ahead, datasteps, faults, fsutil, log, notices, policy, releases, staging, states
from proto4d.activity import Sampler, iso
from proto4d.config import Config
from proto4d.health import Prober
from proto4d.inbox import Request, write_answer
from proto4d.listener import ListenError
from proto4d.notices import Webhook
from proto4d.paths import Paths
from proto4d.procs import Cancel, Cancelled, PidRegistry
from proto4d.runner import PromotionFailed, Runner, SwitchFailed
from proto4d.states import (
    ABORTED,
    BEFORE_SWITCH,
    CANARY,
    DONE,
    FINAL,
    NOTICED,
    PENDING,
    PREPARING,
    REJECTED,
    REQUESTED,
    ROLLED_BACK,
    ROLLING_BACK,
    STAGED,
    SUPERSEDED,
    SWITCHING,
    VERIFYING,
    WAITING,
    WATCHING,
)


class Clock:
    """Wall and monotonic time; the unit tests give the update a clock they move themselves."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


@dataclass(frozen=True)
class UpdateDeps:
    """What an update needs from the daemon, and nothing more. It talks to the runner through its methods."""

    config: Callable[[], Config]  # the config in force (a reload replaces it)
    paths: Paths
    runner: Runner
    mirror: releases.Mirror
    prober: Prober  # the external check (the app's own checks go through the runner)
    registry: PidRegistry
    sampler: Sampler  # the activity verdict, 5xx answers since the switch
    green_since: Callable[[], float | None]
    wait_sample: Callable[[float], Awaitable[None]]
    webhook: Callable[[], Webhook]
    status_changed: Callable[[], None]
    prune: Callable[[], None]  # retention after a successful update
    stopping: Callable[[], bool]
    clock: Clock = field(default_factory=Clock)
    prepare_release: Callable[..., releases.Prepared] = releases.prepare_release


class Rejected(Exception):
    """The request cannot be acted on (bad ref, unknown release); nothing was touched."""


class Aborted(Exception):
    """Preparing or the canary failed; the live service was never touched."""


class RollBack(Exception):
    """The switch, the verification or the watch failed; go back to the previous release."""


class Done(Exception):
    """Nothing to do (already running that commit): a successful no-op."""


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {}

    def start(self, req: Request, **fields: Any) -> None:
        self.data = {"id": req.id, "action": req.action, "request": req.to_dict(), "state": REQUESTED,
                     "steps": [], **fields}
        self.write(REQUESTED)

    def write(self, state: str, **fields: Any) -> None:
        now = time.time()
        self.data.update(fields)
        self.data["state"] = state
        self.data["updated_at"] = now
        self.data.setdefault("steps", []).append({"state": state, "at": now})
        fsutil.atomic_write_json(self.path, self.data)

    def note(self, **fields: Any) -> None:
        """Record facts within a step (no state change), durably."""
        self.data.update(fields)
        fsutil.atomic_write_json(self.path, self.data)

    @staticmethod
    def read(path: Path) -> dict[str, Any] | None:
        data = fsutil.read_json(path)
        return data if isinstance(data, dict) and "state" in data else None


class UpdateLog:
    """`logs/update_<stamp>.log`: the human-readable story of one update."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f: IO[str] = open(path, "a", encoding="utf-8", buffering=1,  # noqa: SIM115 - open for the run
                                opener=fsutil.private_opener)
        self._step_started: float | None = None

    def line(self, text: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        with contextlib.suppress(ValueError, OSError):  # disk full: the story loses a line, the update goes on
            self._f.write(f"{stamp}  {log.scrub(text)}\n")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._f.close()


class UpdateManager:
    """One update at a time; a request that arrives meanwhile is answered and queued (at most one)."""

    def __init__(self, deps: UpdateDeps) -> None:
        self.deps = deps
        self.log = log.get("proto4d.update")
        self.run: UpdateRun | None = None
        self.queued: Request | None = None
        self.last: dict[str, Any] = {}
        self.last_rejected: dict[str, Any] | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._expiry: asyncio.Task[None] | None = None
        self.stage = staging.StageBook(deps.paths, deps.runner, deps.mirror, deps.status_changed)
        self.ahead = ahead.Ahead(
            config=deps.config, paths=deps.paths, mirror=deps.mirror, registry=deps.registry,
            running_commit=lambda: deps.runner.release.commit if deps.runner.release else None,
            staged_release=lambda: self.stage.record.release if self.stage.record else None,
            status_changed=deps.status_changed, prepare=deps.prepare_release)
        self._discards: set[asyncio.Task[None]] = set()

    @property
    def cfg(self) -> Config:
        return self.deps.config()

    def submit(self, req: Request) -> None:
        try:
            if req.action == "discard":
                self._discard(req)
            else:
                self._submit(req)
        finally:
            self._wake.set()  # even when its answer could not be written (disk full): it is queued

    def _submit(self, req: Request) -> None:
        run = self.run
        note = self.stage.note_for(req.action)
        if run is not None and run.state in PENDING and not run.cancelling and req.action != "stage":
            # Nothing has been touched yet: the newer request replaces it. (A stage touches no production, so
            # it never replaces an update waiting for its moment: it waits its turn behind it.)
            run.supersede(req.id)
            self._replace_queued(req)
            write_answer(self.deps.paths, req.id, "accepted",
                         f"{req.describe()} accepted (replaces {run.req.id}){note}")
        elif run is not None:
            self._replace_queued(req)
            write_answer(self.deps.paths, req.id, "queued",
                         f"{req.describe()} queued: update {run.req.id} is {run.state}; this one starts after it{note}")
            self.log.info("request.queued", id=req.id, behind=run.req.id, behind_state=run.state)
        else:
            self._replace_queued(req)
            write_answer(self.deps.paths, req.id, "accepted", f"{req.describe()} accepted{note}")

    def _discard(self, req: Request) -> None:
        """`proto4d discard` is acted on at once, not queued: a promotion waiting for a quiet moment would
        otherwise keep the staged release alive for hours."""
        run = self.run
        if run is not None and run.req.action == "stage" and run.state not in FINAL:  # never past its canary
            run.discard(req.id)
            write_answer(self.deps.paths, req.id, DONE, f"the stage being prepared ({run.req.id}, {run.state}) "
                         "is cancelled; its release is removed")
            self.log.info("stage.cancelled", id=run.req.id, by=req.id)
            return
        if run is not None and run.promoting and run.state not in PENDING and run.state not in FINAL:
            self.reject(req.id, f"the staged release is being promoted (update {run.req.id} is {run.state}): too "
                        "late to discard it; `proto4d rollback` after it if it must go", req.source)
            return
        if self.stage.record is None:
            self.reject(req.id, "nothing is staged (see `proto4d status`)", req.source)
            return
        if run is not None and run.req.action == "promote" and run.state in PENDING and not run.cancelling:
            run.supersede(req.id)  # its target is what is being discarded
        task = asyncio.create_task(self._discard_now(req), name=f"discard-{req.id}")
        self._discards.add(task)
        task.add_done_callback(self._discards.discard)

    async def _discard_now(self, req: Request) -> None:
        why = f"discarded by request {req.id}" + (f": {req.reason}" if req.reason else "")
        try:
            rec = await self.stage.discard(why)
        except Exception as e:  # the record is gone already; the operator must hear what failed
            self.log.exception("stage.discard_failed", id=req.id)
            write_answer(self.deps.paths, req.id, ABORTED, f"discarding failed: {type(e).__name__}: {e}")
            return
        if rec is None:
            self.reject(req.id, "nothing is staged (see `proto4d status`)", req.source)
            return
        write_answer(self.deps.paths, req.id, DONE, f"discarded {rec.release} (commit {rec.commit[:7]}): its "
                     "process ended and its release was removed")

    def _stage_left(self) -> float | None:
        """Seconds until the staged release expires (None: nothing staged, or a promotion holds it)."""
        rec = self.stage.record
        if rec is None or (self.run is not None and self.run.promoting is rec):
            return None
        return max(0.0, rec.expires_at(self.cfg.stage.ttl_s) - self.deps.clock.time())

    async def _expire_stage(self) -> None:
        left = self._stage_left()
        if left is not None and left <= 0 and self.stage.record is not None:
            if self.run is not None and self.run.req.action == "promote" and self.run.state in PENDING:
                return  # the operator asked for it: it waits for its window
            await self.stage.discard(f"not promoted within stage.ttl_s ({self.cfg.stage.ttl_s:g} s)")

    def _replace_queued(self, req: Request) -> None:
        if self.queued is not None:
            write_answer(self.deps.paths, self.queued.id, SUPERSEDED, f"superseded by request {req.id}")
            self.log.info("request.superseded", id=self.queued.id, by=req.id)
        self.queued = req

    def reject(self, req_id: str, why: str, source: str) -> None:
        self.last_rejected = {"id": req_id, "reason": why, "at": iso(time.time()), "source": source}
        write_answer(self.deps.paths, req_id, REJECTED, why)
        self.log.warning("request.rejected", id=req_id, reason=why, source=source)

    async def _expiry_loop(self) -> None:
        """Discard the staged release once stage.ttl_s has passed; looked at every few seconds while
        something is staged, so a reload that shortens stage.ttl_s applies at once."""
        while True:
            left = self._stage_left()
            self.stage.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stage.changed.wait(), None if left is None else min(left + 0.05, 5.0))
            try:
                await self._expire_stage()
            except Exception:  # housekeeping: logged, tried again at the next look
                self.log.exception("stage.expiry_failed")

    async def loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.queued is not None and not self.deps.stopping():
                req, self.queued = self.queued, None
                try:
                    run = UpdateRun(self.deps, req, self.stage, self.ahead)
                except OSError as e:  # cannot even open its log (disk full): nothing was touched
                    self.log.error("update.cannot_start", id=req.id, error=str(e))
                    self.last = {"id": req.id, "state": ABORTED, "message": f"could not start: {e}"}
                    continue
                self.run = run
                try:
                    await run.execute()
                except asyncio.CancelledError:
                    if not run.superseded_by:
                        raise
                except Exception as e:  # e.g. the journal could not be written: this loop must go on
                    self.log.exception("update.failed", id=req.id)
                    run.crashed(e)
                finally:
                    if run.rejected is not None:
                        self.last_rejected = run.rejected
                    self.last = run.summary()
                    self.run = None
                    self.deps.status_changed()
                    run.publish_answer()

    def start(self) -> None:
        self._task = asyncio.create_task(self.loop(), name="updates")
        self._expiry = asyncio.create_task(self._expiry_loop(), name="stage-expiry")

    async def stop(self) -> None:
        run = self.run
        if run is not None:
            run.cancel_for_stop()
        await self.ahead.stop()
        for task in (self._task, self._expiry, *self._discards):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self.stage.record is not None:  # its process ends with the daemon: so does the stage
            with contextlib.suppress(Exception):
                await self.stage.discard("the daemon stopped")

    def status(self) -> dict[str, Any]:
        if self.run is not None:
            out = self.run.summary()
        else:
            out = {"state": "idle", "id": "", "ref": "", "reason": "", "requested_at": None, "message": "",
                   "last": self.last or None}
        out["queued"] = self.queued.to_dict() if self.queued else None
        out["last_rejected"] = self.last_rejected
        return out

    # -- after a restart

    def recover(self) -> Request | None:
        """Settle an update a previous daemon left unfinished. Returns a request to resume, if any."""
        j = Journal.read(self.deps.paths.journal)
        if j is None:
            return None
        state = j["state"]
        outcome = states.recovery_outcome(state)
        if outcome is None:
            return None
        req_id = j.get("id", "?")
        paths = self.deps.paths
        journal = Journal(paths.journal)
        journal.data = j
        if outcome == states.RESUME:
            self.log.info("recover.resume", id=req_id, state=state)
            return Request.from_dict(j.get("request") or {"id": req_id})
        new, old = j.get("new_release"), j.get("old_release")
        if outcome == ABORTED:
            if new and new != paths.current_release() and paths.release(new).exists():
                with contextlib.suppress(OSError):
                    fsutil.remove_tree(paths.release(new))
            why = f"interrupted by a daemon restart during {state}; the live service was not touched"
            journal.write(ABORTED, message=why, outcome=ABORTED)
            write_answer(paths, req_id, ABORTED, why)
            self.log.warning("recover.aborted", id=req_id, state=state)
        else:
            if j.get("restore_on_rollback") and j.get("snapshot"):
                try:
                    said = datasteps.restore_snapshot(paths.backups, paths.shared, j["snapshot"],
                                                      f"the daemon restarted during {state}")
                except Exception as e:  # the release still goes back; the operator is told to restore by hand
                    said = f"could not restore snapshot {j['snapshot']}: {e} (proto4d backups --restore)"
                journal.note(restore_on_rollback=False, restored=said)
                self.log.warning("recover.restored", id=req_id, message=said)
            back = old if old and paths.release(old).exists() else paths.current_release()
            if back and paths.current_release() != back:
                releases.switch_current(paths, back)
            if new and new != back:
                releases.set_outcome(paths, new, ROLLED_BACK, why=f"daemon restarted during {state}")
            why = (f"the daemon restarted during {state}; back on {back} (the new release had not finished "
                   "its verification)")
            journal.write(ROLLED_BACK, message=why, outcome=ROLLED_BACK)
            write_answer(paths, req_id, ROLLED_BACK, why, release=back)
            self.log.warning("recover.rolled_back", id=req_id, state=state, release=back)
        self.last = {"id": req_id, "state": journal.data["state"], "message": journal.data.get("message", "")}
        return None



class UpdateRun:
    def __init__(self, deps: UpdateDeps, req: Request, stage: staging.StageBook | None = None,
                 prepared_ahead: ahead.Ahead | None = None) -> None:
        self.deps = deps
        self.ahead = prepared_ahead
        self.stage = stage if stage is not None else staging.StageBook(deps.paths, deps.runner, deps.mirror,
                                                                        deps.status_changed)
        self.promoting: staging.StageRecord | None = None  # the staged release this run moves to production
        self.in_place = False  # ... and its staged process is promoted in place (no second start)
        self.discarded_by = ""
        self.runner = deps.runner
        self.clock = deps.clock
        self.req = req
        self.log = log.get("proto4d.update").bind(id=req.id)
        self._machine = states.Machine(states.UPDATE, REQUESTED, self._record)
        self.message = ""
        self.waiting_for = ""
        self.until: dt.datetime | None = None
        self.noticed_at: dt.datetime | None = None
        self.superseded_by = ""
        self.final_answer: tuple[str, str, dict[str, Any]] | None = None
        self.cancelling = False
        self.cancel = Cancel()
        self.target_commit = ""
        self.new: releases.Release | None = None
        self.old: releases.Release | None = deps.runner.release
        self.rejected: dict[str, Any] | None = None  # for status' last_rejected
        self.switched = False
        self.switched_at = 0.0  # wall clock of the switch: the watch counts 5xx answers from it
        self._fetched_at: float | None = None  # monotonic; None: not fetched by this run yet
        self.waited = False  # the update waited for a safe moment: refetch before preparing
        self.timings: dict[str, float] = {}
        stamp = time.strftime("%Y%m%d_%H%M%S")
        self.log_path = deps.paths.update_log(stamp)
        n = 2
        while self.log_path.exists():
            self.log_path = deps.paths.update_log(f"{stamp}_{n}")
            n += 1
        self.ulog = UpdateLog(self.log_path)
        self.journal = Journal(deps.paths.journal)
        self._task: asyncio.Task[Any] | None = None
        self.started = self.clock.monotonic()
        cfg, paths = deps.config(), deps.paths
        self.data = datasteps.DataSteps(
            shared_root=paths.shared, shared=cfg.app.shared, declared=cfg.app.databases, migrate_argv=cfg.app.migrate,
            workdir=cfg.app.workdir, state_dir=paths.state, backups=paths.backups,
            timeout_s=cfg.update.migrate_timeout_s, app_env=cfg.app.env_dict,
            python_for=lambda rel: releases.python_for(paths, rel), progress=self._progress, registry=deps.registry,
            app_user=cfg.app.user)

    # -- public

    @property
    def state(self) -> str:
        return self._machine.state

    @property
    def cfg(self) -> Config:
        return self.deps.config()

    @property
    def new_code(self) -> bool:
        """The release is new code from the repository (its migrations apply), not one that served before."""
        return self.req.action in ("update", "stage", "promote")

    def crashed(self, e: Exception) -> None:
        """An exception escaped execute() (its own handlers failed, e.g. on a full disk): end the run
        as aborted if the live service was not touched yet; after the switch the state stays, and the
        next start settles it from the journal."""
        if self.state in FINAL:
            return
        self.message = f"{type(e).__name__}: {e}"
        if not self.switched and ABORTED in states.UPDATE[self.state]:
            self._machine.change(ABORTED, outcome=ABORTED, message=self.message)

    def summary(self) -> dict[str, Any]:
        r = self.req
        until = self.until.astimezone(self.cfg.schedule.zone).isoformat(timespec="seconds") if self.until else None
        return {"state": self.state, "id": r.id, "action": r.action, "ref": r.ref or self.cfg.app.branch,
                "reason": r.reason, "requested_at": iso(r.requested_at), "message": self.message,
                "waiting_for": self.waiting_for, "until": until, "target_commit": self.target_commit,
                "new_release": self.new.name if self.new else None,
                "old_release": self.old.name if self.old else None,
                "log": str(self.log_path.relative_to(self.deps.paths.root)), "force": r.force,
                "timings": {k: round(v, 2) for k, v in self.timings.items()}}

    def supersede(self, by: str) -> None:
        self.superseded_by = by
        self.cancelling = True
        if self._task is not None:
            self._task.cancel()

    def discard(self, by: str) -> None:
        """`proto4d discard` while this stage is being prepared."""
        self.discarded_by = by
        self.cancelling = True
        self.cancel.cancel()
        if self._task is not None:
            self._task.cancel()

    def cancel_for_stop(self) -> None:
        self.cancelling = True
        self.cancel.cancel()
        if self._task is not None:
            self._task.cancel()

    async def execute(self) -> None:
        self._task = asyncio.current_task()
        paths = self.deps.paths
        r = self.req
        self.ulog.line(f"{r.describe()} requested by {r.requested_by or r.source} (id {r.id})"
                       + (f": {r.reason}" if r.reason else ""))
        self.journal.start(r, old_release=self.old.name if self.old else None,
                           old_commit=self.old.commit if self.old else None,
                           log=str(self.log_path.relative_to(paths.root)))
        self._answer("accepted", f"{r.describe()} accepted{self.stage.note_for(r.action)}")
        self.deps.webhook().send(REQUESTED, self._event())
        try:
            if self.ahead is not None:  # nothing of a look for a new head runs beside an update
                await self.ahead.settle(wait=r.action in ("update", "stage"), say=self.ulog.line)
            await self._resolve()
            if r.action == "stage":
                # production is not touched: no quiet moment to wait for, no notice
                await self._step(PREPARING, self._prepare)
                await self._step(CANARY, self._stage_canary)
                rec = self.stage.record
                self._finish(STAGED, f"{self.new.name if self.new else '?'} (commit {self.target_commit[:7]}) is "
                                     f"staged at {rec.url if rec else '?'}: `proto4d promote` makes it production, "
                                     "`proto4d discard` ends it")
                return
            if r.action in ("update", "promote") and not r.force:
                await self._wait_for_window()
            elif r.force:
                self.ulog.line("forced: not waiting for a quiet moment (health checks still run)")
            self._post_notice("An update is being applied now.", self.clock.time())
            self.deps.webhook().send("started", self._event())
            await self._step(PREPARING, self._prepare)
            if self._canary_possible():
                await self._step(CANARY, self._canary)
                await faults.point("canary_done")
            try:
                await self._step(SWITCHING, self._switch)
                await self._step(VERIFYING, self._verify)
                await self._step(WATCHING, self._watch)
            except (RollBack, SwitchFailed) as e:
                await self._rollback(str(e))
                return
            self._finish(DONE, f"{self.new.name if self.new else '?'} serves and is verified "
                                 f"(commit {self.target_commit[:7]})")
            try:
                releases.set_outcome(paths, self.new.name, "verified")
                await asyncio.to_thread(self.deps.prune)
            except Exception as e:  # done and verified: failing housekeeping is no reason to roll back
                self.log.exception("update.housekeeping_failed", error=str(e))
        except Done as e:
            self._finish(DONE, str(e))
        except Rejected as e:
            self.rejected = {"id": r.id, "reason": str(e), "at": iso(self.clock.time()), "source": r.source}
            self.log.warning("request.rejected", reason=str(e), source=r.source)  # as for a malformed file
            self._finish(REJECTED, str(e))
        except Aborted as e:
            self._discard_new()
            self._finish(ABORTED, str(e))
        except (asyncio.CancelledError, Cancelled):
            if self.discarded_by and self.state not in FINAL:
                await self.runner.discard_staged()  # a stage's process that was starting
                self._discard_new()
                self._finish(ABORTED, f"discarded by request {self.discarded_by} while {self.state}")
                return
            self._on_cancel()
            raise
        except Exception as e:  # a bug must not leave the service half-switched without a word
            self.log.exception("update.crashed")
            if self.switched:
                await self._rollback(f"internal error: {type(e).__name__}: {e}")
            else:
                self._discard_new()
                self._finish(ABORTED, f"internal error before the switch: {type(e).__name__}: {e}")
        finally:
            await self.runner.discard_candidate()  # a verified canary the update did not promote
            self.runner.release_hold()
            notices.remove_notice(self.cfg.notice_path)
            self.ulog.close()

    # -- steps

    async def _step(self, state: str, fn: Callable[[], Awaitable[None]]) -> None:
        self._enter(state)
        t = self.clock.monotonic()
        await fn()
        took = self.clock.monotonic() - t
        self.timings[state] = took
        self.ulog.line(f"  {state} done in {took:.2f} s")
        self.log.info("update.step_done", step=state, seconds=round(took, 3))

    def _enter(self, state: str, **fields: Any) -> None:
        self._machine.change(state, **fields)
        self.ulog.line(f"{state} ...")
        self.log.info("update.step", step=state, **{k: v for k, v in fields.items() if isinstance(v, str | int)})
        self.deps.status_changed()

    def _record(self, old: str, new: str, fields: dict[str, Any]) -> None:
        """The journal is written before the state changes: durable before the step does anything. Going
        back (rolling_back) and the outcome are recorded best-effort: on a full disk they still happen,
        are logged, answered if possible and shown in status."""
        try:
            self.journal.write(new, **fields)
        except OSError as e:
            if new not in FINAL and new != ROLLING_BACK:
                raise
            self.log.error("journal.write_failed", state=new, error=str(e))

    def _answer(self, state: str, message: str, **extra: Any) -> None:
        write_answer(self.deps.paths, self.req.id, state, message,
                     log=str(self.log_path.relative_to(self.deps.paths.root)), **extra)

    def _event(self, **extra: Any) -> dict[str, Any]:
        return {"id": self.req.id, "action": self.req.action, "ref": self.req.ref, "state": self.state,
                "reason": self.req.reason, "new_release": self.new.name if self.new else None,
                "old_release": self.old.name if self.old else None, "commit": self.target_commit, **extra}

    def _finish(self, outcome: str, message: str) -> None:
        notices.remove_notice(self.cfg.notice_path)  # before the answer: whoever waits sees it gone
        self.message = message
        took = self.clock.monotonic() - self.started
        self._machine.change(outcome, outcome=outcome, message=message, seconds=round(took, 2))
        self.ulog.line(f"outcome: {outcome.upper()} after {took:.1f} s: {message}")
        if self.timings:
            self.ulog.line("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in self.timings.items()))
        # Answered by the manager once this run is over and status says so: whoever waits on the
        # answer then reads a status that agrees with it.
        self.final_answer = (outcome, message, {"verified": outcome == DONE, "release":
                             self.runner.release.name if self.runner.release else None})
        if outcome == STAGED and self.stage.record is not None:
            self.final_answer[2].update(staged=self.new.name if self.new else None, url=self.stage.record.url)
        say = self.log.info if outcome in (DONE, STAGED) else self.log.warning
        say("update.finished", outcome=outcome, message=message, seconds=round(took, 2))
        if outcome in (DONE, ROLLED_BACK, ABORTED, REJECTED, STAGED):
            self.deps.webhook().send(outcome, self._event(message=message))
        self.deps.status_changed()

    def publish_answer(self) -> None:
        if self.final_answer is None:
            return
        outcome, message, extra = self.final_answer
        try:
            self._answer(outcome, message, **extra)
        except OSError as e:
            self.log.error("answer.write_failed", state=outcome, error=str(e))

    def _on_cancel(self) -> None:
        if self.superseded_by:
            self._finish(SUPERSEDED, f"superseded by request {self.superseded_by} before anything was touched")
        elif self.state in PENDING:
            # The daemon is stopping while this waits: the journal keeps it, the next start resumes it.
            self.ulog.line("daemon stopping: the request stays pending and resumes at the next start")
        elif self.state in BEFORE_SWITCH:
            self._discard_new()
            self._finish(ABORTED, f"the daemon stopped during {self.state}; the live service was not touched")
        else:
            self.ulog.line(f"daemon stopping during {self.state}: the next start returns to "
                           f"{self.old.name if self.old else 'the previous release'}")

    # -- resolve: what exactly will be deployed

    async def _resolve(self) -> None:
        paths = self.deps.paths
        r = self.req
        running = self.old.commit if self.old else None
        if r.action == "rollback":
            target = self._rollback_target()
            self.new = target
            self.target_commit = target.commit
            self.ulog.line(f"rollback target: {target.name} (commit {target.commit[:7]}, {target.outcome})")
            return
        if r.action == "restart":
            # The same release again, by the same handoff: a changed .env or app.env reaches the app.
            if self.old is None:
                raise Rejected("nothing is running to restart")
            self.new = self.old
            self.target_commit = self.old.commit
            self.ulog.line(f"restart of {self.old.name} (commit {self.old.commit[:7]}): a new process, the same "
                           "release, the same zero-gap handoff")
            return
        if r.action == "promote":
            self._resolve_promote()
            return
        cfg = self.cfg
        if r.action == "stage" and not (cfg.app.uses_fd or cfg.app.uses_port):
            raise Rejected("a staged release answers on stage.listen: app.command must take {fd} or {port}")
        await self._fetch()
        mirror = self.deps.mirror
        if r.ref:
            sha = await asyncio.to_thread(mirror.resolve, r.ref)
            if sha is None:
                raise Rejected(f"ref {r.ref!r} does not exist in {self.cfg.app.repo} (not a branch, tag or commit)")
        else:
            sha = await asyncio.to_thread(mirror.branch_head, self.cfg.app.branch)
            if sha is None:
                raise Rejected(f"branch {self.cfg.app.branch!r} does not exist in {self.cfg.app.repo}")
        self.target_commit = sha
        self.journal.note(target_commit=sha)
        rec = self.stage.record
        if r.action == "stage":
            if running == sha:
                raise Rejected(f"{sha[:7]} is what serves ({self.old.name if self.old else '?'}): nothing to stage")
            if rec is not None and rec.commit == sha and not self.stage.exited():
                raise Done(f"{sha[:7]} is already staged ({rec.release}) at {rec.url}")
        if running == sha and self.runner.state == states.RUNNING:
            raise Done(f"already running {sha[:7]} ({self.old.name if self.old else '?'}); nothing to do")
        if r.action == "update" and rec is not None:
            self.ulog.line(f"the staged release {rec.release} ({rec.commit[:7]}) is "
                           + ("this commit: it is promoted, nothing is prepared twice" if rec.commit == sha
                              else "another commit: it is discarded when this update starts preparing"))
        commits = await asyncio.to_thread(mirror.log_between, running, sha)
        self.ulog.line(f"from {running[:7] if running else '(nothing)'} to {sha[:7]}: {len(commits)} commit(s)")
        for c in commits:
            self.ulog.line(f"    {c}")
        del paths

    def _resolve_promote(self) -> None:
        rec = self.stage.record
        if rec is None:
            raise Rejected("nothing is staged: `proto4d stage` prepares a release to promote "
                           "(or `proto4d update` deploys the branch head)")
        rel = releases.read_release(self.deps.paths, rec.release)
        if rel is None:
            raise Rejected(f"the staged release {rec.release} is gone from releases/; `proto4d stage` again")
        self.promoting = rec
        self.new = rel
        self.target_commit = rec.commit
        self.journal.note(target_commit=rec.commit)
        self.ulog.line(f"promotion of the staged release {rec.release} (commit {rec.commit[:7]}, staged by {rec.id})")

    async def _fetch(self) -> None:
        t = self.clock.monotonic()
        try:
            await asyncio.to_thread(self.deps.mirror.fetch, self.cancel)
        except releases.ReleaseError as e:
            raise Aborted(str(e)) from None
        self.timings["fetch"] = self.timings.get("fetch", 0) + self.clock.monotonic() - t
        self._fetched_at = self.clock.monotonic()

    def _rollback_target(self) -> releases.Release:
        paths = self.deps.paths
        current = paths.current_release()
        if self.req.release:
            rel = releases.read_release(paths, self.req.release)
            if rel is None:
                known = ", ".join(r.name for r in releases.list_releases(paths)[:5])
                raise Rejected(f"release {self.req.release!r} is not retained (see `proto4d releases`: {known})")
            if rel.name == current and self.runner.state == states.RUNNING:
                raise Rejected(f"{rel.name} is already the current release")
            return rel
        cur = releases.read_release(paths, current) if current else None
        prev = cur.info.get("previous") if cur else None
        if prev and paths.release(prev).exists():
            rel = releases.read_release(paths, prev)
            if rel is not None:
                return rel
        for rel in releases.list_releases(paths):
            if rel.name != current and rel.outcome in ("verified", "serving") and (
                    cur is None or rel.created_at < cur.created_at):
                return rel
        raise Rejected("there is no previous release to roll back to")

    # -- waiting for a safe moment

    async def _wait_for_window(self) -> None:
        cfg = self.cfg
        self._enter(WAITING)
        self.deps.webhook().send(WAITING, self._event())
        last_reason = ""
        while True:
            if self.cancelling:  # superseded or stopping, even if a cancellation was lost on the way
                raise asyncio.CancelledError
            cfg = self.cfg
            zone = cfg.schedule.zone
            now = dt.datetime.now(zone)
            verdict = self.deps.sampler.last_verdict or policy.Verdict("red", ("no activity sample yet",))
            green = self.deps.green_since()
            green_since = dt.datetime.fromtimestamp(green, zone) if green is not None else None
            decision = policy.decide(verdict, now, cfg.safety, cfg.schedule, cfg.update.notice_grace_s,
                                     green_since=green_since, noticed_at=self.noticed_at, force=self.req.force)
            self.waiting_for = decision.reason
            self.until = decision.until
            if decision.reason != last_reason:
                self.ulog.line(f"  {verdict.color}: {decision.reason}")
                self.log.info("update.waiting", verdict=verdict.color, why=decision.reason,
                              until=decision.until.isoformat(timespec="seconds") if decision.until else None)
                last_reason = decision.reason
                self.message = decision.reason
                self.deps.status_changed()
            if decision.action == "start":
                self.waiting_for = ""
                self.until = None
                return
            self.waited = True
            if decision.action == "notice" and self.noticed_at is None:
                self.noticed_at = now
                when = self.clock.time() + cfg.update.notice_grace_s
                grace = policy.duration_words(cfg.update.notice_grace_s)
                self._post_notice(f"An update will be applied in about {grace}. It should not interrupt you; "
                                  "requests in progress will finish.", when)
                self._enter(NOTICED, noticed_at=now.timestamp())
                self.deps.webhook().send(NOTICED, self._event(notice_until=iso(when), verdict=verdict.color))
                continue
            await self.deps.wait_sample(1.0)

    def _post_notice(self, message: str, when: float) -> None:
        notices.write_notice(self.cfg.notice_path, update_id=self.req.id, message=message, when=when,
                             impact="none expected: the new version takes over without dropping a request")

    # -- preparing

    async def _prepare(self) -> None:
        cfg, paths = self.cfg, self.deps.paths
        if self.req.action in ("rollback", "restart"):
            await self._prepare_rollback()
            return
        if self.req.action == "promote":
            await self._prepare_promote()
            return
        # What was resolved at request time may be stale after a wait: look again.
        if self.waited or self._fetched_at is None or self.clock.monotonic() - self._fetched_at > 30:
            await self._fetch()
        if not self.req.ref:
            head = await asyncio.to_thread(self.deps.mirror.branch_head, cfg.app.branch)
            if head and head != self.target_commit:
                self.ulog.line(f"  branch moved while waiting: now {head[:7]}")
                self.target_commit = head
        else:
            sha = await asyncio.to_thread(self.deps.mirror.resolve, self.req.ref)
            if sha is None:
                raise Aborted(f"ref {self.req.ref!r} no longer exists in {cfg.app.repo} (it was "
                              f"{self.target_commit[:7]} when requested); nothing was deployed")
            if sha != self.target_commit:
                self.ulog.line(f"  {self.req.ref} moved while waiting: now {sha[:7]}")
                self.target_commit = sha
        self.journal.note(target_commit=self.target_commit)
        running = self.old.commit if self.old else None
        if running == self.target_commit and self.runner.state == states.RUNNING:
            raise Done(f"already running {running[:7]}; nothing to do")
        mirror = self.deps.mirror
        if (not self.req.ref and running and await asyncio.to_thread(mirror.has_commit, running)
                and not await asyncio.to_thread(mirror.is_ancestor, running, self.target_commit)):
            raise Aborted(f"history rewritten: {cfg.app.branch} is now {self.target_commit[:7]}, which does not "
                          f"descend from the running commit {running[:7]}; to deploy it anyway, name it: "
                          f"proto4d update --ref {self.target_commit[:12]}")
        rec = self.stage.record
        if rec is not None and self.req.action == "update" and rec.commit == self.target_commit:
            self.promoting = rec
            self.new = releases.read_release(paths, rec.release)
            if self.new is not None:
                self.ulog.line(f"  the staged release {rec.release} is this commit: promoting it")
                await self._prepare_promote()
                return
            self.promoting = None
        if rec is not None:
            await self.stage.discard(f"{self.req.describe()} ({self.req.id}) prepares {self.target_commit[:7]}")
            self.ulog.line(f"  discarded the staged release {rec.release} ({rec.commit[:7]}): this "
                           f"{self.req.action} prepares {self.target_commit[:7]}")
        if self.ahead is not None:
            taken = await asyncio.to_thread(self.ahead.take, cfg, self.target_commit, self.ulog.line)
            if taken is not None:
                self.new = taken
                self.journal.note(new_release=taken.name, new_commit=self.target_commit, prepared_ahead=True)
                return
        try:
            prepared = await asyncio.to_thread(
                self.deps.prepare_release, cfg, paths, self.deps.mirror, self.target_commit,
                self.req.ref or cfg.app.branch, progress=self._progress, cancel=self.cancel,
                registry=self.deps.registry, timings=self.timings)
        except releases.ReleaseError as e:
            raise Aborted(str(e)) from None
        except OSError as e:
            raise Aborted(f"preparing failed: {e.strerror or e} ({getattr(e, 'filename', '') or ''})") from None
        self.new = prepared.release
        self.journal.note(new_release=self.new.name, new_commit=self.target_commit)

    async def _prepare_promote(self) -> None:
        """The staged release is taken: promoted in place when its process can be, else ended (the canary
        on copies of the data and a start on the shared socket follow, as for any update)."""
        rec = self.promoting
        if rec is None or self.stage.record is not rec or self.new is None:
            raise Aborted("the staged release was discarded before its promotion could start")
        staged = self.deps.runner.staged
        exited = self.stage.exited()
        if not exited and staged is not None:
            host, port = staged.probe
            report = await self.runner.wait_healthy(alive=lambda: staged.proc.alive, host=host, port=port,
                                                    timeout=min(self.cfg.health.start_timeout_s, 15))
            if not report.ok:
                exited = f"it no longer passes its checks: {report.failures()}"
        if exited:
            await self.stage.discard(f"it could not be promoted: {exited}")
            raise Aborted(f"the staged release {rec.release} cannot be promoted: {exited}; nothing was switched "
                          "(`proto4d stage` again)")
        self.stage.consume()
        self.journal.note(new_release=self.new.name, new_commit=rec.commit)
        if self.runner.offer_staged(self.new):
            self.in_place = True
            self.ulog.line(f"  {rec.release} (pid {staged.proc.pid if staged else '?'}) is promoted in place: the "
                           "process the teacher tried becomes production (one start)")
        else:
            await self.runner.discard_staged()
            self.stage.remove_copies(rec)
            self.ulog.line(f"  {rec.release} ran on copies of the data: its staged process is ended; the release "
                           "runs its canary again and starts on the shared socket")

    async def _prepare_rollback(self) -> None:
        target = self.new
        assert target is not None
        # a venv removed by retention, or left dangling by an interpreter upgrade, is rebuilt first
        try:
            await asyncio.to_thread(releases.repair_venv, self.cfg, self.deps.paths, target, progress=self._progress,
                                    cancel=self.cancel, registry=self.deps.registry)
        except releases.ReleaseError as e:
            raise Aborted(str(e)) from None
        self.journal.note(new_release=target.name, new_commit=target.commit)

    def _progress(self, text: str) -> None:
        self.ulog.line("  " + text)
        if not releases.is_installer_output(text):
            self.log.info("update.progress", text=text)

    def _discard_new(self) -> None:
        """An aborted update's release never served: remove it (a rollback or restart target is kept)."""
        if self.new is None or not self.new_code:
            return
        if self.deps.paths.current_release() == self.new.name:
            return
        with contextlib.suppress(OSError):
            fsutil.remove_tree(self.new.path)
        self.deps.mirror.unpin(self.new.name)
        self.ulog.line(f"  removed {self.new.name}")

    # -- canary

    def _canary_runs(self) -> bool:
        cfg = self.cfg
        return cfg.update.canary and (cfg.app.uses_fd or cfg.app.uses_port)

    def _canary_possible(self) -> bool:
        # A migration is proven on a copy even when no canary process can run.
        if self.in_place:  # a staged release promoted in place passed its canary when it was staged
            return False
        return self._canary_runs() or (self.data.migrates and self.new_code)

    async def _two_starts_because(self) -> str:
        """Why this release starts twice, canary then production ("" = once: its canary is promoted in place).

        The data rule. A promoted process keeps its working directory, its imports and the files and
        database connections it opened, so a canary that may be promoted must run from the release
        itself on production's shared paths, not from the canary tree on copies (canarydata). That is
        allowed only when the copies would protect nothing of the students': no `app.migrate` (a
        migration is always proven on a copy first, and the canary must run on the migrated copy) and no
        SQLite database, declared in `app.databases` or found under shared/ (a version that writes or
        breaks the database at start-up and then fails must leave production's untouched). With a
        database the canary runs on copies and the release starts again on the shared socket, as before.

        `update.promote: live` is the operator's choice to trade that for one start with a database: the
        canary runs on production's data, after a snapshot, when no migration is pending (no `app.migrate`,
        or it leaves every database's schema revision unchanged on a copy; a restart runs the same code). A
        migration pending, or a rollback with `app.migrate` set (older code on a newer schema is checked on
        a copy first), still starts twice.
        """
        cfg = self.cfg
        mode = cfg.update.promote
        if mode == "never":
            return "update.promote is never"
        blocker = self.runner.promotion_blocker()
        if blocker:
            return blocker
        if mode != "live":
            if self.data.migrates:
                return ("app.migrate is set: the migration is proven on a copy of the data and the canary runs on "
                        "that copy (students' data is never the canary's)")
            dbs = self.data.databases()
            if dbs:
                return f"the canary runs on copies of {', '.join(dbs)} (students' data is never the canary's)"
            return ""
        if self.data.migrates and self.req.action == "rollback":
            return "a rollback with app.migrate set: the older release is checked on a copy of the data first"
        if self.data.migrates and self.new_code:
            pending = await self.data.migration_pending(self.new)
            if pending:
                return f"update.promote is live, but a migration is pending ({pending}): the canary runs on the copy"
        return ""

    async def _canary(self) -> None:
        assert self.new is not None
        why = await self._two_starts_because() if self._canary_runs() else ""
        if self._canary_runs() and not why:
            await self._canary_in_place()
            return
        if why:
            self.ulog.line(f"  two starts (a canary, then production on the shared socket): {why}")
            self.log.info("promote.skipped", release=self.new.name, reason=why)
        old = self.old if self.new_code and self.old is not None and \
            self.old.name != self.new.name else None
        try:
            report, died = await self.data.canary(self.new, old,
                                                  self.runner.canary if self._canary_runs() else None,
                                                  migrate_copy=self.new_code)
        except datasteps.DataStepFailed as e:
            raise Aborted(str(e)) from None
        self.timings.update({k: v for k, v in self.data.timings.items() if k in ("canary_copy", "migrate_copy")})
        if report is not None:
            self.ulog.line(f"  canary checks: {report.summary()}")
            if not report.ok:
                hint = ""
                if self.req.action == "rollback" and self.data.migrates:
                    hint = (" (the data has a newer schema this release may not run on: `proto4d backups` "
                            "lists the snapshots taken before each switch)")
                raise Aborted(f"the canary of {self.new.name} failed: " + (died or report.failures()) + hint)
        self.journal.note(rollback_compatible=self.data.compatible)
        if self.data.compatible is False:
            self._allow_incompatible()

    async def _stage_canary(self) -> None:
        """`proto4d stage`: the canary on the preview address, kept running once verified. In place (holding
        the shared socket, on production's shared paths) when the data rule allows one start; else on
        copies of the data, which it keeps until it ends."""
        assert self.new is not None
        cfg = self.cfg
        address = (cfg.stage.host, cfg.stage.port)
        why = await self._two_starts_because()
        try:
            if not why:
                await self._snapshot_before_live_canary("staged")
                report, died = await self.runner.canary(self.new, promote=True, stage=address)
            else:
                self.ulog.line(f"  staged on copies of the data ({why}); a promotion starts it again")

                async def on_stage(rel: releases.Release) -> Any:
                    return await self.runner.canary(rel, stage=address)

                report, died = await self.data.canary(self.new, None, on_stage, migrate_copy=True, keep=True)
        except ListenError as e:
            raise Aborted(f"stage.listen: {e}") from None
        except datasteps.DataStepFailed as e:
            raise Aborted(str(e)) from None
        staged = self.runner.staged
        if not report.ok or staged is None:
            if self.data.kept is not None:
                await asyncio.to_thread(fsutil.remove_tree, self.data.kept)
            await self.runner.discard_staged()
            raise Aborted(f"the staged {self.new.name} failed its checks: " + (died or report.failures()))
        self.ulog.line(f"  checks on {cfg.stage.url}: {report.summary()}")
        self.stage.set(staging.StageRecord(
            id=self.req.id, release=self.new.name, commit=self.target_commit, ref=self.req.ref or cfg.app.branch,
            url=cfg.stage.url, staged_at=self.clock.time(), promotable=staged.candidate is not None,
            data_dir=str(self.data.kept or ""), pid=staged.proc.pid))
        self.ulog.line(f"  staged: {cfg.stage.url} (pid {staged.proc.pid}) until it is promoted, discarded or "
                       f"{policy.duration_words(cfg.stage.ttl_s)} pass (stage.ttl_s)")

    async def _snapshot_before_live_canary(self, what: str) -> str:
        """update.promote: live: a snapshot before a canary that may be promoted touches production's data
        (its id, "" when there is no database)."""
        assert self.new is not None
        if not self.data.databases():
            return ""
        await asyncio.to_thread(self.data.take_snapshot, self.new, release_name=self.old.name if self.old else "")
        if self.data.snapshot:
            self.journal.note(snapshot=self.data.snapshot)
            self.ulog.line(f"  update.promote is live: {what} on production's data, snapshot {self.data.snapshot} "
                           "taken first")
        return self.data.snapshot or ""

    async def _canary_in_place(self) -> None:
        """The release itself on a private port, holding the shared socket unserved: kept once verified."""
        assert self.new is not None
        self.ulog.line("  canary: the release itself, on production's shared paths, on a private port, holding the "
                       "shared socket; once verified it is promoted in place (one start)")
        snapshot = await self._snapshot_before_live_canary("the canary runs")
        on_live = (f"; it ran on production's data (update.promote: live): snapshot {snapshot} was taken just "
                   "before it (proto4d backups)") if snapshot else ""
        report, died = await self.runner.canary(self.new, promote=True)
        self.ulog.line(f"  canary checks: {report.summary()}")
        if not report.ok:
            raise Aborted(f"the canary of {self.new.name} failed: " + (died or report.failures()) + on_live)
        if self.runner.candidate is None:
            self.ulog.line("  the canary could not hold the shared socket: two starts")
        self.journal.note(rollback_compatible=self.data.compatible)

    def _allow_incompatible(self) -> None:
        """An incompatible migration goes on only when allowed, and only while nobody is on."""
        assert self.new is not None
        if not (self.cfg.update.allow_incompatible or self.req.allow_incompatible):
            raise Aborted(f"the migration of {self.new.name} is not rollback-compatible: "
                          f"{self.old.name if self.old else 'the previous release'} fails its checks on the migrated "
                          "copy, so a rollback would have to restore the pre-switch snapshot and lose what was "
                          "written since. Ask with `proto4d update --allow-incompatible` (or set "
                          "update.allow_incompatible) to deploy it while nobody is on")
        verdict = self.deps.sampler.last_verdict or policy.Verdict("red", ("no activity sample yet",))
        if verdict.color != "green":
            raise Aborted(f"the migration of {self.new.name} is not rollback-compatible and the verdict is "
                          f"{verdict.color} ({'; '.join(verdict.reasons)}): it runs only when nobody is on")
        self.ulog.line("  NOT rollback-compatible, allowed by the request or update.allow_incompatible, verdict green: "
                       "a rollback restores the pre-switch snapshot and saves the rows written since")

    # -- switching, verifying, watching

    async def _switch(self) -> None:
        assert self.new is not None
        runner = self.runner
        cfg = self.cfg
        await self._data_before_switch()
        runner.hold_for_switch()
        promoted = False
        if runner.candidate is not None:
            try:
                await runner.promote(self.new)
                promoted = True
            except PromotionFailed as e:
                self.ulog.line(f"  promotion in place failed ({e}): the release starts again on the shared socket")
                self.log.warning("promote.failed", release=self.new.name, reason=str(e))
        if promoted:
            proc = runner.proc
            self.ulog.line(f"  promoted in place: {self.new.name} (pid {proc.pid if proc else '?'}, verified as the "
                           "canary) accepts on the shared socket without restarting; "
                           f"{self.old.name if self.old else 'the old process'} drains (up to "
                           f"{cfg.update.drain_timeout_s:g} s) - {runner.drain_kind}")
        elif cfg.app.uses_fd and runner.serving_alive():
            await runner.handoff(self.new)
            self.ulog.line(f"  handoff: {self.new.name} accepts on the same socket; "
                           f"{self.old.name if self.old else 'the old process'} drains (up to "
                           f"{cfg.update.drain_timeout_s:g} s) - {runner.drain_kind}")
        elif cfg.app.uses_fd:
            await runner.handoff(self.new)  # nothing was serving: a plain start on the socket
        else:
            self.switched = True
            _proc, gap = await runner.stop_then_start(self.new)
            self.timings["gap"] = gap
            self.ulog.line(f"  stop-then-start: the port was closed for {gap:.2f} s")
        self.switched = True
        releases.switch_current(self.deps.paths, self.new.name)
        await faults.point("current_renamed")
        self._link_previous()
        self.switched_at = self.clock.time()
        self.journal.note(current=self.new.name, switched_at=self.switched_at)
        releases.set_outcome(self.deps.paths, self.new.name, "serving")
        self.ulog.line(f"  current -> releases/{self.new.name}")

    async def _data_before_switch(self) -> None:
        """Snapshot every database, then migrate the live one; a failure restores it and aborts."""
        assert self.new is not None
        old = self.old.name if self.old else ""
        if self.data.snapshot is None:  # update.promote: live took it before the canary already
            await asyncio.to_thread(self.data.take_snapshot, self.new, release_name=old)
        await faults.point("snapshot_taken")
        if not self.data.migrates or not self.new_code or self.data.no_migration_pending:
            if self.data.snapshot:
                self.journal.note(snapshot=self.data.snapshot)
            if self.data.no_migration_pending:  # proven a no-op on a copy: the live schema is the new release's
                releases.note_info(self.deps.paths, self.new.name, schema=self.data.revisions())
            return
        # Durable before the live database changes: a restart mid-migration knows what to restore.
        self.journal.note(snapshot=self.data.snapshot, migrating_live=True,
                          restore_on_rollback=self.data.compatible is not True)
        try:
            await asyncio.to_thread(self.data.migrate_live, self.new)
        except datasteps.DataStepFailed as e:
            self.journal.note(migrating_live=False, restore_on_rollback=False)
            raise Aborted(str(e)) from None
        await faults.point("migrated")
        self.timings.update({k: v for k, v in self.data.timings.items() if k in ("snapshot", "migrate_live")})
        releases.note_info(self.deps.paths, self.new.name, schema=self.data.revisions(),
                           rollback_compatible=self.data.compatible)

    def _link_previous(self) -> None:
        """Remember which release this one replaced: `rollback` with no name goes there."""
        if self.new is None or self.old is None or self.old.name == self.new.name:
            return
        rel = releases.read_release(self.deps.paths, self.new.name)
        if rel is not None and self.new_code:
            rel.info["previous"] = self.old.name
            fsutil.atomic_write_json(rel.path / "release.json", rel.info)

    async def _verify(self) -> None:
        cfg = self.cfg
        runner = self.runner
        proc = runner.proc
        await faults.point("verify")
        report = await runner.wait_healthy(timeout=min(cfg.health.start_timeout_s, 15),
                                           alive=lambda: proc is not None and proc.alive)
        self.ulog.line(f"  checks: {report.summary()}")
        if not report.ok:
            raise RollBack(f"verification failed on port {runner.production_port}: "
                           + (report.failures() if proc is not None and proc.alive else
                              f"the new process {proc.exit_description() if proc else 'is gone'}"))
        runner.mark_healthy(True)
        if cfg.health.external_url:
            ext = await self.deps.prober.external(cfg.health.external_url, cfg.health.timeout_s)
            if ext.ok:
                self.ulog.line(f"  external: {ext.describe()}")
            else:
                self.ulog.line(f"  WARNING external check failed (not a reason to roll back): {ext.describe()}")
                self.log.warning("update.external_failed", check=ext.describe())

    async def _watch(self) -> None:
        cfg = self.cfg
        runner = self.runner
        end = self.clock.monotonic() + cfg.update.watch_s
        since = self.switched_at or self.clock.time()
        failures = 0
        await faults.point("watch")
        while True:
            self._check_alive()
            remaining = end - self.clock.monotonic()
            if remaining <= 0:
                break
            self.until = dt.datetime.now().astimezone() + dt.timedelta(seconds=remaining)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(runner.crashed.wait(), min(cfg.health.interval_s, remaining))
            self._check_alive()
            # A check sent as the process dies waits in the socket's backlog for its whole timeout:
            # race it against the crash so a death is never mistaken for a slow answer.
            check = asyncio.ensure_future(runner.check())
            crash = asyncio.ensure_future(runner.crashed.wait())
            await asyncio.wait({check, crash}, return_when=asyncio.FIRST_COMPLETED)
            crash.cancel()
            if not check.done():
                check.cancel()
                self._check_alive()
            report = check.result()
            if not report.ok:
                failures += 1
                self.ulog.line(f"  watch: check failed ({failures} in a row): {report.failures()}")
                if failures >= 2:
                    raise RollBack(f"health checks failed during the watch: {report.failures()}")
                continue
            failures = 0
            why = accesslog.rollback_for_5xx(self.deps.sampler.errors_detail(since), cfg.update.max_5xx_ratio,
                                             min_errors=cfg.update.min_5xx_count,
                                             min_clients=cfg.update.min_5xx_clients)
            if why:
                raise RollBack(why)
        self.until = None
        self._check_alive()
        total, errors = self.deps.sampler.errors_since(since)
        self.ulog.line(f"  watched {cfg.update.watch_s:g} s: no crash, checks passing, {errors}/{total} 5xx")

    def _check_alive(self) -> None:
        runner = self.runner
        proc = runner.proc
        if runner.crashed.is_set() or proc is None or not proc.alive:
            how = proc.exit_description() if proc is not None else "is gone"
            raise RollBack(f"the new release crashed during the watch ({how}): {proc.last_lines() if proc else ''}")

    async def _rollback(self, why: str) -> None:
        paths, runner, cfg = self.deps.paths, self.runner, self.cfg
        self.message = why
        self.ulog.line(f"FAILED: {why}")
        self._enter(ROLLING_BACK, message=why)  # recorded best-effort: going back is the safe direction
        self.deps.webhook().send(ROLLING_BACK, self._event(message=why))
        back = self.old
        new = self.new
        t = self.clock.monotonic()
        await faults.point("rollback_started")
        if self.data.restore_on_rollback:
            # The old code cannot run on the new schema: the data goes back first, what was written since is saved.
            said = await asyncio.to_thread(self.data.restore_for_rollback)
            self.journal.note(restore_on_rollback=False, restored=said)
            self.ulog.line(f"  {said}")
            self.log.warning("rollback.restored", message=said)
            why = f"{why}; {said}"
        try:
            if back is not None and (runner.release is None or runner.release.name != back.name
                                     or runner.proc is None or not runner.proc.alive):
                runner.hold_for_switch()
                if cfg.app.uses_fd:
                    await runner.handoff(back)
                else:
                    await runner.stop_then_start(back)
            if back is not None:
                releases.switch_current(paths, back.name)
                await faults.point("rollback_renamed")
            report = await runner.wait_healthy(timeout=min(cfg.health.start_timeout_s, 15))
            runner.mark_healthy(report.ok)
            self.ulog.line(f"  back on {back.name if back else '?'}: {report.summary()} "
                           f"({self.clock.monotonic() - t:.2f} s)")
            if not report.ok:
                self.log.error("rollback.unhealthy", release=back.name if back else None, checks=report.failures())
        except SwitchFailed as e:
            # Nothing good is serving: let the supervisor's restart loop take over on `current`.
            self.log.critical("rollback.failed", error=str(e))
            self.ulog.line(f"  ROLLBACK FAILED: {e}; the supervisor keeps restarting {back.name if back else '?'}")
            if back is not None:
                releases.switch_current(paths, back.name)
                runner.fall_back(back, str(e))
        finally:
            runner.release_hold()
        if new is not None and (back is None or new.name != back.name):
            releases.set_outcome(paths, new.name, ROLLED_BACK, why=why)
        self.timings["rollback"] = self.clock.monotonic() - t
        self._finish(ROLLED_BACK, f"{why}; back on {back.name if back else '?'}")
