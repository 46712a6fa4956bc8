"""proto4d as a system service: rendering and installing its launchd plist and systemd unit.

`install-service` fills the templates shipped in `proto4d/templates/` for this machine,
writes them where the service manager looks, and tells the operator the exact commands
that load them. Run through sudo it installs a system-wide job that runs as the operator
(SUDO_USER), never as root. The runtime side channel to systemd (sd_notify) is notifier.py.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import grp
import math
import os
import pwd
import re
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from proto4d import __version__, fsutil
from proto4d import config as configmod

LAUNCHD_LABEL = "org.proto4d.proto4d"
SYSTEMD_UNIT = "proto4d.service"
KINDS = ("systemd", "launchd")
# Seconds above update.drain_timeout_s that the service manager waits before SIGKILL:
# the drain itself plus stopping the sampler, writing status and exiting.
STOP_MARGIN_S = 30

_PLACEHOLDER = re.compile(r"@([A-Z_]+)@")
# What launchd and systemd give a job when nobody sets PATH (launchd: /usr/bin:/bin:/usr/sbin:/sbin)
# is too little to find uv, git, Homebrew or a pyenv Python; these follow the venv's bin, the
# tools found at install time and the places uv's and Homebrew's installers put them.
_DEFAULT_PATH = {
    "systemd": ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"),
    "launchd": ("/opt/homebrew/bin", "/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"),
}
# Where uv's own installer and `pip install --user`/pipx put commands, relative to HOME.
_USER_BIN_DIRS = (".local/bin", ".cargo/bin")


@dataclass(frozen=True)
class Account:
    """The user a system-wide job runs as: launchd's UserName/GroupName and HOME, systemd's User=."""

    user: str
    group: str
    home: str
    uid: int
    gid: int


def account(name: str) -> Account:
    """The passwd entry of `name` (a user name or a numeric uid), or ServiceError."""
    try:
        pw = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except (KeyError, ValueError):
        raise ServiceError(f"no such user: {name!r}") from None
    try:
        group = grp.getgrgid(pw.pw_gid).gr_name
    except KeyError:
        group = str(pw.pw_gid)
    return Account(pw.pw_name, group, pw.pw_dir, pw.pw_uid, pw.pw_gid)


def operator_name(environ: Mapping[str, str], euid: int, given: str | None = None) -> str | None:
    """Whom a system-wide service should run as: --user, else the sudo caller, else this user.

    None when that can only be root (a root shell without sudo and without --user).
    """
    if given:
        return given
    if euid != 0:
        try:
            return pwd.getpwuid(euid).pw_name
        except KeyError:
            return str(euid)
    sudo_user = environ.get("SUDO_USER", "")
    if sudo_user and sudo_user != "root":
        return sudo_user
    return None


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


def _search_path(kind: str, cfg: configmod.Config, argv: Sequence[str], home: str | None = None) -> str:
    """PATH for the service: the venv's bin first, then where python, git and uv are found now,
    then the user's own bin dirs (uv's installer uses ~/.local/bin) and the usual system places."""
    dirs = [os.path.dirname(argv[0])]
    for tool in (cfg.python, "git"):
        found = shutil.which(tool)
        if found:
            # abspath, not realpath: Homebrew's bin/ symlinks outlive the Cellar versions they point at
            dirs.append(os.path.dirname(os.path.abspath(found)))
    uv = configmod.find_uv()
    if uv:
        dirs.append(os.path.dirname(os.path.abspath(uv)))
    if home:
        dirs.extend(os.path.join(home, d) for d in _USER_BIN_DIRS)
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


def _home_of(user: str | None) -> str:
    if user:
        with contextlib.suppress(ServiceError):
            return account(user).home
    return str(Path.home())


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
        "ENV_PATH": _sd_quote(f"PATH={_search_path('systemd', cfg, argv, _home_of(user))}", dollar=False),
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


def render_launchd(cfg: configmod.Config, exe_argv: list[str], *, run_as: Account | None = None) -> bytes:
    """The launchd plist running `proto4d run --config <abs config>`: XML that plistlib parses.

    run_as: a LaunchDaemon (system domain) runs as root unless the plist names a user, so
    one is always named for it (UserName, GroupName, InitGroups for the user's other groups,
    HOME). A LaunchAgent (run_as None) already runs as the user who loads it; HOME is set
    either way. The template is itself a plist; its values are filled here and the result is
    written by plistlib, so a path with `&` or `<` in it can never produce a broken file.
    """
    if not exe_argv:
        raise ServiceError("no command to run proto4d")
    config_path = _check_text("the config path", _config_path(cfg))
    root = _check_text("root", str(cfg.root))
    argv = [_check_text("the proto4d command", a) for a in exe_argv]
    import plistlib  # here, not at the top: only install-service renders plists

    home = run_as.home if run_as is not None else str(Path.home())
    template = plistlib.loads(_template("proto4d.plist").encode("utf-8"))
    values: dict[str, Any] = {
        "LABEL": LAUNCHD_LABEL,
        "CONFIG": config_path,
        "ROOT": root,
        "HOME": _check_text("HOME", home),
        "PATH": _search_path("launchd", cfg, argv, home),
        "EXIT_TIMEOUT": _stop_timeout(cfg),
        # None drops the key: an agent cannot switch users (launchd refuses UserName there)
        "USER": run_as.user if run_as is not None else None,
        "GROUP": run_as.group if run_as is not None else None,
        "INIT_GROUPS": True if run_as is not None else None,
    }
    missing = _plist_placeholders(template) - set(values) - {"PROGRAM"}
    if missing:  # a template edited without this module: fail loudly rather than ship "@X@"
        raise ServiceError(f"template placeholders without a value: {', '.join(sorted(missing))}")
    data = plistlib.dumps(_drop_none(_fill_plist(template, values, argv)), sort_keys=False)
    # plistlib writes no comments; put the provenance in one, just before <plist>.
    # "--" may not appear inside an XML comment.
    note = (f" Generated by proto4d {__version__} install-service (launchd) from {config_path}."
            " Re-run it after moving the config or proto4d's venv; edits made here are lost then. ")
    note = note.replace("--", "- -")
    comment = f"<!--{note}-->\n".encode()
    at = data.index(b"<plist")
    return data[:at] + comment + data[at:]


def _drop_none(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _drop_none(v) for k, v in node.items() if v is not None}
    if isinstance(node, list):
        return [_drop_none(v) for v in node if v is not None]
    return node


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


def _make_owned_dir(path: Path, owner: Account | None) -> None:
    """mkdir -p, and hand what was made to the service's user (root making it under sudo would
    leave a directory the daemon cannot write)."""
    made: list[Path] = []
    p = path
    while not p.exists():
        made.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    if owner is not None and os.geteuid() == 0:
        for d in made:
            os.chown(d, owner.uid, owner.gid)


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


def _load_as(path: str | None, home: str) -> configmod.Config:
    """The config as the service's user will read it: `~` in it is that user's home, not root's."""
    saved = os.environ.get("HOME")
    os.environ["HOME"] = home
    try:
        return configmod.load(path)
    finally:
        if saved is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = saved


def cmd_install_service(args: argparse.Namespace) -> int:
    """`proto4d install-service`: render, then print or write the file and the commands to load it."""
    kind = "launchd" if args.launchd else "systemd"
    output = Path(os.path.abspath(os.path.expanduser(args.output))) if args.output else None
    # No --system flag (yet): root installs system-wide, and so does an --output that names
    # a system directory; anyone else gets a unit of their own.
    system = getattr(args, "system", None)
    if system is None:
        system = os.geteuid() == 0 or (output is not None and _is_system_place(kind, output))
    run_as: Account | None = None
    try:
        if system:
            name = operator_name(os.environ, os.geteuid(), getattr(args, "user", None))
            if name is None:
                raise ServiceError("a system-wide service would run as root; run install-service with sudo from "
                                   "the operator's account, or name the user with --user NAME")
            run_as = account(name)
            if run_as.uid == 0 and not getattr(args, "allow_root", False):
                raise ServiceError(f"a system-wide service would run as {run_as.user} (uid 0); name the operator "
                                   "with --user NAME, or pass --allow-root if root is really meant")
    except ServiceError as e:
        print(f"proto4d install-service: {e}", file=sys.stderr)
        return 1
    home = run_as.home if run_as is not None else str(Path.home())
    cfg = _load_as(args.config, home)  # ConfigError -> exit 78 in the CLI
    argv = exe_argv()
    try:
        if kind == "systemd":
            data = render_systemd(cfg, argv, user=run_as.user if run_as is not None else None,
                                  system=system).encode("utf-8")
        else:
            data = render_launchd(cfg, argv, run_as=run_as if system else None)
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
        _make_owned_dir(cfg.root / "logs", run_as)
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
