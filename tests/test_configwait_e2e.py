"""An invalid config at start: the daemon stays up, says what is wrong, and takes the fixed file."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys

import pytest

from harness import wait_for

pytestmark = pytest.mark.e2e


def test_invalid_config_waits_says_why_in_status_and_log_then_takes_the_saved_fix(make_daemon):
    d = make_daemon()
    d.cfg["activity"]["window_s"] = -3
    d.write_config()
    d.start(wait_healthy=False)
    s = d.wait_status(lambda s: s["daemon"]["state"] == "invalid_config", 30, "the waiting status")
    assert "activity.window_s" in s["daemon"]["config_error"] and str(d.config_path) in s["daemon"]["config_error"]
    assert "activity.window_s" in s["app"]["message"]
    ev = wait_for(lambda: [e for e in d.log_events() if e.get("event") == "config.invalid"], 10, "the log line")
    assert "activity.window_s" in ev[-1]["error"]
    r = d.cli("status")
    assert r.returncode == 78 and "activity.window_s" in r.stderr
    assert f"pid {d.proc.pid}" in r.stderr and "waits for this file" in r.stderr
    d.cfg["activity"]["window_s"] = 5
    d.write_config()  # no signal: the change itself is noticed
    d.wait_healthy(timeout=90)
    assert any(e.get("event") == "config.valid" and e.get("trigger") == "the file changed" for e in d.log_events())
    assert d.get()["status"] == 200


def test_sighup_takes_a_fix_made_outside_the_file(make_daemon, tmp_path):
    """The file is unchanged, what it names is fixed (the interpreter now exists): SIGHUP looks again."""
    d = make_daemon()
    python = tmp_path / "bin" / "python3"
    d.cfg["python"] = str(python)
    d.write_config()
    d.start(wait_healthy=False)
    s = d.wait_status(lambda s: s["daemon"]["state"] == "invalid_config", 30, "the waiting status")
    assert "python" in s["daemon"]["config_error"]
    python.parent.mkdir()
    python.symlink_to(sys.executable)
    d.signal(signal.SIGHUP)
    d.wait_healthy(timeout=90)
    assert any(e.get("event") == "config.valid" and e.get("trigger") == "SIGHUP" for e in d.log_events())


def test_unparseable_config_waits_on_stderr_and_stops_cleanly(make_daemon):
    d = make_daemon()
    d.config_path.write_text("root: [unclosed\n")
    d.start(wait_healthy=False)
    wait_for(lambda: "config.invalid" in d.tail() and str(d.config_path) in d.tail(), 30, "the error on stderr")
    d.signal(signal.SIGUSR1)  # an update trigger while nothing runs must not end the process
    d.signal(signal.SIGUSR2)
    d.assert_alive()
    assert not (d.root / "state" / "status.json").exists()  # no root known: nowhere else to say it
    os.kill(d.proc.pid, signal.SIGTERM)
    assert d.proc.wait(10) == 0


def test_under_systemd_the_wait_is_ready_with_the_error_as_status_and_feeds_the_watchdog(make_daemon, tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    got: list[str] = []

    def seen(pred) -> bool:
        with contextlib.suppress(TimeoutError):
            got.append(sock.recv(4096).decode())
        return any(pred(m) for m in got)

    try:
        d = make_daemon()
        d.cfg["activity"]["window_s"] = -3
        d.write_config()
        d.start(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}, wait_healthy=False)
        wait_for(lambda: seen(lambda m: m == "READY=1"), 30, "READY=1")
        wait_for(lambda: seen(lambda m: m.startswith("STATUS=invalid configuration") and "window_s" in m), 10,
                 "the error as STATUS")
        got.clear()
        wait_for(lambda: seen(lambda m: m == "WATCHDOG=1"), 5, "the watchdog fed while waiting")
        d.assert_alive()
    finally:
        sock.close()


def test_peek_root_reads_root_as_the_loader_would_from_an_otherwise_invalid_file(tmp_path):
    from proto4d.configwait import fingerprint, peek_root

    cfg = tmp_path / "etc" / "proto4d.yaml"
    cfg.parent.mkdir()
    cfg.write_text("root: state/here\nactivity: {window_s: -3}\n")
    assert peek_root(cfg) == tmp_path / "etc" / "state" / "here"  # relative to the file, like config.load
    cfg.write_text("root: ~/p4\napp: [broken\n")
    assert peek_root(cfg) is None  # the YAML does not parse: nothing to trust
    for bad in ("root: /\n", "root: [a, b]\n", "app: {}\n", ""):
        cfg.write_text(bad)
        assert peek_root(cfg) is None, bad
    (tmp_path / "afile").write_text("")
    cfg.write_text(f"root: {tmp_path / 'afile'}\n")
    assert peek_root(cfg) is None
    before = fingerprint(cfg)
    cfg.write_text(cfg.read_text().replace("afile", "bfile"))
    assert fingerprint(cfg) != before and fingerprint(tmp_path / "missing.yaml") is None


def test_a_second_run_with_a_broken_file_leaves_the_running_daemons_status_alone(make_daemon, tmp_path):
    import subprocess

    d = make_daemon().start()
    broken = tmp_path / "broken.yaml"
    broken.write_text(d.config_path.read_text().replace("window_s: 5", "window_s: -3"))
    assert "window_s: -3" in broken.read_text()
    with open(tmp_path / "second.stderr", "wb") as err:
        second = subprocess.Popen([sys.executable, "-m", "proto4d", "run", "--config", str(broken)], stderr=err,
                                  env=d.env, start_new_session=True)
    try:
        # The note comes first, the error line once logging is set up.
        wait_for(lambda: "activity.window_s" in (tmp_path / "second.stderr").read_text(), 30, "the second's error")
        assert "another daemon runs" in (tmp_path / "second.stderr").read_text()
        d.wait_healthy(timeout=10)  # status.json is still the running daemon's
        assert d.status()["daemon"]["state"] == "running"
    finally:
        second.terminate()
        assert second.wait(10) == 0
