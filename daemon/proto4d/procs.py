"""Helper subprocesses (git, venv builds) that can be cancelled, and the registry of every
process proto4d starts, so that a daemon killed with SIGKILL leaves nothing behind for long:
the next start reads `state/app.pids` and ends what is still there.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil

from proto4d import fsutil

BACKGROUND_NICE = 10


class Cancelled(Exception):
    """The operation was cancelled (daemon stopping, update superseded)."""


class CommandFailed(Exception):
    def __init__(self, argv: Sequence[str], code: int, tail: str) -> None:
        self.argv = list(argv)
        self.code = code
        self.tail = tail
        super().__init__(f"{Path(argv[0]).name} exited with {code}: {tail.strip()[-800:]}")


class Cancel:
    """A cancellation token shared between the event loop and a worker thread."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._procs: set[subprocess.Popen[bytes]] = set()
        self._lock = threading.Lock()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def cancel(self) -> None:
        self._event.set()
        with self._lock:
            procs = list(self._procs)
        for p in procs:
            kill_group(p.pid, signal.SIGKILL)

    def check(self) -> None:
        if self.cancelled:
            raise Cancelled()

    def track(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._procs.add(proc)

    def untrack(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._procs.discard(proc)


def lower_priority(pid: int) -> None:
    """Preparation work (git, venv builds, the canary) must not take CPU from the serving app on a
    small machine: run it at a lower priority (children inherit it)."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, pid, min(19, os.getpriority(os.PRIO_PROCESS, pid) + BACKGROUND_NICE))


def kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def run(argv: Sequence[str], *, cancel: Cancel | None = None, cwd: Path | None = None,
        env: dict[str, str] | None = None, on_line: Callable[[str], None] | None = None,
        registry: PidRegistry | None = None, kind: str = "helper", timeout: float | None = None) -> str:
    """Run a command in its own process group, streaming its output lines; return the output.

    Raises CommandFailed on a non-zero exit and Cancelled when the token fires (the whole
    process group is killed, so pip's own children go too).
    """
    proc = subprocess.Popen(list(argv), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    if registry is not None:
        registry.add(proc.pid, kind)
    if cancel is not None:
        cancel.track(proc)
    lower_priority(proc.pid)
    lines: list[str] = []
    deadline = time.monotonic() + timeout if timeout else None
    try:
        assert proc.stdout is not None
        reader = threading.Thread(target=_pump, args=(proc.stdout, lines, on_line), daemon=True)
        reader.start()
        while True:
            try:
                proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if cancel is not None and cancel.cancelled:
                    kill_group(proc.pid, signal.SIGKILL)
                    proc.wait()
                    raise Cancelled() from None
                if deadline is not None and time.monotonic() > deadline:
                    kill_group(proc.pid, signal.SIGKILL)
                    proc.wait()
                    raise CommandFailed(argv, -9, f"timed out after {timeout:g} s") from None
        reader.join(timeout=5)
    finally:
        if cancel is not None:
            cancel.untrack(proc)
        if registry is not None:
            registry.remove(proc.pid)
        if proc.poll() is None:
            kill_group(proc.pid, signal.SIGKILL)
            proc.wait()
    out = "".join(lines)
    if proc.returncode != 0:
        raise CommandFailed(argv, proc.returncode, out[-2000:])
    return out


def _pump(stream, lines: list[str], on_line: Callable[[str], None] | None) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace")
        lines.append(line)
        if on_line is not None:
            with contextlib.suppress(Exception):
                on_line(line.rstrip("\n"))
    stream.close()


class PidRegistry:
    """`state/app.pids`: every process group proto4d started and has not yet seen end.

    Entries carry the process start time so a recycled pid is never mistaken for ours.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._entries: dict[int, dict] = {}

    def add(self, pid: int, kind: str, **extra: object) -> None:
        try:
            created = psutil.Process(pid).create_time()
        except psutil.Error:
            created = None
        with self._lock:
            self._entries[pid] = {"pid": pid, "kind": kind, "create_time": created, **extra}
            self._save()

    def remove(self, pid: int) -> None:
        with self._lock:
            if self._entries.pop(pid, None) is not None:
                self._save()

    def _save(self) -> None:
        fsutil.atomic_write_json(self.path, sorted(self._entries.values(), key=lambda e: e["pid"]), durable=False)

    def reap_orphans(self, timeout: float = 10.0, log: Callable[..., None] | None = None) -> list[dict]:
        """End every process group left by a previous daemon; return what was found."""
        entries = fsutil.read_json(self.path, []) or []
        found = []
        for e in entries if isinstance(entries, list) else []:
            try:
                pid = int(e.get("pid"))
                proc = psutil.Process(pid)
                if e.get("create_time") is not None and abs(proc.create_time() - float(e["create_time"])) > 1:
                    continue  # the pid was recycled by an unrelated process
            except (psutil.Error, TypeError, ValueError):
                continue
            found.append({**e, "cmdline": _cmdline(proc)})
            if log:
                log("orphan.found", pid=pid, kind=e.get("kind"), cmdline=found[-1]["cmdline"])
            terminate_group(pid, timeout)
        with self._lock:
            self._entries.clear()
            self._save()
        return found


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())[:300]
    except psutil.Error:
        return "?"


def terminate_group(pid: int, timeout: float) -> None:
    """SIGTERM a process group, wait up to `timeout`, then SIGKILL it."""
    kill_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not group_alive(pid):
            return
        time.sleep(0.05)
    kill_group(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and group_alive(pid):
        time.sleep(0.05)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie leader still "exists" for killpg; count only live members.
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                return True
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return False
