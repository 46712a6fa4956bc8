"""The port is ours alone: before binding, nothing else may answer on it on 127.0.0.1 or ::1.

The holders are real processes outside this one's tree (as another start script's app would
be), listening on real sockets."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import has_ipv6_loopback
from proto4d.listener import ListenError, check_port_free, open_listener

HOLDER = """
import socket, sys, time
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam)
s.bind((sys.argv[1], 0))
s.listen(8)
open(sys.argv[2] + ".tmp", "w").write(str(s.getsockname()[1]))
import os; os.rename(sys.argv[2] + ".tmp", sys.argv[2])
time.sleep(120)
"""


@pytest.fixture()
def foreign(tmp_path: Path) -> Iterator:
    """Start a listener in a process that is not our descendant (a shell backgrounds it and exits)."""
    started: list[int] = []

    def start(addr: str) -> tuple[int, int]:
        out = tmp_path / f"port-{len(started)}"
        script = tmp_path / "holder.py"
        script.write_text(HOLDER)
        r = subprocess.run(["sh", "-c", f'"{sys.executable}" "{script}" "{addr}" "{out}" >/dev/null 2>&1 & echo $!'],
                           capture_output=True, text=True, check=True)
        pid = int(r.stdout.strip())
        started.append(pid)
        deadline = time.monotonic() + 10
        while not out.exists():
            assert time.monotonic() < deadline, "the holder did not start"
            time.sleep(0.02)
        return pid, int(out.read_text())

    yield start
    for pid in started:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no ::1 on this machine")
def test_a_holder_on_ipv6_loopback_is_refused_by_name(foreign):
    pid, port = foreign("::1")
    # Linux lets us bind 127.0.0.1 beside [::1]:port: only the check stops us
    with pytest.raises(ListenError) as e:
        open_listener("127.0.0.1", port, 16)
    msg = str(e.value)
    assert f"the port is already in use: [::1]:{port} answers" in msg and f"pid {pid}" in msg and "holder.py" in msg


def test_a_holder_on_ipv4_loopback_is_refused_before_binding_anywhere(foreign):
    pid, port = foreign("127.0.0.1")
    with pytest.raises(ListenError, match=rf"in use: 127\.0\.0\.1:{port} answers, served by pid {pid} "):
        open_listener("0.0.0.0", port, 16)


def test_our_own_socket_does_not_count(tmp_path: Path):
    with socket.socket() as mine:
        mine.bind(("127.0.0.1", 0))
        mine.listen(8)
        port = mine.getsockname()[1]
        check_port_free("0.0.0.0", port)  # only this process answers: ours (an address change keeps the port)


def test_a_free_port_binds():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sock = open_listener("127.0.0.1", port, 16)
    try:
        assert sock.getsockname()[1] == port and sock.get_inheritable()
    finally:
        sock.close()
