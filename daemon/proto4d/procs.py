"""Helper subprocesses (git, venv builds) that can be cancelled, and the registry of every
process proto4d starts, so that a daemon killed with SIGKILL leaves nothing behind for long:
the next start reads `state/app.pids` and ends what is still there.

No start is ever unrecorded: every child is started *held* (`Hold`): a tiny `/bin/sh` waits
on a pipe for the word "go" before it execs the real command, and the daemon writes "go" only
once the pid is in `state/app.pids`. A daemon killed between the fork and the record closes
the pipe by dying, and the held shell exits without ever running the command. As a second
line, `find_stale` recognises our processes by what they are (an interpreter from `venvs/`, a
working directory in `releases/` with our marker or our port), so a process that escaped the
registry anyway is still ended on the next start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

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
    """Work that must not take CPU from the serving app on a small machine but must still finish
    under load (a migration, a canary that will not serve): a lower priority (children inherit it)."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, pid, min(19, os.getpriority(os.PRIO_PROCESS, pid) + BACKGROUND_NICE))


# macOS's background band (setpriority(2)): lowest CPU priority and throttled disk I/O, the class
# Time Machine and Spotlight run in. Python 3.11 has no names for them (3.12's os.PRIO_DARWIN_*).
PRIO_DARWIN_PROCESS = 4
PRIO_DARWIN_BG = 0x1000
CAP_SYS_NICE = 23  # linux/capability.h: what lets a process leave SCHED_IDLE whatever its RLIMIT_NICE


def to_background(pid: int, platform: str = sys.platform, fallback: bool = True) -> str:
    """Preparation work (the fetch, the export, venv builds and their compile) in the OS's background
    class, so that it gives the CPU back the instant the serving app wakes: a lower nice value only
    shares it more unevenly, and on two cores a request then waits behind `git` or `uv` for a
    scheduler slice (the fetch phase's p99 was 2-3x the rest's). Linux: SCHED_IDLE; macOS: the
    darwin background band. Returns the class it got ("nice" when neither is possible). With a
    single-process app the other cores stay free, so the work is slower only on a saturated machine,
    where the update's own timeouts bound it. `fallback` False: "none" instead of a nice value, which
    an unprivileged daemon could never take back (for a process that may become production)."""
    try:
        if platform.startswith("linux"):
            os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
            return "idle"
        if platform == "darwin":
            os.setpriority(PRIO_DARWIN_PROCESS, pid, PRIO_DARWIN_BG)
            return "darwin-bg"
    except (OSError, AttributeError):
        pass
    if not fallback:
        return "none"
    lower_priority(pid)
    return "nice"


def can_leave_background(platform: str = sys.platform, status: Path = Path("/proc/self/status")) -> bool:
    """Whether a process this daemon put in the background class can be given the normal one back.

    macOS: the same user may clear the darwin background band. Linux (sched(7)): leaving SCHED_IDLE
    needs CAP_SYS_NICE (root has it, a container's root may not) or an RLIMIT_NICE that allows the
    daemon's own nice value (LimitNICE=20 in the shipped systemd unit); without either, a canary put
    there could not become production."""
    if platform == "darwin":
        return True
    if not platform.startswith("linux"):
        return False
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NICE)[0]
    if soft == resource.RLIM_INFINITY or soft >= 20 - os.getpriority(os.PRIO_PROCESS, 0):
        return True
    try:
        caps = next(line.split()[1] for line in status.read_text().splitlines() if line.startswith("CapEff:"))
        return bool(int(caps, 16) >> CAP_SYS_NICE & 1)
    except (OSError, StopIteration, IndexError, ValueError):
        return False


def background_note(platform: str = sys.platform) -> str:
    """Where this daemon's canaries start, and why not in the background class when they cannot
    (said once at start, for whoever wonders why a canary's start competes with the app)."""
    if can_leave_background(platform):
        return "background class"
    if platform.startswith("linux"):
        return "normal priority (no CAP_SYS_NICE, and RLIMIT_NICE below 20: systemd's LimitNICE=20 allows it)"
    return "normal priority (no background class on this platform)"


def to_foreground(pid: int, platform: str = sys.platform) -> str | None:
    """Give a process `to_background` put in the background class the normal one again: every thread of
    it (Linux schedules threads, each with its own class) and of the processes it started meanwhile (a
    worker the app forks at start would otherwise stay in the class in production). None when done,
    else why not."""
    try:
        if platform == "darwin":
            os.setpriority(PRIO_DARWIN_PROCESS, pid, 0)
            for child in _children(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.setpriority(PRIO_DARWIN_PROCESS, child.pid, 0)
            return None
        if not platform.startswith("linux"):
            return "no background class on this platform"
        for _ in range(3):  # a thread or child started while the others were moved inherits the old class: again
            moved = 0
            for tid in _threads(pid):
                with contextlib.suppress(ProcessLookupError):  # that thread ended meanwhile
                    if os.sched_getscheduler(tid) == os.SCHED_IDLE:
                        os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
                        moved += 1
            if not moved:
                return None
        return "its threads keep entering SCHED_IDLE"
    except psutil.NoSuchProcess:
        return "the process is gone"
    except (OSError, psutil.Error) as e:
        return f"{type(e).__name__}: {e}"


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _threads(pid: int) -> list[int]:
    """The thread ids of `pid` and of its descendants (one that ended meanwhile is skipped; NoSuchProcess
    when `pid` itself is gone)."""
    tids = [t.id for t in psutil.Process(pid).threads()]
    for child in _children(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            tids.extend(t.id for t in child.threads())
    return tids


def holds_socket(pid: int, inodes: set[int], skip_fds: set[int], proc_root: Path = Path("/proc")) -> bool | None:
    """Whether `pid` has one of the sockets `inodes` open on a descriptor not in `skip_fds`; None where
    that cannot be read (no /proc: macOS), and the caller asks psutil instead.

    The handoff asks this every few milliseconds while the old process stops accepting. psutil's
    net_connections parses every TCP socket of the host for it, about 10 ms of CPU a call on the
    cores the app is serving from; a socket's descriptor links read `socket:[<inode>]`, a readlink
    each."""
    wanted = {f"socket:[{i}]" for i in inodes}
    fd_dir = proc_root / str(pid) / "fd"
    try:
        names = os.listdir(fd_dir)
    except FileNotFoundError:
        return False if (proc_root / "self").exists() else None  # the process is gone / no procfs
    except OSError:
        return None
    for name in names:
        if not name.isdigit() or int(name) in skip_fds:
            continue
        try:
            if os.readlink(fd_dir / name) in wanted:
                return True
        except OSError:  # closed meanwhile
            continue
    return False


def kill_group(pid: int, sig: int) -> None:
    if pid <= 1:  # killpg(0) would signal our own group: a process that never started has pid 0
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def run(argv: Sequence[str], *, cancel: Cancel | None = None, cwd: Path | None = None,
        env: dict[str, str] | None = None, on_line: Callable[[str], None] | None = None,
        registry: PidRegistry | None = None, kind: str = "helper", timeout: float | None = None,
        user: Mapping[str, Any] | None = None, background: bool = True) -> str:
    """Run a command in its own process group, streaming its output lines; return the output.

    `background`: in the OS's background class (`to_background`); False: only a lower priority, for
    work that holds up the switch (a migration of the live database).

    Raises CommandFailed on a non-zero exit and Cancelled when the token fires (the whole
    process group is killed, so pip's own children go too).
    """
    # Always held: a recorded start (see the module docstring), and the priority set before the
    # command runs, so that what it forks at once (git's upload-pack, uv's workers) inherits it.
    hold = Hold()
    try:
        proc = subprocess.Popen(hold.wrap(argv), cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=hold.read_fd, start_new_session=True, **(user or {}))
    except OSError:
        hold.abort()
        raise
    hold.spawned()
    (to_background if background else lower_priority)(proc.pid)
    if registry is not None:
        try:
            registry.add(proc.pid, kind)
        except BaseException:
            hold.abort()  # unrecorded, it must not run: the held shell exits on the closed pipe
            proc.wait()
            raise
    with contextlib.suppress(OSError):  # the shell already died (killed from outside): its exit code says so
        hold.release()
    if cancel is not None:
        cancel.track(proc)
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


# The held start: read one line from stdin (the hold pipe); anything but "go" (EOF: the daemon died
# before recording the pid) exits without running the command. The command then gets /dev/null
# as its stdin, as an unheld child would.
_HOLD_SCRIPT = 'IFS= read -r go; [ "$go" = go ] || exit 111; exec "$@" </dev/null'
HELD_EXIT = 111  # the held shell's exit when it was never released


class Hold:
    """Start a child held until its pid is recorded (see the module docstring).

    Use: `argv = hold.wrap(argv)` with `stdin=hold.read_fd` for the spawn, then `spawned()`,
    record the pid, `release()`; `abort()` on any failure in between. The write end stays
    in the daemon alone (not inheritable), so only the daemon's death or `abort()` closes it.
    """

    SHELL = "/bin/sh"

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()

    def wrap(self, argv: Sequence[str]) -> list[str]:
        return [self.SHELL, "-c", _HOLD_SCRIPT, "proto4d-held", *argv]

    def spawned(self) -> None:
        """The child has its copy of the read end: the parent's goes."""
        self._close("read_fd")

    def release(self) -> None:
        try:
            os.write(self.write_fd, b"go\n")
        finally:
            self._close("read_fd")
            self._close("write_fd")

    def abort(self) -> None:
        self._close("read_fd")
        self._close("write_fd")

    def _close(self, name: str) -> None:
        fd = getattr(self, name)
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
            setattr(self, name, -1)


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

    def pids(self) -> set[int]:
        with self._lock:
            return set(self._entries)

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


# -- our processes, recognised by what they are

OWN_DIRS = ("releases", "venvs", "mirror")  # what proto4d creates and runs things from under `root`


def _under(path: str | None, parents: Sequence[Path]) -> bool:
    if not path:
        return False
    p = Path(path)
    return any(p == d or d in p.parents for d in parents)


def why_ours(proc: psutil.Process, root: Path, port: int | None) -> str:
    """Why `proc` is one of ours ("" when it is not): its interpreter or executable lies in one of
    our directories under `root`, or it works in `releases/` and carries our marker or our port.

    A shell or editor of the operator that merely sits in `root` has none of these.
    """
    root = Path(os.path.realpath(root))
    own = [root / d for d in OWN_DIRS]
    try:
        cmd = proc.cmdline()
    except psutil.Error:
        return ""
    if cmd[:2] == [Hold.SHELL, "-c"] and cmd[3:4] == ["proto4d-held"]:
        return ""  # a start being recorded right now, or one whose daemon died: it exits by itself
    if cmd and os.path.isabs(cmd[0]) and _under(os.path.abspath(cmd[0]), own):
        return f"runs {cmd[0]}"
    with contextlib.suppress(psutil.Error, OSError):
        if _under(proc.exe(), own):
            return f"executable {proc.exe()}"
    try:
        cwd = proc.cwd()
    except psutil.Error:
        return ""
    if not _under(os.path.realpath(cwd), [root / "releases"]):
        return ""
    with contextlib.suppress(psutil.Error):
        if "PROTO4D_RELEASE" in proc.environ():
            return f"works in {cwd} with PROTO4D_RELEASE set"
    if port:
        with contextlib.suppress(psutil.Error):
            if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   for c in proc.net_connections(kind="tcp")):
                return f"works in {cwd} and listens on port {port}"
    return ""


def find_stale(root: Path, port: int | None, live: set[int]) -> list[dict]:
    """Our processes that nobody holds: recognised by `why_ours`, not in `live` (the registry's
    pids) nor in one of their process groups, not this daemon nor its group."""
    me = os.getpid()
    my_group = os.getpgid(0)
    out = []
    for p in psutil.process_iter(["pid"]):
        pid = p.pid
        if pid == me or pid in live:
            continue
        try:
            pgid = os.getpgid(pid)
            if pgid == my_group or pgid in live or p.status() == psutil.STATUS_ZOMBIE:
                continue
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
        why = why_ours(p, root, port)
        if why:
            out.append({"pid": pid, "pgid": pgid, "why": why, "cmdline": _cmdline(p)})
    return out


def end_stale(root: Path, port: int | None, live: set[int], timeout: float,
              log: Callable[..., None] | None = None) -> list[dict]:
    """End every stale process of ours (group by group: SIGTERM, `timeout`, SIGKILL); return them."""
    stale = find_stale(root, port, live)
    groups: dict[int, list[dict]] = {}
    for e in stale:
        if log:
            log("stale.found", pid=e["pid"], why=e["why"], cmdline=e["cmdline"])
        groups.setdefault(e["pgid"], []).append(e)
    threads = []
    for pgid, members in groups.items():
        if any(m["pid"] == pgid for m in members):  # a group we started (its leader is ours)
            t = threading.Thread(target=terminate_group, args=(pgid, timeout), daemon=True)
        else:
            t = threading.Thread(target=_terminate_pids, args=([m["pid"] for m in members], timeout), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join(timeout + 10)
    return stale


def _terminate_pids(pids: list[int], timeout: float) -> None:
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            p.terminate()
            procs.append(p)
    _gone, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
