"""`proto4d doctor`: what on this machine would break the service, each with its fix.

Each check is a function of the config and a `Host` (host.py, the one seam to the platform)
that returns findings; none changes anything. A finding is `fail` when the service would
break (doctor then exits 1), `warn` when it is a risk, `info`/`ok` otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import plistlib
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from proto4d import config as configmod
from proto4d import releases
from proto4d.host import Host
from proto4d.paths import Paths
from proto4d.service import LAUNCHD_LABEL

LEVELS = ("fail", "warn", "info", "ok")
# Folders macOS privacy protection (TCC) hides from background jobs unless granted Full Disk Access.
TCC_FOLDERS = ("Documents", "Desktop", "Downloads", "Library/Mobile Documents")
# Processes that are expected to mention the app's folder or port without serving it.
NOT_THE_APP = ("cloudflared", "proto4d")


@dataclass(frozen=True)
class Finding:
    check: str
    level: str
    message: str
    fix: str = ""


Check = Callable[[configmod.Config, Host], Iterable[Finding]]


# --------------------------------------------------------------------------- helpers


def _under(path: Path, parent: Path) -> bool:
    try:
        path.relative_to(parent)
        return True
    except ValueError:
        return False


def _our_pids(cfg: configmod.Config, host: Host) -> set[int]:
    """The running daemon (its pid is in state/daemon.lock) and everything it started."""
    try:
        pid = int(Paths(cfg.root).lock.read_text().strip() or 0)
    except (OSError, ValueError):
        return set()
    if not pid or host.process(pid) is None:
        return set()
    return {pid, *host.descendants(pid)}


@dataclass(frozen=True)
class Plist:
    domain: str
    path: Path
    data: dict

    @property
    def label(self) -> str:
        return str(self.data.get("Label", self.path.stem))

    def words(self) -> list[str]:
        args = self.data.get("ProgramArguments") or []
        words = [str(a) for a in args if isinstance(a, str)]
        if isinstance(self.data.get("Program"), str):
            words.insert(0, self.data["Program"])
        return words


def _plists(host: Host) -> list[Plist]:
    out = []
    for domain, directory in host.plist_dirs():
        if not directory.is_dir():
            continue
        for p in sorted(directory.glob("*.plist")):
            try:
                data = plistlib.loads(p.read_bytes())
            except (OSError, plistlib.InvalidFileException, ValueError):
                continue
            if isinstance(data, dict):
                out.append(Plist(domain, p, data))
    return out


def _platform_dirs(cfg: configmod.Config) -> list[Path]:
    """Where the app lives outside proto4d: the checkout that holds `root` (the platform repo the old
    scripts run from), and app.repo when it is a local path."""
    dirs = [cfg.root.parent]
    repo = Path(os.path.expanduser(cfg.app.repo))
    if repo.is_absolute() and repo.exists():
        dirs.append(repo.parent if repo.name.endswith(".git") else repo)
    return dirs


def _starts_the_app(plist: Plist, cfg: configmod.Config) -> bool:
    words = plist.words()
    if any(any(n in Path(w).name for n in NOT_THE_APP) for w in words[:2]):
        return False
    text = " ".join([*words, str(plist.data.get("WorkingDirectory", ""))])
    if any(str(d) in text for d in _platform_dirs(cfg)):
        return True
    port = str(cfg.listen.port)
    return any(w == port or w.endswith(f":{port}") or w == f"--port={port}" for w in words)


# --------------------------------------------------------------------------- checks


def check_platform(cfg: configmod.Config, host: Host) -> Iterable[Finding]:
    if host.is_mac:
        v = host.sw_vers()
        yield Finding("platform", "info", f"{v.get('ProductName', 'macOS')} {v.get('ProductVersion', '?')} "
                                          f"({v.get('BuildVersion', '?')})")
    else:
        yield Finding("platform", "info", f"{host.system}: the launchd, pmset and privacy checks apply to macOS only")


def check_port(cfg: configmod.Config, host: Host) -> Iterable[Finding]:
    port = cfg.listen.port
    ours = _our_pids(cfg, host)
    jobs = {j.pid: j.label for j in host.launchd_jobs() if j.pid}
    visible = host.listeners(port)
    others = [li for li in visible if li.pid not in ours]
    if not others:
        # macOS shows another user's sockets only to root: ask the port itself
        hidden = [a for a in ("127.0.0.1", "::1") if host.answers(a, port)] if not visible else []
        if hidden:
            yield Finding("port", "fail", f"port {port} answers on {', '.join(hidden)} but no process of this user "
                                          "holds it: another user's process (a LaunchDaemon?) serves it",
                          f"sudo lsof -nP -iTCP:{port} -sTCP:LISTEN, then stop what it names")
        else:
            yield Finding("port", "ok", f"port {port}: nothing but proto4d listens on it")
        return
    for li in others:
        label = jobs.get(li.pid)
        by = f" (started by the launchd job {label})" if label else ""
        fix = (f"launchctl bootout gui/{host.uid}/{label} (and move its plist away)" if label
               else f"stop it (kill {li.pid}), and whatever starts it")
        yield Finding("port", "fail", f"port {port} is served by another process: pid {li.pid} ({li.cmdline}){by}; "
                                      f"proto4d refuses to start beside it", fix)


def check_launchd(cfg: configmod.Config, host: Host) -> Iterable[Finding]:
    if not host.is_mac:
        return
    loaded = {j.label: j for j in host.launchd_jobs()}
    plists = _plists(host)
    ours = [p for p in plists if p.label == LAUNCHD_LABEL]
    for p in plists:
        if p.label == LAUNCHD_LABEL or not _starts_the_app(p, cfg):
            continue
        what = f"the launchd job {p.label} ({p.path}) starts the same app: {' '.join(p.words())[:200]}"
        if p.label in loaded:
            yield Finding("launchd", "fail", f"{what}; it is loaded and fights proto4d for port {cfg.listen.port}",
                          f"launchctl bootout {p.domain}/{p.label} && mv {p.path} ~/{p.path.name}.disabled")
        elif p.data.get("RunAtLoad") or p.data.get("KeepAlive"):
            yield Finding("launchd", "warn", f"{what}; not loaded now, but it starts at the next login or boot",
                          f"mv {p.path} ~/{p.path.name}.disabled")
    if not ours:
        yield Finding("launchd", "warn", "proto4d is not installed as a launchd job: nothing starts it at boot",
                      "sudo proto4d install-service --launchd --config <this config> (as the operator, via sudo)")
        return
    for p in ours:
        target = f"{p.domain}/{LAUNCHD_LABEL}"
        if p.domain == "system" and not p.data.get("UserName"):
            yield Finding("launchd", "fail", f"{p.path} runs proto4d, git and the app as root (no UserName)",
                          "sudo proto4d install-service --launchd (it names the sudo user), then bootout + bootstrap")
        words = p.words()
        if words and not os.path.exists(words[0]):
            yield Finding("launchd", "fail", f"{p.path} runs {words[0]}, which does not exist (proto4d's venv moved "
                                             f"or its interpreter was upgraded away)",
                          "reinstall proto4d, then run install-service again")
        path = str((p.data.get("EnvironmentVariables") or {}).get("PATH", ""))
        if path and not host.which("uv", path):
            yield Finding("launchd", "warn", f"uv is not on the PATH of {p.path}: venvs are built with pip "
                                             "(about 30x slower)",
                          "install uv (brew install uv), then run install-service again")
        info = host.launchd_job(target)
        if info is None:
            yield Finding("launchd", "warn", f"{p.path} is installed but not loaded",
                          f"{'sudo ' if p.domain == 'system' else ''}launchctl bootstrap {p.domain} {p.path}")
            continue
        state, code = info.get("state", "?"), info.get("last exit code", "")
        level = "ok" if state == "running" else "warn"
        extra = f"; last exit code {code}" if code and not code.startswith("0") else ""
        user = f", as {info['username']}" if info.get("username") else ""
        yield Finding("launchd", level, f"{target}: {state}{user}{extra}",
                      "" if level == "ok" else f"proto4d status; tail {cfg.root}/logs/launchd.err.log")


def check_pid_files(cfg: configmod.Config, host: Host) -> Iterable[Finding]:
    ours = _our_pids(cfg, host)
    seen: set[Path] = set()
    for d in _platform_dirs(cfg):
        for pidfile in [*d.glob(".pids/*.pid"), *d.glob("*.pid"), *d.glob("*/.pids/*.pid")]:
            if pidfile in seen or _under(pidfile, cfg.root):
                continue
            seen.add(pidfile)
            try:
                pid = int(pidfile.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            cmd = host.process(pid)
            if cmd is None or pid in ours:
                continue
            yield Finding("pid files", "fail",
                          f"{pidfile}: pid {pid} is alive ({cmd[:200]}): another start script runs this app or "
                          f"its neighbours", f"stop it the way it was started (e.g. `{d}/llmclass stop`), or "
                                             f"kill {pid}; then remove {pidfile}")


def check_interpreter(cfg: configmod.Config, host: Host) -> Iterable[Finding]:
    found = host.which(cfg.python) if not os.path.isabs(cfg.python) else cfg.python
    if not found or not os.path.exists(found):
        yield Finding("python", "fail", f"python: {cfg.python!r} is not found",
                      "set python: to an absolute path (e.g. /opt/homebrew/opt/python@3.12/bin/python3.12)")
        return
    if "/Cellar/" in cfg.python:
        stable = releases.stable_interpreter(cfg.python)
        yield Finding("python", "fail", f"python: {cfg.python} is a versioned Homebrew path; the next "
                                        f"`brew upgrade` removes it", f"python: {stable}" if stable != cfg.python
                      else "python: /opt/homebrew/opt/python@3.X/bin/python3.X")
    else:
        try:
            real, version = releases.python_identity(cfg.python)
        except releases.ReleaseError as e:
            yield Finding("python", "fail", str(e), "set python: to an interpreter that runs")
        else:
            yield Finding("python", "ok", f"python: {cfg.python} -> {real} (Python {version}; venvs are built from it)")
    # proto4d's own venv: built from a Cellar path, proto4d itself stops starting after a brew upgrade
    pyvenv = Path(sys.prefix) / "pyvenv.cfg"
    with contextlib.suppress(OSError):
        for line in pyvenv.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "home" and "/Cellar/" in value:
                yield Finding("python", "fail", f"proto4d's own venv ({sys.prefix}) uses {value.strip()}, which "
                                                "`brew upgrade` removes: proto4d would no longer start",
                              f"recreate it from the opt/ path: {releases.stable_interpreter(value.strip())}/python3 "
                              f"-m venv --clear {sys.prefix} && reinstall proto4d")
    paths = Paths(cfg.root)
    if paths.venvs.is_dir():
        for venv in sorted(p for p in paths.venvs.iterdir() if p.is_dir() and not p.name.startswith(".")):
            py = releases.venv_python(venv)
            target = os.readlink(py) if py.is_symlink() else ""
            if target and not os.path.exists(py):
                yield Finding("python", "warn", f"venv {venv.name}: its interpreter {target} is gone; proto4d "
                                                "rebuilds it before it next starts a release that uses it")
            elif "/Cellar/" in target:
                yield Finding("python", "warn", f"venv {venv.name} links {target}, which `brew upgrade` removes "
                                                "(proto4d then rebuilds it)")


def check_tcc(cfg: configmod.Config, host: Host) -> Iterable[Finding]:
    if not host.is_mac:
        return
    places = [("root", cfg.root), ("the config", Path(os.path.abspath(cfg.source)))]
    repo = Path(os.path.expanduser(cfg.app.repo))
    if repo.is_absolute():
        places.append(("app.repo", repo))
    bad = False
    for what, path in places:
        for folder in TCC_FOLDERS:
            if _under(path, host.home / folder):
                bad = True
                yield Finding("privacy", "fail", f"{what} ({path}) is under ~/{folder}, which macOS hides from "
                                                 "background jobs (TCC): launchd's proto4d gets 'Operation not "
                                                 "permitted'", f"move it out, e.g. to {host.home / 'proto4d'}")
        if _under(path, Path("/Volumes")):
            bad = True
            yield Finding("privacy", "fail", f"{what} ({path}) is on an external volume: hidden from background "
                                             "jobs by TCC, and absent until mounted at boot",
                          f"move it to the internal disk, e.g. {host.home / 'proto4d'}")
    if not bad:
        yield Finding("privacy", "ok", "root, the config and the repo are outside the folders macOS protects")


def check_sleep(cfg: configmod.Config, host: Host) -> Iterable[Finding]:
    if not host.is_mac:
        return
    pm = host.pmset()
    if not pm:
        yield Finding("sleep", "warn", "pmset -g gave nothing: the sleep settings are unknown", "pmset -g")
        return
    sleep = pm.get("sleep", "0")
    if sleep != "0":
        yield Finding("sleep", "fail", f"the Mac sleeps after {sleep} min idle: the app stops answering the tunnel",
                      "sudo pmset -a sleep 0 (System Settings > Energy: prevent automatic sleeping)")
    else:
        yield Finding("sleep", "ok", "system sleep is off")
    if pm.get("disksleep", "0") != "0":
        yield Finding("sleep", "warn", f"disks sleep after {pm['disksleep']} min: the first request after a quiet "
                                       "spell waits for the disk", "sudo pmset -a disksleep 0")
    if pm.get("autorestart", "0") != "1":
        yield Finding("sleep", "warn", "after a power cut the Mac stays off (autorestart is not 1)",
                      "sudo pmset -a autorestart 1")


def check_tools(cfg: configmod.Config, host: Host) -> Iterable[Finding]:
    # The PATH the service will have: the installed plist's, else this shell's.
    path = None
    for p in _plists(host) if host.is_mac else []:
        if p.label == LAUNCHD_LABEL:
            path = str((p.data.get("EnvironmentVariables") or {}).get("PATH", "")) or None
    where = "the service's PATH" if path else "PATH"
    git = host.which("git", path)
    yield (Finding("tools", "ok", f"git: {git}") if git else
           Finding("tools", "fail", f"git is not on {where}: no release can be fetched",
                   "xcode-select --install (or brew install git), then install-service again"))
    uv = host.which("uv", path) or configmod.find_uv()
    yield (Finding("tools", "ok", f"uv: {uv}") if uv else
           Finding("tools", "warn", f"uv is not on {where}: venvs are built with pip (about 30x slower)",
                   "brew install uv (or pip install 'proto4d[uv]')"))


def check_disk(cfg: configmod.Config, host: Host) -> Iterable[Finding]:
    free = host.free_bytes(cfg.root)
    if free is None:
        yield Finding("disk", "warn", f"cannot tell the free space under {cfg.root}")
        return
    mb = free // (1024 * 1024)
    need = cfg.update.min_free_mb
    if mb < need:
        yield Finding("disk", "fail", f"{mb} MB free under {cfg.root}, below update.min_free_mb ({need}): every "
                                      "update is refused", "free some space (old Time Machine snapshots: "
                                                           "tmutil listlocalsnapshots /)")
    elif mb < max(1024, 4 * need):
        yield Finding("disk", "warn", f"only {mb} MB free under {cfg.root}", "free some space")
    else:
        yield Finding("disk", "ok", f"{mb / 1024:.1f} GB free under {cfg.root}")


def check_timezone(cfg: configmod.Config, host: Host) -> Iterable[Finding]:
    zone = host.timezone()
    want = cfg.schedule.timezone
    if zone == want:
        yield Finding("time zone", "ok", f"the machine and schedule.timezone are both {want}")
    else:
        yield Finding("time zone", "info", f"the machine runs on {zone or 'an unknown zone'}; update windows are in "
                                           f"schedule.timezone ({want}), log times in the machine's zone")


def check_listen(cfg: configmod.Config, host: Host) -> Iterable[Finding]:
    host_ = cfg.listen.host
    try:
        loopback = ipaddress.ip_address(host_).is_loopback
    except ValueError:
        loopback = host_ == "localhost"
    if loopback:
        yield Finding("listen", "ok", f"listen {host_}:{cfg.listen.port}: reachable from this machine only "
                                      "(cloudflared connects to localhost)")
        return
    extra = (" On macOS another process may also bind 127.0.0.1 on the same port and take the tunnel's traffic."
             if host.is_mac else "")
    yield Finding("listen", "warn", f"listen {host_}:{cfg.listen.port} serves the app to the whole LAN, around "
                                    f"the tunnel and its access rules.{extra}",
                  f"listen: {{host: 127.0.0.1, port: {cfg.listen.port}}}")


CHECKS: tuple[Check, ...] = (check_platform, check_port, check_launchd, check_pid_files, check_interpreter,
                             check_tcc, check_sleep, check_tools, check_disk, check_timezone, check_listen)


def diagnose(cfg: configmod.Config, host: Host | None = None) -> list[Finding]:
    host = host or Host()
    out: list[Finding] = []
    for check in CHECKS:
        try:
            out.extend(check(cfg, host))
        except Exception as e:  # a check that cannot look is a finding, never a traceback
            out.append(Finding(check.__name__.removeprefix("check_"), "warn", f"could not check: {e}"))
    return out


def render(findings: list[Finding], source: str) -> str:
    lines = [f"proto4d doctor: {source}"]
    for f in sorted(findings, key=lambda f: LEVELS.index(f.level)):
        lines.append(f"  {f.level.upper():<5} {f.check:<10} {f.message}")
        if f.fix:
            lines.append(f"  {'':<5} {'':<10} fix: {f.fix}")
    fails = sum(f.level == "fail" for f in findings)
    warns = sum(f.level == "warn" for f in findings)
    lines.append(f"{fails} problem(s) that would break the service, {warns} warning(s)")
    return "\n".join(lines)


def cmd_doctor(args: argparse.Namespace, host: Host | None = None) -> int:
    cfg = configmod.load(args.config)  # ConfigError -> exit 78 in the CLI
    findings = diagnose(cfg, host)
    if getattr(args, "json", False):
        print(json.dumps([asdict(f) for f in findings], indent=2, ensure_ascii=False))
    else:
        print(render(findings, cfg.source))
    return 1 if any(f.level == "fail" for f in findings) else 0
