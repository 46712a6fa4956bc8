"""proto4d as a system service: its service files and its side channel to systemd.

This module owns two things. `install-service`: rendering the systemd unit and the
launchd plist from the templates shipped in `proto4d/templates/`, writing them where the
service manager looks, and telling the operator the exact commands that load them.
`Notifier`: the sd_notify messages the daemon sends to systemd (ready, status, reloading,
stopping, watchdog). When to send them is the supervisor's business, not this module's.
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import pwd
import re
import shlex
import shutil
import socket
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import sdnotify

from proto4d import __version__, fsutil
from proto4d import config as configmod

log = logging.getLogger(__name__)

LAUNCHD_LABEL = "org.proto4d.proto4d"
SYSTEMD_UNIT = "proto4d.service"
KINDS = ("systemd", "launchd")
# Seconds above update.drain_timeout_s that the service manager waits before SIGKILL:
# the drain itself plus stopping the sampler, writing status and exiting.
STOP_MARGIN_S = 30
# Children must not inherit these: NotifyAccess=main drops their messages anyway, and a
# child that thought it owned the watchdog would only add noise to the journal.
NOTIFY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")

_PLACEHOLDER = re.compile(r"@([A-Z_]+)@")
# What launchd and systemd give a job when nobody sets PATH is too little to find git,
# Homebrew or a pyenv Python; these follow the venv's bin and the tools found at install.
_DEFAULT_PATH = {
    "systemd": ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"),
    "launchd": ("/opt/homebrew/bin", "/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"),
}


class ServiceError(Exception):
    """A service file that cannot be rendered or written, worded for the operator."""


# --------------------------------------------------------------------------- where things are


def exe_argv() -> list[str]:
    """The command that runs proto4d on this machine, with absolute paths.

    The `proto4d` console script when it sits beside the running interpreter (the usual
    venv install), else this interpreter with `-m proto4d`. sys.executable is made absolute
    but not resolved: a venv's bin/python is a symlink, and resolving it would escape the venv.
    """
    python = os.path.abspath(sys.executable)
    script = os.path.join(os.path.dirname(python), "proto4d")
    if os.path.isfile(script) and os.access(script, os.X_OK):
        return [script]
    return [python, "-m", "proto4d"]


def default_path(kind: str, system: bool) -> Path:
    """Where the service manager looks for proto4d's file: the system-wide place or the user's."""
    if kind == "systemd":
        if system:
            return Path("/etc/systemd/system") / SYSTEMD_UNIT
        return Path.home() / ".config/systemd/user" / SYSTEMD_UNIT
    if kind == "launchd":
        if system:
            return Path("/Library/LaunchDaemons") / f"{LAUNCHD_LABEL}.plist"
        return Path.home() / "Library/LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _template(name: str) -> str:
    # importlib.resources, not __file__: also works from a wheel or a zipped install
    return (resources.files("proto4d") / "templates" / name).read_text(encoding="utf-8")


def _config_path(cfg: configmod.Config) -> str:
    # cfg.source is what the operator typed and may be relative; the service runs elsewhere.
    # abspath, not resolve: a config reached through a symlink should stay reached that way.
    return os.path.abspath(cfg.source)


def _stop_timeout(cfg: configmod.Config) -> int:
    return math.ceil(cfg.update.drain_timeout_s) + STOP_MARGIN_S


def _search_path(kind: str, cfg: configmod.Config, argv: Sequence[str]) -> str:
    """PATH for the service: the venv's bin first, then where git and python are found now."""
    dirs = [os.path.dirname(argv[0])]
    for tool in (cfg.python, "git"):
        found = shutil.which(tool)
        if found:
            dirs.append(os.path.dirname(os.path.abspath(found)))
    dirs.extend(_DEFAULT_PATH[kind])
    seen: list[str] = []
    for d in dirs:
        if d and d not in seen:
            seen.append(d)
    return ":".join(seen)


def _check_text(what: str, value: str) -> str:
    # One line per setting in a unit; XML 1.0 cannot carry most control characters at all.
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ServiceError(f"{what} contains a control character, which a service file cannot hold: "
                           f"{value!r}")
    return value


# --------------------------------------------------------------------------- systemd


def _sd_escape(value: str, *, dollar: bool) -> str:
    # systemd expands %-specifiers in nearly every setting, and $VAR in ExecStart= only.
    value = value.replace("%", "%%")
    return value.replace("$", "$$") if dollar else value


def _sd_quote(word: str, *, dollar: bool) -> str:
    """One word for ExecStart=/Environment=: escaped, and double-quoted when it needs it."""
    word = _sd_escape(word, dollar=dollar)
    if word and not any(c in word for c in " \t\"'\\;"):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _fill_lines(template: str, values: Mapping[str, str]) -> str:
    # "#@" lines are notes for whoever reads the template, not part of the unit
    lines = [line for line in template.splitlines() if not line.startswith("#@")]
    missing = {name for line in lines for name in _PLACEHOLDER.findall(line)} - set(values)
    if missing:  # a template edited without this module: fail loudly rather than ship "@X@"
        raise ServiceError(f"template placeholders without a value: {', '.join(sorted(missing))}")
    out = []
    for line in lines:
        whole = _PLACEHOLDER.fullmatch(line.strip())
        if whole and not values[whole.group(1)]:
            continue
        # one pass, so a value that happens to contain "@X@" is never substituted again
        out.append(_PLACEHOLDER.sub(lambda m: values[m.group(1)], line))
    return "\n".join(out) + "\n"


def render_systemd(cfg: configmod.Config, exe_argv: list[str], *, user: str | None, system: bool) -> str:
    """The systemd unit running `proto4d run --config <abs config>` for this config.

    system=False renders a user unit (`systemctl --user`, WantedBy=default.target, no
    User=); system=True a system unit (WantedBy=multi-user.target, after the network is
    up) that runs as `user` when given, else as root. `user` is ignored for a user unit:
    a user manager cannot switch users.
    """
    if not exe_argv:
        raise ServiceError("no command to run proto4d")
    config_path = _check_text("the config path", _config_path(cfg))
    root = _check_text("root", str(cfg.root))
    argv = [_check_text("the proto4d command", a) for a in exe_argv]
    if any(c in argv[0] for c in "\"'\\"):
        # systemd refuses such an executable name outright ("contains special characters")
        raise ServiceError(f"systemd cannot run a program whose path contains quotes or backslashes: "
                           f"{argv[0]}; install proto4d under a plainer path")
    # $VAR expansion (hence "$$") applies to the arguments, not to the executable's path
    exec_start = " ".join([_sd_quote(argv[0], dollar=False)]
                          + [_sd_quote(w, dollar=True) for w in [*argv[1:], "run", "--config", config_path]])
    scope = "a system unit (systemctl)" if system else "a user unit (systemctl --user)"
    header = (
        f"# Generated by `proto4d install-service --systemd` (proto4d {__version__})\n"
        f"# from {config_path}, as {scope}.\n"
        f"# Re-run it after moving the config or proto4d's venv: edits made here are lost then.\n"
        f"# `systemctl reload` (SIGHUP) re-reads the config; stopping (SIGTERM) drains the app first."
    )
    values = {
        "HEADER": header,
        # The user manager has no network-online.target (it lives in the system manager).
        "NETWORK": "Wants=network-online.target\nAfter=network-online.target" if system else "",
        "USER": f"User={_sd_escape(_check_text('user', user), dollar=False)}" if (system and user) else "",
        "WORKDIR": _sd_escape(root, dollar=False),
        "ENV_CONFIG": _sd_quote(f"PROTO4D_CONFIG={config_path}", dollar=False),
        "ENV_PATH": _sd_quote(f"PATH={_search_path('systemd', cfg, argv)}", dollar=False),
        "EXEC_START": exec_start,
        "TIMEOUT_STOP": str(_stop_timeout(cfg)),
        "WANTED_BY": "multi-user.target" if system else "default.target",
    }
    return _fill_lines(_template("proto4d.service"), values)


# --------------------------------------------------------------------------- launchd


def _plist_placeholders(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set().union(*(_plist_placeholders(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_plist_placeholders(v) for v in node))
    return set(_PLACEHOLDER.findall(node)) if isinstance(node, str) else set()


def _fill_plist(node: Any, values: Mapping[str, Any], program: Sequence[str]) -> Any:
    if isinstance(node, dict):
        return {k: _fill_plist(v, values, program) for k, v in node.items()}
    if isinstance(node, list):
        out: list[Any] = []
        for item in node:
            if item == "@PROGRAM@":
                out.extend(program)
            else:
                out.append(_fill_plist(item, values, program))
        return out
    if isinstance(node, str):
        whole = _PLACEHOLDER.fullmatch(node)
        if whole:  # the value keeps its own type: an integer stays an <integer>
            return values[whole.group(1)]
        return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), node)
    return node


def render_launchd(cfg: configmod.Config, exe_argv: list[str]) -> bytes:
    """The launchd plist running `proto4d run --config <abs config>`: XML that plistlib parses.

    The template is itself a plist; its values are filled here and the result is written
    by plistlib, so a path with `&` or `<` in it can never produce a broken file.
    """
    if not exe_argv:
        raise ServiceError("no command to run proto4d")
    config_path = _check_text("the config path", _config_path(cfg))
    root = _check_text("root", str(cfg.root))
    argv = [_check_text("the proto4d command", a) for a in exe_argv]
    import plistlib  # here, not at the top: the running daemon imports this module for Notifier only

    template = plistlib.loads(_template("proto4d.plist").encode("utf-8"))
    values: dict[str, Any] = {
        "LABEL": LAUNCHD_LABEL,
        "CONFIG": config_path,
        "ROOT": root,
        "PATH": _search_path("launchd", cfg, argv),
        "EXIT_TIMEOUT": _stop_timeout(cfg),
    }
    missing = _plist_placeholders(template) - set(values) - {"PROGRAM"}
    if missing:  # a template edited without this module: fail loudly rather than ship "@X@"
        raise ServiceError(f"template placeholders without a value: {', '.join(sorted(missing))}")
    data = plistlib.dumps(_fill_plist(template, values, argv), sort_keys=False)
    # plistlib writes no comments; put the provenance in one, just before <plist>.
    # "--" may not appear inside an XML comment.
    note = (f" Generated by proto4d {__version__} install-service (launchd) from {config_path}."
            " Re-run it after moving the config or proto4d's venv; edits made here are lost then. ")
    note = note.replace("--", "- -")
    comment = f"<!--{note}-->\n".encode()
    at = data.index(b"<plist")
    return data[:at] + comment + data[at:]


# --------------------------------------------------------------------------- install-service


_SYSTEMD_SYSTEM_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system",
                        "/usr/lib/systemd/system", "/lib/systemd/system")


def _systemd_user_dirs() -> tuple[str, ...]:
    home = str(Path.home())
    return (f"{home}/.config/systemd/user", f"{home}/.local/share/systemd/user", "/etc/systemd/user",
            "/usr/lib/systemd/user")


def _is_system_place(kind: str, path: Path) -> bool:
    parent = os.path.abspath(path.parent)
    if kind == "systemd":
        return parent in _SYSTEMD_SYSTEM_DIRS
    return parent in ("/Library/LaunchDaemons", "/System/Library/LaunchDaemons")


def _current_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a uid without a passwd entry (some containers): systemd takes numbers too
        return str(os.geteuid())


def _systemd_commands(dest: Path, system: bool) -> list[str]:
    root = os.geteuid() == 0
    sudo = "sudo " if system and not root else ""
    ctl = f"{sudo}systemctl" if system else "systemctl --user"
    unit = dest.stem if dest.suffix == ".service" else dest.name
    cmds: list[str] = []
    if os.path.abspath(dest.parent) not in (_SYSTEMD_SYSTEM_DIRS if system else _systemd_user_dirs()):
        # outside the search path: link it in, or `enable` cannot find it by name
        cmds.append(f"{ctl} link {shlex.quote(str(dest))}")
    cmds += [f"{ctl} daemon-reload", f"{ctl} enable --now {unit}", f"{ctl} status {unit}"]
    if system:
        cmds.append(f"{sudo}journalctl -u {unit} -f")
    else:
        cmds.append(f"journalctl --user -u {unit} -f")
        # without lingering the user manager (and proto4d) stops at logout and waits for a login at boot
        cmds.append(f"sudo loginctl enable-linger {shlex.quote(_current_user())}")
    return cmds


def _launchd_commands(dest: Path, system: bool) -> list[str]:
    sudo = "sudo " if system and os.geteuid() != 0 else ""
    domain = "system" if system else "gui/$(id -u)"
    target = f"{domain}/{LAUNCHD_LABEL}"
    return [
        f"{sudo}launchctl bootout {target} 2>/dev/null || true   # only when replacing a loaded job",
        f"{sudo}launchctl bootstrap {domain} {shlex.quote(str(dest))}",
        f"{sudo}launchctl print {target}",
        f"{sudo}launchctl kickstart -k {target}   # later: restart it (e.g. after upgrading proto4d)",
    ]


def cmd_install_service(args: argparse.Namespace) -> int:
    """`proto4d install-service`: render, then print or write the file and the commands to load it."""
    cfg = configmod.load(args.config)  # ConfigError -> exit 78 in the CLI
    kind = "launchd" if args.launchd else "systemd"
    output = Path(os.path.abspath(os.path.expanduser(args.output))) if args.output else None
    # No --system flag (yet): root installs system-wide, and so does an --output that names
    # a system directory; anyone else gets a unit of their own.
    system = getattr(args, "system", None)
    if system is None:
        system = os.geteuid() == 0 or (output is not None and _is_system_place(kind, output))
    argv = exe_argv()
    try:
        if kind == "systemd":
            user = _current_user() if system and os.geteuid() != 0 else None
            data = render_systemd(cfg, argv, user=user, system=system).encode("utf-8")
        else:
            data = render_launchd(cfg, argv)
    except (ServiceError, ValueError) as e:
        print(f"proto4d install-service: {e}", file=sys.stderr)
        return 1

    if args.print_only:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return 0

    dest = output or default_path(kind, system)
    try:
        # temp file beside it + fsync + rename, 0644: launchd refuses group/world-writable plists
        fsutil.atomic_write(dest, data, mode=0o644)
    except OSError as e:
        reason = e.strerror or str(e)
        hint = ""
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            hint = " (run it as root, or use --print and put the file there yourself)"
        print(f"proto4d install-service: cannot write {dest}: {reason}{hint}", file=sys.stderr)
        return 1

    print(f"wrote {dest}")
    # launchd opens its StandardOutPath/StandardErrorPath before starting proto4d and will
    # not create their directory; systemd starts in root. Make both exist now.
    try:
        (cfg.root / "logs").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"warning: cannot create {cfg.root / 'logs'}: {e.strerror or e}; create it before loading "
              f"the service", file=sys.stderr)
    commands = _systemd_commands(dest, system) if kind == "systemd" else _launchd_commands(dest, system)
    print("load and start it:")
    for c in commands:
        print(f"  {c}")
    if kind == "launchd" and not system:
        print("  (gui/ needs a logged-in session, e.g. auto-login on the Mac mini; run as root for a "
              "LaunchDaemon that starts at boot without one)")
    return 0


# --------------------------------------------------------------------------- sd_notify


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
