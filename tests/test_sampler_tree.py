"""The app's process tree as the activity sample sees it (CPU and memory are summed over it), read from
the kernel's child lists on Linux rather than psutil's machine-wide parent map (issue 12: that walk
of every process at every sample was a large share of the idle daemon's CPU). Real processes."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import psutil
import pytest

from harness import has_ipv6_loopback, wait_for
from proto4d import activity
from proto4d.activity import Sampler
from proto4d.config import ActivityConfig, SafetyConfig


@contextlib.contextmanager
def connected(host: str, n: int) -> Iterator[tuple[int, list[socket.socket]]]:
    """A listening socket on `host` with `n` clients connected and accepted: (its port, the accepted ends)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as server:
        server.bind((host, 0))
        server.listen()
        port = server.getsockname()[1]
        clients = [socket.create_connection((host, port), timeout=10) for _ in range(n)]
        accepted = [server.accept()[0] for _ in clients]
        try:
            yield port, accepted
        finally:
            for c in clients + accepted:
                c.close()


# A parent that forks one child from its main thread and one from another thread (the kernel lists a
# child under the thread that forked it), the first of which has a child of its own.
TREE = textwrap.dedent("""
    import subprocess, sys, threading, time
    kids = [subprocess.Popen(["/bin/sh", "-c", "sleep 600 & wait"])]
    t = threading.Thread(target=lambda: kids.append(subprocess.Popen(["sleep", "600"])))
    t.start(); t.join()
    print("ready", flush=True)
    time.sleep(600)
""")


@pytest.fixture
def tree() -> Iterator[psutil.Process]:
    p = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
        root = psutil.Process(p.pid)
        wait_for(lambda: len(root.children(recursive=True)) == 3, 10, "the three descendants")
        yield root
    finally:
        for c in psutil.Process(p.pid).children(recursive=True):
            c.kill()
        p.kill()
        p.wait(10)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's child lists are Linux's")
def test_the_kernel_lists_give_the_same_tree_as_psutil(tree: psutil.Process):
    below = activity.descendants(tree.pid)
    assert below is not None, "this kernel has no /proc/<pid>/task/<tid>/children (CONFIG_PROC_CHILDREN)"
    assert sorted(below) == sorted(c.pid for c in tree.children(recursive=True))


def test_the_sample_counts_the_whole_tree(tree: psutil.Process):
    cfg = ActivityConfig(interval_s=5, window_s=300, ignore_paths=(), tunnel_process="", history_max_bytes=1 << 20)
    s = Sampler(cfg, SafetyConfig(yellow_max_users=2, quiet_for_s=120, red_rpm=600), 1, "", set)
    last = s.sample([tree.pid], app_up=True)
    assert last["processes"] == 4
    assert last["rss_bytes"] >= sum(p.memory_info().rss for p in [tree, *tree.children(recursive=True)]) // 2
    assert s.sample([12345678], app_up=False)["processes"] == 0  # a pid that does not exist: no tree, no error


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_connections_are_counted_from_the_listening_socket_s_own_table(host: str):
    """Only the table of the socket's family is read (connection_kind): its connections must all be there."""
    if host == "::1" and not has_ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with connected(host, 3) as (port, _accepted):
        cfg = ActivityConfig(interval_s=5, window_s=300, ignore_paths=(), tunnel_process="",
                             history_max_bytes=1 << 20)
        s = Sampler(cfg, SafetyConfig(yellow_max_users=2, quiet_for_s=120, red_rpm=600), port, "", set,
                    host=host)
        assert s.conn_kind == ("tcp6" if family == socket.AF_INET6 else "tcp4")
        assert s.sample([os.getpid()], app_up=True)["connections"] == 3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sock_diag and /proc/<pid>/fd are Linux's")
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_the_kernel_s_table_of_the_port_agrees_with_psutil(host: str):
    """established_on_port (sock_diag, one port's established sockets) finds what psutil finds in /proc/net/tcp*,
    and socket_inodes finds the sockets a process holds."""
    if host == "::1" and not has_ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kind = "tcp6" if family == socket.AF_INET6 else "tcp4"
    with connected(host, 3) as (port, accepted):
        accepted[0].close()  # closed by the app: no longer established
        table = activity.established_on_port(port, kind)
        assert table is not None, "sock_diag refused here"
        want = {(tuple(c.laddr), tuple(c.raddr)) for c in psutil.Process().net_connections(kind=kind)
                if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port}
        assert set(table.values()) == want
        assert len(table) == 2
        mine = activity.socket_inodes([os.getpid()])
        assert mine is not None and set(table) <= mine
        assert activity.established_on_port(port, "tcp") == table  # both families asked



@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sock_diag and /proc/<pid>/fd are Linux's")
def test_a_quiet_app_is_counted_without_asking_the_kernel_s_table(monkeypatch: pytest.MonkeyPatch):
    """Issue 12's idle CPU: while the app's tree holds only sockets already found quiet (its listener,
    socketpairs), a sample counts 0 connections without reading any TCP table; an accepted connection is a
    new socket, so the next sample asks and counts it, and once it is closed the samples are quiet again."""
    asked: list[int] = []
    real = activity.established_on_port

    def counting(port: int, kind: str):  # type: ignore[no-untyped-def]
        asked.append(port)
        return real(port, kind)

    monkeypatch.setattr(activity, "established_on_port", counting)
    app = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import socket, sys
        server = socket.create_server(("127.0.0.1", 0))
        a, b = socket.socketpair()  # a quiet socket that is not TCP, as asyncio's self-pipe
        print(server.getsockname()[1], flush=True)
        conns = []
        for line in sys.stdin:
            if line.strip() == "accept":
                conns.append(server.accept()[0])
            elif line.strip() == "close":
                conns.pop().close()
            print("ok", flush=True)
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert app.stdin is not None and app.stdout is not None

    def tell(what: str) -> None:
        app.stdin.write(what + "\n")
        app.stdin.flush()
        assert app.stdout.readline().strip() == "ok"

    try:
        port = int(app.stdout.readline())
        cfg = ActivityConfig(interval_s=5, window_s=300, ignore_paths=(), tunnel_process="", history_max_bytes=1 << 20)
        s = Sampler(cfg, SafetyConfig(yellow_max_users=2, quiet_for_s=120, red_rpm=600), port, "", set,
                    host="127.0.0.1")
        assert s.sample([app.pid], app_up=True)["connections"] == 0
        assert len(asked) == 1  # the first look classifies the sockets
        for _ in range(3):
            assert s.sample([app.pid], app_up=True)["connections"] == 0
        assert len(asked) == 1
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        tell("accept")
        assert s.sample([app.pid], app_up=True)["connections"] == 1
        assert s.sample([app.pid], app_up=True)["connections"] == 1  # a live connection: asked again
        assert len(asked) == 3
        tell("close")
        client.close()
        assert s.sample([app.pid], app_up=True)["connections"] == 0
        assert len(asked) == 3
        s.reconfigure(cfg, s.safety, port, "", host="127.0.0.1")  # a reload that changes nothing here
        assert s.sample([app.pid], app_up=True)["connections"] == 0
        assert len(asked) == 3
        s.reconfigure(cfg, s.safety, port + 1, "", host="127.0.0.1")  # quiet on the old port says nothing
        assert s.sample([app.pid], app_up=True)["connections"] == 0
        assert len(asked) == 4
    finally:
        app.kill()
        app.wait(10)
