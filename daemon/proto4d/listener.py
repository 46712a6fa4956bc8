"""The listening socket the daemon owns and lends to the app (`{fd}`), and "who holds this port".

Because the daemon keeps the socket open across app restarts and switches, the kernel keeps
queueing connections while no app process is accepting: clients wait, they are not refused.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket

import psutil


class ListenError(Exception):
    """The port cannot be bound; the message says who holds it when that can be found."""


def _family(host: str) -> socket.AddressFamily:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return socket.AF_INET


# Where a local client (cloudflared, a health probe, a browser on the Mac) connects for "localhost".
LOOPBACKS = ("127.0.0.1", "::1")


def answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on host:port (a completed handshake, not a bind test)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:  # refused, unreachable, or no such address family (no IPv6 on this machine)
        return False


def foreign_holders(port: int, ours: set[int] | None = None) -> list[int]:
    """Pids listening on `port` other than this process, its descendants (our app inherits our
    socket) and the pids in `ours`."""
    mine = {os.getpid(), *(ours or set())}
    with contextlib.suppress(psutil.Error):
        mine.update(c.pid for c in psutil.Process().children(recursive=True))
    return [pid for pid in _listening_pids(port) if pid not in mine]


def check_port_free(host: str, port: int, ours: set[int] | None = None) -> None:
    """Refuse, naming the holder, when anything else answers on `port` on a loopback address.

    On macOS (BSD SO_REUSEADDR) another process of the same user may bind 127.0.0.1:8000 beside
    our 0.0.0.0:8000, and the more specific bind wins: cloudflared's loopback traffic would reach
    it while every update changes nothing students see. Linux refuses that bind, but not one on
    ::1 beside our 127.0.0.1. So before binding, ask both loopbacks whether anyone answers.
    """
    if port == 0:
        return
    for addr in LOOPBACKS:
        if not answers(addr, port):
            continue
        pids = _listening_pids(port)
        if pids and not foreign_holders(port, ours):
            continue  # only our own socket (e.g. the old one while the address changes) answers
        where = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
        raise ListenError(f"listen {host}:{port}: the port is already in use: {where} answers, served by "
                          f"{who_listens(port, ours)}; stop it (or move it to another port) so that traffic for "
                          f"port {port} reaches proto4d's app only")


def open_listener(host: str, port: int, backlog: int, *, check: bool = True,
                  ours: set[int] | None = None) -> socket.socket:
    if check:
        check_port_free(host, port, ours)
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # uvicorn treats an fd as a Unix socket and never sets TCP_NODELAY; set it here so accepted
        # connections inherit it (Nagle + delayed ACK otherwise add ~40 ms to small responses).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ListenError(f"listen {host}:{port}: the port is already in use by {who_listens(port)}") from None
        if e.errno == errno.EACCES:
            raise ListenError(f"listen {host}:{port}: permission denied (ports below 1024 need root)") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise ListenError(f"listen {host}:{port}: this machine has no address {host}") from None
        raise ListenError(f"listen {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def private_listener(backlog: int = 128) -> socket.socket:
    """A socket on a free loopback port, for a canary nobody else can reach."""
    return open_listener("127.0.0.1", 0, backlog, check=False)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening_pids(port: int) -> list[int]:
    holders: list[int] = []
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, PermissionError):
        conns = []
        for p in psutil.process_iter(["pid"]):
            try:
                conns.extend(c._replace(pid=p.pid) if hasattr(c, "_replace") else c
                             for c in p.net_connections(kind="tcp"))
            except psutil.Error:
                continue
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
            holders.append(c.pid)
    return sorted(set(holders))


def who_listens(port: int, ours: set[int] | None = None) -> str:
    """'pid 123 (python -m uvicorn ...)' for the process listening on `port`, as far as we may see."""
    holders = foreign_holders(port, ours) if ours is not None else _listening_pids(port)
    if not holders:
        return f"another process (not visible to this user; try `lsof -nP -iTCP:{port} -sTCP:LISTEN`)"
    described = []
    for pid in sorted(set(holders)):
        try:
            cmd = " ".join(psutil.Process(pid).cmdline())[:200]
        except psutil.Error:
            cmd = "?"
        described.append(f"pid {pid} ({cmd})")
    return ", ".join(described)
