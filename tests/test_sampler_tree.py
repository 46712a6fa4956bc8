"""The app's process tree as the activity sample sees it (CPU and memory are summed over it), read from
the kernel's child lists on Linux rather than psutil's machine-wide parent map (issue 12: that walk
of every process at every sample was a large share of the idle daemon's CPU). Real processes."""

from __future__ import annotations

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
    with socket.socket(family) as server:
        server.bind((host, 0))
        server.listen()
        port = server.getsockname()[1]
        clients = [socket.create_connection((host, port), timeout=10) for _ in range(3)]
        accepted = [server.accept()[0] for _ in clients]
        try:
            cfg = ActivityConfig(interval_s=5, window_s=300, ignore_paths=(), tunnel_process="",
                                 history_max_bytes=1 << 20)
            s = Sampler(cfg, SafetyConfig(yellow_max_users=2, quiet_for_s=120, red_rpm=600), port, "", set,
                        host=host)
            assert s.conn_kind == ("tcp6" if family == socket.AF_INET6 else "tcp4")
            assert s.sample([os.getpid()], app_up=True)["connections"] == 3
        finally:
            for c in clients + accepted:
                c.close()
