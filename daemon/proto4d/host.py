"""The machine proto4d runs on: every platform fact goes through one `Host` object.

What the OS is (`uname`, `sw_vers`), which launchd jobs are loaded (`launchctl list`,
`launchctl print`), the power settings (`pmset -g`), the user's uid and home, where the
launchd plists live, which binaries are on a PATH, who listens on a port, the time zone.
`proto4d doctor` asks only this object, so its macOS branches run anywhere: tests build a
Host with recorded outputs of the real macOS tools (tests/fixtures/macos/) and a home and
Library made on disk. Parsing is done by pure functions over those outputs.
"""

from __future__ import annotations

import os
import platform as _platform
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

Runner = Callable[[Sequence[str]], "str | None"]


def run_tool(argv: Sequence[str], timeout: float = 10) -> str | None:
    """stdout of a command, or None when it is missing, fails or hangs (a fact we cannot know)."""
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


@dataclass(frozen=True)
class LaunchdJob:
    label: str
    pid: int | None
    status: str  # last exit status ("0", "78", "-9" for a signal) as launchctl prints it


@dataclass(frozen=True)
class Listener:
    pid: int
    cmdline: str
    address: str


# --------------------------------------------------------------------------- pure parsers


def parse_sw_vers(text: str) -> dict[str, str]:
    """`sw_vers`: "ProductName:\tmacOS" lines -> {"ProductName": "macOS", ...}."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            out[key.strip()] = value.strip()
    return out


def parse_launchctl_list(text: str) -> list[LaunchdJob]:
    """`launchctl list`: "PID\\tStatus\\tLabel" rows; "-" for no pid."""
    jobs = []
    for line in text.splitlines():
        parts = line.split("\t") if "\t" in line else line.split()
        if len(parts) < 3 or parts[0] == "PID":
            continue
        pid = int(parts[0]) if parts[0].isdigit() else None
        jobs.append(LaunchdJob(parts[2].strip(), pid, parts[1].strip()))
    return jobs


def parse_launchctl_print(text: str) -> dict[str, str]:
    """The top-level "key = value" lines of `launchctl print <domain>/<label>` (nested blocks skipped)."""
    out: dict[str, str] = {}
    depth = 0
    for raw in text.splitlines():
        line = raw.strip()
        if line.endswith("{"):
            depth += 1
            if depth > 1:
                continue
            continue
        if line == "}":
            depth -= 1
            continue
        if depth == 1 and " = " in line:
            key, _, value = line.partition(" = ")
            out[key.strip()] = value.strip()
    return out


def parse_pmset(text: str) -> dict[str, str]:
    """`pmset -g`: the settings in use, name -> value (the first word; "sleep 1 (sleep prevented by ...)" -> "1")."""
    out = {}
    for line in text.splitlines():
        if not line.startswith(" "):
            continue
        m = re.match(r"^\s+(.+?)\s{2,}(\S+)", line) or re.match(r"^\s+(\S+)\s+(\S+)", line)
        if m:
            out[m.group(1).strip()] = m.group(2)
    return out


def zone_from_localtime(link: str) -> str | None:
    """/etc/localtime -> /var/db/timezone/zoneinfo/Asia/Seoul (macOS) or /usr/share/zoneinfo/UTC -> the zone name."""
    marker = "zoneinfo/"
    i = link.find(marker)
    return link[i + len(marker):] if i >= 0 else None


# --------------------------------------------------------------------------- the seam


@dataclass
class Host:
    """Platform facts. Every field has the real machine's value by default; tests pass their own."""

    system: str = field(default_factory=_platform.system)
    home: Path = field(default_factory=Path.home)
    uid: int = field(default_factory=os.geteuid)
    run: Runner = run_tool
    # where launchd looks for jobs, besides ~/Library/LaunchAgents
    library: Path = Path("/Library")
    localtime: Path = Path("/etc/localtime")
    environ: dict[str, str] = field(default_factory=lambda: dict(os.environ))

    @property
    def is_mac(self) -> bool:
        return self.system == "Darwin"

    def which(self, name: str, path: str | None = None) -> str | None:
        return shutil.which(name, path=path if path is not None else self.environ.get("PATH", os.defpath))

    def sw_vers(self) -> dict[str, str]:
        text = self.run(["sw_vers"]) if self.is_mac else None
        return parse_sw_vers(text) if text else {}

    def launchd_jobs(self) -> list[LaunchdJob]:
        """Jobs loaded in this user's domain (and the system's, when run as root)."""
        text = self.run(["launchctl", "list"]) if self.is_mac else None
        return parse_launchctl_list(text) if text else []

    def launchd_job(self, target: str) -> dict[str, str] | None:
        """`launchctl print system/<label>` or `gui/<uid>/<label>`; None when not loaded."""
        text = self.run(["launchctl", "print", target]) if self.is_mac else None
        return parse_launchctl_print(text) if text else None

    def pmset(self) -> dict[str, str]:
        text = self.run(["pmset", "-g"]) if self.is_mac else None
        return parse_pmset(text) if text else {}

    def plist_dirs(self) -> list[tuple[str, Path]]:
        """(domain, directory) where launchd finds jobs: the user's agents, everyone's agents, daemons."""
        return [(f"gui/{self.uid}", self.home / "Library" / "LaunchAgents"),
                (f"gui/{self.uid}", self.library / "LaunchAgents"),
                ("system", self.library / "LaunchDaemons")]

    def timezone(self) -> str | None:
        try:
            return zone_from_localtime(os.readlink(self.localtime))
        except OSError:
            return self.environ.get("TZ") or None

    def listeners(self, port: int) -> list[Listener]:
        """Processes listening on TCP `port`, as far as this user may see."""
        import psutil

        from proto4d.listener import _listening_pids

        out = []
        for pid in _listening_pids(port):
            try:
                cmd = " ".join(psutil.Process(pid).cmdline())
            except psutil.Error:
                cmd = "?"
            out.append(Listener(pid, cmd[:300], f"*:{port}"))
        return out

    def answers(self, address: str, port: int) -> bool:
        """Whether anything accepts connections on address:port (seen even when its process is not)."""
        from proto4d.listener import answers
        return answers(address, port)

    def descendants(self, pid: int) -> set[int]:
        import psutil
        try:
            return {c.pid for c in psutil.Process(pid).children(recursive=True)}
        except psutil.Error:
            return set()

    def process(self, pid: int) -> str | None:
        """The command line of a live process, or None when there is none."""
        import psutil
        try:
            p = psutil.Process(pid)
            if p.status() == psutil.STATUS_ZOMBIE:
                return None
            return " ".join(p.cmdline()) or p.name()
        except psutil.Error:
            return None

    def free_bytes(self, path: Path) -> int | None:
        p = path
        while not p.exists() and p != p.parent:
            p = p.parent
        try:
            st = os.statvfs(p)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize
