"""The supervisor end to end: real daemon, real git origin, real uvicorn, real signals."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time

import psutil
import pytest

from harness import rows, wait_for

pytestmark = pytest.mark.e2e


def test_first_start_serves_the_branch_head_and_status_shows_it(make_daemon, origin):
    sha = origin.commit("7")
    d = make_daemon().start()
    s = d.status()
    assert s["app"]["commit"] == sha
    assert s["app"]["release"].startswith("proto4_") and s["app"]["release"].endswith(sha[:7])
    assert s["app"]["healthy"] is True and s["app"]["restarts"] == 0
    assert d.get("/version")["version"] == "7"
    assert (d.root / "current").resolve().name == s["app"]["release"]
    r = d.cli("status", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for section, keys in {"daemon": ["pid", "version", "state"],
                          "app": ["pid", "release", "commit", "healthy", "since", "restarts"],
                          "activity": ["verdict", "reasons", "users", "requests_window", "connections",
                                       "last_request", "tunnel", "cpu_percent", "rss_bytes", "sampled_at"],
                          "update": ["state", "id", "ref", "reason", "requested_at", "message"]}.items():
        for k in keys:
            assert k in out[section], f"status --json lacks {section}.{k}"
    assert out["daemon"]["pid"] == d.proc.pid
    text = d.cli("status").stdout
    assert "healthy" in text and sha[:12] in text


def test_app_killed_comes_back_with_a_counted_restart(make_daemon):
    d = make_daemon().start()
    pid = d.status()["app"]["pid"]
    os.kill(pid, signal.SIGKILL)
    s = d.wait_status(lambda s: s["app"]["restarts"] == 1 and s["app"]["healthy"] and s["app"]["pid"] not in (0, pid),
                      30, "the app restarted")
    assert "SIGKILL" in s["app"]["last_exit"]
    assert d.get("/version")["status"] == 200


def test_crash_looping_app_reaches_fatal(make_daemon, origin):
    origin.commit("2", mode="crash_at_start")
    d = make_daemon().start(wait_healthy=False)
    s = d.wait_status(lambda s: s["app"]["state"] == "fatal", 60, "fatal")
    assert "fast failures" in s["app"]["message"]
    assert s["app"]["pid"] == 0
    assert "FATAL" in d.cli("status").stdout.upper()
    assert d.stop() == 0


def test_sigterm_drains_and_exits_zero_leaving_no_app_process(make_daemon):
    d = make_daemon().start()
    app_pid = d.status()["app"]["pid"]
    assert psutil.pid_exists(app_pid)
    assert d.stop() == 0
    wait_for(lambda: not psutil.pid_exists(app_pid) or psutil.Process(app_pid).status() == psutil.STATUS_ZOMBIE,
             10, "the app process gone")
    assert d.app_pids() == []
    assert d.status()["daemon"]["state"] == "stopped"


# SIGINT here in ./dev proofs only: the default suite stops a daemon with SIGINT (exit 0, no app process left, status
# `stopped`) in test_bad_input_e2e.py::test_term_and_int_during_an_update, mid-update, the harder case.
@pytest.mark.parametrize("sig", rows([signal.SIGINT, signal.SIGQUIT], [signal.SIGQUIT]))
def test_other_stop_signals_leave_no_app_process(make_daemon, sig):
    d = make_daemon().start()
    d.signal(sig)
    assert d.proc.wait(60) == 0
    assert d.app_pids() == []


def test_daemon_sigkill_then_restart_ends_the_orphan(make_daemon):
    d = make_daemon().start()
    orphan = d.status()["app"]["pid"]
    d.kill()
    assert psutil.pid_exists(orphan), "the app keeps serving while the daemon is down"
    d.start()
    wait_for(lambda: not psutil.pid_exists(orphan) or psutil.Process(orphan).status() == psutil.STATUS_ZOMBIE,
             20, "the orphan ended")
    events = [e for e in d.log_events() if e.get("event") == "orphan.found"]
    assert any(e.get("pid") == orphan for e in events)
    assert d.status()["app"]["pid"] != orphan


def test_port_in_use_names_the_holder(make_daemon):
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        d = make_daemon(port=port).start(wait_healthy=False)
        s = d.wait_status(lambda s: "already in use" in s["app"]["message"], 60, "the port's holder named")
        assert f"pid {os.getpid()}" in s["app"]["message"], s["app"]["message"]
        assert s["app"]["state"] in ("backoff", "fatal") and s["app"]["pid"] == 0
        wait_for(lambda: len([e for e in d.log_events() if e.get("event") == "listen.failed"]) >= 2, 30,
                 "a second try")
    finally:
        holder.close()
    # Not ours, so it was left alone; once it is gone the retry takes the port (fatal retries within a minute).
    d.wait_healthy(timeout=90)
    assert d.get("/version")["status"] == 200


def test_sighup_applies_a_good_config_and_refuses_a_bad_one(make_daemon):
    d = make_daemon().start()
    d.cfg["activity"]["window_s"] = 7
    d.write_config()
    d.signal(signal.SIGHUP)
    d.wait_status(lambda s: s["activity"].get("window_s") == 7, 20, "the new window_s")
    good = d.config_path.read_text()
    d.config_path.write_text(good.replace("window_s: 7", "window_s: -3"))
    d.signal(signal.SIGHUP)
    ev = wait_for(lambda: [e for e in d.log_events() if e.get("event") == "reload.refused"], 20, "reload.refused")
    assert "activity.window_s" in ev[-1]["error"]
    time.sleep(0)  # the daemon is still running on the old config:
    assert d.wait_status(lambda s: s["activity"].get("window_s") == 7 and s["daemon"]["state"] == "running",
                         10, "old config kept")
    d.config_path.write_text(good.replace(f"port: {d.port}", f"port: {d.port + 1}"))
    d.signal(signal.SIGHUP)
    ev = wait_for(lambda: [e for e in d.log_events() if e.get("event") == "reload.pending"], 20, "reload.pending")
    assert "listen.port" in ev[-1]["keys"]
    assert d.get("/version")["status"] == 200  # still on the old port until the next switch


def test_sd_notify_messages_on_a_real_datagram_socket(make_daemon, tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    got: list[str] = []

    def read_until(pred, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                got.append(sock.recv(4096).decode())
            if pred():
                return
        raise AssertionError(f"no such message in {got}")

    try:
        d = make_daemon()
        d.start(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}, wait_healthy=False)
        d.env["WATCHDOG_PID"] = ""
        read_until(lambda: "READY=1" in got, 60)
        assert d.get("/health")["status"] == 200, "READY=1 only once the app is healthy"
        assert d.status()["app"]["healthy"]
        read_until(lambda: any(m.startswith("STATUS=") for m in got), 10)
        read_until(lambda: "WATCHDOG=1" in got, 10)
        got.clear()
        d.signal(signal.SIGHUP)
        read_until(lambda: any(m.startswith("RELOADING=1") for m in got) and "READY=1" in got, 10)
        reloading = next(m for m in got if m.startswith("RELOADING=1"))
        usec = int(reloading.split("MONOTONIC_USEC=")[1])
        assert abs(usec - time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000) < 30_000_000
        assert d.stop() == 0
        read_until(lambda: "STOPPING=1" in got, 5)
    finally:
        sock.close()
