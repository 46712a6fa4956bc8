"""`proto4d web` and `proto4d logs` without a daemon: the pure history functions as tables, and the
real HTTP server and CLI against state files written here (the browser test covers a live daemon)."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from harness import wait_for
from proto4d import config as configmod
from proto4d import logview
from proto4d.paths import Paths
from proto4d.web import history, server
from proto4d.web.state import update_log_path

UTC = dt.UTC

# --------------------------------------------------------------------------- pure


def _t(hhmm: str) -> float:
    return dt.datetime.fromisoformat(f"2026-11-29T{hhmm}:00+00:00").timestamp()


def test_buckets_keep_the_peak_and_leave_gaps_where_nothing_was_sampled() -> None:
    rows = [history.Row(_t("10:01"), 1, 4.0, "yellow"), history.Row(_t("10:03"), 3, 2.0, "red"),
            history.Row(_t("10:07"), 0, 0.0, "green"), history.Row(_t("09:00") - 86400, 9, 9, "red")]
    b = history.buckets(rows, _t("10:08"), "24h")
    assert len(b["users"]) == 288 and b["step"] == 300
    assert b["users"][-2:] == [3, 0]       # 10:00-10:05 peak 3, 10:05-10:10: 0
    assert b["rpm"][-2:] == [4.0, 0.0]
    assert b["users"][-3] is None          # not sampled: a gap, not a zero
    assert all(v is None for v in b["users"][:-2])  # the day-old row is out of the span
    week = history.buckets(rows, _t("10:08"), "7d")
    assert len(week["users"]) == 168 and week["users"][-1] == 3 and max(v or 0 for v in week["users"]) == 9


LOG = """23:59:58  update to the branch head requested by op@mini (id 20261129-235958-abc123)
23:59:58  from aaaaaaa to bbbbbbb: 1 commit(s)
23:59:58  waiting ...
23:59:58    yellow: 1 user
00:00:01  noticed ...
00:00:03  preparing ...
00:00:04    preparing done in 1.10 s
00:00:04  switching ...
00:00:05    switching done in 0.50 s
00:00:05  verifying ...
00:00:06  FAILED: /health -> HTTP 500 (3 ms)
00:00:06  rolling_back ...
00:00:07  outcome: ROLLED_BACK after 9.0 s: /health answered 500
"""


def test_an_update_log_becomes_steps_with_durations_across_midnight() -> None:
    u = history.parse_update_log("update_20261129_235958.log", LOG, UTC)
    assert u is not None
    assert u["id"] == "20261129-235958-abc123" and u["what"] == "update to the branch head"
    assert u["outcome"] == "rolled_back" and u["seconds"] == 9.0 and u["message"] == "/health answered 500"
    steps = {s["state"]: s for s in u["steps"]}
    assert list(steps) == ["waiting", "noticed", "preparing", "switching", "verifying", "rolling_back"]
    assert steps["waiting"]["seconds"] == 3.0  # no done line: until the next step
    assert u["waited_s"] == 5.0                # waiting, then the notice's grace
    assert steps["preparing"]["seconds"] == 1.1
    assert steps["rolling_back"]["seconds"] == 1.0                     # the last step ends with the outcome
    assert u["finished_at"] == dt.datetime(2026, 11, 30, 0, 0, 7, tzinfo=UTC).timestamp()  # the next day
    marks = history.markers([u], u["started_at"] - 1, u["finished_at"] + 1)
    assert [m["kind"] for m in marks] == ["requested", "waited", "rolled_back"]
    assert history.step_durations([u, u])["preparing"] == (2, 2.2)
    assert history.parse_update_log("update_x.log", LOG) is None
    assert history.parse_update_log("notes.txt", LOG) is None


def test_only_update_logs_in_logs_are_served(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    paths.logs.mkdir()
    (paths.logs / "update_20261129_101010.log").write_text("x\n")
    (tmp_path / "secret.txt").write_text("s\n")
    os.symlink(tmp_path / "secret.txt", paths.logs / "update_20261129_111111.log")
    assert update_log_path(paths, "update_20261129_101010.log") is not None
    for bad in ("update_20261129_111111.log", "../secret.txt", "..%2fsecret.txt", "proto4d.log",
                "update_20261129_101010.log/..", "/etc/passwd", "update_20261129_999999.log"):
        assert update_log_path(paths, bad) is None, bad


# --------------------------------------------------------------------------- a real server on written state


def _root(tmp_path: Path, web: dict | None = None) -> tuple[Path, Paths]:
    root = tmp_path / "root"
    paths = Paths(root)
    paths.make_dirs()
    now = dt.datetime.now(UTC)
    status = {"daemon": {"pid": os.getpid(), "state": "running", "rss_bytes": 29_000_000, "root": str(root)},
              "app": {"release": "r1", "commit": "a" * 40, "healthy": True, "state": "running", "restarts": 2,
                      "since": now.isoformat()},
              "activity": {"verdict": "yellow", "reasons": ["1 user <b>"], "users": 1, "rpm": 12.5,
                           "sampled_at": now.isoformat()},
              "update": {"state": "idle"}, "health": {"ok": True, "latency_ms": 4.0, "at": now.isoformat()},
              "written_at": now.isoformat()}
    paths.status.write_text(json.dumps(status))
    paths.lock.write_text(str(os.getpid()))  # not locked: the daemon reads as not running, which is fine here
    rows = [{"sampled_at": (now - dt.timedelta(minutes=m)).isoformat(), "users": m % 3, "rpm": float(m),
             "verdict": "green"} for m in range(0, 600, 7)]
    paths.activity.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"sampled_at": "trunc')
    stamp = time.strftime("%Y%m%d_%H%M%S", time.localtime(time.time() - 120))
    clock = time.strftime("%H:%M:%S", time.localtime(time.time() - 120))
    (paths.logs / f"update_{stamp}.log").write_text(
        f"{clock}  update to main requested by op (id req1)\n{clock}  preparing ...\n{clock}    preparing done in "
        f"0.50 s\n{clock}  outcome: DONE after 0.6 s: r1 serves \x1b[31mand\x1b[0m is verified\n")
    (paths.answers / "req1.json").write_text(json.dumps({"id": "req1", "state": "done",
                                                         "log": f"logs/update_{stamp}.log"}))
    snap = paths.backups / "20261129_101010_r1"
    snap.mkdir(parents=True)
    (snap / "snapshot.json").write_text(json.dumps({
        "id": snap.name, "created_at": time.time() - 60, "release": "r1", "reason": "before the switch <i>",
        "databases": [{"path": "data/app.db", "bytes": 8192, "rows": {"users": 3, "notes": 4}}]}))
    cfg = {"root": str(root), "app": {"repo": str(tmp_path / "origin.git")}}
    if web:
        cfg["web"] = web
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "p.yaml", paths


@pytest.fixture
def served(tmp_path: Path, request):
    cfg_path, paths = _root(tmp_path, getattr(request, "param", None))
    cfg = configmod.load(str(cfg_path))
    import dataclasses
    cfg = dataclasses.replace(cfg, web=dataclasses.replace(cfg.web, port=0))
    srv = server.serve(cfg)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv, paths, cfg_path
    srv.shutdown()
    srv.server_close()


def _get(srv: server.WebServer, path: str, method: str = "GET", headers: dict | None = None
         ) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def test_state_history_logs_and_metrics_from_the_files(served) -> None:
    srv, _, _ = served
    code, h, body = _get(srv, "/api/state")
    assert code == 200 and "default-src 'none'" in h["content-security-policy"]
    s = json.loads(body)
    assert s["verdict"]["color"] == "yellow" and s["verdict"]["reasons"] == ["1 user <b>"]
    assert [u["outcome"] for u in s["updates"]] == ["done"] and s["updates"][0]["steps"][0]["seconds"] == 0.5
    assert [(sn["id"], sn["databases"][0]["rows"]) for sn in s["snapshots"]] == [("20261129_101010_r1", 7)]
    assert any("backups" in c and "--restore 20261129_101010_r1" in c for c in s["commands"])
    code, _, body = _get(srv, "/api/history?span=24h")
    hist = json.loads(body)
    assert code == 200 and max(v or 0 for v in hist["users"]) == 2 and hist["samples"] == 86
    assert [m["kind"] for m in hist["markers"]] == ["requested", "done"]
    assert _get(srv, "/api/history?span=1y")[0] == 400
    name = s["updates"][0]["log"]
    code, h, body = _get(srv, f"/logs/{name}")
    assert code == 200 and h["content-type"].startswith("text/plain") and b"\x1b" not in body
    assert b"r1 serves and is verified" in body
    assert _get(srv, "/logs/..%2Fstate%2Fstatus.json")[0] == 404
    assert _get(srv, "/static/../server.py")[0] == 404
    assert _get(srv, "/", method="POST")[0] == 405
    assert _get(srv, "/", headers={"Host": "evil.example:80"})[0] == 421  # DNS rebinding
    code, h, body = _get(srv, "/")
    assert code == 200 and b"/static/app.js" in body
    code, h, body = _get(srv, "/metrics")
    assert code == 200 and h["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}
    assert samples[("proto4d_up", ())] == 0.0  # the lock is not held: no daemon runs here
    assert samples[("proto4d_users", ())] == 1.0 and samples[("proto4d_requests_per_minute", ())] == 12.5
    assert samples[("proto4d_app_restarts_total", ())] == 2.0
    assert samples[("proto4d_daemon_rss_bytes", ())] == 29_000_000
    assert samples[("proto4d_verdict", (("verdict", "yellow"),))] == 1.0
    assert samples[("proto4d_verdict", (("verdict", "green"),))] == 0.0
    assert samples[("proto4d_updates_total", (("outcome", "done"),))] == 1.0
    assert samples[("proto4d_update_step_duration_seconds_sum", (("step", "preparing"),))] == 0.5
    assert samples[("proto4d_health_check_latency_seconds", ())] == 0.004


TOKEN = "0123456789abcdef0123"


@pytest.mark.parametrize("served", [{"listen": {"host": "127.0.0.1"}, "token": TOKEN}], indirect=True)
def test_a_token_guards_everything_when_set(served) -> None:
    srv, _, _ = served
    for path in ("/", "/api/state", "/metrics", "/static/app.js"):
        assert _get(srv, path)[0] == 401, path
    assert _get(srv, "/metrics", headers={"Authorization": "Bearer wrong-token-0000000"})[0] == 401
    assert _get(srv, "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
    code, h, _ = _get(srv, f"/?token={TOKEN}")
    assert code == 303 and h["location"] == "/" and "HttpOnly" in h["set-cookie"]
    cookie = h["set-cookie"].split(";")[0]
    assert _get(srv, "/api/state", headers={"Cookie": cookie})[0] == 200
    assert _get(srv, "/api/state", headers={"Cookie": "proto4d_token=nope"})[0] == 401


def test_a_non_loopback_address_needs_a_token(tmp_path: Path) -> None:
    cfg_path, _ = _root(tmp_path, {"listen": {"host": "0.0.0.0", "port": 8099}})
    r = subprocess.run([sys.executable, "-m", "proto4d", "check-config", "--config", str(cfg_path)],
                       capture_output=True, text=True)
    assert r.returncode == 78 and "web.token" in r.stderr and "0.0.0.0" in r.stderr and "Traceback" not in r.stderr
    cfg_path.write_text(cfg_path.read_text().replace("port: 8099", f"port: 8099\n  token: {TOKEN}"))
    r = subprocess.run([sys.executable, "-m", "proto4d", "check-config", "--config", str(cfg_path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert TOKEN not in r.stdout and "(set)" in r.stdout


# --------------------------------------------------------------------------- proto4d logs


def test_logs_follow_across_rotation(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_text("old 1\n")
    got: list[str] = []
    start = log.stat().st_size

    def reader() -> None:
        for line in logview.follow(log, start, stop=lambda ln: ln == "end", poll_s=0.02):
            got.append(line)
    t = threading.Thread(target=reader, daemon=True)
    t.start()
    with open(log, "a") as f:
        f.write("old 2\n")
    wait_for(lambda: got == ["old 2"], 5, "the appended line")
    log.rename(tmp_path / "app.log.1")  # rotated as RotatingLog does: rename, then a new file
    with open(tmp_path / "app.log.1", "a") as f:
        f.write("old 3\n")
    log.write_text("new 1\nend\n")
    t.join(5)
    assert got == ["old 2", "old 3", "new 1", "end"]


def test_logs_command_tells_an_update_and_daemon_events(tmp_path: Path) -> None:
    cfg_path, paths = _root(tmp_path)
    paths.daemon_log.write_text(json.dumps({"timestamp": "2026-11-29T10:00:00.123", "level": "warning",
                                            "event": "app.exited", "how": "exited with code 4", "pid": 7}) + "\n")

    def logs(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "proto4d", "logs", "--config", str(cfg_path), *args],
                              capture_output=True, text=True, timeout=30)
    r = logs("--daemon")
    assert r.returncode == 0 and r.stdout == "2026-11-29 10:00:00 warning app.exited how='exited with code 4' pid=7\n"
    for args in ((), ("--update",), ("--update", "req1"), ("-f",)):  # -f ends with the story
        r = logs(*args)
        assert r.returncode == 0 and "outcome: DONE" in r.stdout and "\x1b" not in r.stdout, (args, r.stderr)
    r = logs("--update", "nope")
    assert r.returncode == 1 and "no update log for 'nope'" in r.stderr
    r = logs("--app")
    assert r.returncode == 1 and "app.log does not exist yet" in r.stderr


# --------------------------------------------------------------------------- status --watch


def test_sparkline_scales_to_the_peak_and_shows_gaps(tmp_path: Path) -> None:
    from proto4d import views
    assert views.sparkline([0, 1, 2, 4, None, 4]) == "▁▃▅█ █"
    assert views.sparkline([0, 0, None]) == "▁▁ "
    _, paths = _root(tmp_path)
    line = views.users_sparkline(paths)
    bars = line.split("|")[1]
    assert len(bars) == 36 and "█" in bars and line.endswith("now 0, peak 2")


def test_the_daemon_rolls_up_5_minute_peaks_that_the_7_day_chart_reads(served) -> None:
    from proto4d.activity import History
    srv, paths, _ = served
    h = History(paths.activity, 5 << 20)
    three_days_ago = (time.time() - 3 * 86400) // 300 * 300
    for i, users in enumerate([1, 4, 2]):       # one 5-minute bucket, peak 4
        h.append({"sampled_at": "x", "users": users, "rpm": 10.0 * i}, now=three_days_ago + i)
    h.append({"sampled_at": "x", "users": 0, "rpm": 0}, now=three_days_ago + 300)  # the next one closes it
    lines = [json.loads(x) for x in h.rollup_path.read_text().splitlines()]
    assert lines == [{"t": three_days_ago, "users": 4, "rpm": 20.0}]
    week = json.loads(_get(srv, "/api/history?span=7d")[2])
    i = int((three_days_ago - week["start"]) // week["step"])
    assert week["users"][i] == 4 and week["rpm"][i] == 20.0


def test_the_daemon_never_loads_the_web_side() -> None:
    # The daemon's memory target: the page, its history and prometheus-client live in `proto4d web` only.
    code = ("import sys, proto4d.supervisor, proto4d.cli; "
            "bad = [m for m in sys.modules if m.startswith(('prometheus_client', 'proto4d.web', 'http.server'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
