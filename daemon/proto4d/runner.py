"""The serving app process: start, keep alive with backoff, hand the socket over, drain, stop.

States follow supervisord's: stopped, starting, running, backoff, fatal, stopping. During
an update's switch and watch the runner is *held*: an exit is reported to the update (which
rolls back) instead of being restarted here.

Promotion in place (one start per release): a canary run with `promote=True` also inherits the
shared listening socket, unserved, and a control socket to the drain shim inside it. Once it has
passed every check on its private port it is kept as the runner's `candidate`; `promote()` tells
the shim `promote`, and only after the shim answers `promoted` (its event loop accepts on the
shared socket) does the old process get SIGTERM and drain, as in the handoff. A candidate that
cannot be promoted (the shim refuses, no answer, the process died) is stopped and the update
starts the release again on the shared socket (`handoff`, the two-start path).

No failure leaves the app down with nobody trying: a start that fails for any reason (the
port cannot be bound, the command cannot be executed, the app dies or stays unhealthy) goes
through the same backoff, and `fatal` (too many fast failures) still tries again every
`FATAL_RETRY_S`. A port that cannot be bound first ends stale processes of ours (one a killed
daemon left holding the socket); a holder that is not ours is named in the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from proto4d import appenv, appuser, drain, envwatch, faults, log, procs, releases, spare, states
from proto4d.accesschannel import AccessChannel
from proto4d.child import AppProcess, Backoff, LineHandler, NoLine, RecordHandler, close_socket, recv_line
from proto4d.config import Config, probe_host
from proto4d.health import HealthReport, Prober
from proto4d.listener import ListenError, free_port, open_listener, private_listener
from proto4d.paths import Paths
from proto4d.procs import PidRegistry, can_leave_background, lower_priority, to_foreground
from proto4d.releases import Release, python_for
from proto4d.spare import Spare, SpareError
from proto4d.states import BACKOFF, FATAL, RUNNING, STARTING, STOPPED, STOPPING

FATAL_RETRY_S = 60.0  # after giving up on fast failures: try again this often (SIGHUP tries at once)


# A spare warms only once the serving process has run for this many samples (not in the wake of a
# start or a switch), and after a failed one not again for SPARE_RETRY_S.
SPARE_AFTER_SAMPLES = 2
SPARE_RETRY_S = 600.0


class SwitchFailed(Exception):
    """The new process did not become ready; the old one still serves."""


class PromotionFailed(Exception):
    """The verified canary could not take the shared socket; the old one still serves (start it again)."""


async def ask(control: socket.socket, proc: AppProcess, what: str, timeout: float, limit: int = 4096) -> str:
    """One line to the drain shim on its control socket, its one-line answer (or why there was none)."""
    control.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_sendall(control, what.encode() + b"\n")
    except OSError as e:
        return f"the control socket is closed ({e.strerror or e})"
    try:
        line, _ = await recv_line(control, b"", timeout, limit, what)
    except NoLine as e:
        return f"the control socket closed ({proc.exit_description()})" if e.closed else str(e)
    return line


@dataclass
class Candidate:
    """A canary that passed its checks and may be promoted in place: it holds the shared socket unserved."""

    proc: AppProcess
    plan: drain.DrainPlan
    release: Release
    control: socket.socket  # the daemon's end of the control socket pair
    env_started: dict[str, dict[str, str]]
    shared: socket.socket | None = None  # the production socket it holds (a reload may replace the daemon's)

    async def ask_promote(self, timeout: float) -> str:
        """Send `promote`; return the shim's answer line (`promoted`, `refused ...`, `unavailable ...`) or
        why there was none."""
        return (await ask(self.control, self.proc, "promote", timeout))[:400]

    def close(self) -> None:
        close_socket(self.control)


@dataclass
class Staged:
    """A staged release's process on the preview address (`proto4d stage`): kept until promoted,
    discarded or expired. `candidate` is set when it can be promoted in place (it holds the shared
    socket unserved); otherwise it runs on copies of the data and a promotion starts the release again."""

    proc: AppProcess
    release: Release
    candidate: Candidate | None
    probe: tuple[str, int]  # where its checks reach it


@dataclass(frozen=True)
class RunnerDeps:
    """What the runner needs from the daemon that owns it, and nothing more."""

    config: Callable[[], Config]  # the config in force (a reload replaces it)
    paths: Paths
    prober: Prober
    registry: PidRegistry
    on_line: LineHandler  # every line the app prints
    on_fatal: Callable[[], None]  # the app gave up (status must say so)
    stopping: Callable[[], bool]  # the daemon is shutting down: restart nothing
    on_record: RecordHandler | None = None  # each access record from the drain shim's channel


class Runner:
    def __init__(self, deps: RunnerDeps) -> None:
        self.deps = deps
        self.log = log.get("proto4d.app")
        self._machine = states.Machine(states.APP, STOPPED, states.logged(self.log, "app.state"))
        self.proc: AppProcess | None = None
        self.release: Release | None = None
        self.listener: socket.socket | None = None
        self._listener_key: tuple[str, int, int] | None = None
        self._retired_listeners: list[socket.socket] = []
        self.draining: set[AppProcess] = set()
        self.restarts = 0
        self.healthy: bool | None = None
        self.since: float | None = None
        self.last_exit = ""
        self.message = ""
        self.drain_kind = ""
        # digests of the .env files and app.env the serving process started with (envwatch)
        self.env_started: dict[str, dict[str, str]] | None = None
        self.hold = False
        self.candidate: Candidate | None = None  # a verified canary waiting to be promoted in place
        self.staged: Staged | None = None  # `proto4d stage`: a release on the preview address
        self.crashed = asyncio.Event()
        self.backoff = Backoff()
        self._restart: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # app.spare: an interpreter with the venv's imports done, that becomes the next canary (spare.py)
        self.spare: Spare | None = None
        self._spare_task: asyncio.Task[None] | None = None
        self._spare_retry_at = 0.0  # monotonic: a spare that failed to warm is not tried again before
        self._starts = 0  # release starts begun (canaries, stages, handoffs): a spare's warming sees one
        self.configure()

    @property
    def state(self) -> str:
        return self._machine.state

    @property
    def cfg(self) -> Config:
        return self.deps.config()

    def configure(self) -> None:
        app = self.cfg.app
        self.backoff.stable_s = app.stable_s
        self.backoff.max_fast_failures = app.max_fast_failures
        if self.spare is not None:  # a reload: it started with the old config (its environment, its user)
            self._drop_spare("the configuration was reloaded")

    # -- building a process

    def production_listener(self) -> socket.socket | None:
        cfg = self.cfg
        if not cfg.app.uses_fd:
            return None
        key = (cfg.listen.host, cfg.listen.port, cfg.listen.backlog)
        if self.listener is None or self._listener_key != key:
            if self.listener is not None and self._listener_key and self._listener_key[:2] == key[:2]:
                return self.listener  # only the backlog changed: keep the socket
            new = open_listener(*key)
            if self.listener is not None:
                self.log.info("listen.changed", old=f"{self._listener_key[0]}:{self._listener_key[1]}",
                              new=f"{key[0]}:{key[1]}")
                self._retired_listeners.append(self.listener)
            self.listener, self._listener_key = new, key
        return self.listener

    def build(self, release: Release, role: str, sock: socket.socket | None = None,
              port: int | None = None, host: str | None = None,
              promote: tuple[socket.socket, socket.socket] | None = None, *,
              control: tuple[socket.socket, socket.socket] | None = None,
              spare_fds: list[int] | None = None, access: AccessChannel | None = None,
              ) -> tuple[AppProcess, drain.DrainPlan]:
        """One app process of `release`. `promote` (the shared listening socket, the shim's end of the
        control pair) makes a canary that can be promoted in place, when the drain shim runs it.
        A production process (role "app") through the shim gets a control socket of its own (the
        daemon asks it `modules` for the spare): `control` (the daemon's end, the shim's end), made
        here when not given. For a spare that becomes the process: `spare_fds`, the numbers in the
        spare of sock, then the shim's ends of `promote` or `control`, in that order; `access`, the
        spare's own record channel."""
        handed = [s for s in (sock, *(promote or ()), *(control[1:] if control else ())) if s is not None]
        number = dict(zip((s.fileno() for s in handed), spare_fds or (), strict=False))
        cfg = self.cfg
        for rel in cfg.app.shared:  # what the app may print from its .env is masked (read now: it may have changed)
            if Path(rel).name.startswith(".env"):
                log.redact_env_file(self.deps.paths.shared / rel)
        python = python_for(self.deps.paths, release)
        if sock is not None:
            port = int(sock.getsockname()[1])
        fd = str(number.get(sock.fileno(), sock.fileno())) if sock is not None else ""
        values = {"python": str(python), "fd": fd,
                  "port": str(port if port is not None else cfg.listen.port),
                  "host": host or cfg.listen.host, "release": str(release.path)}
        argv = [arg.format(**values) for arg in cfg.app.command]
        env = appenv.app_environment(os.environ, venv=python.parent.parent, release=release.name,
                                     extra=cfg.app.env_dict)
        user = self.app_user()
        cwd = release.path / cfg.app.workdir
        if user is not None:
            env.update(user.env())
        plan = drain.plan(argv, cfg.app.drain, env, cfg.app.drain_grace_s)
        env.update(plan.env)
        blocked = self.as_user(user, cwd, python, plan) if user is not None else None
        fds = [sock.fileno()] if sock is not None else []
        made = False
        if promote is not None and plan.kind == "shim":
            shared, theirs = promote
            env.update({drain.SHARED_ENV: str(number.get(shared.fileno(), shared.fileno())),
                        drain.CONTROL_ENV: str(number.get(theirs.fileno(), theirs.fileno()))})
            fds += [shared.fileno(), theirs.fileno()]
            control = None
        elif plan.kind == "shim" and role == "app":
            promote = None
            made = control is None
            control = control or socket.socketpair()
            env[drain.CONTROL_ENV] = str(number.get(control[1].fileno(), control[1].fileno()))
            fds.append(control[1].fileno())
        else:
            promote = control = None
        # records the app cannot forge (a canary that may be promoted has its channel from the start)
        if access is None and plan.kind == "shim" and (role in ("app", "spare") or promote is not None):
            access = AccessChannel()
        if access is not None:
            env.update(access.env)
        proc = AppProcess(release=release.name, role=role, argv=plan.argv, cwd=cwd,
                          env=env, pass_fds=tuple(fds), on_line=self.deps.on_line,
                          registry=self.deps.registry, ready_pattern=cfg.app.ready_pattern,
                          access=access, on_record=self.deps.on_record, user=user, blocked=blocked)
        if control is not None:
            proc.control = control[0]
            if made:
                proc.close_after_start = [control[1]]
        return proc, plan

    def app_user(self) -> appuser.AppUser | None:
        """`app.user`, looked up at every start (the account may have changed since the config was read)."""
        return appuser.resolve(self.cfg.app.user)

    def as_user(self, user: appuser.AppUser, cwd: Path, python: Path, plan: drain.DrainPlan) -> str | None:
        """Give the app user what it writes; why a process cannot start as it (None: it can)."""
        problem = user.problem()
        if problem:
            return problem
        paths = self.deps.paths
        try:
            user.prepare(root=paths.root, shared=paths.shared, state=paths.state, cwd=cwd, venv=python.parent.parent)
        except OSError as e:
            self.log.warning("app_user.handover_failed", user=user.name, error=str(e))
        shim = drain.SHIM_DIR / "proto4d_drain.py"  # the app imports it through the shim
        return user.cannot_run(python) or (user.cannot_read(shim) if plan.kind == "shim" else None)

    def _adopt(self, proc: AppProcess, release: Release, plan: drain.DrainPlan) -> None:
        self.proc = proc
        self.release = release
        self.drain_kind = plan.description
        self.env_started = self.env_now()
        task = asyncio.create_task(self._watch(proc), name=f"watch-{proc.pid}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def env_now(self) -> dict[str, dict[str, str]]:
        cfg = self.cfg
        return envwatch.read_fingerprints(self.deps.paths.shared, cfg.app.shared, cfg.app.env_dict)

    def env_changes(self) -> list[str]:
        """Keys of the shared .env (or app.env) changed since the serving process started; never values."""
        if self.env_started is None or self.proc is None:
            return []
        return [c.describe() for c in envwatch.changes(self.env_started, self.env_now())]

    @property
    def production_port(self) -> int:
        if self.listener is not None:
            return int(self.listener.getsockname()[1])
        return self.cfg.listen.port

    # -- health

    def serving_alive(self) -> bool:
        return self.proc is not None and self.proc.alive

    async def wait_healthy(self, *, alive: Callable[[], bool] | None = None, timeout: float | None = None,
                           host: str | None = None, port: int | None = None) -> HealthReport:
        """Every health check passing, within `timeout` (default health.start_timeout_s), on the production
        port unless told otherwise; gives up early once `alive` (default: the serving process) says no."""
        cfg = self.cfg
        return await self.deps.prober.wait_healthy(
            host or cfg.listen.probe_host, port if port is not None else self.production_port, cfg.health.checks,
            cfg.health.start_timeout_s if timeout is None else timeout, cfg.health.timeout_s,
            alive=alive or self.serving_alive)

    async def check(self) -> HealthReport:
        """One round of every health check against the production port."""
        cfg = self.cfg
        return await self.deps.prober.check(cfg.listen.probe_host, self.production_port, cfg.health.checks,
                                            cfg.health.timeout_s)

    def mark_healthy(self, ok: bool) -> None:
        """The update verified (or failed to verify) the serving process."""
        self.healthy = ok

    # -- first start and restarts

    async def start(self, release: Release) -> bool:
        """Start `release` on the production socket and wait until every health check passes."""
        cfg = self.cfg
        self.release = release  # even if it never starts: a restart or a revive tries it again
        self._machine.change(STARTING)
        self.healthy = None
        try:
            sock = await self.listen_production()
        except ListenError as e:
            self.log.error("listen.failed", release=release.name, error=str(e))
            self._retry_later(release.name, 0.0, str(e))
            return False
        proc, plan = self.build(release, "app", sock)
        self.log.info("app.starting", release=release.name, commit=release.commit[:7], argv=" ".join(proc.argv),
                      cwd=str(proc.cwd), drain=plan.description)
        await proc.start()
        self._adopt(proc, release, plan)
        report = await self.wait_healthy(alive=lambda: proc.alive)
        if proc is not self.proc or self.state == STOPPING:
            return False
        if report.ok:
            self._machine.change(RUNNING)
            self.healthy = True
            self.since = time.time()
            self.message = ""
            self.log.info("app.ready", release=release.name, pid=proc.pid,
                          seconds=round(time.monotonic() - proc.started_mono, 2), checks=report.summary())
            return True
        if proc.alive:
            why = f"not healthy after {cfg.health.start_timeout_s:g} s: {report.failures()}"
            self.log.error("app.unhealthy", release=release.name, pid=proc.pid, checks=report.failures())
            await proc.stop(min(5.0, cfg.update.drain_timeout_s))
        else:
            why = f"{proc.exit_description()} during start-up: {proc.last_lines()}"
        self._failed(proc, why)
        return False

    async def _watch(self, proc: AppProcess) -> None:
        await proc.exited.wait()
        if proc.stop_requested or proc is not self.proc:
            return
        self.healthy = False
        desc = proc.exit_description()
        self.last_exit = f"{desc} after {proc.ran_for:.1f} s"
        self.log.error("app.exited", release=proc.release, pid=proc.pid, how=desc,
                       ran_s=round(proc.ran_for, 1), last_output=proc.last_lines())
        if self.hold:
            self.crashed.set()
            return
        if self.state == STARTING:
            return  # start() sees the death through wait_healthy and calls _failed itself
        self._failed(proc, f"{desc}: {proc.last_lines()}")

    def _failed(self, proc: AppProcess, why: str) -> None:
        self._retry_later(proc.release, proc.ran_for, why)

    def _retry_later(self, release: str, ran_for: float, why: str) -> None:
        """Every failed start or crash ends here: a restart is always scheduled (slowly once fatal)."""
        if self.deps.stopping() or self.hold:
            return
        self.last_exit = why
        self.healthy = False
        action, delay = self.backoff.on_exit(ran_for)
        if action == "fatal":
            delay = max(FATAL_RETRY_S, self.backoff.maximum_s)
            self._machine.change(FATAL)
            self.message = (f"gave up after {self.backoff.failures} fast failures in a row "
                            f"(each under {self.backoff.stable_s:g} s), trying again every {delay:g} s "
                            f"(SIGHUP: at once); last: {why}")
            self.log.critical("app.fatal", release=release, failures=self.backoff.failures, last=why[:500],
                              retry_s=delay)
            self.deps.on_fatal()
        else:
            self._machine.change(BACKOFF)
            self.restarts += 1
            self.message = f"restarting in {delay:g} s after: {why[:300]}"
            self.log.warning("app.backoff", release=release, delay_s=delay, failures=self.backoff.failures)
        if self._restart is not None and not self._restart.done() and self._restart is not asyncio.current_task():
            self._restart.cancel()
        self._restart = asyncio.create_task(self._restart_after(delay), name="restart")

    async def _restart_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        rel = self.release
        if self.state not in (BACKOFF, FATAL) or self.deps.stopping() or self.hold or rel is None:
            return
        if await self.start(rel) and rel.outcome in ("prepared", "serving") \
                and self.deps.paths.current_release() == rel.name:
            # As at the first start: a release no update verified is verified by passing every check.
            releases.set_outcome(self.deps.paths, rel.name, "verified")

    async def listen_production(self) -> socket.socket | None:
        """The production socket. When it cannot be bound, end stale processes of ours (a daemon killed
        between a fork and its record left one holding the socket) and try once more; a ListenError
        otherwise names the holder."""
        try:
            return self.production_listener()
        except ListenError as first:
            stale = await self.end_stale()
            if not stale:
                raise
            self.log.warning("listen.retry", error=str(first), ended=[e["pid"] for e in stale])
            return self.production_listener()

    async def end_stale(self) -> list[dict]:
        """End processes of ours that nobody holds (procs.find_stale); return them."""
        cfg = self.cfg
        return await asyncio.to_thread(procs.end_stale, self.deps.paths.root, cfg.listen.port,
                                       self.deps.registry.pids(), cfg.update.drain_timeout_s, self.log.warning)

    def hold_for_switch(self) -> None:
        """An update switches: from now on an exit is the update's to act on (it rolls back), not restarted."""
        self.hold = True
        self.crashed.clear()

    def fall_back(self, release: Release, why: str) -> None:
        """A rollback could not start `release`: it stays the runner's release and the restart policy takes
        over from here."""
        self.hold = False
        self.release = release
        if self.proc is not None:
            self._failed(self.proc, why)

    def release_hold(self) -> None:
        """End an update's hold. A process that died while held, and that the update did not act on,
        is handed to the normal restart policy: never left dead with nobody watching."""
        self.hold = False
        proc = self.proc
        if proc is not None and not proc.alive and not proc.stop_requested and self.state == RUNNING \
                and not self.deps.stopping():
            self._failed(proc, f"{proc.exit_description()}: {proc.last_lines()}")

    def stable_check(self) -> None:
        """Called every sample: a run that outlived `stable_s` resets the backoff."""
        if self.proc is not None and self.proc.alive and self.proc.ran_for >= self.backoff.stable_s:
            self.backoff.reset()

    async def revive(self) -> bool:
        """Leave `fatal` (on SIGHUP or an operator action) and try again from a clean backoff."""
        if self.state != FATAL or self.release is None:
            return False
        if self._restart is not None and not self._restart.done():
            self._restart.cancel()
        self.backoff.reset()
        self.log.info("app.revive", release=self.release.name)
        return await self.start(self.release)

    # -- switching

    async def handoff(self, release: Release) -> AppProcess:
        """Start `release` on the same listening socket; once it is ready, retire the old process."""
        cfg = self.cfg
        try:
            sock = await self.listen_production()
        except ListenError as e:
            raise SwitchFailed(f"the new process of {release.name} cannot have the socket: {e}") from None
        # A warm spare is this start when it can stand in (app.spare): the canary before it was one
        # that is not promoted (it ran on copies of the data), and this is the start beside production.
        self._starts += 1
        became = await self._spare_becomes(release, "app", sock, None, None, None)
        proc, plan = became or self.build(release, "app", sock)
        if became is None:
            self.log.info("switch.start_new", release=release.name, argv=" ".join(proc.argv),
                          drain=plan.description)
            await proc.start()
        ok = await proc.wait_ready_line(cfg.health.start_timeout_s)
        if not ok:
            why = (f"{proc.exit_description()}: {proc.last_lines()}" if not proc.alive else
                   f"no ready line ({cfg.app.ready_pattern!r}) within {cfg.health.start_timeout_s:g} s")
            await proc.stop(5)
            raise SwitchFailed(f"the new process of {release.name} did not become ready: {why}")
        await faults.point("new_started")
        await self._take_over(proc, release, plan)
        return proc

    async def _take_over(self, proc: AppProcess, release: Release, plan: drain.DrainPlan) -> None:
        """`proc` accepts on the shared socket: it serves from now on, the old process drains."""
        old = self.proc
        self._adopt(proc, release, plan)
        self._machine.change(RUNNING)
        self.healthy = None
        self.since = time.time()
        self.restarts = 0
        self.backoff.reset()
        if old is not None and old.alive:
            self.retire(old)
            await self.wait_stopped_accepting(old, 3.0)

    def promotion_blocker(self) -> str:
        """Why a canary of the configured command cannot be promoted in place ("" when it can)."""
        cfg = self.cfg
        if not cfg.app.uses_fd:
            return "the command takes no {fd}, so there is no shared socket to hand over"
        values = {"python": "python", "fd": "3", "port": "0", "host": "127.0.0.1", "release": "."}
        plan = drain.plan([a.format(**values) for a in cfg.app.command], cfg.app.drain, {}, cfg.app.drain_grace_s)
        if plan.kind != "shim":
            return f"the drain shim does not run this server ({plan.description})"
        return ""

    async def promote(self, release: Release) -> AppProcess:
        """The verified canary of `release` starts accepting on the shared socket; then the old one drains.

        Raises PromotionFailed with the candidate stopped (nothing changed for the old process)."""
        cand, self.candidate = self.candidate, None
        if cand is None or cand.release.name != release.name:
            raise PromotionFailed(f"no verified canary of {release.name} is waiting")
        if not cand.proc.alive:
            cand.close()
            raise PromotionFailed(f"the canary {cand.proc.exit_description()}: {cand.proc.last_lines()}")
        try:
            current = self.production_listener()
        except ListenError as e:
            current = None
            self.log.warning("promote.no_socket", release=release.name, error=str(e))
        if current is None or current is not cand.shared:
            cand.close()
            await cand.proc.stop(min(5.0, self.cfg.update.drain_timeout_s))
            raise PromotionFailed("the listening address changed since the canary started (a reload): the release "
                                  "starts on the new one")
        if cand.proc.background:  # the normal class before it serves anyone
            problem = await asyncio.to_thread(to_foreground, cand.proc.pid)
            if problem is not None:
                cand.close()
                await cand.proc.stop(min(5.0, self.cfg.update.drain_timeout_s))
                raise PromotionFailed(f"the canary could not leave the background class: {problem}")
            cand.proc.background = False
        t = time.monotonic()
        answer = await cand.ask_promote(min(10.0, self.cfg.health.start_timeout_s))
        if answer != "promoted" or not cand.proc.alive:
            cand.close()
            await cand.proc.stop(min(5.0, self.cfg.update.drain_timeout_s))
            raise PromotionFailed(answer if answer != "promoted" else
                                  f"the canary {cand.proc.exit_description()} as it was promoted")
        proc = cand.proc
        proc.role = "app"  # its output and access records are production's from here
        proc.control = cand.control  # production's control socket from here (`modules`, for the spare)
        self.log.info("switch.promoted", release=release.name, pid=proc.pid, seconds=round(time.monotonic() - t, 3),
                      drain=cand.plan.description)
        await faults.point("new_started")
        await self._take_over(proc, release, cand.plan)
        self.env_started = cand.env_started  # what it read its .env from: at its start, as a canary
        return proc

    async def discard_candidate(self) -> None:
        """A verified canary that will not be promoted (the update ended otherwise): stop it."""
        cand, self.candidate = self.candidate, None
        if cand is not None:
            cand.close()
            await cand.proc.stop(min(5.0, self.cfg.update.drain_timeout_s))

    async def discard_staged(self) -> Staged | None:
        """End the staged release's process (`proto4d discard`, its expiry, a newer stage or update)."""
        staged, self.staged = self.staged, None
        if staged is not None:
            if staged.candidate is not None:
                staged.candidate.close()
            await staged.proc.stop(min(5.0, self.cfg.update.drain_timeout_s))
        return staged

    def offer_staged(self, release: Release) -> bool:
        """A promotion of the staged `release`: its process becomes the candidate promote() takes (True),
        or, when it cannot be promoted in place, stays staged for the caller to end (False)."""
        staged = self.staged
        if staged is None or staged.release.name != release.name or staged.candidate is None:
            return False
        self.staged = None
        self.candidate = staged.candidate
        return True

    async def stop_then_start(self, release: Release) -> tuple[AppProcess, float]:
        """For apps that bind the port themselves: the gap is as long as the new one's start-up."""
        cfg = self.cfg
        old = self.proc
        t0 = time.monotonic()
        if old is not None:
            await old.stop(cfg.update.drain_timeout_s)
        proc, plan = self.build(release, "app")
        await proc.start()
        self._adopt(proc, release, plan)
        self._machine.change(STARTING)
        report = await self.wait_healthy(alive=lambda: proc.alive, port=self.cfg.listen.port)
        gap = time.monotonic() - t0
        if not report.ok:
            why = report.failures() if proc.alive else f"{proc.exit_description()}: {proc.last_lines()}"
            await proc.stop(5)
            raise SwitchFailed(f"{release.name} did not become healthy after stop-then-start: {why}")
        self._machine.change(RUNNING)
        self.healthy = None
        self.since = time.time()
        self.backoff.reset()
        return proc, gap

    def retire(self, old: AppProcess) -> None:
        self.draining.add(old)
        task = asyncio.create_task(self._drain(old), name=f"drain-{old.pid}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, old: AppProcess) -> None:
        t = time.monotonic()
        timeout = self.cfg.update.drain_timeout_s
        rc = await old.stop(timeout)
        took = time.monotonic() - t
        self.log.info("app.drained", release=old.release, pid=old.pid, seconds=round(took, 2),
                      how=old.exit_description(), killed=took >= timeout, drain=old.drain_note or "SIGTERM")
        self.draining.discard(old)
        if not self.draining:
            for s in self._retired_listeners:
                s.close()
            self._retired_listeners.clear()
        del rc

    async def wait_stopped_accepting(self, old: AppProcess, timeout: float) -> None:
        """After SIGTERM the old process stops accepting; until then a probe of the port could be
        answered by it. Wait (briefly) until it no longer listens.

        uvicorn dups the inherited fd and serves on the dup, leaving the inherited fd open until it
        exits: only the socket on another fd means "still accepting". Where /proc is readable that is
        a look at the old process's descriptors for the sockets this daemon handed out (the drain shim
        lets go of it at its loop's next turn, so the first looks come after 2, 4, 8 ms); elsewhere
        psutil's list of its listening sockets on the port, in a thread (it reads every TCP socket of
        the host).
        """
        deadline = time.monotonic() + timeout
        port = self.production_port
        inherited = set(old.pass_fds)
        inodes = {os.fstat(s.fileno()).st_ino for s in (self.listener, *self._retired_listeners)
                  if s is not None and s.fileno() >= 0}

        def listening() -> bool:
            try:
                return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                           and c.fd not in inherited
                           for c in psutil.Process(old.pid).net_connections(kind="tcp"))
            except psutil.Error:
                return False

        pause = 0.002
        while old.alive and time.monotonic() < deadline:
            held = procs.holds_socket(old.pid, inodes, inherited) if inodes else None
            if held is None:
                held = await asyncio.to_thread(listening)
            if not held:
                return
            await asyncio.sleep(pause)
            pause = min(0.02, pause * 2)

    # -- canary

    async def canary(self, release: Release, *, promote: bool = False,
                     stage: tuple[str, int] | None = None) -> tuple[HealthReport, str]:
        """Run `release` on a private loopback port and check it; stopped afterwards, unless `promote`:
        then it also holds the shared socket (unserved) and, once it has passed every check, is kept as
        `self.candidate` for promote(). `release` must then be the release itself (its own tree and
        production's shared paths): a promoted process keeps its working directory and open files.

        `stage` (host, port): the preview address instead of a private port, and the verified process is
        kept as `self.staged` (promotable or not) until promoted or discarded. Raises ListenError when
        that address cannot be bound."""
        cfg = self.cfg
        self._starts += 1
        await self.discard_candidate()
        if stage is not None:
            host, port = stage
            sock = open_listener(host, port, 128) if cfg.app.uses_fd else None
            probe = probe_host(host)
        else:
            host = probe = "127.0.0.1"
            sock = private_listener() if cfg.app.uses_fd else None
            port = int(sock.getsockname()[1]) if sock is not None else free_port()
        pair: tuple[socket.socket, socket.socket] | None = None
        if promote and sock is not None:
            try:
                shared = await self.listen_production()
            except ListenError as e:
                self.log.warning("promote.no_socket", release=release.name, error=str(e))
            else:
                if shared is not None:
                    mine, theirs = socket.socketpair()
                    pair = (shared, theirs)
        env_started = self.env_now()
        became = await self._spare_becomes(release, "canary", sock, port, host, pair) \
            if pair is not None and sock is not None else None
        proc, plan = became or self.build(release, "canary", sock, port, host=host, promote=pair)
        promotable = pair is not None and plan.kind == "shim"
        keep = False
        # A process that may become production starts in the background class (its imports are the
        # update's largest burst of CPU, beside the app serving on the same cores) and gets the normal
        # class back before it serves production; one that will not is only niced (it never comes back).
        # A spare that became the canary is in that class already.
        if became is None:
            proc.background = promotable and can_leave_background()
        escape: asyncio.TimerHandle | None = None
        try:
            if became is None:
                await proc.start()
            if not promotable:
                lower_priority(proc.pid)
            elif proc.background:  # a start starved by a saturated machine finishes at the normal class
                escape = asyncio.get_running_loop().call_later(self.canary_foreground_after_s(),
                                                               self._canary_to_foreground, proc)
            report = await self.wait_healthy(alive=lambda: proc.alive, host=probe, port=port)
            died = "" if proc.alive else f"{proc.exit_description()}: {proc.last_lines()}"
            if report.ok and proc.alive and (promotable or stage is not None):
                cand = Candidate(proc, plan, release, mine, env_started, pair[0]) \
                    if promotable and pair is not None else None
                if stage is not None:
                    self.staged = Staged(proc, release, cand, (probe, port))
                else:
                    self.candidate = cand
                keep = True
            return report, died
        finally:
            if escape is not None:
                escape.cancel()
            if pair is not None:
                with contextlib.suppress(OSError):
                    pair[1].close()  # the child has its own copy
                if not keep or (self.staged is not None and self.staged.proc is proc
                                and self.staged.candidate is None):
                    with contextlib.suppress(OSError):
                        mine.close()
            if not keep:
                await proc.stop(5)
            if sock is not None:
                sock.close()

    # -- the spare (app.spare; spare.py)

    async def _spare_becomes(self, release: Release, role: str, sock: socket.socket, port: int | None, host: str | None,
                             promote: tuple[socket.socket, socket.socket] | None,
                             ) -> tuple[AppProcess, drain.DrainPlan] | None:
        """The warm spare becomes `release`'s process in `role` ("canary": one that may be promoted, with
        `promote`; "app": the handoff's new production process), as build() + start() would have made
        it; None (the spare stopped, the log saying why) when there is none or it cannot stand in."""
        sp, self.spare = self.spare, None
        if sp is None:
            return None
        t = time.monotonic()
        why = ""
        if not sp.proc.alive:
            why = f"the spare {sp.proc.exit_description()}"
        elif sp.state != "warm":
            why = "the spare is still importing"
        elif role == "app" and sp.proc.background:  # it serves production as soon as it runs
            why = to_foreground(sp.proc.pid) or ""
            sp.proc.background = bool(why)
        plan: drain.DrainPlan | None = None
        proc: AppProcess | None = None
        numbers: list[int] = []
        control = socket.socketpair() if promote is None else None
        try:
            if not why:
                handed = [sock, *(promote or ()), *(control[1:] if control else ())]
                numbers = await sp.send_fds([s.fileno() for s in handed])
                proc, plan = self.build(release, role, sock, port, host=host, promote=promote, control=control,
                                        spare_fds=numbers, access=sp.proc.access)
                if plan.kind != "shim":
                    why = "the command does not run through the drain shim"
                elif list(plan.argv[1:3]) != ["-m", drain.SHIM_MODULE]:
                    why = "the command gives the interpreter options before -m"
                else:
                    why = proc.blocked or spare.mismatch(sp.key, spare.Key.of(plan.argv[0], self.cfg.app.user,
                                                                              proc.env))
                if not why:
                    why = await sp.become(plan.argv[3:], proc.cwd, proc.env)
        except SpareError as e:
            why = str(e)
        finally:
            if control is not None:
                with contextlib.suppress(OSError):
                    control[1].close()  # the spare has its copy (or is stopped below)
        if why or proc is None or plan is None:
            if control is not None:
                with contextlib.suppress(OSError):
                    control[0].close()
            self.log.info("spare.unused", release=release.name, pid=sp.proc.pid, role=role, why=why,
                          then="a cold start")
            await self._end_spare(sp)
            return None
        became = sp.proc
        became.release, became.role, became.argv = release.name, role, list(plan.argv)
        became.cwd, became.env, became.ready_re = proc.cwd, proc.env, proc.ready_re
        # What it holds as inherited, as a cold start's pass_fds: the handoff skips these descriptors
        # when it asks whether the process still accepts (wait_stopped_accepting).
        became.pass_fds = tuple(numbers)
        became.control = control[0] if control is not None else None
        became.started_at, became.started_mono = time.time(), time.monotonic()  # its run starts now
        sp.close()
        # The spare's crash window: it serves the release (and holds the shared socket) while the registry
        # still names it a spare; a restarted daemon ends every registered process that is not production.
        await faults.point("spare_became")
        with contextlib.suppress(OSError):
            self.deps.registry.add(became.pid, role, release=release.name)
        self.log.info("spare.became", release=release.name, pid=became.pid, role=role,
                      seconds=round(time.monotonic() - t, 3), imported=sp.imported)
        return became, plan

    async def _modules_of_production(self) -> list[str]:
        """What the serving process imported from its venv and the library: what a spare imports ahead."""
        proc = self.proc
        if proc is None or proc.control is None or not proc.alive:
            return []
        answer = await ask(proc.control, proc, "modules", 10.0, limit=spare.MAX_LINE)
        verb, _, rest = answer.partition(" ")
        try:
            return spare.clean_modules(json.loads(rest)) if verb == "modules" else []
        except ValueError:
            return []

    def spare_tick(self, *, green: bool, updating: bool) -> None:
        """Called every sample: end a spare that no longer fits; warm one while nobody is on."""
        sp = self.spare
        cfg = self.cfg
        rel = self.release
        if sp is not None:
            why = ("app.spare is off" if not cfg.app.spare else
                   f"it {sp.proc.exit_description()}" if not sp.proc.alive else
                   "the serving release has another venv" if rel is None or rel.venv != sp.venv else "")
            if why:
                self._drop_spare(why)
        if (not cfg.app.spare or not green or updating or self.hold or self.spare is not None or rel is None
                or self.state != RUNNING or self.proc is None or not self.proc.alive
                or self.proc.ran_for < SPARE_AFTER_SAMPLES * cfg.activity.interval_s
                or self.candidate is not None or self.staged is not None
                or time.monotonic() < self._spare_retry_at or self.deps.stopping()
                or (self._spare_task is not None and not self._spare_task.done())):
            return
        if self.proc.control is None:  # not through the drain shim, or its server could not be wrapped
            return
        self._spare_task = asyncio.create_task(self._warm_spare(rel), name="spare-warm")

    async def _warm_spare(self, release: Release) -> None:
        starts = self._starts
        cfg = self.cfg
        modules = await self._modules_of_production()
        # A start (an update's canary, a stage, the handoff's) that began while the serving process
        # answered went on without a spare: this one would warm beside it, so it is not started.
        if self.release is not release or starts != self._starts or self.spare is not None:
            return
        if not modules:
            self.log.warning("spare.no_modules", pid=self.proc.pid if self.proc else 0,
                             then=f"not tried again for {SPARE_RETRY_S:g} s")
            self._spare_retry_at = time.monotonic() + SPARE_RETRY_S
            return
        python = python_for(self.deps.paths, release)
        proc, plan = self.build(release, "spare")
        if plan.kind != "shim":
            self._spare_retry_at = time.monotonic() + SPARE_RETRY_S
            return
        mine, theirs = socket.socketpair()
        proc.argv = [str(python), "-m", drain.SHIM_MODULE, spare.FLAG]
        proc.cwd = python.parent.parent  # its venv: the release's tree may be pruned while it waits
        proc.env = {**proc.env, spare.ENV: str(theirs.fileno())}
        proc.pass_fds = (*proc.pass_fds, theirs.fileno())
        proc.close_after_start = [theirs]
        proc.background = can_leave_background()
        sp = Spare(proc, mine, spare.Key.of(python, cfg.app.user, proc.env), release.venv)
        self.spare = sp
        self.log.info("spare.starting", venv=release.venv, modules=len(modules))
        try:
            await proc.start()
            if not proc.background:
                lower_priority(proc.pid)
            await sp.warm(modules, max(30.0, cfg.health.start_timeout_s))
        except SpareError as e:
            if sp.state == "ended":  # ended meanwhile on purpose (an update came, a reload): no failure
                return
            self.log.warning("spare.failed", pid=proc.pid, error=str(e))
            self._spare_retry_at = time.monotonic() + SPARE_RETRY_S
            if self.spare is sp:
                self.spare = None
            await self._end_spare(sp)
            return
        self.log.info("spare.warm", pid=proc.pid, venv=release.venv, imported=sp.imported, failed=sp.failed,
                      seconds=sp.warm_s)

    def _drop_spare(self, why: str) -> None:
        """End the spare, in the background (from a sample or a reload)."""
        sp, self.spare = self.spare, None
        if sp is None:
            return
        if sp.proc.alive:
            self.log.info("spare.ended", pid=sp.proc.pid, why=why)
        else:
            self.log.warning("spare.exited", pid=sp.proc.pid, how=sp.proc.exit_description(),
                             last_output=sp.proc.last_lines())
            self._spare_retry_at = time.monotonic() + SPARE_RETRY_S
        task = asyncio.create_task(self._end_spare(sp), name=f"spare-end-{sp.proc.pid}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _end_spare(self, sp: Spare) -> None:
        sp.state = "ended"
        sp.close()
        await sp.proc.stop(5)

    def spare_status(self) -> dict[str, object] | None:
        sp = self.spare
        return sp.status() if sp is not None and sp.proc.alive else None

    def canary_foreground_after_s(self) -> float:
        """How long a canary's start may take in the background class before it gets the normal one:
        a third of health.start_timeout_s (at least 2 s), so a start that only needed the CPU still
        has the rest of the timeout to finish."""
        return max(2.0, self.cfg.health.start_timeout_s / 3)

    def _canary_to_foreground(self, proc: AppProcess) -> None:
        if not proc.background or not proc.alive:
            return
        problem = to_foreground(proc.pid)
        if problem is None:
            proc.background = False
        said = {"error": problem} if problem else {}
        self.log.info("canary.foreground", pid=proc.pid, after_s=round(self.canary_foreground_after_s(), 1),
                      reason="not healthy yet in the background class", **said)

    # -- stopping

    async def stop_all(self) -> None:
        """Drain every app process (the serving one and any still draining), then close the sockets."""
        self._machine.change(STOPPING)
        if self._restart is not None:
            self._restart.cancel()
        timeout = self.cfg.update.drain_timeout_s
        for cand in (self.candidate, self.staged.candidate if self.staged else None):
            if cand is not None:
                cand.close()
        if self._spare_task is not None:
            self._spare_task.cancel()
        if self.spare is not None:
            self.spare.close()
        procs = [p for p in {self.proc, *self.draining, self.candidate.proc if self.candidate else None,
                             self.staged.proc if self.staged else None,
                             self.spare.proc if self.spare else None} if p is not None]
        self.candidate = None
        self.staged = None
        self.spare = None
        await asyncio.gather(*(p.stop(timeout) for p in procs), return_exceptions=True)
        for s in [self.listener, *self._retired_listeners]:
            if s is not None:
                with contextlib.suppress(OSError):
                    s.close()
        self.listener = None
        self._retired_listeners.clear()
        self._machine.change(STOPPED)
        self.healthy = False

    def pids(self) -> list[int]:
        return [p.pid for p in {self.proc, *self.draining} if p is not None and p.alive]
