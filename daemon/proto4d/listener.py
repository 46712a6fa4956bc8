"""The listening socket the daemon owns and lends to the app (`{fd}`), and "who holds this port".

Because the daemon keeps the socket open across app restarts and switches, the kernel keeps
queueing connections while no app process is accepting: clients wait, they are not refused.
"""

from __future__ import annotations

import errno
import ipaddress
import socket

import psutil


class ListenError(Exception):
    """The port cannot be bound; the message says who holds it when that can be found."""


def _family(host: str) -> socket.AddressFamily:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return socket.AF_INET


def open_listener(host: str, port: int, backlog: int) -> socket.socket:
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
    return open_listener("127.0.0.1", 0, backlog)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def who_listens(port: int) -> str:
    """'pid 123 (python -m uvicorn ...)' for the process listening on `port`, as far as we may see."""
    holders = []
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
