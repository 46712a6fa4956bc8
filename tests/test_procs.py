"""Starts held until recorded, and our processes recognised by what they are (real processes)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from harness import wait_for
from proto4d import procs
from proto4d.procs import HELD_EXIT, Hold, PidRegistry


def spawn_held(argv: list[str], **kw) -> tuple[subprocess.Popen[bytes], Hold]:
    hold = Hold()
    p = subprocess.Popen(hold.wrap(argv), stdin=hold.read_fd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         start_new_session=True, **kw)
    hold.spawned()
    return p, hold


def test_a_held_child_runs_its_command_only_once_released(tmp_path: Path):
    marker = tmp_path / "ran"
    p, hold = spawn_held([sys.executable, "-c", f"open({str(marker)!r}, 'w').write('x'); print('ran')"])
    time.sleep(0.3)  # not a synchronisation: proof that nothing runs while held
    assert not marker.exists() and p.poll() is None
    hold.release()
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 0 and out.strip() == b"ran" and marker.exists()


def test_an_aborted_hold_never_runs_the_command(tmp_path: Path):
    marker = tmp_path / "ran"
    p, hold = spawn_held([sys.executable, "-c", f"open({str(marker)!r}, 'w')"])
    hold.abort()
    assert p.wait(30) == HELD_EXIT
    assert not marker.exists()


def test_a_spawner_killed_before_recording_leaves_nothing_running(tmp_path: Path):
    """The crash window of a switch: the daemon forks, then dies before the pid is recorded."""
    marker = tmp_path / "ran"
    pidfile = tmp_path / "child.pid"
    script = textwrap.dedent(f"""
        import os, subprocess, sys, time
        from proto4d.procs import Hold
        hold = Hold()
        code = "import time; open({str(marker)!r}, 'w'); time.sleep(60)"
        p = subprocess.Popen(hold.wrap([sys.executable, "-c", code]), stdin=hold.read_fd, start_new_session=True)
        hold.spawned()
        open({str(pidfile)!r}, "w").write(str(p.pid))
        time.sleep(60)  # SIGKILLed here, before any record and release
    """)
    spawner = subprocess.Popen([sys.executable, "-c", script])
    pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), 30, "the child's pid"))
    assert psutil.pid_exists(pid)
    spawner.kill()
    spawner.wait(10)
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 10,
             "the held child gone by itself")
    assert not marker.exists()


def test_run_records_the_helper_before_it_runs(tmp_path: Path):
    reg = PidRegistry(tmp_path / "app.pids")
    seen = tmp_path / "seen"
    # The helper itself reads the registry: its own pid must already be there.
    code = (f"import json, os; pids = [e['pid'] for e in json.load(open({str(reg.path)!r}))]; "
            f"open({str(seen)!r}, 'w').write(str(os.getpid() in pids))")
    procs.run([sys.executable, "-c", code], registry=reg)
    assert seen.read_text() == "True"
    assert reg.pids() == set()


def test_a_failed_exec_is_reported_not_raised(tmp_path: Path):
    reg = PidRegistry(tmp_path / "app.pids")
    with pytest.raises(procs.CommandFailed) as e:
        procs.run([str(tmp_path / "venvs" / "gone" / "bin" / "python"), "-V"], registry=reg)
    assert e.value.code == 127 and "not found" in e.value.tail


# A command and the child it forks report their scheduling class and nice value, from the first
# instruction they run (what `git fetch` forks at once, upload-pack, must be in the class too).
_SCHED = ("import os, subprocess, sys; print(os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)); "
          "sys.stdout.flush(); subprocess.run([sys.executable, '-c', "
          "'import os; print(os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0))'])")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE is Linux's background class")
@pytest.mark.parametrize("held", [True, False])
def test_preparation_runs_in_the_background_class_from_its_first_instruction(tmp_path: Path, held: bool):
    reg = PidRegistry(tmp_path / "app.pids") if held else None
    base = os.getpriority(os.PRIO_PROCESS, 0)
    out = procs.run([sys.executable, "-c", _SCHED], registry=reg).split()
    assert out == [str(os.SCHED_IDLE), str(base)] * 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's scheduling class")
def test_a_migration_keeps_its_class_at_a_lower_priority(tmp_path: Path):
    base = os.getpriority(os.PRIO_PROCESS, 0)
    want = [str(os.SCHED_OTHER), str(min(19, base + procs.BACKGROUND_NICE))] * 2
    assert procs.run([sys.executable, "-c", _SCHED], registry=PidRegistry(tmp_path / "app.pids"),
                     background=False).split() == want


def test_the_background_class_per_platform(monkeypatch: pytest.MonkeyPatch):
    """The macOS branch cannot run here: what it asks the kernel for, and the fallback where a platform
    has no background class or refuses it."""
    calls: list[tuple[int, int, int]] = []
    monkeypatch.setattr(os, "setpriority", lambda which, who, prio: calls.append((which, who, prio)))
    monkeypatch.setattr(os, "getpriority", lambda which, who: 0)
    assert procs.to_background(4242, platform="darwin") == "darwin-bg"
    assert calls == [(procs.PRIO_DARWIN_PROCESS, 4242, procs.PRIO_DARWIN_BG)]
    calls.clear()
    assert procs.to_background(4242, platform="freebsd14") == "nice"
    assert calls == [(os.PRIO_PROCESS, 4242, procs.BACKGROUND_NICE)]

    def refuse(*a: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse, raising=False)
    calls.clear()
    assert procs.to_background(4242, platform="linux") == "nice"
    assert calls == [(os.PRIO_PROCESS, 4242, procs.BACKGROUND_NICE)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux schedules threads, each in its class")
def test_a_process_leaves_the_background_class_with_every_thread_and_child_it_started_there(tmp_path: Path):
    code = ("import subprocess, sys, threading, time; [threading.Thread(target=time.sleep, args=(60,), daemon=True)"
            ".start() for _ in range(3)]; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "print('up', flush=True); time.sleep(60)")
    hold = Hold()
    p = subprocess.Popen(hold.wrap([sys.executable, "-c", code]), stdin=hold.read_fd, stdout=subprocess.PIPE)
    try:
        hold.spawned()
        assert procs.to_background(p.pid, fallback=False) == "idle"
        hold.release()
        assert p.stdout is not None and p.stdout.readline().strip() == b"up"

        def classes() -> list[int]:
            ours = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
            return [os.sched_getscheduler(t.id) for q in ours for t in q.threads()]

        # born in it: the main thread, the three it started, and the process it started
        assert classes() == [os.SCHED_IDLE] * 5
        assert procs.to_foreground(p.pid) is None
        assert classes() == [os.SCHED_OTHER] * 5
    finally:
        for q in psutil.Process(p.pid).children(recursive=True):
            q.kill()
        p.kill()
        p.wait()
    assert procs.to_foreground(p.pid) == "the process is gone"


def test_who_can_take_a_canary_out_of_the_background_class(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A canary goes into the background class only where the daemon can take it out again: an
    unprivileged Linux daemon needs RLIMIT_NICE (systemd's LimitNICE=20); macOS lets the same user."""
    import resource

    limit = [0]
    monkeypatch.setattr(os, "getpriority", lambda which, who: 0)
    monkeypatch.setattr(resource, "getrlimit", lambda what: (limit[0], limit[0]))
    status = tmp_path / "status"
    status.write_text("Name:\tproto4d\nCapEff:\t0000000000000000\n")  # a user's daemon: no capabilities
    assert not procs.can_leave_background("linux", status)
    status.write_text("Name:\tproto4d\nCapEff:\t00000000a80425fb\n")  # a container's root: no CAP_SYS_NICE
    assert not procs.can_leave_background("linux", status)
    status.write_text("Name:\tproto4d\nCapEff:\t000001ffffffffff\n")  # root
    assert procs.can_leave_background("linux", status)
    status.write_text("Name:\tproto4d\nCapEff:\t0000000000000000\n")
    limit[0] = 20  # LimitNICE=20
    assert procs.can_leave_background("linux", status)
    assert procs.can_leave_background("darwin") and not procs.can_leave_background("freebsd14")
    calls: list[tuple[int, int, int]] = []
    monkeypatch.setattr(os, "setpriority", lambda which, who, prio: calls.append((which, who, prio)))
    assert procs.to_foreground(4242, platform="darwin") is None
    assert calls == [(procs.PRIO_DARWIN_PROCESS, 4242, 0)]
    # Where the class cannot be set, a process that may become production is left as it is: a nice
    # value an unprivileged daemon could never take back would follow it into production.
    calls.clear()
    assert procs.to_background(4242, platform="freebsd14", fallback=False) == "none" and calls == []


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    for d in ("releases/r1", "venvs/abc/bin", "shared"):
        (r / d).mkdir(parents=True)
    os.symlink(sys.executable, r / "venvs/abc/bin/python")
    return r


def _sleeper(argv0: str, cwd: Path, env: dict[str, str] | None = None, listen: int | None = None):
    code = "import time; time.sleep(60)"
    if listen is not None:
        code = (f"import socket, time; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
                f"s.bind(('127.0.0.1', {listen})); s.listen(); print('up', flush=True); time.sleep(60)")
    p = subprocess.Popen([argv0, "-c", code], cwd=cwd, env={**os.environ, **(env or {})}, start_new_session=True,
                         stdout=subprocess.PIPE)
    if listen is not None:
        assert p.stdout is not None and p.stdout.readline().strip() == b"up"
    return p


def test_processes_are_recognised_as_ours_by_what_they_are(root: Path, tmp_path: Path):
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    portnum = port.getsockname()[1]
    port.close()
    venv_py = str(root / "venvs/abc/bin/python")
    started = {
        "venv interpreter": _sleeper(venv_py, tmp_path),
        "marker in releases": _sleeper(sys.executable, root / "releases/r1", env={"PROTO4D_RELEASE": "r1"}),
        "our port from releases": _sleeper(sys.executable, root / "releases/r1", listen=portnum),
    }
    strangers = {
        "a shell sitting in releases": _sleeper(sys.executable, root / "releases/r1"),
        "marker elsewhere": _sleeper(sys.executable, tmp_path, env={"PROTO4D_RELEASE": "r1"}),
    }
    live = _sleeper(venv_py, root / "releases/r1")  # ours but held by the registry
    try:
        stale = procs.find_stale(root, portnum, live={live.pid})
        found = {e["pid"] for e in stale}
        for what, p in started.items():
            assert p.pid in found, what
        for what, p in strangers.items():
            assert p.pid not in found, what
        assert live.pid not in found and os.getpid() not in found
        ended = procs.end_stale(root, portnum, {live.pid}, timeout=5)
        assert {e["pid"] for e in ended} == found
        for p in started.values():
            assert p.wait(10) == -signal.SIGTERM
        for p in [*strangers.values(), live]:
            assert p.poll() is None
    finally:
        for p in [*started.values(), *strangers.values(), live]:
            p.kill()
            p.wait(10)


def test_a_held_start_is_not_taken_for_a_stale_process(root: Path):
    """A start not yet recorded (or left by a dead daemon) runs no command: it must not be ended as stale."""
    p, hold = spawn_held([str(root / "venvs/abc/bin/python"), "-c", "pass"], cwd=root / "releases/r1",
                         env={**os.environ, "PROTO4D_RELEASE": "r1"})
    try:
        assert p.pid not in {e["pid"] for e in procs.find_stale(root, None, live=set())}
    finally:
        hold.abort()
        p.wait(10)


def test_an_app_process_that_cannot_start_is_dead_with_its_reason_not_an_exception(tmp_path: Path):
    import asyncio

    from proto4d.child import AppProcess

    async def go(cwd: Path, argv0: str) -> AppProcess:
        reg = PidRegistry(tmp_path / "app.pids")
        p = AppProcess(release="r1", role="app", argv=[argv0, "-c", "pass"], cwd=cwd, env=dict(os.environ),
                       pass_fds=(), on_line=lambda line, proc: None, registry=reg, ready_pattern="x")
        await p.start()
        await p.wait(30)
        assert reg.pids() == set()
        return p

    gone_dir = asyncio.run(go(tmp_path / "removed-release", sys.executable))
    assert not gone_dir.alive and gone_dir.exit_description() == "never started"
    assert "removed-release" in gone_dir.last_lines()
    no_python = asyncio.run(go(tmp_path, str(tmp_path / "venvs/x/bin/python")))
    assert no_python.returncode == 127 and "could not execute" in no_python.exit_description()
    assert "not found" in no_python.last_lines()


def test_holds_socket_sees_the_handed_out_socket_on_any_other_descriptor_until_it_is_let_go(tmp_path: Path):
    """The handoff's look at the old process: the socket it was given, by inode, on a descriptor other
    than the inherited one; gone once the drain shim points that descriptor at /dev/null."""
    listener = socket.create_server(("127.0.0.1", 0))
    other = socket.create_server(("127.0.0.1", 0))
    inode = os.fstat(listener.fileno()).st_ino
    fd = listener.fileno()
    script = textwrap.dedent(f"""
        import os, sys
        dup = os.dup({fd})                      # what uvicorn serves on
        print(dup, flush=True)
        sys.stdin.readline()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, dup)                       # what the drain shim does on SIGTERM
        print("let go", flush=True)
        sys.stdin.readline()
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         pass_fds=(fd, other.fileno()))
    try:
        dup = int(p.stdout.readline())
        assert procs.holds_socket(p.pid, {inode}, {fd}) is True
        assert procs.holds_socket(p.pid, {inode}, {fd, dup}) is False  # only the inherited descriptors
        assert procs.holds_socket(p.pid, {os.fstat(other.fileno()).st_ino}, {other.fileno()}) is False
        p.stdin.write("\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "let go"
        assert procs.holds_socket(p.pid, {inode}, {fd}) is False
    finally:
        p.kill()
        p.wait()
        listener.close()
        other.close()
    assert procs.holds_socket(p.pid, {inode}, set()) is False  # gone
    assert procs.holds_socket(p.pid, {inode}, set(), proc_root=tmp_path) is None  # no procfs: ask psutil
