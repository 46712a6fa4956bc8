"""The daemon's side channel to systemd: sd_notify(3) messages (ready, status, reloading,
stopping, watchdog). When to send them is the supervisor's business; rendering the service
files that make systemd listen is service.py's.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterable, Mapping

import sdnotify

log = logging.getLogger(__name__)

# Children must not inherit these: NotifyAccess=main drops their messages anyway, and a
# child that thought it owned the watchdog would only add noise to the journal.
NOTIFY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _notify_address(value: str) -> str | None:
    """NOTIFY_SOCKET as a socket address; "@name" is Linux's abstract namespace."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    if value:  # e.g. "vsock:..." (systemd 254+, VMs): not for a daemon on a host
        log.debug("NOTIFY_SOCKET %r is not a unix socket path; sd_notify disabled", value)
    return None


class _Channel(sdnotify.SystemdNotifier):
    """sdnotify's notifier, adapted to what a long-running daemon needs.

    sdnotify 0.3.2 reads NOTIFY_SOCKET from os.environ when constructed (so tests cannot
    pass their own), connects once and never again, encodes as Latin-1 (a Korean STATUS
    would raise and, without debug, vanish silently), and with debug=False hides every
    failure. It does map "@name" to the abstract namespace; so does _notify_address.
    Here: the address comes from the caller, text is UTF-8 (what systemd expects), each
    message is one sendto() on an unconnected socket (nothing to reconnect after systemd
    re-executes itself), and failures raise for Notifier to log.
    """

    def __init__(self, address: str) -> None:
        # not super().__init__(): it reads os.environ and connects
        self.debug = True
        self.address = address
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # close-on-exec (PEP 446)
        # never stall the daemon's loop if systemd stops reading: drop the message instead
        self.socket.settimeout(1.0)

    def notify(self, state: str) -> None:
        self.socket.sendto(state.encode("utf-8"), self.address)

    def close(self) -> None:
        self.socket.close()


class Notifier:
    """sd_notify(3) for proto4d: tells systemd when the daemon is ready, reloading, stopping, alive.

    A no-op when NOTIFY_SOCKET is unset (launchd, a terminal) and never raises: a failed
    send is logged at debug and forgotten, since the service must not die for its manager's
    sake. Every method returns whether the message was sent.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        # read once: the supervisor may then remove NOTIFY_ENV from what its children inherit
        self._address = _notify_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = env.get("WATCHDOG_USEC", "")
        self._watchdog_pid = env.get("WATCHDOG_PID", "")
        self._channel: _Channel | None = None
        if self._address is not None:
            try:
                self._channel = _Channel(self._address)
            except OSError as e:
                log.debug("sd_notify: cannot create a socket: %s", e)

    @property
    def enabled(self) -> bool:
        """True when systemd gave a notify socket (and it could be opened)."""
        return self._channel is not None

    def _send(self, lines: Iterable[str]) -> bool:
        if self._channel is None:
            return False
        # one datagram for all lines: systemd applies them together (RELOADING with its timestamp)
        message = "\n".join(lines)
        try:
            self._channel.notify(message)
        except (OSError, ValueError) as e:
            log.debug("sd_notify %r failed: %s", message.split("\n", 1)[0], e)
            return False
        return True

    def ready(self) -> bool:
        """Start-up is complete (or a reload is): READY=1."""
        return self._send(["READY=1"])

    def status(self, text: str) -> bool:
        """A one-line status that `systemctl status` shows."""
        # a newline would start a new assignment: "x\nREADY=1" must not declare readiness
        return self._send(["STATUS=" + " ".join(text.splitlines())])

    def reloading(self) -> bool:
        """A config reload started (follow with ready()); the timestamp is in CLOCK_MONOTONIC usec."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self._send(["RELOADING=1", f"MONOTONIC_USEC={usec}"])

    def stopping(self) -> bool:
        """Shutdown started (draining the app): STOPPING=1."""
        return self._send(["STOPPING=1"])

    def watchdog(self) -> bool:
        """The daemon's loop is alive: WATCHDOG=1, at least every watchdog_interval() seconds."""
        return self._send(["WATCHDOG=1"])

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more time to start or stop (e.g. a first venv build slower than TimeoutStartSec)."""
        return self._send([f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}"])

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog() calls: half of WatchdogSec, or None when there is no watchdog.

        Like sd_watchdog_enabled(3): WATCHDOG_USEC must be a positive integer, and when
        WATCHDOG_PID is set it must be this process (a forked child inherits the variables
        but not the duty). None as well without a notify socket: there is nowhere to ping.
        """
        if not self.enabled:
            return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        if self._watchdog_pid:
            try:
                if int(self._watchdog_pid) != os.getpid():
                    return None
            except ValueError:
                return None
        return usec / 1_000_000 / 2

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
