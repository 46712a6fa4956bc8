"""The daemon: one asyncio loop that owns the app, samples activity, and acts on requests.

It holds `state/daemon.lock` (one daemon per root), reaps what a killed predecessor left
behind, settles an unfinished update from the journal, builds the first release when
there is none, starts the app, and then loops: sample every `activity.interval_s`
(status.json, activity history, sd_notify STATUS), look for `update.request`, ping the
watchdog. Signals: HUP reloads the config, USR1 requests an update, TERM/INT/QUIT drain
the app and exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import fcntl
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from proto4d import __version__, configwait, faults, fsutil, log, prune, releases, states
from proto4d import config as configmod
from proto4d.activity import History, Sampler, iso
from proto4d.child import RotatingLog
from proto4d.health import Prober
from proto4d.inbox import Request, RequestRejected, claim, new_id, parse, prune_consumed, set_aside, vet
from proto4d.notices import Webhook
from proto4d.notifier import Notifier
from proto4d.paths import Paths
from proto4d.procs import Cancel, Cancelled, PidRegistry, background_note
from proto4d.runner import Runner, RunnerDeps
from proto4d.update import UpdateDeps, UpdateManager

REQUEST_POLL_S = 1.0  # `proto4d update` also sends SIGUSR2 to have it looked at at once
NO_RELEASE_RETRY_S = 60.0


class AlreadyRunning(Exception):
    pass


class Daemon:
    def __init__(self, cfg: configmod.Config, config_path: str | None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.paths = Paths(cfg.root)
        self.log = log.get("proto4d")
        self._machine = states.Machine(states.DAEMON, states.STARTING, states.logged(self.log, "daemon.state"))
        self.stopping = False
        self._reload_lock = asyncio.Lock()
        self.started_at = time.time()
        self.notifier = Notifier()
        self.registry = PidRegistry(self.paths.app_pids)
        self.prober = Prober()
        self.sampler = Sampler(cfg.activity, cfg.safety, cfg.listen.port, cfg.app.access_log_regex,
                               self.prober.probe_ports, host=cfg.listen.host)
        self.history = History(self.paths.activity, cfg.activity.history_max_bytes)
        self.mirror = releases.Mirror(self.paths.mirror, cfg.app.repo, cfg.app.branch)
        self.webhook = Webhook(cfg.notify.webhook_url, cfg.notify.webhook_timeout_s)
        self.green_since: float | None = None
        self.release_error = ""
        self._data_cache: tuple[float, tuple[str, bool], dict[str, Any]] | None = None
        self.app_log: RotatingLog | None = None
        self.runner = Runner(RunnerDeps(config=lambda: self.cfg, paths=self.paths, prober=self.prober,
                                        registry=self.registry, on_line=self.on_app_line,
                                        on_fatal=self.on_app_fatal, stopping=lambda: self.stopping,
                                        on_record=self.on_access_record))
        self.updates = UpdateManager(UpdateDeps(
            config=lambda: self.cfg, paths=self.paths, runner=self.runner, mirror=self.mirror, prober=self.prober,
            registry=self.registry, sampler=self.sampler, green_since=lambda: self.green_since,
            wait_sample=self.wait_sample, webhook=lambda: self.webhook, status_changed=self.status_changed,
            prune=self.prune, stopping=lambda: self.stopping))
        self._stop = asyncio.Event()
        self._sampled = asyncio.Event()
        self._lock_fd: int | None = None
        self._flush_handle: asyncio.TimerHandle | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._startup_cancel = Cancel()

    @property
    def state(self) -> str:
        return self._machine.state

    def _running(self) -> None:
        """Startup or a reload is over; a stop that arrived meanwhile wins."""
        if not self.stopping and self.state != states.RUNNING:
            self._machine.change(states.RUNNING)

    # -- lifecycle

    def acquire_lock(self) -> None:
        self.paths.make_dirs()
        fd = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise AlreadyRunning(f"another proto4d daemon (pid {other or '?'}) already runs for {self.cfg.root}") \
                from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            loop.add_signal_handler(sig, self.request_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        loop.add_signal_handler(signal.SIGUSR1, self._on_usr1)
        loop.add_signal_handler(signal.SIGUSR2, self._on_usr2)
        self.app_log = RotatingLog(self.paths.app_log, self.cfg.app.log_max_bytes, self.cfg.app.log_backups)
        faults.configure(self.paths.state)
        self.log.info("daemon.starting", pid=os.getpid(), version=__version__, root=str(self.cfg.root),
                      config=self.cfg.source, python=sys.version.split()[0], canary_start=background_note())
        try:
            # The first start can take minutes (a venv build): a stop signal must not wait for it.
            startup = asyncio.create_task(self._startup(), name="startup")
            stop = asyncio.create_task(self._stop.wait())
            await asyncio.wait({startup, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not startup.done():
                self._startup_cancel.cancel()
                startup.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await startup
                return 0
            stop.cancel()
            startup.result()
            self._running()
            self.write_status()
            self._tasks = [asyncio.create_task(self._sample_loop(), name="sample"),
                           asyncio.create_task(self._request_loop(), name="requests"),
                           asyncio.create_task(self._watchdog_loop(), name="watchdog"),
                           asyncio.create_task(self._weekly_loop(), name="weekly"),
                           asyncio.create_task(self._no_release_loop(), name="no-release")]
            self.updates.start()
            await self._stop.wait()
        finally:
            await self._shutdown()
        return 0

    async def _startup(self) -> None:
        orphans = await asyncio.to_thread(self.registry.reap_orphans, self.cfg.update.drain_timeout_s,
                                          self.log.warning)
        if orphans:
            self.log.warning("orphans.ended", count=len(orphans), pids=[o["pid"] for o in orphans])
        # A process of ours that escaped the registry (it should not: starts are held until recorded) is
        # recognised by what it is, and ended too: it would hold the port and leave us idle.
        stale = await self.runner.end_stale()
        if stale:
            self.log.warning("stale.ended", count=len(stale), pids=[o["pid"] for o in stale])
        partial = await asyncio.to_thread(releases.cleanup_partial, self.paths)
        if partial:
            self.log.warning("partial.removed", paths=partial)
        self._resubmit_claimed()
        resume = self.updates.recover()
        await asyncio.to_thread(self.updates.stage.recover)
        await self._start_current()
        self._running()
        self.write_status()
        if self.runner.state in (states.RUNNING, states.FATAL, states.BACKOFF) or self.runner.release is None:
            self.notifier.ready()
        if resume is not None:
            self.updates.submit(resume)

    async def _start_current(self) -> None:
        """Start the release `current` points at, building the first one when there is none."""
        if self.paths.current_release() is None:
            await self._first_release()
        name = self.paths.current_release()
        if name is not None and not self.stopping:
            rel = releases.read_release(self.paths, name)
            if rel is None:
                self.release_error = f"releases/{name} has no readable release.json"
                self.log.error("release.unreadable", release=name)
            else:
                await self._rebuild_venv(rel)
                # A failure here (port, exec, crash) is retried by the runner's backoff, never left idle.
                if await self.runner.start(rel) and rel.outcome in ("prepared", "serving"):
                    # The first release has no update to verify it: passing every check at start does.
                    releases.set_outcome(self.paths, rel.name, "verified")

    async def _first_release(self) -> None:
        """No `current` yet: fetch the branch head and prepare it exactly as an update would."""
        cfg = self.cfg
        self.log.info("first_release.start", repo=cfg.app.repo, branch=cfg.app.branch)

        def progress(text: str) -> None:
            if not releases.is_installer_output(text):
                self.log.info("first_release.progress", text=text)

        try:
            await asyncio.to_thread(self.mirror.fetch)
            sha = await asyncio.to_thread(self.mirror.branch_head, cfg.app.branch)
            if sha is None:
                raise releases.ReleaseError(f"branch {cfg.app.branch!r} does not exist in {cfg.app.repo}")
            prepared = await asyncio.to_thread(releases.prepare_release, cfg, self.paths, self.mirror, sha,
                                               cfg.app.branch, progress=progress, registry=self.registry,
                                               cancel=self._startup_cancel)
        except releases.ReleaseError as e:
            self.release_error = str(e)
            self.log.error("first_release.failed", error=str(e))
            return
        except Cancelled:
            return
        if cfg.app.migrate and not await self._first_migration(prepared.release, progress):
            return
        releases.switch_current(self.paths, prepared.release.name)
        releases.set_outcome(self.paths, prepared.release.name, "serving")
        self.release_error = ""
        self.log.info("first_release.ready", release=prepared.release.name, commit=sha[:7])

    async def _first_migration(self, rel: releases.Release, progress: Callable[[str], None]) -> bool:
        """The first release creates or upgrades the schema before it starts (snapshot first, if data exists)."""
        from proto4d import datasteps

        cfg = self.cfg
        data = datasteps.DataSteps(
            shared_root=self.paths.shared, shared=cfg.app.shared, declared=cfg.app.databases,
            migrate_argv=cfg.app.migrate, workdir=cfg.app.workdir, state_dir=self.paths.state,
            backups=self.paths.backups, timeout_s=cfg.update.migrate_timeout_s, app_env=cfg.app.env_dict,
            python_for=lambda r: releases.python_for(self.paths, r), progress=progress, registry=self.registry,
            app_user=cfg.app.user)
        try:
            await asyncio.to_thread(data.take_snapshot, rel, release_name="")
            await asyncio.to_thread(data.migrate_live, rel)
            releases.note_info(self.paths, rel.name, schema=data.revisions())
        except datasteps.DataStepFailed as e:
            self.release_error = f"first release {rel.name}: {e}"
            self.log.error("first_release.failed", error=self.release_error)
            with contextlib.suppress(OSError):
                fsutil.remove_tree(rel.path)
            return False
        return True

    async def _rebuild_venv(self, rel: releases.Release) -> None:
        """A venv removed, or left dangling by an interpreter upgrade (brew upgrade), is rebuilt before the start."""
        try:
            await asyncio.to_thread(releases.repair_venv, self.cfg, self.paths, rel,
                                    progress=lambda t: self.log.warning("venv.repair", text=t)
                                    if not releases.is_installer_output(t) else None,
                                    cancel=self._startup_cancel, registry=self.registry)
        except releases.ReleaseError as e:
            self.log.error("venv.rebuild_failed", release=rel.name, error=str(e))
        except Cancelled:
            return

    def request_stop(self, sig: int | None = None) -> None:
        if not self.stopping:
            self.log.info("daemon.stopping", signal=signal.Signals(sig).name if sig else None)
        self.stopping = True
        if self.state != states.STOPPED:  # a signal after the shutdown: nothing left to stop
            self._machine.change(states.STOPPING)
        self._stop.set()

    async def _shutdown(self) -> None:
        self.stopping = True
        self._machine.change(states.STOPPING)
        self.notifier.stopping()
        with contextlib.suppress(Exception):
            self.write_status()
        await self.updates.stop()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.runner.stop_all()
        # A process the runner does not hold (a new one started for a switch the stop interrupted before it
        # took over, a canary) is still in the registry: no app process outlives the daemon.
        left = await asyncio.to_thread(self.registry.reap_orphans, self.cfg.update.drain_timeout_s, self.log.warning)
        if left:
            self.log.warning("stop.ended_unheld", pids=[e["pid"] for e in left])
        await self.webhook.flush()
        self._machine.change(states.STOPPED)
        with contextlib.suppress(Exception):
            self.write_status()
        if self.app_log is not None:
            self.app_log.close()
        self.log.info("daemon.stopped")

    # -- app output

    def on_access_record(self, rec: Any, proc: Any) -> None:
        """A record from the drain shim's access channel (child.AppProcess hands them over)."""
        if proc.role == "app":
            self.sampler.feed_record(rec)

    def on_app_line(self, line: str, proc: Any) -> None:
        if self.app_log is not None:
            self.app_log.write(f"{dt.datetime.now().isoformat(timespec='milliseconds')} "
                               f"{proc.role}[{proc.pid}] {line}\n")
            if self._flush_handle is None:
                self._flush_handle = asyncio.get_running_loop().call_later(0.2, self._flush_app_log)
        if proc.role == "app" and not proc.access_channel:  # with the shim's channel, only its records count
            self.sampler.feed(line)

    def _flush_app_log(self) -> None:
        self._flush_handle = None
        if self.app_log is not None:
            self.app_log.flush()

    def on_app_fatal(self) -> None:
        self.notifier.status(f"FATAL: {self.runner.message[:200]}")
        self.notifier.ready()  # systemd should not kill the daemon for it: status must stay readable

    # -- loops

    async def _sample_loop(self) -> None:
        while True:
            started = time.monotonic()
            try:
                self.sample()
            except Exception:
                self.log.exception("sample.failed")
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.05, self.cfg.activity.interval_s - elapsed))

    def sample(self) -> None:
        runner = self.runner
        runner.stable_check()
        act = self.sampler.sample(runner.pids(), app_up=runner.state == states.RUNNING)
        if act["verdict"] == "green":
            if self.green_since is None:
                self.green_since = time.time()
        else:
            self.green_since = None
        runner.spare_tick(green=act["verdict"] == "green", updating=self.updates.run is not None)
        self.updates.ahead.tick(green=act["verdict"] == "green" and runner.state == states.RUNNING,
                                busy=self.updates.run is not None or self.updates.queued is not None)
        with contextlib.suppress(OSError):
            self.history.append(act)
        self.write_status()
        self.notifier.status(self.status_line())
        self._sampled.set()
        self._sampled.clear()

    async def wait_sample(self, timeout: float) -> None:
        # asyncio.wait, not wait_for: on Python < 3.12 wait_for swallows a cancellation that lands as the
        # sample arrives, and a waiting update superseded by a newer request would wait on.
        waiter = asyncio.ensure_future(self._sampled.wait())
        try:
            await asyncio.wait({waiter}, timeout=timeout)
        finally:
            waiter.cancel()

    async def _request_loop(self) -> None:
        while True:
            await asyncio.sleep(REQUEST_POLL_S)
            try:
                self.check_request_file()
            except Exception:
                self.log.exception("request.check_failed")

    def check_request_file(self) -> None:
        paths = self.paths
        if not os.path.lexists(paths.request):
            return
        fallback = new_id()
        try:
            claimed = claim(paths)
        except RequestRejected as e:
            self.updates.reject(fallback, str(e), "file")
            prune_consumed(paths)
            return
        except OSError as e:
            self.log.error("request.claim_failed", error=str(e))
            return
        if claimed is None:
            return
        path, data = claimed
        faults.point_sync("consumed")
        self._take(path, data, fallback)
        prune_consumed(paths)

    def _take(self, path: os.PathLike[str] | str, data: bytes, fallback: str) -> None:
        try:
            req = parse(data, fallback_id=fallback)
        except RequestRejected as e:
            self.updates.reject(fallback, str(e), "file")
        else:
            self.log.info("request.received", id=req.id, what=req.describe(), by=req.requested_by or "file",
                          reason=req.reason)
            self.updates.submit(req)
        # Marked taken only once it is in the journal/answers: a crash before this line re-reads it.
        with contextlib.suppress(OSError):
            os.rename(path, f"{path}.taken")

    def _resubmit_claimed(self) -> None:
        """A request claimed by a daemon that died before acting on it is acted on now (exactly once)."""
        if not self.paths.requests.is_dir():
            return
        for p in sorted(self.paths.requests.glob("*.request")):
            fallback = new_id()
            try:
                data = vet(self.paths, p)  # the same trust rules as a fresh claim: never follow a symlink
            except RequestRejected as e:
                set_aside(p)
                self.updates.reject(fallback, str(e), "file")
                continue
            except OSError:
                continue
            self.log.info("request.recovered", file=p.name)
            self._take(p, data, fallback)

    def _on_usr2(self) -> None:
        """`proto4d update` dropped a request file: look now rather than at the next poll."""
        try:
            self.check_request_file()
        except Exception:
            self.log.exception("request.check_failed")

    def _on_usr1(self) -> None:
        req = Request(id=new_id(), source="SIGUSR1", reason="SIGUSR1", requested_by="SIGUSR1")
        self.log.info("request.received", id=req.id, what=req.describe(), by="SIGUSR1")
        self.updates.submit(req)

    async def _watchdog_loop(self) -> None:
        interval = self.notifier.watchdog_interval()
        if not interval:
            return
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def _no_release_loop(self) -> None:
        """Without a release nothing serves: retry the first one every minute (an update request
        or a SIGHUP tries at once) until one starts."""
        while True:
            await asyncio.sleep(NO_RELEASE_RETRY_S)
            if self.runner.release is None and self.updates.run is None and not self.stopping:
                self.log.info("first_release.retry")
                await self._start_current()

    async def _weekly_loop(self) -> None:
        from proto4d import policy

        while True:
            weekly = self.cfg.schedule.weekly
            if weekly is None:
                await asyncio.sleep(60)
                continue
            zone = self.cfg.schedule.zone
            now = dt.datetime.now(zone)
            due = policy.next_weekly(now, weekly, zone)
            await asyncio.sleep(min(60.0, max(0.0, (due - dt.datetime.now(zone)).total_seconds())))
            if dt.datetime.now(zone) >= due and self.cfg.schedule.weekly == weekly:
                marker = self.paths.state / "weekly.last"
                stamp = due.isoformat()
                if (marker.read_text().strip() if marker.exists() else "") != stamp:
                    fsutil.atomic_write(marker, stamp)
                    req = Request(id=new_id(), source="weekly", reason=f"weekly schedule ({weekly.text})",
                                  requested_by="schedule.weekly")
                    self.log.info("request.received", id=req.id, what=req.describe(), by="schedule.weekly")
                    self.updates.submit(req)

    # -- reload

    async def reload(self) -> None:
        # SIGHUPs in a row: one reload at a time (each reads the file as it is then), so none starts
        # from the RELOADING state another left behind.
        async with self._reload_lock:
            await self._reload()

    async def _reload(self) -> None:
        if self.stopping:
            return  # a SIGHUP during the shutdown: nothing left to reconfigure
        self.notifier.reloading()
        previous_state = self.state
        self._machine.change(states.RELOADING)
        path = self.config_path
        try:
            # In a thread: a hostile file (thousands of nested brackets) takes seconds to refuse, and the
            # loop goes on sampling, checking and writing status meanwhile.
            new = await asyncio.to_thread(configmod.load, path)
            if self.stopping:
                return  # stopped while the file was read: the stop owns the state now
            if new.root != self.cfg.root:
                raise configmod.ConfigError(new.source, "root", f"the same root while running ({self.cfg.root}); "
                                            "restart the daemon to move it", new.root)
        except configmod.ConfigError as e:
            self.log.error("reload.refused", error=str(e), kept=self.cfg.source)
            if self.stopping:
                return
            self._machine.change(previous_state)
            self.notifier.ready()
            return
        changed = configmod.reload_differences(self.cfg, new)
        self.cfg = new
        self.sampler.reconfigure(new.activity, new.safety, new.listen.port, new.app.access_log_regex,
                                 host=new.listen.host)
        self.history.max_bytes = new.activity.history_max_bytes
        self.mirror.url = new.app.repo
        self.mirror.branch = new.app.branch
        self.webhook.configure(new.notify.webhook_url, new.notify.webhook_timeout_s)
        self.runner.configure()
        if self.app_log is not None:
            self.app_log.reconfigure(new.app.log_max_bytes, new.app.log_backups)
        self.log.info("reload.applied", now=changed[configmod.NOW] or "nothing",
                      **{f"at_{rule}": keys for rule, keys in changed.items() if rule != configmod.NOW and keys})
        pending = [k for rule, keys in changed.items() if rule != configmod.NOW for k in keys]
        if pending:
            self.log.info("reload.pending", keys=pending, msg="; ".join(
                f"{', '.join(keys)}: {configmod.RELOAD_RULES[rule]}" for rule, keys in changed.items()
                if rule != configmod.NOW and keys))
        self._machine.change(previous_state)
        self.notifier.ready()
        if self.runner.state == states.FATAL:
            await self.runner.revive()
        elif self.runner.release is None and self.updates.run is None:
            await self._start_current()
        self.write_status()

    # -- status

    def status_changed(self) -> None:
        with contextlib.suppress(Exception):
            self.write_status()

    def status(self) -> dict[str, Any]:
        runner = self.runner
        rel = runner.release
        proc = runner.proc
        return {
            "daemon": {"pid": os.getpid(), "version": __version__, "state": self.state,
                       "started_at": iso(self.started_at), "config": self.cfg.source, "root": str(self.cfg.root),
                       "interval_s": self.cfg.activity.interval_s, "rss_bytes": _own_rss()},
            "app": {"pid": proc.pid if proc is not None and proc.alive else 0,
                    "release": rel.name if rel else "", "commit": rel.commit if rel else "",
                    "healthy": bool(runner.healthy), "since": iso(runner.since), "restarts": runner.restarts,
                    "state": runner.state, "message": runner.message or self.release_error,
                    "last_exit": runner.last_exit, "drain": f"{runner.drain_kind}; the app says: {proc.drain_note}"
                    if proc is not None and proc.drain_note else runner.drain_kind,
                    "draining": sorted(p.pid for p in runner.draining if p.alive),
                    # where users and 5xx come from: only the shim's channel is out of the app's reach
                    "access_records": "the drain shim's channel" if proc is not None and proc.access_channel
                    else "parsed from the app's output",
                    "port": runner.production_port, "env_changed": self._env_changes(),
                    "spare": runner.spare_status()},
            "activity": self.sampler.last or {"verdict": "red", "reasons": ["not sampled yet"], "users": 0,
                                              "requests_window": 0, "connections": 0, "last_request": None,
                                              "tunnel": None, "cpu_percent": 0.0, "rss_bytes": 0,
                                              "sampled_at": None},
            "update": self.updates.status(),
            "stage": self.updates.stage.status(self.cfg),
            "ahead": self.updates.ahead.status(),
            "health": self._health_doc(),
            "data": self._data_status(),
            "written_at": iso(time.time()),
        }

    def _health_doc(self) -> dict[str, Any] | None:
        report, at = self.prober.last, self.prober.last_at
        if report is None:
            return None
        return {"ok": report.ok, "at": iso(at), "latency_ms": round(max((r.ms for r in report.results), default=0), 1),
                "summary": report.summary()}

    def _env_changes(self) -> list[str]:
        try:
            return self.runner.env_changes()
        except OSError:
            return []

    def _data_status(self) -> dict[str, Any] | None:
        # Walking shared/ for databases is not free: once a minute is enough for sizes and ages.
        # A switch (or the end of an update) changes revisions and snapshots: look again then too.
        now = time.monotonic()
        key = (self.runner.release.name if self.runner.release else "", self.updates.run is None)
        if self._data_cache is None or now - self._data_cache[0] > 60 or self._data_cache[1] != key:
            from proto4d import datasteps
            try:
                rel = self.runner.release
                self._data_cache = (now, key, datasteps.status(
                    self.paths.shared, self.cfg.app.databases, self.paths.backups,
                    pending_report=self.paths.pending_report, running_commit=rel.commit if rel else ""))
            except OSError:
                return None
        return self._data_cache[2]

    def write_status(self) -> None:
        fsutil.atomic_write_json(self.paths.status, log.scrub_obj(self.status()), durable=False)

    def status_line(self) -> str:
        rel = self.runner.release
        act = self.sampler.last
        upd = self.updates.run
        text = f"{self.runner.state}: {rel.name if rel else 'no release'}"
        if act:
            text += f"; {act['verdict']} ({act['users']} users)"
        if upd is not None:
            text += f"; update {upd.state}"
        return text

    def prune(self) -> None:
        staged = self.runner.staged.release if self.runner.staged is not None else None
        in_use = {r.venv for r in (self.runner.release, staged) if r is not None}
        removed, venvs = prune.apply(self.paths, self.cfg, sorted(in_use), keep=[staged.name] if staged else [])
        for name in removed:
            self.mirror.unpin(name)
        from proto4d import datasteps

        snaps = datasteps.prune(self.paths.backups, keep_days=self.cfg.update.keep_days,
                                keep_min=self.cfg.update.keep_min)
        if removed or venvs or snaps:
            self.log.info("retention.removed", releases=removed, venvs=venvs, snapshots=snaps)


def root_refusal(euid: int, allow_flag: bool, environ: Mapping[str, str]) -> str | None:
    """Why `proto4d run` must not start as this user, or None. Root is refused unless told:
    the app, git and every venv build would run as root, from files the operator's user can change."""
    if euid != 0 or allow_flag or environ.get("PROTO4D_ALLOW_ROOT", "") == "1":
        return None
    return ("refusing to run as root: the app, git and the venv builds would all run as root. Run it as the "
            "operator's user (a LaunchDaemon from `sudo proto4d install-service --launchd` does), or pass "
            "--allow-root / set PROTO4D_ALLOW_ROOT=1 if root is really meant")


def _own_rss() -> int:
    # What /metrics reports as proto4d_daemon_rss_bytes: the web process reads it here rather than
    # measuring another process (it may run as another user, or not on the same host view).
    try:
        import psutil  # already loaded by the sampler
        return int(psutil.Process().memory_info().rss)
    except Exception:
        return 0


def cmd_run(args: argparse.Namespace) -> int:
    refusal = root_refusal(os.geteuid(), getattr(args, "allow_root", False), os.environ)
    if refusal:
        print(f"proto4d run: {refusal}", file=sys.stderr)
        return 1
    # Nothing the daemon (or the app it starts) creates is writable by others, whatever umask it was
    # started with (a stricter one, such as 077, is kept).
    os.umask(os.umask(0o022) | 0o022)
    try:
        cfg = configmod.load(args.config)
    except configmod.ConfigError as e:
        # Not exit 78: launchd would respawn us into the same error forever. Stay up, say it, take the fix.
        waited = configwait.wait(args.config, e)
        if waited is None:
            return 0
        cfg = waited
    paths = Paths(cfg.root)
    paths.make_dirs()
    # Under launchd stderr is a file nothing rotates: the plist sets PROTO4D_LOG_STDERR=0 so that
    # events are written once, to the rotated logs/proto4d.log.
    log.setup(paths.daemon_log, stderr=os.environ.get("PROTO4D_LOG_STDERR", "1") != "0")
    daemon = Daemon(cfg, args.config or str(configmod.default_config_path()))
    try:
        daemon.acquire_lock()
    except AlreadyRunning as e:
        print(f"proto4d: {e}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(daemon.run())
    except KeyboardInterrupt:
        return 0
    except Exception:
        log.get().exception("daemon.crashed")
        # Whatever happened, the app must not outlive us.
        daemon.registry.reap_orphans(5)
        return 1
