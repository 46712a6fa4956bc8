"""The tunnel check of the activity sample (`activity.tunnel_process`), against real processes.

A tunnel once found is watched by its pid alone; while none is known every process is looked
through at most every TUNNEL_RESCAN_S (issue 12: walking them all at every sample was most of the
idle daemon's CPU). So a tunnel that stops shows at the next sample, one that starts within
TUNNEL_RESCAN_S. The clock is the sampler's own (injected), so no test waits 30 s.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from harness import wait_for
from proto4d import activity
from proto4d.activity import TUNNEL_RESCAN_S, Sampler
from proto4d.config import ActivityConfig, SafetyConfig

SAFETY = SafetyConfig(yellow_max_users=2, quiet_for_s=120, red_rpm=600)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Tunnels:
    """Processes under a given name (copies of `sleep`), started and killed by the test."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str) -> subprocess.Popen[bytes]:
        exe = self.base / name
        if not exe.exists():
            shutil.copy2(shutil.which("sleep") or "/bin/sleep", exe)
        p = subprocess.Popen([str(exe), "600"], stdin=subprocess.DEVNULL)
        self.procs.append(p)
        # Popen may return before the child has exec'd (it still carries python's name until then)
        wait_for(lambda: psutil.Process(p.pid).name() == name, 10, f"{name} to run")
        return p

    def stop(self, p: subprocess.Popen[bytes]) -> None:
        p.kill()
        p.wait(10)  # reaped: no zombie left under the name

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                self.stop(p)


@pytest.fixture
def tunnels(tmp_path: Path) -> Iterator[Tunnels]:
    t = Tunnels(tmp_path)
    try:
        yield t
    finally:
        t.stop_all()


def sampler(name: str, clock: Clock) -> Sampler:
    cfg = ActivityConfig(interval_s=5, window_s=300, ignore_paths=(), tunnel_process=name, history_max_bytes=1 << 20)
    return Sampler(cfg, SAFETY, 1, "", set, clock=clock)


@pytest.fixture
def walks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """How often every process was looked through (the real lookup, counted)."""
    calls: list[str] = []
    real = activity.find_process

    def counted(name: str):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(activity, "find_process", counted)
    return calls


# Unique per test run: another test's (or another worker's) tunnel must not be found.
SHORT = f"p4dtun{os.getpid() % 100000}"          # fits Linux's 15-character comm
LONG = f"proto4d-tunnel-check-{os.getpid()}"    # longer: compared in full past the truncated comm


@pytest.mark.parametrize("length", ["short", "long"])
def test_a_started_tunnel_is_seen_within_the_rescan_and_a_stopped_one_at_once(tunnels, walks, length):
    name = SHORT if length == "short" else LONG
    clock = Clock()
    s = sampler(name, clock)
    assert s.sample([], app_up=True)["tunnel"] is False
    assert walks == [name]
    t = tunnels.start(name)
    clock.now += 5
    assert s.sample([], app_up=True)["tunnel"] is False  # not looked for again yet
    assert len(walks) == 1
    clock.now += TUNNEL_RESCAN_S - 5
    last = s.sample([], app_up=True)
    assert last["tunnel"] is True and last["tunnel_rescan_s"] == TUNNEL_RESCAN_S and last["tunnel_checked_at"]
    assert len(walks) == 2
    # Found: watched by its pid, never another walk however long it runs.
    for _ in range(20):
        clock.now += TUNNEL_RESCAN_S
        assert s.sample([], app_up=True)["tunnel"] is True
    assert len(walks) == 2
    tunnels.stop(t)
    assert s.sample([], app_up=True)["tunnel"] is False  # the next sample, no clock advance
    assert len(walks) == 3


def test_a_restarted_tunnel_is_found_at_once_under_its_new_pid(tunnels, walks):
    clock = Clock()
    s = sampler(SHORT, clock)
    first = tunnels.start(SHORT)
    assert s.sample([], app_up=True)["tunnel"] is True
    tunnels.stop(first)
    tunnels.start(SHORT)  # a service manager brings it back before the next sample
    assert s.sample([], app_up=True)["tunnel"] is True
    assert len(walks) == 2


def test_another_name_after_a_reload_is_looked_for_at_the_next_sample(tunnels, walks):
    clock = Clock()
    s = sampler(SHORT, clock)
    assert s.sample([], app_up=True)["tunnel"] is False
    other = SHORT + "b"
    tunnels.start(other)
    s.reconfigure(ActivityConfig(interval_s=5, window_s=300, ignore_paths=(), tunnel_process=other,
                                 history_max_bytes=1 << 20), SAFETY, 1, "")
    assert s.sample([], app_up=True)["tunnel"] is True
    assert walks == [SHORT, other]


def test_no_tunnel_configured_is_never_looked_for(walks):
    s = sampler("", Clock())
    last = s.sample([], app_up=True)
    assert last["tunnel"] is None and last["tunnel_checked_at"] is None and walks == []
