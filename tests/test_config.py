"""The configuration contract: what parses, what every default is, and how every mistake is reported.

The table of invalid configurations runs twice: through the real `proto4d check-config` in a
subprocess (exit 78, one line on stderr naming the file, the dotted key and the line) and through
`config.parse` / `config.load` in-process (fast, same rows).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import yaml

from harness import FULL
from proto4d import config
from proto4d.config import Check, ConfigError, Weekly, Window

# The example from DESIGN.md ("Configuration (contract)"), verbatim but for root and app.repo.
DESIGN_EXAMPLE = """\
root: @ROOT@   # all state lives under here
python: python3                  # interpreter used to build release venvs
app:
  repo: @REPO@   # URL or local path
  branch: main
  subdir: proto4                 # the app's folder inside the repo ("" = whole repo)
  workdir: backend               # where the command runs, relative to subdir
  requirements: backend/requirements.txt     # relative to subdir ("" = none)
  command: ["{python}", "-m", "uvicorn", "main:app", "--fd", "{fd}"]
  env: {}                        # extra environment for the app
  shared: [backend/.env, backend/data]       # kept across releases (secrets, SQLite, uploads)
listen: {host: 0.0.0.0, port: 8000}
health:
  checks:
    - {path: /health, status: [200]}
    - {path: /, status: [200, 307]}
  external_url: https://socratic.llmclass.org   # optional; a failure is a warning, never a rollback
  start_timeout_s: 60
activity:
  interval_s: 5
  window_s: 300
  ignore_paths: [/health]
  tunnel_process: cloudflared
safety:
  yellow_max_users: 2            # 0 users = green, 1..2 = yellow, 3+ = red
  quiet_for_s: 120               # green must hold this long before an update starts
schedule:
  timezone: Asia/Seoul
  preferred: ["02:00-06:00"]
  acceptable: ["14:00-16:00"]
  avoid: ["09:00-12:00", "19:00-22:00"]
  weekly: "tue 03:00"            # optional: request an update by itself
update:
  notice_grace_s: 300            # yellow: post the notice, wait this long, look again
  drain_timeout_s: 60
  watch_s: 120                   # after the switch: a crash or failed check here rolls back
  keep_days: 7
  keep_min: 3
notify:
  notice_file: notice.json       # what the app or the hub shows users (relative to root)
  webhook_url: ""                # optional JSON POST on every update event
"""

HAVE_PYTHON3 = shutil.which("python3") is not None
needs_python3 = pytest.mark.skipif(not HAVE_PYTHON3, reason="python3 (the default `python`) is not on PATH")


def fill(text: str, tmp: Path) -> str:
    """Point the @PLACEHOLDERS@ into tmp (JSON strings are valid YAML scalars, whatever the path holds)."""
    for mark, value in (("@ROOT@", tmp / "state"), ("@REPO@", tmp / "origin"), ("@PY@", sys.executable),
                        ("@FILE@", tmp / "plain.txt")):
        text = text.replace(mark, json.dumps(str(value)))
    return text


def prepare(tmp: Path) -> None:
    (tmp / "origin").mkdir(exist_ok=True)
    (tmp / "plain.txt").write_text("not a directory, not executable\n")


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PROTO4D_CONFIG"}
    env.update(extra)
    return env


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proto4d", "check-config", *args], cwd=cwd,
                          env=env if env is not None else cli_env(), capture_output=True, text=True,
                          timeout=30)


def load_text(tmp: Path, text: str, name: str = "proto4d.yaml") -> config.Config:
    path = tmp / name
    path.write_text(fill(text, tmp))
    return config.load(path)


# =========================================================================== 1. what parses


def test_design_example_parses_to_the_files_values(tmp_path: Path) -> None:
    prepare(tmp_path)
    text = DESIGN_EXAMPLE if HAVE_PYTHON3 else DESIGN_EXAMPLE.replace("python: python3", "python: @PY@")
    cfg = load_text(tmp_path, text)

    assert cfg.source == str(tmp_path / "proto4d.yaml")
    assert cfg.root == tmp_path / "state"
    if HAVE_PYTHON3:
        assert cfg.python == "python3"
    app = cfg.app
    assert app.repo == str(tmp_path / "origin")
    assert (app.branch, app.subdir, app.workdir) == ("main", "proto4", "backend")
    assert app.requirements == "backend/requirements.txt"
    assert app.command == ("{python}", "-m", "uvicorn", "main:app", "--fd", "{fd}")
    assert app.uses_fd and not app.uses_port
    assert app.env == () and app.env_dict == {}
    assert app.shared == ("backend/.env", "backend/data")
    assert (cfg.listen.host, cfg.listen.port, cfg.listen.probe_host) == ("0.0.0.0", 8000, "127.0.0.1")
    assert cfg.health.checks == (Check("/health", (200,)), Check("/", (200, 307)))
    assert cfg.health.external_url == "https://socratic.llmclass.org"
    assert cfg.health.start_timeout_s == 60
    assert (cfg.activity.interval_s, cfg.activity.window_s) == (5, 300)
    assert cfg.activity.ignore_paths == ("/health",)
    assert cfg.activity.tunnel_process == "cloudflared"
    assert (cfg.safety.yellow_max_users, cfg.safety.quiet_for_s) == (2, 120)
    sch = cfg.schedule
    assert sch.timezone == "Asia/Seoul" and sch.zone.key == "Asia/Seoul"
    assert sch.preferred == (Window(120, 360, "02:00-06:00"),)
    assert sch.acceptable == (Window(840, 960, "14:00-16:00"),)
    assert sch.avoid == (Window(540, 720, "09:00-12:00"), Window(1140, 1320, "19:00-22:00"))
    assert sch.weekly == Weekly(1, 180, "tue 03:00")
    up = cfg.update
    assert (up.notice_grace_s, up.drain_timeout_s, up.watch_s) == (300, 60, 120)
    assert (up.keep_days, up.keep_min) == (7, 3)
    assert (cfg.notify.notice_file, cfg.notify.webhook_url) == ("notice.json", "")
    assert cfg.notice_path == tmp_path / "state" / "notice.json"

    # Generic: every key written in the file comes out of to_dict() with the file's value.
    written = yaml.safe_load(fill(text, tmp_path))
    effective = config.to_dict(cfg)
    for key, value in written.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                assert effective[key][sub] == v, f"{key}.{sub}"
        else:
            assert effective[key] == value, key


@needs_python3
def test_every_omitted_key_has_its_default(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "root: state\napp:\n  repo: origin\n")
    assert cfg.python == "python3"
    assert cfg.app == config.AppConfig(
        repo=str(tmp_path / "origin"), branch="main", subdir="", workdir="", requirements="",
        command=("{python}", "-m", "uvicorn", "main:app", "--fd", "{fd}"), env=(), shared=(),
        ready_pattern=r"Uvicorn running on|Listening at:", access_log_regex="", drain="auto",
        drain_grace_s=1.0, stable_s=60.0, max_fast_failures=5, log_max_bytes=10 << 20, log_backups=5,
        databases=(), migrate=(), spare=True, user="")
    assert cfg.listen == config.ListenConfig("0.0.0.0", 8000, 2048)
    assert cfg.health == config.HealthConfig(checks=(Check("/health", (200,)),), external_url="",
                                             start_timeout_s=60.0, timeout_s=5.0, interval_s=10.0)
    assert cfg.activity == config.ActivityConfig(interval_s=5.0, window_s=300.0, ignore_paths=("/health",),
                                                 tunnel_process="cloudflared", history_max_bytes=5 << 20)
    assert cfg.safety == config.SafetyConfig(yellow_max_users=2, quiet_for_s=120.0, red_rpm=600.0)
    assert cfg.schedule == config.ScheduleConfig("UTC", (), (), (), None)
    assert cfg.update == config.UpdateConfig(notice_grace_s=300.0, drain_timeout_s=60.0, watch_s=120.0,
                                             keep_days=7.0, keep_min=3, max_5xx_ratio=0.2, min_free_mb=200,
                                             installer="auto", canary=True, migrate_timeout_s=300.0,
                                             allow_incompatible=False, min_5xx_count=5, min_5xx_clients=2,
                                             prepare_ahead_s=600.0, promote="auto")
    assert cfg.notify == config.NotifyConfig(notice_file="notice.json", webhook_url="", webhook_timeout_s=3.0)
    assert cfg.web == config.WebConfig(host="127.0.0.1", port=8099, token="")
    assert cfg.stage == config.StageConfig(host="127.0.0.1", port=8001, ttl_s=28800.0)
    assert cfg.stage.url == "http://127.0.0.1:8001/"

    # Empty or null sections are the same as omitted ones.
    sections = "listen:\nhealth: {}\nactivity:\nsafety: {}\nschedule:\nupdate: {}\nnotify:\n"
    same = load_text(tmp_path, "root: state\napp:\n  repo: origin\n" + sections, "empty-sections.yaml")
    for name in ("app", "listen", "health", "activity", "safety", "schedule", "update", "notify"):
        assert getattr(same, name) == getattr(cfg, name), name


def test_root_and_repo_expand_tilde(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    text = f"root: ~/proto4d-state\npython: {sys.executable}\napp:\n  repo: ~/src/app\n"
    cfg = config.parse(text, "x.yaml", base_dir=tmp_path / "elsewhere")
    assert cfg.root == tmp_path / "home" / "proto4d-state"
    assert cfg.app.repo == str(tmp_path / "home" / "src" / "app")


def test_relative_paths_are_resolved_against_the_config_files_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    path = etc / "proto4d.yaml"
    path.write_text(f"root: ./state/../state\npython: {sys.executable}\napp:\n  repo: ../origin\n")
    cfg = config.load(path)
    assert cfg.root == etc / "state"
    assert cfg.app.repo == str(tmp_path / "origin")
    # URLs (and scp-style remotes) are left alone.
    for url in ("https://github.com/jjhmonolith/llmclass_platform.git", "git@github.com:jjhmonolith/x.git",
                "file:///srv/git/app.git"):
        path.write_text(f"root: state\npython: {sys.executable}\napp:\n  repo: {url}\n")
        assert config.load(path).app.repo == url


@pytest.mark.parametrize(("host", "bound", "probe"), [
    ("localhost", "127.0.0.1", "127.0.0.1"),
    ("0.0.0.0", "0.0.0.0", "127.0.0.1"),
    ("127.0.0.1", "127.0.0.1", "127.0.0.1"),
    ("'::'", "::", "::1"),
    ("'::1'", "::1", "::1"),
])
def test_listen_host(tmp_path: Path, host: str, bound: str, probe: str) -> None:
    cfg = config.parse(f"root: state\npython: {sys.executable}\napp: {{repo: x}}\nlisten: {{host: {host}}}\n",
                       "x.yaml", base_dir=tmp_path)
    assert (cfg.listen.host, cfg.listen.probe_host) == (bound, probe)


def _schedule(tmp: Path, body: str) -> config.ScheduleConfig:
    text = f"root: state\npython: {sys.executable}\napp: {{repo: x}}\nschedule:\n"
    text += textwrap.indent(body, "  ")
    return config.parse(text, "x.yaml", base_dir=tmp).schedule


def test_windows_including_one_across_midnight(tmp_path: Path) -> None:
    sch = _schedule(tmp_path, 'preferred: ["22:00-02:00", "9:30-10:00"]\navoid: "23:00-24:00"\n')
    night, morning = sch.preferred
    assert (night.start, night.end, str(night)) == (22 * 60, 2 * 60, "22:00-02:00")
    assert night.contains(23 * 60) and night.contains(0) and night.contains(60) and night.contains(22 * 60)
    assert not night.contains(2 * 60) and not night.contains(12 * 60) and not night.contains(21 * 60 + 59)
    assert (morning.start, morning.end, morning.text) == (570, 600, "09:30-10:00")
    assert morning.contains(570) and not morning.contains(600)
    (late,) = sch.avoid  # a single string is a one-window list; 24:00 is the end of the day
    assert late.contains(23 * 60 + 59) and not late.contains(0) and not late.contains(22 * 60)


@pytest.mark.parametrize(("text", "weekly"), [
    ('"tue 03:00"', Weekly(1, 180, "tue 03:00")),
    ('"Sunday 23:59"', Weekly(6, 1439, "sun 23:59")),
    ('"MON 7:05"', Weekly(0, 425, "mon 07:05")),
    ('"  fri   00:00 "', Weekly(4, 0, "fri 00:00")),
    ('""', None),
    ("", None),
])
def test_weekly(tmp_path: Path, text: str, weekly: Weekly | None) -> None:
    assert _schedule(tmp_path, f"weekly: {text}\n").weekly == weekly


def test_env_values_become_strings(tmp_path: Path) -> None:
    text = f"""\
root: state
python: {sys.executable}
app:
  repo: x
  env:
    PORT: 8000
    DEBUG: true
    QUIET: no
    RATIO: 0.5
    NAME: proto4
    EMPTY: ""
    BIG: 12345678901234567890
"""
    env = config.parse(text, "x.yaml", base_dir=tmp_path).app.env_dict
    assert env == {"PORT": "8000", "DEBUG": "true", "QUIET": "false", "RATIO": "0.5", "NAME": "proto4",
                   "EMPTY": "", "BIG": "12345678901234567890"}
    assert all(type(v) is str for v in env.values())


def test_yaml_niceties_are_accepted(tmp_path: Path) -> None:
    # A byte-order mark (Windows editors), merge keys with an override, and literal braces in a command.
    text = f"""\
\ufeffroot: state
python: {sys.executable}
app:
  repo: x
  command: ["{{python}}", "-c", "print('{{{{fd}}}}')", "--port", "{{port}}"]
health:
  checks:
    - &base {{path: /health, status: [200]}}
    - {{<<: *base, path: /ready}}
"""
    cfg = config.parse(text.encode("utf-8"), "x.yaml", base_dir=tmp_path)
    assert cfg.health.checks == (Check("/health", (200,)), Check("/ready", (200,)))
    assert cfg.app.uses_port and not cfg.app.uses_fd  # "{{fd}}" is a literal, not the placeholder


# =========================================================================== 2. what is refused


@dataclass(frozen=True)
class Bad:
    id: str
    text: str | bytes = ""
    key: str | None = None  # the dotted key the message must name (None: a whole-file problem)
    line: int | None = None  # the line the message must give, where YAML knows it
    needle: str = ""  # something else the message must say
    kind: str = "text"  # text | dir | missing | fifo | dangling | loop | chmod000


# B is a valid start: root (1), python (2), app (3), app.repo (4); app keys added below are on line 5,
# a section added below has its header on line 5 and its first key on line 6.
B = "root: @ROOT@\npython: @PY@\napp:\n  repo: @REPO@\n"

BAD: list[Bad] = [
    # ---- the file itself
    Bad("yaml-syntax", B + "listen: port: 8000\n", line=5, needle="valid YAML"),
    Bad("yaml-unclosed-flow", B + "listen: {port: 8000\nhealth: {}\n", needle="valid YAML"),
    Bad("tabs", "root: @ROOT@\napp:\n\trepo: @REPO@\n", line=3, needle="tabs"),
    Bad("duplicate-top-key", B + "root: /elsewhere\n", key="root", line=5, needle="also on line 1"),
    Bad("duplicate-nested-key", B + "  repo: /elsewhere\n", key="app.repo", line=5, needle="also on line 4"),
    Bad("duplicate-key-in-list", B + "health:\n  checks:\n    - {path: /a, path: /b}\n",
        key="health.checks[0].path", line=7, needle="twice"),
    Bad("empty-file", "", needle="no settings"),
    Bad("only-a-comment", "# proto4d config: to do\n", needle="only comments"),
    Bad("top-level-list", "- root: /srv\n- app: x\n", needle="mapping of keys at the top level, got a list"),
    Bad("top-level-scalar", "proto4d\n", needle="top level, got 'proto4d'"),
    Bad("two-documents", B + "---\nroot: /srv\n", line=5, needle="single document"),
    Bad("non-utf8", B.encode() + b"  branch: caf\xe9\n", line=5, needle="UTF-8"),
    Bad("control-character", B + "  branch: ma\x07in\n", line=5, needle="#x0007"),
    Bad("non-text-key", B + "8000: port\n", line=5, needle="keys must be text"),
    Bad("nested-too-deep", "root: " + "[" * 3000 + "]" * 3000 + "\n", needle="nested"),
    Bad("directory", kind="dir", needle="directory"),
    Bad("missing-file", kind="missing", needle="no such file"),
    Bad("fifo", kind="fifo", needle="FIFO"),
    Bad("dangling-symlink", kind="dangling", needle="symbolic link"),
    Bad("symlink-loop", kind="loop", needle="symbolic link"),
    Bad("unreadable-chmod-000", B, kind="chmod000", needle="cannot read"),
    # ---- root, python, required keys
    Bad("missing-root", "python: @PY@\napp:\n  repo: @REPO@\n", key="root", needle="missing"),
    Bad("missing-app", "root: @ROOT@\npython: @PY@\n", key="app", needle="missing"),
    Bad("null-app", "root: @ROOT@\npython: @PY@\napp:\n", key="app", line=3, needle="missing"),
    Bad("missing-app-repo", "root: @ROOT@\npython: @PY@\napp:\n  branch: main\n", key="app.repo",
        needle="missing"),
    Bad("root-not-text", "root: [a, b]\npython: @PY@\napp:\n  repo: @REPO@\n", key="root", line=1,
        needle="got a list"),
    Bad("root-empty", 'root: ""\npython: @PY@\napp:\n  repo: @REPO@\n', key="root", line=1),
    Bad("root-is-slash", "root: /\npython: @PY@\napp:\n  repo: @REPO@\n", key="root", line=1,
        needle="filesystem root"),
    Bad("root-is-a-file", "root: @FILE@\npython: @PY@\napp:\n  repo: @REPO@\n", key="root", line=1,
        needle="not one"),
    Bad("python-not-on-path", "root: @ROOT@\npython: no-such-python3.99\napp:\n  repo: @REPO@\n",
        key="python",
        line=2, needle="PATH"),
    Bad("python-not-executable", "root: @ROOT@\npython: @FILE@\napp:\n  repo: @REPO@\n", key="python",
        line=2, needle="executable"),
    # ---- unknown keys
    Bad("unknown-top-key", B + "scheduel:\n  timezone: UTC\n", key="scheduel", line=5,
        needle="did you mean schedule?"),
    Bad("unknown-nested-key", B + "  brnch: main\n", key="app.brnch", line=5,
        needle="did you mean app.branch?"),
    Bad("unknown-key-in-check", B + "health:\n  checks:\n    - {path: /h, stauts: [200]}\n",
        key="health.checks[0].stauts", line=7, needle="did you mean health.checks[0].status?"),
    # ---- wrong types
    Bad("string-for-number", B + "listen:\n  port: '8000'\n", key="listen.port", line=6, needle="got '8000'"),
    Bad("bool-for-number", B + "activity:\n  interval_s: true\n", key="activity.interval_s", line=6,
        needle="got true"),
    Bad("null-for-number", B + "listen:\n  port:\n", key="listen.port", line=6, needle="null"),
    Bad("float-for-integer", B + "update:\n  keep_min: 2.5\n", key="update.keep_min", line=6,
        needle="whole number"),
    Bad("nan", B + "health:\n  timeout_s: .nan\n", key="health.timeout_s", line=6),
    Bad("list-for-mapping", B + "listen: [0.0.0.0, 8000]\n", key="listen", line=5, needle="got a list"),
    Bad("app-is-a-list", "root: @ROOT@\npython: @PY@\napp: [x]\n", key="app", line=3, needle="got a list"),
    Bad("string-for-bool", B + "update:\n  canary: 'yes'\n", key="update.canary", line=6,
        needle="true or false"),
    Bad("promote-mode", B + "update:\n  promote: sometimes\n", key="update.promote", line=6,
        needle="one of auto, live, never"),
    # ---- numbers out of range
    Bad("negative-interval", B + "activity:\n  interval_s: -5\n", key="activity.interval_s", line=6),
    Bad("zero-interval", B + "activity:\n  interval_s: 0\n", key="activity.interval_s", line=6),
    Bad("window-shorter-than-interval", B + "activity:\n  interval_s: 60\n  window_s: 30\n",
        key="activity.window_s", line=7, needle="activity.interval_s"),
    Bad("port-0", B + "listen:\n  port: 0\n", key="listen.port", line=6, needle=">= 1"),
    Bad("port-70000", B + "listen:\n  port: 70000\n", key="listen.port", line=6, needle="<= 65535"),
    Bad("bad-host-name", B + "listen:\n  host: proto4.local\n", key="listen.host", line=6,
        needle="IP address"),
    Bad("bad-host-octet", B + "listen:\n  host: 999.0.0.1\n", key="listen.host", line=6),
    Bad("keep-min-0", B + "update:\n  keep_min: 0\n", key="update.keep_min", line=6),
    Bad("5xx-ratio-1.5", B + "update:\n  max_5xx_ratio: 1.5\n", key="update.max_5xx_ratio", line=6,
        needle="<= 1"),
    Bad("drain-timeout-0", B + "update:\n  drain_timeout_s: 0\n", key="update.drain_timeout_s", line=6),
    Bad("negative-users", B + "safety:\n  yellow_max_users: -1\n", key="safety.yellow_max_users", line=6),
    Bad("start-timeout-0", B + "health:\n  start_timeout_s: 0\n", key="health.start_timeout_s", line=6),
    # ---- schedule
    Bad("window-25h", B + 'schedule:\n  preferred: ["25:00-01:00"]\n', key="schedule.preferred[0]", line=6,
        needle="'25:00-01:00'"),
    Bad("window-no-minutes", B + 'schedule:\n  avoid: ["9-12"]\n', key="schedule.avoid[0]", line=6,
        needle="HH:MM-HH:MM"),
    Bad("window-empty", B + 'schedule:\n  acceptable: ["12:00-12:00"]\n', key="schedule.acceptable[0]",
        line=6,
        needle="same"),
    Bad("window-60-minutes", B + 'schedule:\n  preferred: ["02:00-06:00", "12:60-13:00"]\n',
        key="schedule.preferred[1]", line=6, needle="minutes 00-59"),
    Bad("window-number", B + "schedule:\n  preferred: [5]\n", key="schedule.preferred[0]", line=6),
    Bad("bad-weekday", B + 'schedule:\n  weekly: "tux 03:00"\n', key="schedule.weekly", line=6,
        needle="mon, tue"),
    Bad("weekly-24h", B + 'schedule:\n  weekly: "tue 24:00"\n', key="schedule.weekly", line=6),
    Bad("bad-timezone", B + "schedule:\n  timezone: Asia/Seol\n", key="schedule.timezone", line=6,
        needle="did you mean Asia/Seoul?"),
    # ---- command
    Bad("command-shell-string", B + '  command: "python -m uvicorn main:app --fd 3"\n', key="app.command",
        line=5, needle="never a shell string"),
    Bad("command-empty-list", B + "  command: []\n", key="app.command", line=5),
    Bad("command-empty-program", B + "  command: ['', 'x']\n", key="app.command[0]", line=5),
    Bad("command-unknown-placeholder", B + "  command: ['{pyton}', '-m', 'uvicorn']\n", key="app.command[0]",
        line=5, needle="did you mean {python}?"),
    Bad("command-unbalanced-brace", B + "  command: ['{python', '-m', 'uvicorn']\n", key="app.command[0]",
        line=5, needle="{{"),
    Bad("command-two-fd", B + "  command: ['{python}', '--fd', '{fd}', '--again', '{fd}']\n",
        key="app.command",
        line=5, needle="at most one {fd}"),
    Bad("command-two-fd-one-arg", B + "  command: ['{python}', '--fd={fd},{fd}']\n", key="app.command",
        line=5,
        needle="at most one {fd}"),
    Bad("command-format-spec", B + "  command: ['{python}', '--fd', '{fd:d}']\n", key="app.command[2]",
        line=5,
        needle="plain placeholders"),
    Bad("command-mapping-arg", B + "  command: ['{python}', {a: 1}]\n", key="app.command[1]", line=5),
    # ---- env
    Bad("env-nested-mapping", B + "  env:\n    DB: {host: x}\n", key="app.env.DB", line=6,
        needle="got a mapping"),
    Bad("env-name-with-dash", B + "  env:\n    OK: 1\n    MY-VAR: x\n", key="app.env.MY-VAR", line=7),
    Bad("env-a-list", B + "  env: [A=1]\n", key="app.env", line=5),
    # ---- paths inside the release
    Bad("shared-absolute", B + "  shared: [/etc/proto4.env]\n", key="app.shared[0]", line=5,
        needle="not absolute"),
    Bad("shared-dotdot", B + "  shared: [backend/../../secrets]\n", key="app.shared[0]", line=5,
        needle="'..'"),
    Bad("shared-duplicates", B + "  shared: [backend/data, backend/data/]\n", key="app.shared", line=5,
        needle="'backend/data' is listed twice"),
    Bad("shared-nested", B + "  shared: [backend, backend/data]\n", key="app.shared", line=5,
        needle="contain"),
    Bad("requirements-absolute", B + "  requirements: /srv/requirements.txt\n", key="app.requirements",
        line=5),
    Bad("subdir-dotdot", B + "  subdir: ../other\n", key="app.subdir", line=5),
    Bad("notice-file-absolute", B + "notify:\n  notice_file: /tmp/notice.json\n", key="notify.notice_file",
        line=6, needle="inside root"),
    Bad("bad-branch", B + "  branch: feature..x\n", key="app.branch", line=5),
    # ---- health, URLs
    Bad("check-path-without-slash", B + "health:\n  checks:\n    - {path: health}\n",
        key="health.checks[0].path",
        line=7, needle="starting with /"),
    Bad("check-status-999", B + "health:\n  checks:\n    - {path: /health, status: [200, 999]}\n",
        key="health.checks[0].status", line=7, needle="100-599), got a list [200, 999]"),
    Bad("checks-empty", B + "health:\n  checks: []\n", key="health.checks", line=6,
        needle="got an empty list"),
    Bad("external-url-no-scheme", B + "health:\n  external_url: socratic.llmclass.org\n",
        key="health.external_url", line=6, needle="https://"),
    Bad("stage-on-the-production-port", B + "listen: {port: 8001}\nstage:\n  listen: {port: 8001}\n",
        key="stage.listen.port", line=7, needle="other than listen.port (8001)"),
    Bad("stage-port-default-clash", B + "listen: {port: 8001}\n", key="stage.listen.port",
        needle="other than listen.port"),
    Bad("stage-ttl-zero", B + "stage:\n  ttl_s: 0\n", key="stage.ttl_s", line=6),
    Bad("stage-listen-not-a-mapping", B + "stage:\n  listen: 8001\n", key="stage.listen", line=6),
    Bad("webhook-ftp", B + "notify:\n  webhook_url: ftp://hooks.example.org/x\n", key="notify.webhook_url",
        line=6, needle="http://"),
    Bad("ignore-path-without-slash", B + "activity:\n  ignore_paths: [health]\n", key="activity.ignore_paths",
        line=6),
    # ---- choices, regexes
    Bad("installer-conda", B + "update:\n  installer: conda\n", key="update.installer", line=6,
        needle="auto, uv, pip"),
    Bad("drain-maybe", B + "  drain: maybe\n", key="app.drain", line=5, needle="auto, shim, sigterm"),
    Bad("access-log-regex-missing-groups", B + "  access_log_regex: '(?P<client>\\S+) (?P<path>\\S+)'\n",
        key="app.access_log_regex", line=5, needle="missing: method, status"),
    Bad("access-log-regex-invalid", B + "  access_log_regex: '(?P<client>\\S+'\n", key="app.access_log_regex",
        line=5, needle="regular expression"),
    Bad("ready-pattern-invalid", B + "  ready_pattern: '[Uvicorn'\n", key="app.ready_pattern", line=5,
        needle="regular expression"),
]


def materialize(row: Bad, tmp: Path) -> Path:
    """Write the row's config (or make its odd file) under tmp; return the path given to --config."""
    prepare(tmp)
    path = tmp / f"{row.id}.yaml"
    if row.kind == "dir":
        path.mkdir()
    elif row.kind == "missing":
        pass
    elif row.kind == "fifo":
        os.mkfifo(path)
    elif row.kind == "dangling":
        path.symlink_to(tmp / "nowhere.yaml")
    elif row.kind == "loop":
        path.symlink_to(path.name)
    else:
        data = row.text if isinstance(row.text, bytes) else row.text.encode()
        for mark in (b"@ROOT@", b"@REPO@", b"@PY@", b"@FILE@"):
            data = data.replace(mark, fill(mark.decode(), tmp).encode())
        path.write_bytes(data)
        if row.kind == "chmod000":
            path.chmod(0)
    return path


def _rows(cli: bool = False) -> list:
    out = []
    for i, row in enumerate(BAD):
        # Every row is parsed in-process; the CLI (one interpreter start each) gets every file-kind row
        # and every fifth text row in the default suite, all of them in `./dev proofs`.
        if cli and not FULL and row.kind == "text" and i % 5:
            continue
        marks = []
        if row.kind == "chmod000":
            marks.append(pytest.mark.skipif(
                hasattr(os, "geteuid") and os.geteuid() == 0,
                reason="root reads a chmod-000 file; the fifo/dangling/loop rows cover unreadable configs"))
        out.append(pytest.param(row, id=row.id, marks=marks))
    return out


def test_the_table_is_big_and_distinct() -> None:
    assert len(BAD) >= 35
    assert len({r.id for r in BAD}) == len(BAD)
    assert len({(r.kind, r.text) for r in BAD}) == len(BAD)


def check_message(message: str, row: Bad, path: Path) -> None:
    assert str(path) in message
    if row.key is not None:
        assert f": {row.key}: " in message, f"key {row.key!r} not named in {message!r}"
    if row.line is not None:
        assert f"{path}:{row.line}: " in message, f"line {row.line} not given in {message!r}"
    assert row.needle in message, f"{row.needle!r} not in {message!r}"
    assert "\n" not in message


@pytest.mark.timeout(30)  # a config that blocks (a FIFO) must fail fast, not hang
@pytest.mark.parametrize("row", _rows(cli=True))
def test_cli_refuses(tmp_path: Path, row: Bad) -> None:
    path = materialize(row, tmp_path)
    proc = run_cli("--config", str(path), cwd=tmp_path)
    assert proc.returncode == config.EX_CONFIG, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.endswith("\n") and proc.stderr.count("\n") == 1, proc.stderr
    line = proc.stderr.rstrip("\n")
    assert "Traceback" not in line and "Error:" not in line, line
    check_message(line, row, path)


@pytest.mark.timeout(30)  # a config that blocks (a FIFO) must fail fast, not hang
@pytest.mark.parametrize("row", _rows())
def test_parse_refuses(tmp_path: Path, row: Bad) -> None:
    path = materialize(row, tmp_path)
    with pytest.raises(ConfigError) as info:
        if row.kind == "text":
            config.parse(path.read_bytes(), str(path), base_dir=tmp_path)
        else:
            config.load(path)
    check_message(str(info.value), row, path)
    assert info.value.file == str(path)
    if row.key is not None:
        assert info.value.key == row.key
    if row.line is not None:
        assert info.value.line == row.line


# =========================================================================== 3. check-config


def test_check_config_prints_loadable_yaml_and_the_same_json(tmp_path: Path) -> None:
    prepare(tmp_path)
    path = tmp_path / "proto4d.yaml"
    path.write_text(fill(DESIGN_EXAMPLE.replace("python: python3", "python: @PY@"), tmp_path))
    as_yaml = run_cli("--config", str(path), cwd=tmp_path)
    as_json = run_cli("--config", str(path), "--json", cwd=tmp_path)
    for proc in (as_yaml, as_json):
        assert (proc.returncode, proc.stderr) == (0, "")
    from_yaml = yaml.safe_load(as_yaml.stdout)
    from_json = json.loads(as_json.stdout)
    assert from_yaml == from_json == config.to_dict(config.load(path))
    assert str(path) in as_yaml.stdout.splitlines()[0]
    assert from_yaml["root"] == str(tmp_path / "state")
    assert from_yaml["listen"] == {"host": "0.0.0.0", "port": 8000, "backlog": 2048}
    assert from_yaml["schedule"]["avoid"] == ["09:00-12:00", "19:00-22:00"]
    assert from_yaml["schedule"]["weekly"] == "tue 03:00"
    assert from_yaml["health"]["checks"][1] == {"path": "/", "status": [200, 307]}
    assert from_yaml["update"]["canary"] is True  # a default, printed too


def test_check_config_without_any_config_says_how_to_give_one(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli(cwd=empty)
    assert proc.returncode == 78
    assert proc.stderr.count("\n") == 1
    assert str(empty / "proto4d.yaml") in proc.stderr
    assert "--config" in proc.stderr and "PROTO4D_CONFIG" in proc.stderr


def test_config_file_lookup_order(tmp_path: Path) -> None:
    prepare(tmp_path)
    good = f"root: state\npython: {sys.executable}\napp:\n  repo: origin\n"
    for name in ("env.yaml", "flag.yaml", "proto4d.yaml"):
        (tmp_path / name).write_text(good.replace("state", name.split(".")[0]))
    bad = tmp_path / "bad.yaml"
    bad.write_text("root: /\n")

    def root_of(proc: subprocess.CompletedProcess[str]) -> str:
        assert proc.returncode == 0, proc.stderr
        return yaml.safe_load(proc.stdout)["root"]

    # ./proto4d.yaml when nothing else is given
    assert root_of(run_cli(cwd=tmp_path)) == str(tmp_path / "proto4d")
    # PROTO4D_CONFIG beats ./proto4d.yaml (relative to the cwd, ~ expanded)
    assert root_of(run_cli(cwd=tmp_path, env=cli_env(PROTO4D_CONFIG="env.yaml"))) == str(tmp_path / "env")
    proc = run_cli(cwd=tmp_path, env=cli_env(PROTO4D_CONFIG=str(bad)))
    assert proc.returncode == 78 and f"{bad}:1: root: " in proc.stderr
    # --config beats PROTO4D_CONFIG
    proc = run_cli("--config", "flag.yaml", cwd=tmp_path, env=cli_env(PROTO4D_CONFIG=str(bad)))
    assert root_of(proc) == str(tmp_path / "flag")


# =========================================================================== 4. reload


def _cfg(tmp: Path, **sections: str) -> config.Config:
    parts = {"app": "repo: origin", "listen": "port: 8000", "activity": "interval_s: 5",
             "schedule": "timezone: UTC", **sections}
    text = f"root: state\npython: {sys.executable}\n" + "".join(
        f"{name}:\n" + textwrap.indent(body, "  ") + "\n" for name, body in parts.items())
    return config.parse(text, "x.yaml", base_dir=tmp)


@pytest.mark.parametrize(("change", "expected"), [
    ({}, {}),
    ({"activity": "interval_s: 2"}, {"now": ["activity.interval_s"]}),
    ({"schedule": "timezone: Asia/Seoul"}, {"now": ["schedule.timezone"]}),
    ({"activity": "interval_s: 2\nwindow_s: 60"}, {"now": ["activity.interval_s", "activity.window_s"]}),
    ({"listen": "port: 8002"}, {"next_start": ["listen.port"]}),
    ({"listen": "port: 8000\nbacklog: 16"}, {"restart": ["listen.backlog"]}),
    ({"app": "repo: origin\ncommand: ['{python}', '-m', 'uvicorn', 'main:app', '--port', '{port}']"},
     {"next_start": ["app.command"]}),
    ({"app": "repo: other\nstable_s: 5"}, {"now": ["app.stable_s"], "next_update": ["app.repo"]}),
    ({"listen": "port: 8002", "activity": "interval_s: 2"},
     {"now": ["activity.interval_s"], "next_start": ["listen.port"]}),
    ({"app": "repo: origin\nenv: {A: 1}", "update": "keep_min: 5"},
     {"now": ["update.keep_min"], "next_start": ["app.env"]}),
])
def test_reload_differences(tmp_path: Path, change: dict[str, str], expected: dict[str, list[str]]) -> None:
    old = _cfg(tmp_path)
    new = _cfg(tmp_path, **change)
    assert config.reload_differences(old, new) == {rule: expected.get(rule, []) for rule in config.RELOAD_RULES}


def test_reload_python_change_waits_for_the_next_update(tmp_path: Path) -> None:
    old = _cfg(tmp_path)
    new = replace(old, python="/opt/python3.12/bin/python3")
    assert config.reload_differences(old, new)["next_update"] == ["python"]


def test_every_key_declares_when_a_reload_applies_it() -> None:
    """The schema is the dataclasses: every field of every section is a key with a reload rule, and
    the keys the parser accepts are exactly those."""
    keys = config.schema()
    assert set(keys.values()) <= set(config.RELOAD_RULES)
    undeclared = [f"{name}.{f.name}" for name, cls in config._sections().items() for f in dataclasses.fields(cls)
                  if "reload" not in f.metadata]
    assert not undeclared, f"keys without a reload rule (field(metadata=_NOW) etc.): {undeclared}"
    for name in config.SECTIONS:
        section = {k.split(".", 1)[1] for k in keys if k.startswith(name + ".")}
        with pytest.raises(ConfigError, match=rf"{name}\.no_such_key: not a known key"):
            _cfg(Path("/tmp"), **{name: "no_such_key: 1" if name != "app" else "repo: o\nno_such_key: 1"})
        assert section, name
    assert keys["root"] == config.RESTART and keys["listen.port"] == config.NEXT_START
    text = config.describe_reload_rules()
    assert "at once: " in text and "listen.backlog" in text and "health.*" in text
