"""sd_notify from the daemon's side: datagrams on real sockets, as systemd would receive them."""

from __future__ import annotations

import os
import socket
import sys
import time
import uuid
from pathlib import Path

import pytest

from proto4d import notifier

# --------------------------------------------------------------------------- sd_notify


@pytest.fixture()
def receiver(tmp_path: Path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    assert len(str(path)) < 100, "AF_UNIX paths are limited to ~104 bytes"
    sock.bind(str(path))
    sock.settimeout(5)
    yield sock, str(path)
    sock.close()


def recv(sock: socket.socket) -> str:
    return sock.recv(65536).decode("utf-8")


def assert_each_message(n: notifier.Notifier, sock: socket.socket) -> None:
    assert n.enabled
    assert n.ready() is True
    assert recv(sock) == "READY=1"
    assert n.status("serving proto4_20261126_030000_abc1234; 2 users") is True
    assert recv(sock) == "STATUS=serving proto4_20261126_030000_abc1234; 2 users"
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = recv(sock).split("\n")  # both lines in one datagram
    assert first == "RELOADING=1"
    key, _, usec = second.partition("=")
    assert key == "MONOTONIC_USEC" and before <= int(usec) <= after
    assert n.stopping() is True
    assert recv(sock) == "STOPPING=1"
    assert n.watchdog() is True
    assert recv(sock) == "WATCHDOG=1"
    assert n.extend_timeout(600) is True
    assert recv(sock) == "EXTEND_TIMEOUT_USEC=600000000"


def test_notifier_path_socket(receiver):
    sock, path = receiver
    assert_each_message(notifier.Notifier({"NOTIFY_SOCKET": path}), sock)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets are Linux-only")
def test_notifier_abstract_socket():
    name = f"proto4d-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        assert_each_message(notifier.Notifier({"NOTIFY_SOCKET": "@" + name}), sock)
    finally:
        sock.close()


def test_status_is_one_utf8_line(receiver):
    sock, path = receiver
    n = notifier.Notifier({"NOTIFY_SOCKET": path})
    assert n.status("업데이트 대기 중\nREADY=1")
    # a newline in the text must not smuggle in a second assignment
    assert recv(sock) == "STATUS=업데이트 대기 중 READY=1"


def test_watchdog_interval(receiver):
    _, path = receiver
    base = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "60000000"}
    assert notifier.Notifier(base).watchdog_interval() == 30.0
    assert notifier.Notifier({**base, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval() == 30.0
    assert notifier.Notifier({**base, "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval() is None
    assert notifier.Notifier({**base, "WATCHDOG_PID": "nonsense"}).watchdog_interval() is None
    assert notifier.Notifier({**base, "WATCHDOG_USEC": "0"}).watchdog_interval() is None
    assert notifier.Notifier({**base, "WATCHDOG_USEC": "soon"}).watchdog_interval() is None
    assert notifier.Notifier({"NOTIFY_SOCKET": path}).watchdog_interval() is None
    assert notifier.Notifier({"WATCHDOG_USEC": "60000000"}).watchdog_interval() is None  # nowhere to ping


def test_without_notify_socket_everything_is_a_no_op():
    for env in ({}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "vsock:2:1234"}):
        n = notifier.Notifier(env)
        assert not n.enabled
        assert n.ready() is False
        assert n.status("x") is False
        assert n.reloading() is False
        assert n.stopping() is False
        assert n.watchdog() is False
        assert n.watchdog_interval() is None
        n.close()


def test_a_vanished_socket_never_raises(tmp_path: Path):
    n = notifier.Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert n.enabled
    assert n.ready() is False and n.watchdog() is False and n.stopping() is False


def test_a_receiver_that_never_reads_cannot_hang_the_sender(receiver):
    _, path = receiver
    n = notifier.Notifier({"NOTIFY_SOCKET": path})
    # fill the receiver's queue (Linux: net.unix.max_dgram_qlen, 10 by default); the send
    # that no longer fits gives up after its timeout instead of blocking the daemon's loop
    for _ in range(10_000):
        started = time.monotonic()
        if not n.watchdog():
            assert time.monotonic() - started < 3
            break
    else:
        pytest.skip("the queue never filled (a platform with a very large datagram queue)")
