"""`proto4d doctor` and the platform seam.

The macOS branches run here through `Host` with recorded outputs of the real tools
(tests/fixtures/macos/: sw_vers, launchctl list/print, pmset -g from a Mac), with the user's
home and /Library made on disk (real plists, real pid files) and real processes holding
the port. The Linux branch runs on this machine as it is, through the CLI.
"""

from __future__ import annotations

import contextlib
import json
import os
import plistlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from proto4d import config, doctor, host, service
from proto4d.host import Host

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "macos"
LISTENER = """
import socket, sys, time, os
s = socket.socket()
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(8)
open(sys.argv[2] + ".tmp", "w").close(); os.rename(sys.argv[2] + ".tmp", sys.argv[2])
time.sleep(120)
"""


def recorded(outputs: dict[tuple[str, ...], str]) -> Callable[[Sequence[str]], str | None]:
    """A runner that answers from recorded outputs and records what was asked."""
    def run(argv: Sequence[str]) -> str | None:
        run.asked.append(tuple(argv))  # type: ignore[attr-defined]
        return outputs.get(tuple(argv))
    run.asked = []  # type: ignore[attr-defined]
    return run


def fixture(name: str, **subst: str) -> str:
    text = (FIXTURES / name).read_text()
    for old, new in subst.items():
        text = text.replace(old, new)
    return text


# --------------------------------------------------------------------------- the parsers, on recorded outputs


def test_parsers_read_the_recorded_outputs():
    assert host.parse_sw_vers(fixture("sw_vers.txt")) == {"ProductName": "macOS", "ProductVersion": "14.6.1",
                                                          "BuildVersion": "23G93"}
    jobs = {j.label: j for j in host.parse_launchctl_list(fixture("launchctl_list.txt"))}
    assert jobs["com.llmclassroom.unified"].pid == 8123
    assert jobs["com.apple.quicklook.ThumbnailsAgent"].pid is None
    assert jobs["com.apple.quicklook.ThumbnailsAgent"].status == "-9"
    assert "PID" not in jobs
    pm = host.parse_pmset(fixture("pmset_g_laptop_defaults.txt"))
    assert pm["sleep"] == "1" and pm["disksleep"] == "10" and pm["autorestart"] == "0"
    assert pm["hibernatefile"] == "/var/vm/sleepimage"
    assert host.parse_pmset(fixture("pmset_g_server.txt"))["sleep"] == "0"
    running = host.parse_launchctl_print(fixture("launchctl_print_running.txt"))
    assert running["state"] == "running" and running["username"] == "jjh_server" and running["pid"] == "4242"
    assert "run" not in running and "PATH" not in str(running.keys())  # nested blocks are not top-level keys
    exited = host.parse_launchctl_print(fixture("launchctl_print_exited78.txt"))
    assert exited["last exit code"] == "78: EX_CONFIG" and exited["state"] == "not running"
    assert host.zone_from_localtime("/var/db/timezone/zoneinfo/Asia/Seoul") == "Asia/Seoul"
    assert host.zone_from_localtime("/usr/share/zoneinfo/Etc/UTC") == "Etc/UTC"


def test_the_real_host_on_this_machine():
    h = Host()
    assert h.system and h.home.is_absolute()
    if not h.is_mac:  # the macOS tools are never asked for elsewhere
        assert h.sw_vers() == {} and h.launchd_jobs() == [] and h.pmset() == {}


# --------------------------------------------------------------------------- a Mac, through the seam


@pytest.fixture()
def foreign(tmp_path: Path) -> Iterator[Callable[[int], int]]:
    """A listener in a process that is not ours (a shell backgrounds it and exits), like the old start-all."""
    pids: list[int] = []

    def start(port: int) -> int:
        ready = tmp_path / f"ready-{port}"
        script = tmp_path / "main.py"
        script.write_text(LISTENER)
        r = subprocess.run(["sh", "-c", f'"{sys.executable}" "{script}" {port} "{ready}" >/dev/null 2>&1 & echo $!'],
                           capture_output=True, text=True, check=True)
        pid = int(r.stdout)
        pids.append(pid)
        deadline = time.monotonic() + 10
        while not ready.exists():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        return pid

    yield start
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mac:
    """A Mac mini's home, /Library and config, on disk; the tools' outputs recorded."""

    def __init__(self, base: Path, *, pmset: str = "pmset_g_server.txt", root_under: str = "llmclass_platform",
                 listen: str = "127.0.0.1") -> None:
        self.home = base / "Users" / "jjh_server"
        self.library = base / "Library"
        self.platform = self.home / "llmclass_platform"
        self.root = self.home / root_under / ".proto4d"
        self.port = free_port()
        for d in (self.platform, self.root, self.home / "Library" / "LaunchAgents", self.library / "LaunchAgents",
                  self.library / "LaunchDaemons"):
            d.mkdir(parents=True, exist_ok=True)
        self.config = self.home / "proto4d.yaml"
        self.config.write_text(
            f"root: {json.dumps(str(self.root))}\npython: {json.dumps(sys.executable)}\n"
            f"app: {{repo: https://github.com/jjhmonolith/llmclass_platform.git}}\n"
            f"listen: {{host: {listen}, port: {self.port}}}\nschedule: {{timezone: Asia/Seoul}}\n")
        self.localtime = base / "localtime"
        self.localtime.symlink_to("/var/db/timezone/zoneinfo/Asia/Seoul")
        self.outputs: dict[tuple[str, ...], str] = {
            ("sw_vers",): fixture("sw_vers.txt"),
            ("pmset", "-g"): fixture(pmset),
            ("launchctl", "list"): "PID\tStatus\tLabel\n612\t0\tcom.apple.Finder\n",
        }

    def host(self) -> Host:
        return Host(system="Darwin", home=self.home, uid=501, run=recorded(self.outputs), library=self.library,
                    localtime=self.localtime, environ={"PATH": os.environ["PATH"]})

    def plist(self, where: Path, label: str, args: list[str], **extra: object) -> Path:
        path = where / f"{label}.plist"
        path.write_bytes(plistlib.dumps({"Label": label, "ProgramArguments": args, "RunAtLoad": True, **extra}))
        return path

    def install_proto4d(self, **extra: object) -> Path:
        """Our LaunchDaemon, as install-service renders it for this operator."""
        cfg = config.load(self.config)
        acct = service.Account("jjh_server", "staff", str(self.home), 501, 20)
        data = plistlib.loads(service.render_launchd(cfg, service.exe_argv(), run_as=acct))
        data.update(extra)
        path = self.library / "LaunchDaemons" / f"{service.LAUNCHD_LABEL}.plist"
        path.write_bytes(plistlib.dumps(data))
        return path

    def diagnose(self) -> dict[str, list[doctor.Finding]]:
        out: dict[str, list[doctor.Finding]] = {}
        for f in doctor.diagnose(config.load(self.config), self.host()):
            out.setdefault(f.level, []).append(f)
        return out


def messages(found: dict[str, list[doctor.Finding]], level: str) -> str:
    return "\n".join(f"{f.check}: {f.message} | fix: {f.fix}" for f in found.get(level, []))


def test_a_mac_set_up_right_has_nothing_to_fix(tmp_path: Path):
    mac = Mac(tmp_path)
    mac.install_proto4d()
    mac.outputs[("launchctl", "print", f"system/{service.LAUNCHD_LABEL}")] = fixture("launchctl_print_running.txt")
    found = mac.diagnose()
    assert not found.get("fail"), messages(found, "fail")
    ok = messages(found, "ok")
    assert f"system/{service.LAUNCHD_LABEL}: running, as jjh_server" in ok
    assert "system sleep is off" in ok and "both Asia/Seoul" in ok and "reachable from this machine only" in ok
    assert "macOS 14.6.1 (23G93)" in messages(found, "info")


def test_the_mac_as_found_fails_with_a_fix_for_each(tmp_path: Path, foreign):
    """The platform's other ways to start the app are still there, and the Mac sleeps."""
    mac = Mac(tmp_path, pmset="pmset_g_laptop_defaults.txt", listen="0.0.0.0")
    old = foreign(mac.port)  # the "unified" start-all script's proto4, listening on the port
    mac.outputs[("launchctl", "list")] = fixture("launchctl_list.txt", **{"8123": str(old)})
    agents = mac.home / "Library" / "LaunchAgents"
    mac.plist(agents, "com.llmclassroom.unified", [str(mac.platform / "llmclass"), "start"],
              WorkingDirectory=str(mac.platform))
    mac.plist(agents, "com.llmclassroom.proto4", ["/usr/bin/python3", str(mac.platform / "proto4/backend/main.py")],
              WorkingDirectory=str(mac.platform / "proto4/backend"))
    mac.plist(agents, "com.llmclassroom.cloudflared",  # the tunnel is expected, even though it names the platform
              ["/opt/homebrew/bin/cloudflared", "tunnel", "run"], WorkingDirectory=str(mac.platform))
    (mac.platform / ".pids").mkdir()
    (mac.platform / ".pids" / "proto4.pid").write_text(f"{old}\n")
    (mac.platform / ".pids" / "hub.pid").write_text("999999\n")  # stale: nobody runs under that pid
    daemon = mac.library / "LaunchDaemons" / f"{service.LAUNCHD_LABEL}.plist"
    daemon.write_bytes(plistlib.dumps({"Label": service.LAUNCHD_LABEL,  # an old install: no UserName
                                       "ProgramArguments": [service.exe_argv()[0], "run"], "RunAtLoad": True}))
    mac.outputs[("launchctl", "print", f"system/{service.LAUNCHD_LABEL}")] = fixture("launchctl_print_exited78.txt")

    found = mac.diagnose()
    fails = messages(found, "fail")
    # the port: the holder named, and the launchd job that started it
    assert f"port {mac.port} is served by another process: pid {old}" in fails
    assert "started by the launchd job com.llmclassroom.unified" in fails
    assert "launchctl bootout gui/501/com.llmclassroom.unified" in fails
    # the loaded start-all agent fails; the older per-service agent is a warning (not loaded, starts at login)
    assert "com.llmclassroom.unified" in fails and "it is loaded and fights proto4d" in fails
    warns = messages(found, "warn")
    assert "com.llmclassroom.proto4" in warns and "starts at the next login" in warns
    assert "cloudflared" not in fails + warns.replace("cloudflared connects", "")
    # the pid file of the CLI's start, alive; the stale one is not a problem
    assert f"{mac.platform / '.pids' / 'proto4.pid'}: pid {old} is alive" in fails
    assert "hub.pid" not in fails
    # our own job runs as root, and the Mac sleeps
    assert "runs proto4d, git and the app as root (no UserName)" in fails
    assert "the Mac sleeps after 1 min idle" in fails and "sudo pmset -a sleep 0" in fails
    assert "last exit code 78: EX_CONFIG" in warns
    assert "autorestart" in warns and "disksleep" in warns
    assert "serves the app to the whole LAN" in warns and "bind 127.0.0.1" in warns


def test_a_holder_this_user_cannot_see_is_still_found(tmp_path: Path, foreign):
    """On macOS psutil shows another user's sockets only to root: the port itself is asked."""
    mac = Mac(tmp_path)
    foreign(mac.port)

    class NotRoot(Host):
        def listeners(self, port: int) -> list:
            return []

    h = mac.host()
    blind = NotRoot(system=h.system, home=h.home, uid=h.uid, run=h.run, library=h.library, localtime=h.localtime,
                    environ=h.environ)
    found = doctor.diagnose(config.load(mac.config), blind)
    port = [f for f in found if f.check == "port"]
    assert port[0].level == "fail" and "127.0.0.1" in port[0].message and "sudo lsof" in port[0].fix


def test_root_in_a_protected_folder_fails(tmp_path: Path):
    mac = Mac(tmp_path, root_under="Documents")
    found = mac.diagnose()
    assert "is under ~/Documents, which macOS hides from background jobs" in messages(found, "fail")


def test_a_versioned_homebrew_python_fails(tmp_path: Path):
    mac = Mac(tmp_path)
    cellar = mac.home / "hb" / "Cellar" / "python@3.12" / "3.12.7" / "bin" / "python3.12"
    cellar.parent.mkdir(parents=True)
    cellar.write_text("#!/bin/sh\n")
    cellar.chmod(0o755)
    (mac.home / "hb" / "opt").mkdir()
    (mac.home / "hb" / "opt" / "python@3.12").symlink_to("../Cellar/python@3.12/3.12.7")
    text = mac.config.read_text().replace(f"python: {json.dumps(sys.executable)}", f"python: {cellar}")
    mac.config.write_text(text)
    fails = messages(mac.diagnose(), "fail")
    assert "is a versioned Homebrew path" in fails
    assert f"python: {mac.home / 'hb' / 'opt' / 'python@3.12' / 'bin' / 'python3.12'}" in fails


def test_missing_git_and_uv_on_the_services_path(tmp_path: Path):
    mac = Mac(tmp_path)
    mac.install_proto4d(EnvironmentVariables={"PATH": str(tmp_path / "empty")})
    found = mac.diagnose()
    assert "git is not on the service's PATH" in messages(found, "fail")


# --------------------------------------------------------------------------- the CLI, on this machine


def run_doctor(cfg: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PROTO4D_CONFIG"}
    return subprocess.run([sys.executable, "-m", "proto4d", "doctor", "--config", str(cfg), *extra],
                          capture_output=True, text=True, timeout=60, env=env)


def test_cli_on_this_machine(tmp_path: Path, foreign):
    port = free_port()
    cfg = tmp_path / "proto4d.yaml"
    cfg.write_text(f"root: {json.dumps(str(tmp_path / 'root'))}\npython: {json.dumps(sys.executable)}\n"
                   f"app: {{repo: {json.dumps(str(tmp_path))}}}\nlisten: {{host: 127.0.0.1, port: {port}}}\n"
                   f"update: {{min_free_mb: 1}}\n")
    r = run_doctor(cfg)
    assert r.returncode in (0, 1) and "Traceback" not in r.stderr, r.stderr
    assert r.stdout.startswith(f"proto4d doctor: {cfg}") and f"port {port}: nothing but proto4d" in r.stdout
    pid = foreign(port)
    r = run_doctor(cfg, "--json")
    assert r.returncode == 1, r.stdout
    port_findings = [f for f in json.loads(r.stdout) if f["check"] == "port"]
    assert port_findings[0]["level"] == "fail" and f"pid {pid}" in port_findings[0]["message"]
    assert port_findings[0]["fix"]


def test_cli_bad_config_is_78(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("root: [1]\n")
    r = run_doctor(bad)
    assert r.returncode == 78 and str(bad) in r.stderr and "Traceback" not in r.stderr
