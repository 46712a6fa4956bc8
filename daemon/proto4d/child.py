"""One app process: spawn, output capture, readiness by log line, drain, and the restart backoff.

The process runs in its own process group (so a stop reaches uvicorn's workers and
anything the app spawned), with stdout and stderr merged into one pipe the daemon reads
line by line: each line goes to `logs/app.log` and to whoever listens (the access-log
parser, the readiness watcher, the drain-shim announcement).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from proto4d import faults
from proto4d.accesschannel import AccessChannel
from proto4d.accesslog import AccessRecord
from proto4d.appuser import AppUser
from proto4d.fsutil import private_opener
from proto4d.log import scrub
from proto4d.procs import HELD_EXIT, Hold, PidRegistry, kill_group, to_background

LineHandler = Callable[[str, "AppProcess"], None]
RecordHandler = Callable[[AccessRecord, "AppProcess"], None]


class RotatingLog:
    """Append-only text log rotated by size (app.log, app.log.1, ...), flushed per batch."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a", encoding="utf-8", errors="replace", opener=private_opener)  # noqa: SIM115 - long-lived handle
        self._size = self._f.tell()
        self.dropped = 0  # lines lost to failed writes

    def write(self, text: str) -> None:
        # A write that fails (disk full) loses this line, never more: raising here would end the task
        # that reads the app's output, which then stops feeding the activity sampler and, its pipe
        # no longer read, at last blocks the app itself.
        try:
            self._f.write(text)
            self._size += len(text)
            if self._size >= self.max_bytes:
                self._rotate()
        except (OSError, ValueError):
            self.dropped += 1
            if self._f.closed:  # a rotation that could not reopen the file: try again next time
                with contextlib.suppress(OSError):
                    self._f = open(self.path, "a", encoding="utf-8", errors="replace", opener=private_opener)  # noqa: SIM115
                    self._size = self._f.tell()

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._f.flush()

    def _rotate(self) -> None:
        self._f.close()
        if self.backups > 0:
            for i in range(self.backups - 1, 0, -1):
                src = self.path.with_name(f"{self.path.name}.{i}")
                if src.exists():
                    os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink(missing_ok=True)
        self._f = open(self.path, "a", encoding="utf-8", errors="replace", opener=private_opener)  # noqa: SIM115
        self._size = 0

    def reconfigure(self, max_bytes: int, backups: int) -> None:
        self.max_bytes, self.backups = max_bytes, backups

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._f.close()


@dataclass
class Backoff:
    """Restart policy after a crash: 1 s doubling to 60 s; a stable run resets it; too many
    fast failures in a row are fatal (supervisord's FATAL: stop trying, say so in status)."""

    stable_s: float = 60.0
    max_fast_failures: int = 5
    initial_s: float = 1.0
    maximum_s: float = 60.0
    failures: int = 0

    def on_exit(self, ran_for: float) -> tuple[str, float]:
        if ran_for >= self.stable_s:
            self.failures = 0
        self.failures += 1
        if ran_for < self.stable_s and self.failures >= self.max_fast_failures:
            return "fatal", 0.0
        return "restart", min(self.initial_s * 2 ** (self.failures - 1), self.maximum_s)

    def reset(self) -> None:
        self.failures = 0


class NoLine(Exception):
    """No line came on a socket: why, in words; `closed` when the other end closed it."""

    def __init__(self, why: str, closed: bool = False) -> None:
        super().__init__(why)
        self.closed = closed


def close_socket(sock: socket.socket) -> None:
    """Close a socket the event loop may be waiting to read (a `recv_line` in another task).

    A socket closed under a pending loop.sock_recv leaves its descriptor number registered with the
    loop while epoll forgets it: the next socket that gets the same number (a control socket pair made
    a moment later) is then never polled, and its answer never arrives (a staged release's `promoted`
    was lost this way, after a spare still warming was ended by a reload). Unregistering first keeps
    the loop's map and the kernel's in step; the pending read then ends at its own deadline."""
    with contextlib.suppress(RuntimeError, OSError, ValueError):  # no running loop; closed already
        loop, fd = asyncio.get_running_loop(), sock.fileno()
        if fd >= 0:
            loop.remove_reader(fd)
            loop.remove_writer(fd)
    with contextlib.suppress(OSError):
        sock.close()


async def recv_line(sock: socket.socket, buf: bytes, timeout: float, limit: int, what: str) -> tuple[str, bytes]:
    """Read a non-blocking socket until a newline: (the line, what came after it). `buf` is what an
    earlier read left; `what` names the awaited answer in the reason. Raises NoLine."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while b"\n" not in buf:
        left = deadline - loop.time()
        if left <= 0:
            raise NoLine(f"no answer to {what} within {timeout:g} s")
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), left)
        except TimeoutError:
            raise NoLine(f"no answer to {what} within {timeout:g} s") from None
        except OSError as e:
            raise NoLine(f"the socket failed ({e.strerror or e})") from None
        if not chunk:
            raise NoLine("closed", closed=True)
        buf += chunk
        if len(buf) > limit:
            raise NoLine(f"an answer to {what} longer than {limit} bytes")
    line, _, rest = buf.partition(b"\n")
    return line.decode("utf-8", "replace").strip(), rest


class AppProcess:
    """A running (or finished) app process of one release."""

    def __init__(self, *, release: str, role: str, argv: Sequence[str], cwd: Path, env: dict[str, str],
                 pass_fds: Sequence[int], on_line: LineHandler, registry: PidRegistry | None,
                 ready_pattern: str, access: AccessChannel | None = None,
                 on_record: RecordHandler | None = None, user: AppUser | None = None,
                 blocked: str | None = None) -> None:
        self.release = release
        self.role = role
        self.argv = list(argv)
        self.cwd = cwd
        self.env = env
        self.pass_fds = tuple(pass_fds)
        self.on_line = on_line
        self.registry = registry
        self.ready_re = re.compile(ready_pattern)
        self.proc: asyncio.subprocess.Process | None = None
        self.pid = 0
        self.started_at = 0.0  # wall clock
        self.started_mono = 0.0
        self.ready_at: float | None = None
        self.ready_line = asyncio.Event()
        self.exited = asyncio.Event()
        self.returncode: int | None = None
        self.stop_requested = False
        self.drain_note = ""
        self.tail: list[str] = []
        self._reader: asyncio.Task[None] | None = None
        self._waiter: asyncio.Task[None] | None = None
        self.access = access  # the drain shim's access-record pipe, when the app runs through the shim
        self.on_record = on_record
        self._access_reader: asyncio.Task[None] | None = None
        self.user = user  # app.user: the process runs as that user from its first instruction (the held shell too)
        self.blocked = blocked  # known before the start: why it cannot run (e.g. app.user cannot reach the python)
        # Started in the OS's background class (a canary that may be promoted: procs.to_foreground gives
        # it the normal class back before it serves production, or when its start drags on).
        self.background = False
        # The daemon's end of the drain shim's control socket (`promote`, `modules`), for the process's
        # life; and the child's end, closed here once the child has its copy.
        self.control: socket.socket | None = None
        self.close_after_start: list[socket.socket] = []

    @property
    def access_channel(self) -> bool:
        """Whether access records come from the shim's pipe (so look-alikes in the output are ignored)."""
        return self.access is not None and self.access.active

    async def start(self) -> None:
        """Spawn the process held, record its pid, then let it run (procs.Hold).

        Never raises for a start that fails (a missing working directory or interpreter, a
        registry that cannot be written): the process is then simply dead at once, with the
        reason as its last output line, and every caller treats it as a failed start.
        """
        self.started_at = time.time()
        self.started_mono = time.monotonic()
        problem = self.blocked or (self.user.problem() if self.user is not None else None)
        if problem:
            self._never_started(f"not started: {problem}")
            return
        hold = Hold()
        extra = (self.access.write_fd,) if self.access is not None else ()  # the shim's access-record pipe
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *hold.wrap(self.argv), cwd=self.cwd, env=self.env, stdin=hold.read_fd,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, pass_fds=(*self.pass_fds, *extra),
                start_new_session=True, limit=1 << 20, **(self.user.popen() if self.user is not None else {}))
        except OSError as e:
            hold.abort()
            self._never_started(f"could not start {self.argv[0]} in {self.cwd}: {e.strerror or e}")
            return
        hold.spawned()
        self._close_child_ends()
        self.pid = self.proc.pid
        if self.background:  # before the app's first instruction, so its threads are born in the class
            self.background = to_background(self.pid, fallback=False) != "none"
        if self.access is not None:
            self.access.spawned()  # the child holds the write end now; the pipe ends when the app does
            on_record = self.on_record or (lambda rec, proc: None)
            self._access_reader = asyncio.create_task(
                self.access.run(lambda rec: on_record(rec, self), lambda: None), name=f"access-{self.pid}")
        await faults.point(f"forked_{self.role}")  # the crash window the hold closes: forked, not yet recorded
        try:
            if self.registry is not None:
                self.registry.add(self.pid, self.role, release=self.release)
        except OSError as e:
            # Unrecorded, it must not run: the held shell exits on the closed pipe without exec'ing.
            hold.abort()
            self.tail.append(f"proto4d: not started: its pid could not be recorded ({e.strerror or e})")
        else:
            with contextlib.suppress(OSError):  # the shell already died (killed from outside): _wait sees it
                hold.release()
        self._reader = asyncio.create_task(self._read(), name=f"read-{self.pid}")
        self._waiter = asyncio.create_task(self._wait(), name=f"wait-{self.pid}")

    def _close_child_ends(self) -> None:
        for s in self.close_after_start:
            with contextlib.suppress(OSError):
                s.close()
        self.close_after_start = []

    def close_control(self) -> None:
        if self.control is not None:
            close_socket(self.control)

    def _never_started(self, why: str) -> None:
        self._close_child_ends()
        self.close_control()
        if self.access is not None:  # no child holds the record pipe: close our ends
            self.access.spawned()
            with contextlib.suppress(OSError):
                os.close(self.access.read_fd)
        self.tail.append(why)
        self.returncode = 127
        self.exited.set()
        with contextlib.suppress(Exception):
            self.on_line(why, self)

    @property
    def alive(self) -> bool:
        return self.proc is not None and not self.exited.is_set()

    @property
    def ran_for(self) -> float:
        return time.monotonic() - self.started_mono if self.started_mono else 0.0

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        stream = self.proc.stdout
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line longer than the limit: take what there is
                raw = await stream.read(1 << 20)
            except (asyncio.CancelledError, ConnectionError):
                return
            if not raw:
                return
            # Masked at the source: app.log, the last lines quoted in messages and status never hold a secret.
            line = scrub(raw.decode("utf-8", "replace").rstrip("\r\n"))
            self.tail.append(line)
            if len(self.tail) > 40:
                del self.tail[:-20]
            if not self.ready_line.is_set() and self.ready_re.search(line):
                self.ready_at = time.monotonic()
                self.ready_line.set()
            if line.startswith("proto4d-drain:"):
                self.drain_note = line.split(":", 1)[1].strip()
            self.on_line(line, self)

    async def _wait(self) -> None:
        assert self.proc is not None
        rc = await self.proc.wait()
        for reader in (self._reader, self._access_reader):
            if reader is not None:
                # The pipe can stay open if the app left a grandchild holding it; do not wait forever.
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(reader), 2)
        if self._access_reader is not None and not self._access_reader.done():
            self._access_reader.cancel()
        self.returncode = rc
        self.close_control()
        # Whatever the app forked must not outlive it (a crashed master leaves workers behind).
        kill_group(self.pid, signal.SIGKILL)
        if self.registry is not None:
            self.registry.remove(self.pid)
        self.exited.set()

    async def wait(self, timeout: float | None = None) -> int | None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.exited.wait(), timeout)
        return self.returncode

    async def wait_ready_line(self, timeout: float) -> bool:
        """True once the ready line is seen; False on exit or timeout."""
        ready = asyncio.create_task(self.ready_line.wait())
        died = asyncio.create_task(self.exited.wait())
        try:
            await asyncio.wait({ready, died}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            died.cancel()
        return self.ready_line.is_set() and not self.exited.is_set()

    def signal(self, sig: int) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    async def stop(self, timeout: float) -> int | None:
        """SIGTERM, let in-flight requests finish for up to `timeout`, then SIGKILL the group."""
        self.stop_requested = True
        if not self.alive:
            return self.returncode
        self.signal(signal.SIGTERM)
        if await self.wait(timeout) is None and not self.exited.is_set():
            kill_group(self.pid, signal.SIGKILL)
            await self.wait(10)
        return self.returncode

    def kill(self) -> None:
        self.stop_requested = True
        kill_group(self.pid, signal.SIGKILL)

    def exit_description(self) -> str:
        rc = self.returncode
        if rc is None:
            return "running"
        if self.pid == 0:
            return "never started"
        if rc == HELD_EXIT:
            return "never started (the daemon did not release it)"
        if rc in (126, 127):
            return f"exited with code {rc} (could not execute {self.argv[0]})"
        if rc < 0:
            try:
                return f"killed by {signal.Signals(-rc).name}"
            except ValueError:
                return f"killed by signal {-rc}"
        return f"exited with code {rc}"

    def last_lines(self, n: int = 5) -> str:
        return " | ".join(line.strip() for line in self.tail[-n:] if line.strip())[-800:]
