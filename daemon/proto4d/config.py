"""The configuration: YAML in, frozen dataclasses out.

This module owns the whole schema (every key, its default, what it accepts) and the
error messages. Every error names the file, the line when YAML knows it, the dotted
key and what was expected, so an operator can fix it without reading code. Nothing
here touches the running system except `python` (looked up on PATH) and the config
file itself.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import os
import re
import shutil
import string
import typing
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

import yaml

EX_CONFIG = 78
DEFAULT_CONFIG_NAME = "proto4d.yaml"
PLACEHOLDERS = frozenset({"python", "fd", "port", "host", "release"})
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MAX_CONFIG_BYTES = 1 << 20
PROMOTE_MODES = ("auto", "live", "never")  # update.promote


class ConfigError(Exception):
    """A configuration problem, worded for the operator."""

    def __init__(self, file: str, key: str, expected: str, got: Any = None, line: int | None = None,
                 has_got: bool = True, hint: str = "") -> None:
        self.file = file
        self.key = key
        self.expected = expected
        self.line = line
        where = f"{file}:{line}" if line else file
        msg = f"{where}: {key}: " if key else f"{where}: "
        msg += f"expected {expected}, got {_show(got)}" if has_got else expected
        if hint:
            msg += f"; {hint}"
        super().__init__(msg)


def _plain(value: Any) -> Any:
    """Plain containers, so a list in a message reads like YAML data rather than Python classes."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _show(value: Any) -> str:
    if isinstance(value, str):
        text = repr(value)
    elif value is None:
        text = "nothing (null)"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, dict):
        text = "a mapping" if value else "an empty mapping"
    elif isinstance(value, list):
        text = f"a list {_plain(value)!r}" if value else "an empty list"
    else:
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- when a change applies

# Every key below declares, beside its type, when a new value sent by SIGHUP takes effect.
NOW = "now"  # the daemon uses it from the reload on
NEXT_UPDATE = "next_update"  # what the next release is built from: the next update (or rollback) uses it
NEXT_START = "next_start"  # what an app process starts with: the next switch, or a restart after a crash
RESTART = "restart"  # only a daemon restart applies it
WEB_RESTART = "web_restart"  # read by `proto4d web` when it starts; the daemon does not use it
RELOAD_RULES = {
    NOW: "at once",
    NEXT_UPDATE: "at the next update (what the next release is built from)",
    NEXT_START: "at the next start of the app (a switch, or a restart after a crash)",
    RESTART: "at the next daemon restart",
    WEB_RESTART: "when `proto4d web` is restarted (the daemon does not use it)",
}


# --------------------------------------------------------------------------- the schema

# Every key is declared once, in its section's dataclass field: when a change sent by SIGHUP takes
# effect, its default (as written in YAML), how it is read (a _Builder check by name), and one line
# for the operator. The parser, `check-config`, the reload decision and README's key table
# (tests/test_readme_config.py) are all made from these declarations.
REQUIRED = object()  # a key with no default


@dataclass(frozen=True)
class Read:
    """How a key's YAML value becomes its typed value: `_Builder.<check>(*args)`, called with
    (key, value, section, values read so far in the section)."""

    check: str
    args: tuple[Any, ...] = ()
    kwargs: tuple[tuple[str, Any], ...] = ()

    def __call__(self, b: _Builder, key: str, value: Any, sec: Mapping[str, Any], done: dict[str, Any]) -> Any:
        fn = getattr(b, self.check)
        if self.check in _FACTORIES:  # a check made from its arguments (a range, a choice, ...)
            fn = fn(*self.args, **dict(self.kwargs))
        return fn(key, value, sec, done)


_FACTORIES = frozenset({"number", "text", "relpath", "url", "one_of", "regex", "ip_address"})


def read(check: str, *args: Any, **kwargs: Any) -> Read:
    return Read(check, args, tuple(kwargs.items()))


@dataclass(frozen=True)
class Spec:
    reload: str
    default: Any
    read: Read
    doc: str
    at: tuple[str, ...] = ()  # where the key sits in its section when not at the top (web.listen.host)
    missing: str = ""  # for a REQUIRED key: what it should be


def setting(reload: str, default: Any, reader: Read, doc: str, *, at: tuple[str, ...] = (),
            missing: str = "") -> Any:
    return field(metadata={"reload": reload, "spec": Spec(reload, default, reader, doc, at, missing)})


_NUM_S = {"unit": "seconds"}
_DEFAULT_COMMAND = ["{python}", "-m", "uvicorn", "main:app", "--fd", "{fd}"]


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Window:
    """A daily time window in the schedule's zone; `end` <= `start` means it wraps midnight."""

    start: int  # minutes after midnight
    end: int
    text: str

    def contains(self, minute_of_day: int) -> bool:
        if self.start < self.end:
            return self.start <= minute_of_day < self.end
        return minute_of_day >= self.start or minute_of_day < self.end

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Weekly:
    weekday: int  # 0 = Monday
    minute: int  # minutes after midnight
    text: str


@dataclass(frozen=True)
class Check:
    path: str
    status: tuple[int, ...]


@dataclass(frozen=True)
class AppConfig:
    repo: str = setting(NEXT_UPDATE, REQUIRED, read("repo"), "the app's git repository: a URL or a local path",
                        missing="a git URL or a local path to the app's repository")
    branch: str = setting(NEXT_UPDATE, "main", read("branch"), "the branch an update follows")
    subdir: str = setting(NEXT_UPDATE, "", read("relpath"), "the app's folder inside the repository (\"\" = all)")
    workdir: str = setting(NEXT_START, "", read("relpath"), "where the command runs, relative to `subdir`")
    requirements: str = setting(NEXT_UPDATE, "", read("relpath", what="a requirements file path"),
                                "requirements file relative to `subdir` (\"\" = none)")
    command: tuple[str, ...] = setting(NEXT_START, _DEFAULT_COMMAND, read("command"),
                                       "argv of the app; placeholders {python} {fd} {port} {host} {release}")
    env: tuple[tuple[str, str], ...] = setting(NEXT_START, {}, read("env"), "extra environment for the app")
    shared: tuple[str, ...] = setting(NEXT_UPDATE, [], read("shared"),
                                      "paths kept across releases (secrets, SQLite, uploads), linked into each")
    ready_pattern: str = setting(NEXT_START, r"Uvicorn running on|Listening at:", read("regex", allow_empty=False),
                                 "the log line that says a new process accepts on the shared socket")
    access_log_regex: str = setting(NOW, "", read("access_regex"),
                                    "named groups `client`, `method`, `path`, `status` for other servers "
                                    "(uvicorn and gunicorn formats built in)")
    drain: str = setting(NEXT_START, "auto", read("one_of", "auto", "shim", "sigterm"),
                         "`auto`/`shim`: drain uvicorn through the proto4d shim; `sigterm`: stock shutdown")
    drain_grace_s: float = setting(NEXT_START, 1, read("number", 0, 30, **_NUM_S),
                                   "how long an idle keep-alive connection stays open after SIGTERM")
    stable_s: float = setting(NOW, 60, read("number", 1, 3600, **_NUM_S),
                              "a run shorter than this is a fast failure")
    max_fast_failures: int = setting(NOW, 5, read("number", 1, 100, integer=True),
                                     "that many fast failures in a row is `fatal`")
    log_max_bytes: int = setting(NOW, 10 << 20, read("number", 4096, 1 << 34, integer=True, unit="bytes"),
                                 "`logs/app.log` rotates at this size")
    log_backups: int = setting(NOW, 5, read("number", 0, 100, integer=True), "rotated app logs kept")
    databases: tuple[str, ...] = setting(NEXT_UPDATE, [], read("databases"),
                                         "SQLite files (under `shared`) to snapshot and copy for the canary "
                                         "([] = found under shared/ by header)")
    migrate: tuple[str, ...] = setting(NEXT_UPDATE, [], read("migrate"),
                                       "argv run in the release's venv and workdir: on the canary's copy, "
                                       "then live at the switch")
    spare: bool = setting(NOW, True, read("boolean"),
                          "keep one spare interpreter with the venv's imports done, warmed while nobody is on, "
                          "that becomes the next release's start (which then imports only the app's own code; "
                          "false: no idle process, every start is cold)")
    user: str = setting(NEXT_START, "", read("app_user"),
                        "run the app, its canary and its migrations as this user (needs a daemon run as root; "
                        "\"\" = the daemon's user)")

    @property
    def uses_fd(self) -> bool:
        return any("fd" in _placeholders(arg) for arg in self.command)

    @property
    def uses_port(self) -> bool:
        return any("port" in _placeholders(arg) for arg in self.command)

    @property
    def env_dict(self) -> dict[str, str]:
        return dict(self.env)


def probe_host(host: str) -> str:
    """Where the daemon itself reaches what listens on `host`: a wildcard bind is probed on loopback."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


@dataclass(frozen=True)
class ListenConfig:
    host: str = setting(NEXT_START, "0.0.0.0", read("ip_address", "0.0.0.0 or 127.0.0.1"),
                        "the address of the listening socket the daemon owns")
    port: int = setting(NEXT_START, 8000, read("number", 1, 65535, integer=True), "its port")
    backlog: int = setting(RESTART, 2048, read("number", 1, 65535, integer=True),
                           "the accept queue (it keeps connections waiting while no process accepts)")

    @property
    def probe_host(self) -> str:
        return probe_host(self.host)


@dataclass(frozen=True)
class HealthConfig:
    checks: tuple[Check, ...] = setting(NOW, [{"path": "/health", "status": [200]}], read("checks"),
                                        "GET each path; the answer's status must be in the list")
    external_url: str = setting(NOW, "", read("url"), "checked through the tunnel; a failure is a warning only")
    start_timeout_s: float = setting(NOW, 60, read("number", 0, 3600, strict_min=True, **_NUM_S),
                                     "a new process must pass the checks within this")
    timeout_s: float = setting(NOW, 5, read("number", 0, 300, strict_min=True, **_NUM_S), "per check")
    interval_s: float = setting(NOW, 10, read("number", 0, 3600, strict_min=True, **_NUM_S),
                                "how often the watch checks")


@dataclass(frozen=True)
class ActivityConfig:
    interval_s: float = setting(NOW, 5, read("number", 0.1, 3600, **_NUM_S), "how often activity is sampled")
    window_s: float = setting(NOW, 300, read("window_length"), "users are those seen within this")
    ignore_paths: tuple[str, ...] = setting(NOW, ["/health"], read("url_paths"),
                                            "requests to these paths are nobody's activity")
    tunnel_process: str = setting(NOW, "cloudflared", read("stripped_text"),
                                  "the tunnel's process name, for its connection count (\"\" = none); one that starts "
                                  "is seen within 30 s")
    history_max_bytes: int = setting(NOW, 5 << 20, read("number", 4096, 1 << 32, integer=True, unit="bytes"),
                                     "bound of `state/activity.jsonl`")


@dataclass(frozen=True)
class SafetyConfig:
    yellow_max_users: int = setting(NOW, 2, read("number", 0, 10000, integer=True),
                                    "0 users is green, up to this many yellow, more red")
    quiet_for_s: float = setting(NOW, 120, read("number", 0, 86400, **_NUM_S),
                                 "green must hold this long before an update starts")
    red_rpm: float = setting(NOW, 600, read("number", 0, 1e9, unit="requests per minute"),
                             "this many requests per minute is red whatever the user count (0 = off)")


@dataclass(frozen=True)
class ScheduleConfig:
    timezone: str = setting(NOW, "UTC", read("timezone"), "the zone of the windows below")
    preferred: tuple[Window, ...] = setting(NOW, [], read("window_list"), "\"HH:MM-HH:MM\" windows: green updates")
    acceptable: tuple[Window, ...] = setting(NOW, [], read("window_list"), "windows where green also goes")
    avoid: tuple[Window, ...] = setting(NOW, [], read("window_list"), "windows where nothing starts")
    weekly: Weekly | None = setting(NOW, "", read("weekly"), "\"tue 03:00\": file an update request by itself")

    @property
    def zone(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.timezone)


@dataclass(frozen=True)
class UpdateConfig:
    notice_grace_s: float = setting(NOW, 300, read("number", 0, 86400, **_NUM_S),
                                    "yellow: post the notice, wait this long, look again")
    drain_timeout_s: float = setting(NOW, 60, read("number", 0, 3600, strict_min=True, **_NUM_S),
                                     "the old process's in-flight requests get this long")
    watch_s: float = setting(NOW, 120, read("number", 0, 86400, **_NUM_S),
                             "after the switch: a crash or failed check here rolls back")
    keep_days: float = setting(NOW, 7, read("number", 0, 3650, unit="days"), "releases younger than this stay")
    keep_min: int = setting(NOW, 3, read("number", 1, 1000, integer=True), "and at least this many")
    max_5xx_ratio: float = setting(NOW, 0.2, read("number", 0, 1),
                                   "share of 5xx answers during the watch that rolls back")
    min_free_mb: int = setting(NOW, 200, read("number", 0, 1 << 30, integer=True, unit="MB"),
                               "preflight: free space under `root`")
    installer: str = setting(NOW, "auto", read("installer"), "`uv` when present, else `venv` + `pip`")
    canary: bool = setting(NOW, True, read("boolean"),
                           "run the new release on a private port and check it before touching production")
    migrate_timeout_s: float = setting(NOW, 300, read("number", 1, 86400, **_NUM_S), "a migration's limit")
    allow_incompatible: bool = setting(NOW, False, read("boolean"),
                                       "deploy a migration the previous release cannot run on (green only)")
    min_5xx_count: int = setting(NOW, 5, read("number", 1, 1 << 20, integer=True),
                                 "the ratio rolls back only with at least this many 5xx answers")
    min_5xx_clients: int = setting(NOW, 2, read("number", 1, 1 << 20, integer=True),
                                   "to at least this many distinct clients")
    prepare_ahead_s: float = setting(NOW, 600, read("number", 0, 86400, **_NUM_S),
                                     "while nobody is on, look for a new head of app.branch this often and prepare "
                                     "its release ahead (export, venv, checks), so that its update only checks it "
                                     "and switches; 0 = never")
    promote: str = setting(NOW, "auto", read("one_of", *PROMOTE_MODES),
                           "one start per release: `auto` promotes the verified canary in place when the app has no "
                           "database or migration; `live` also with a database when no migration is pending "
                           "(the canary then runs on production's data, after a snapshot); `never`: two starts")


@dataclass(frozen=True)
class NotifyConfig:
    notice_file: str = setting(NOW, "notice.json", read("relpath", False, "a file path", inside="root"),
                               "what the app or the hub shows users (relative to `root`)")
    webhook_url: str = setting(NOW, "", read("url"), "optional JSON POST on every update event")
    webhook_timeout_s: float = setting(NOW, 3, read("number", 0, 60, strict_min=True, **_NUM_S),
                                       "the webhook never blocks or fails an update")


@dataclass(frozen=True)
class StageConfig:
    """`proto4d stage`: where a staged release answers for a teacher to try, and for how long."""
    host: str = setting(NOW, "127.0.0.1", read("ip_address", "127.0.0.1"),
                        "where a staged release answers (`proto4d stage`); loopback by default, for a second "
                        "tunnel hostname or an SSH forward", at=("listen", "host"))
    port: int = setting(NOW, 8001, read("number", 1, 65535, integer=True), "its port", at=("listen", "port"))
    ttl_s: float = setting(NOW, 28800, read("number", 1, 90 * 86400, **_NUM_S),
                           "a staged release not promoted within this is discarded")

    @property
    def probe_host(self) -> str:
        return probe_host(self.host)

    @property
    def url(self) -> str:
        host = self.probe_host
        return f"http://[{host}]:{self.port}/" if ":" in host else f"http://{host}:{self.port}/"


@dataclass(frozen=True)
class WebConfig:
    """`proto4d web`: where the status page and /metrics listen; a token for any non-loopback address."""
    host: str = setting(WEB_RESTART, "127.0.0.1", read("ip_address", "127.0.0.1"),
                        "where `proto4d web` serves the status page and /metrics", at=("listen", "host"))
    port: int = setting(WEB_RESTART, 8099, read("number", 1, 65535, integer=True), "its port",
                        at=("listen", "port"))
    token: str = setting(WEB_RESTART, "", read("web_token"),
                         "required (16+ characters) for a non-loopback `web.listen.host`")


@dataclass(frozen=True)
class Config:
    source: str
    root: Path = setting(RESTART, REQUIRED, read("root"), "all state lives under here",
                         missing="a directory where proto4d keeps its state")
    python: str = setting(NEXT_UPDATE, "python3", read("python"), "interpreter that builds release venvs")
    app: AppConfig
    listen: ListenConfig
    health: HealthConfig
    activity: ActivityConfig
    safety: SafetyConfig
    schedule: ScheduleConfig
    update: UpdateConfig
    notify: NotifyConfig
    stage: StageConfig
    web: WebConfig
    raw: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def notice_path(self) -> Path:
        return self.root / self.notify.notice_file


# --------------------------------------------------------------------------- loading


class _MarkedLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping key, for error messages."""


class _MarkedDict(dict):
    lines: dict[str, int]


def _construct_mapping(loader: _MarkedLoader, node: yaml.MappingNode) -> _MarkedDict:
    # Keys written twice were refused before construction (_check_duplicates, which names the dotted
    # key); what repeats here comes from a `<<` merge, where the mapping's own key wins.
    loader.flatten_mapping(node)
    result = _MarkedDict()
    result.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            raise yaml.constructor.ConstructorError(
                None, None, f"keys must be text, found {_show(key)}", key_node.start_mark)
        result[key] = loader.construct_object(value_node, deep=True)
        result.lines[key] = key_node.start_mark.line + 1
    return result


_MarkedLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _check_duplicates(root: yaml.Node, file: str) -> None:
    """Refuse a key written twice in one mapping, naming its dotted key and both lines.

    Walks the composed nodes once each (aliases share nodes: no exponential walk).
    """
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    while stack:
        node, prefix = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    key = key_node.value
                    line = key_node.start_mark.line + 1
                    if key in first:
                        raise ConfigError(file, f"{prefix}{key}",
                                          f"appears twice (also on line {first[key]}); give each key once",
                                          line=line, has_got=False)
                    first[key] = line
                    stack.append((value_node, f"{prefix}{key}."))
                else:
                    stack.append((value_node, prefix))
        elif isinstance(node, yaml.SequenceNode):
            base = prefix[:-1] if prefix.endswith(".") else prefix
            for i, item in enumerate(node.value):
                stack.append((item, f"{base}[{i}]."))


def _load_yaml(text: str, file: str) -> Any:
    loader = _MarkedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicates(node, file)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _line_at(text: str | bytes, offset: int) -> int:
    return text[:offset].count("\n" if isinstance(text, str) else b"\n") + 1


def _file_kind(p: Path) -> str:
    import stat
    mode = p.stat().st_mode
    for test, kind in ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def default_config_path() -> Path:
    env = os.environ.get("PROTO4D_CONFIG")
    return Path(env).expanduser() if env else Path.cwd() / DEFAULT_CONFIG_NAME


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate a config file. Raises ConfigError for every problem."""
    p = Path(path).expanduser() if path is not None else default_config_path()
    name = str(p)
    if not p.exists():
        if p.is_symlink():
            raise ConfigError(name, "", f"expected a YAML file; this is a symbolic link to "
                              f"{os.readlink(p)!r}, which leads nowhere (missing target or a loop)",
                              has_got=False)
        raise ConfigError(name, "", "no such file (give --config FILE or set PROTO4D_CONFIG)", has_got=False)
    if p.is_dir():
        raise ConfigError(name, "", "expected a YAML file, this is a directory", has_got=False)
    if not p.is_file():
        # never open it: a FIFO with no writer would block the daemon (or a reload) forever
        raise ConfigError(name, "", f"expected a regular YAML file, this is {_file_kind(p)}", has_got=False)
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(name, "", f"cannot read the file ({e.strerror})", has_got=False) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(name, "", f"a config file of at most {MAX_CONFIG_BYTES} bytes", has_got=False)
    return parse(data, name, base_dir=p.resolve().parent)


def parse(data: bytes | str, name: str = "<config>", base_dir: Path | None = None) -> Config:
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(name, "", f"expected UTF-8 text (invalid byte 0x{data[e.start]:02x} at offset "
                              f"{e.start})", line=_line_at(data, e.start), has_got=False) from None
    else:
        text = data
    try:
        doc = _load_yaml(text, name)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        if line is None and isinstance(getattr(e, "position", None), int):  # ReaderError: a control character
            line = _line_at(text, e.position)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        context = getattr(e, "context", None)
        if context and problem.startswith("but "):  # "expected a single document ..., but found another"
            problem = f"{context}, {problem}"
        tab = "\\t" in problem or "\t" in problem
        hint = "YAML indents with spaces, never tabs" if tab else ""
        raise ConfigError(name, "", f"expected valid YAML ({problem})", line=line, has_got=False,
                          hint=hint) from None
    except RecursionError:
        raise ConfigError(name, "", "expected YAML nested at most a few hundred levels deep", has_got=False) \
            from None
    if doc is None:
        raise ConfigError(name, "", "expected a YAML mapping with at least `root` and `app.repo`; the file "
                          "has no settings (it is empty or only comments)", has_got=False)
    if not isinstance(doc, dict):
        raise ConfigError(name, "", "a YAML mapping of keys at the top level", doc)
    return _Builder(name, base_dir or Path.cwd()).build(doc)


# --------------------------------------------------------------------------- validation

_MISSING = object()
_WINDOW_RE = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")
_WEEKLY_RE = re.compile(r"^\s*([A-Za-z]+)\s+(\d{1,2}):(\d{2})\s*$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class _Builder:
    def __init__(self, file: str, base_dir: Path) -> None:
        self.file = file
        self.base_dir = base_dir

    # -- helpers

    def fail(self, key: str, expected: str, got: Any = _MISSING, section: Mapping[str, Any] | None = None,
             hint: str = "") -> NoReturn:
        line = None
        if section is not None:
            line = getattr(section, "lines", {}).get(key.rsplit(".", 1)[-1].split("[", 1)[0])
        raise ConfigError(self.file, key, expected, None if got is _MISSING else got, line=line,
                          has_got=got is not _MISSING, hint=hint)

    def section(self, doc: Mapping[str, Any], name: str, known: set[str], required: bool = False) -> dict:
        if name not in doc or doc[name] is None:
            if required:
                self.fail(name, f"missing; expected a mapping with the {name} settings "
                          "(this section is required)", section=doc)
            empty = _MarkedDict()
            empty.lines = {}
            return empty
        value = doc[name]
        if not isinstance(value, dict):
            self.fail(name, "a mapping of keys", value, doc)
        self.unknown(value, known, name + ".")
        return value

    def unknown(self, mapping: Mapping[str, Any], known: set[str], prefix: str) -> None:
        for key in mapping:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
                hint = f"did you mean {prefix}{close[0]}?" if close else \
                    f"known keys here: {', '.join(sorted(known))}"
                self.fail(f"{prefix}{key}", "not a known key", section=mapping, hint=hint)

    def get(self, sec: Mapping[str, Any], prefix: str, key: str, default: Any,
            check: Callable[[str, Any, Mapping], Any]):
        value = sec.get(key, default)
        if value is None and default is not None and key not in sec:
            value = default
        return check(f"{prefix}{key}", value, sec) if check else value

    def number(self, minimum: float | None = None, maximum: float | None = None, integer: bool = False,
               strict_min: bool = False, unit: str = "") -> Callable[..., Any]:
        def check(key: str, value: Any, sec: Mapping, done: dict | None = None) -> Any:
            kind = "a whole number" if integer else "a number"
            if unit:
                kind += f" of {unit}"
            bounds = []
            if minimum is not None:
                bounds.append(f"> {minimum:g}" if strict_min else f">= {minimum:g}")
            if maximum is not None:
                bounds.append(f"<= {maximum:g}")
            expected = kind + (" " + " and ".join(bounds) if bounds else "")
            if isinstance(value, bool) or not isinstance(value, int | float) or \
                    (integer and not isinstance(value, int)):
                self.fail(key, expected, value, sec)
            if value != value or value in (float("inf"), float("-inf")):
                self.fail(key, expected, value, sec)
            if minimum is not None and (value <= minimum if strict_min else value < minimum):
                self.fail(key, expected, value, sec)
            if maximum is not None and value > maximum:
                self.fail(key, expected, value, sec)
            return int(value) if integer else float(value)
        return check

    def text(self, allow_empty: bool = True, what: str = "text") -> Callable[..., str]:
        def check(key: str, value: Any, sec: Mapping, done: dict | None = None) -> str:
            if value is None and allow_empty:
                return ""
            if not isinstance(value, str):
                self.fail(key, what, value, sec)
            if not allow_empty and not value.strip():
                self.fail(key, f"{what} (not empty)", value, sec)
            if "\x00" in value:
                self.fail(key, f"{what} without NUL characters", value, sec)
            return value
        return check

    def boolean(self, key: str, value: Any, sec: Mapping, done: dict | None = None) -> bool:
        if not isinstance(value, bool):
            self.fail(key, "true or false", value, sec)
        return value

    def relpath(self, allow_empty: bool = True, what: str = "a relative path",
                inside: str = "the release") -> Callable[..., str]:
        def check(key: str, value: Any, sec: Mapping, done: dict | None = None) -> str:
            raw = self.text(allow_empty, what)(key, value, sec).strip()
            if raw.startswith(("/", "~")):
                self.fail(key, f"{what} inside {inside} (not absolute)", raw, sec)
            if ".." in Path(raw).parts:
                self.fail(key, f"{what} that stays inside {inside} (no '..')", raw, sec)
            value = os.path.normpath(raw) if raw else ""
            if value in ("", "."):
                if not allow_empty:
                    self.fail(key, what + " (not empty)", raw, sec)
                return ""
            return value
        return check

    def window_list(self, key: str, value: Any, sec: Mapping, done: dict | None = None) -> tuple[Window, ...]:
        if value is None:
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            self.fail(key, 'a list of "HH:MM-HH:MM" windows', value, sec)
        windows = []
        for i, item in enumerate(value):
            windows.append(self.window(f"{key}[{i}]", item, sec))
        return tuple(windows)

    def window(self, key: str, item: Any, sec: Mapping) -> Window:
        expected = 'a window "HH:MM-HH:MM" (24-hour clock; an end before the start wraps past midnight)'
        if not isinstance(item, str):
            self.fail(key, expected, item, sec)
        m = _WINDOW_RE.match(item)
        if not m:
            self.fail(key, expected, item, sec)
        h1, m1, h2, m2 = (int(g) for g in m.groups())
        if h1 > 23 or m1 > 59 or m2 > 59 or h2 > 24 or (h2 == 24 and m2 != 0):
            self.fail(key, expected + " with hours 00-23 and minutes 00-59", item, sec)
        start, end = h1 * 60 + m1, (h2 * 60 + m2) % 1440
        if start == end:
            self.fail(key, expected + "; start and end are the same, so the window is empty", item, sec)
        return Window(start, end, f"{h1:02d}:{m1:02d}-{h2:02d}:{m2:02d}")

    def weekly(self, key: str, value: Any, sec: Mapping, done: dict | None = None) -> Weekly | None:
        if value is None or value == "":
            return None
        expected = 'a weekday and a time like "tue 03:00"'
        if not isinstance(value, str):
            self.fail(key, expected, value, sec)
        m = _WEEKLY_RE.match(value)
        if not m:
            self.fail(key, expected, value, sec)
        day = m.group(1).lower()[:3]
        if day not in WEEKDAYS or not (len(m.group(1)) == 3 or
                                       m.group(1).lower() in _FULL_DAYS):
            self.fail(key, expected + f" (weekday one of {', '.join(WEEKDAYS)})", value, sec)
        hour, minute = int(m.group(2)), int(m.group(3))
        if hour > 23 or minute > 59:
            self.fail(key, expected + " with hours 00-23 and minutes 00-59", value, sec)
        return Weekly(WEEKDAYS.index(day), hour * 60 + minute, f"{day} {hour:02d}:{minute:02d}")

    def url(self, allow_empty: bool = True) -> Callable[..., str]:
        def check(key: str, value: Any, sec: Mapping, done: dict | None = None) -> str:
            value = self.text(allow_empty, "an http:// or https:// URL")(key, value, sec).strip()
            if not value:
                return ""
            if not re.match(r"^https?://[^\s/]+", value) or any(c.isspace() for c in value):
                self.fail(key, "an http:// or https:// URL", value, sec)
            return value
        return check

    # -- sections: every key read by its declaration (Spec), in declaration order

    def build(self, doc: dict) -> Config:
        self.unknown(doc, _top_keys(), "")
        top = self.read_fields(Config, doc, "")
        sections = {name: self.read_section(doc, name, cls, required=name == "app")
                    for name, cls in _sections().items()}
        stage, listen = sections["stage"], sections["listen"]
        if stage.port == listen.port:
            holder = doc.get("stage") if isinstance(doc.get("stage"), dict) else {}
            holder = holder.get("listen") if isinstance(holder.get("listen"), dict) else doc
            self.fail("stage.listen.port", f"a port other than listen.port ({listen.port}): a staged release "
                      "answers beside production, never on its socket", stage.port, holder)
        return Config(self.file, **top, **sections, raw=doc)

    def read_section(self, doc: Mapping[str, Any], name: str, cls: type, required: bool = False) -> Any:
        known = {spec.at[0] if spec.at else f.name for f, spec in _specs(cls)}
        sec = self.section(doc, name, known, required)
        return cls(**self.read_fields(cls, sec, name + "."))

    def read_fields(self, cls: type, sec: Mapping[str, Any], prefix: str) -> dict[str, Any]:
        done: dict[str, Any] = {}
        for f, spec in _specs(cls):
            holder, name = sec, f.name
            if spec.at:  # a key in a mapping of its own (web.listen.host): that mapping checked first
                holder = self.inner(cls, sec, prefix, spec.at[0])
                name = spec.at[-1]
            key = prefix + ".".join(spec.at or (name,))
            if spec.default is REQUIRED and name not in holder:
                self.fail(key, f"missing; expected {spec.missing} (this key is required)")
            done[f.name] = spec.read(self, key, holder.get(name, spec.default), holder, done)
        return done

    def inner(self, cls: type, sec: Mapping[str, Any], prefix: str, name: str) -> Mapping[str, Any]:
        specs = [(f, spec) for f, spec in _specs(cls) if spec.at and spec.at[0] == name]
        value = sec.get(name, {})
        if not isinstance(value, dict):
            shape = ", ".join(f"{spec.at[-1]}: {spec.default}" for _, spec in specs)
            self.fail(prefix + name, f"a mapping {{{shape}}}", value, sec)
        self.unknown(value, {spec.at[-1] for _, spec in specs}, f"{prefix}{name}.")
        return value

    # -- the checks that are more than a type and a range

    def root(self, key: str, value: Any, sec: Mapping, done: dict) -> Path:
        text = self.text(False, "a directory path")(key, value, sec)
        root = self.abspath(text)
        if root == Path("/"):
            self.fail(key, "a directory of its own, not the filesystem root", text, sec)
        if root.exists() and not root.is_dir():
            self.fail(key, "a directory (this path exists and is not one)", text, sec)
        return root

    def abspath(self, text: str) -> Path:
        p = Path(os.path.expanduser(text))
        if not p.is_absolute():
            p = self.base_dir / p
        return Path(os.path.normpath(p))

    def python(self, key: str, value: Any, sec: Mapping, done: dict) -> str:
        value = self.text(False, "a Python interpreter: a command on PATH or a path")(key, value, sec)
        if "/" in value:
            p = self.abspath(value)
            if not (p.is_file() and os.access(p, os.X_OK)):
                self.fail(key, "an executable Python interpreter", value, sec)
            return str(p)
        if not shutil.which(value):
            self.fail(key, "a Python interpreter found on PATH", value, sec)
        return value

    def repo(self, key: str, value: Any, sec: Mapping, done: dict) -> str:
        repo = self.text(False, "a git URL or a local path")(key, value, sec).strip()
        return repo if _is_remote_url(repo) else str(self.abspath(repo))

    def branch(self, key: str, value: Any, sec: Mapping, done: dict) -> str:
        branch = self.text(False, "a branch name")(key, value, sec).strip()
        if not _valid_ref_name(branch):
            self.fail(key, "a git branch name", branch, sec)
        return branch

    def one_of(self, *choices: str) -> Callable[..., str]:
        def check(key: str, value: Any, sec: Mapping, done: dict | None = None) -> str:
            value = self.text(False)(key, value, sec)
            if value not in choices:
                self.fail(key, "one of " + ", ".join(choices), value, sec)
            return value
        return check

    def installer(self, key: str, value: Any, sec: Mapping, done: dict) -> str:
        installer = self.one_of("auto", "uv", "pip")(key, value, sec)
        if installer == "uv" and not find_uv():
            self.fail(key, "an installer that exists here: uv was not found (pip install uv, or use auto)",
                      installer, sec)
        return installer

    def regex(self, allow_empty: bool = True) -> Callable[..., str]:
        def check(key: str, value: Any, sec: Mapping, done: dict | None = None) -> str:
            value = self.text(allow_empty)(key, value, sec)
            if value:
                self.compiled(key, value, sec)
            return value
        return check

    def access_regex(self, key: str, value: Any, sec: Mapping, done: dict) -> str:
        value = self.text()(key, value, sec)
        if value:
            missing = {"client", "method", "path", "status"} - set(self.compiled(key, value, sec).groupindex)
            if missing:
                self.fail(key, "a regex with the named groups client, method, path and "
                          f"status (missing: {', '.join(sorted(missing))})", value, sec)
        return value

    def compiled(self, key: str, value: str, sec: Mapping) -> re.Pattern[str]:
        try:
            return re.compile(value)
        except re.error as e:
            self.fail(key, f"a valid regular expression ({e})", value, sec)
        raise AssertionError  # unreachable

    def app_user(self, key: str, value: Any, sec: Mapping, done: dict) -> str:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        name = self.text(True, "a user name")(key, value, sec).strip()
        if name:
            import pwd  # here: only a config that names a user looks one up
            try:
                pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
            except (KeyError, OverflowError):
                self.fail(key, "a user that exists on this machine", name, sec)
        return name

    def stripped_text(self, key: str, value: Any, sec: Mapping, done: dict) -> str:
        return self.text()(key, value, sec).strip()

    def ip_address(self, example: str) -> Callable[..., str]:
        def check(key: str, value: Any, sec: Mapping, done: dict | None = None) -> str:
            host = self.text(False, "an IP address")(key, value, sec)
            if host == "localhost":
                return "127.0.0.1"
            try:
                ipaddress.ip_address(host)
            except ValueError:
                self.fail(key, f"an IP address such as {example} (or localhost)", host, sec)
            return host
        return check

    def web_token(self, key: str, value: Any, sec: Mapping, done: dict) -> str:
        token = self.text(True, "a string of at least 16 characters")(key, value, sec)
        if token and (len(token) < 16 or any(c.isspace() for c in token)):
            self.fail(key, "at least 16 characters without spaces (e.g. from `openssl rand -hex 16`)",
                      "(hidden)", sec)
        host = done["host"]
        if not token and not ipaddress.ip_address(host).is_loopback:
            self.fail(key, f"a token (at least 16 characters): required because web.listen.host {host} "
                      "is not a loopback address (or keep 127.0.0.1 and reach it through an SSH forward)")
        return token

    def window_length(self, key: str, value: Any, sec: Mapping, done: dict) -> float:
        window = self.number(1, 86400, unit="seconds")(key, value, sec)
        if window < done["interval_s"]:
            self.fail(key, f"a window at least as long as activity.interval_s ({done['interval_s']:g})",
                      window, sec)
        return window

    def url_paths(self, key: str, value: Any, sec: Mapping, done: dict) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list) or any(not isinstance(x, str) or not x.startswith("/") for x in value):
            self.fail(key, "a list of URL paths starting with /", value, sec)
        return tuple(value)

    def timezone(self, key: str, value: Any, sec: Mapping, done: dict) -> str:
        tz = self.text(False, "an IANA time zone")(key, value, sec)
        try:
            if tz != tz.strip() or ".." in tz or tz.startswith("/"):
                raise ValueError
            zoneinfo.ZoneInfo(tz)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
            close = difflib.get_close_matches(tz, sorted(zoneinfo.available_timezones()), n=1)
            hint = f"did you mean {close[0]}?" if close else ""
            self.fail(key, "an IANA time zone like Asia/Seoul", tz, sec, hint=hint)
        return tz

    def checks(self, key: str, raw: Any, sec: Mapping, done: dict) -> tuple[Check, ...]:
        if raw is None:
            return (Check("/health", (200,)),)
        if not isinstance(raw, list) or not raw:
            self.fail(key, "a non-empty list of {path: /..., status: [200]}", raw, sec)
        checks = []
        for i, item in enumerate(raw):
            at = f"{key}[{i}]"
            if isinstance(item, str):
                item = {"path": item}
            if not isinstance(item, dict):
                self.fail(at, "a mapping {path: /..., status: [200]}", item, sec)
            self.unknown(item, {"path", "status"}, at + ".")
            path = item.get("path")
            if not isinstance(path, str) or not path.startswith("/") or any(c.isspace() for c in path):
                self.fail(f"{at}.path", "a URL path starting with /", path, item)
            status = item.get("status", [200])
            if isinstance(status, int) and not isinstance(status, bool):
                status = [status]
            if not isinstance(status, list) or not status or any(
                    isinstance(s, bool) or not isinstance(s, int) or not 100 <= s <= 599 for s in status):
                self.fail(f"{at}.status", "a list of HTTP status codes (100-599)", item.get("status"), item)
            checks.append(Check(path, tuple(status)))
        return tuple(checks)

    def databases(self, key: str, value: Any, sec: Mapping, done: dict) -> tuple[str, ...]:
        """Database paths relative to the app; each must lie under a shared path (that is where data lives)."""
        if value is None:
            return ()
        if not isinstance(value, list):
            self.fail("app.databases", "a list of SQLite file paths relative to the app, under app.shared", value,
                      sec)
        out = []
        for i, item in enumerate(value):
            rel = self.relpath(False, "a path relative to the app")(f"app.databases[{i}]", item, sec)
            shared = done["shared"]
            if not any(rel == s or rel.startswith(s.rstrip("/") + "/") for s in shared):
                self.fail(f"app.databases[{i}]", "a path under one of app.shared (" + ", ".join(shared)
                          + "): a database outside shared/ would be lost with its release", item, sec)
            out.append(rel)
        return tuple(out)

    def migrate(self, key: str, value: Any, sec: Mapping, done: dict) -> tuple[str, ...]:
        if value in (None, [], ""):
            return ()
        expected = 'a list of arguments like ["{python}", "-m", "alembic", "upgrade", "head"]'
        if not isinstance(value, list) or not all(isinstance(a, str) and a for a in value):
            self.fail("app.migrate", expected + " (a list, never a shell string)", value, sec)
        for i, arg in enumerate(value):
            try:
                fields = [f for _, f, _, _ in string.Formatter().parse(arg) if f is not None]
            except ValueError as e:
                self.fail(f"app.migrate[{i}]", f"an argument with well-formed placeholders ({e})", arg, sec)
            bad = [f for f in fields if f not in ("python", "release")]
            if bad:
                self.fail(f"app.migrate[{i}]", "placeholders among {python}, {release}", arg, sec)
        return tuple(value)

    def command(self, key: str, value: Any, sec: Mapping, done: dict) -> tuple[str, ...]:
        expected = 'a list of arguments like ["{python}", "-m", "uvicorn", "main:app", "--fd", "{fd}"]'
        if isinstance(value, str):
            self.fail(key, expected + " (a list, never a shell string)", value, sec)
        if not isinstance(value, list) or not value:
            self.fail(key, expected, value, sec)
        out = []
        for i, arg in enumerate(value):
            if isinstance(arg, bool) or not isinstance(arg, str | int | float):
                self.fail(f"{key}[{i}]", "a text argument", arg, sec)
            arg = str(arg)
            try:
                parsed = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(arg)
                          if f is not None]
            except ValueError as e:
                self.fail(f"{key}[{i}]", f"an argument with well-formed placeholders ({e}; write {{{{ for a "
                          "literal brace)", arg, sec)
            for f, spec, conv in parsed:
                if f not in PLACEHOLDERS:
                    close = difflib.get_close_matches(f, sorted(PLACEHOLDERS), n=1)
                    self.fail(f"{key}[{i}]", "placeholders among {" + "}, {".join(sorted(PLACEHOLDERS)) + "}",
                              arg, sec, hint="did you mean {" + close[0] + "}?" if close else "")
                if spec or conv:
                    self.fail(f"{key}[{i}]", "plain placeholders like {" + f + "} "
                              "(no !conversion or :format)", arg, sec)
            out.append(arg)
        if not out[0].strip():
            self.fail(f"{key}[0]", "a program to run (not empty)", value[0], sec)
        if sum(_placeholders(a).count("fd") for a in out) > 1:
            self.fail(key, "at most one {fd} placeholder", value, sec)
        return tuple(out)

    def env(self, key: str, value: Any, sec: Mapping, done: dict) -> tuple[tuple[str, str], ...]:
        if value is None:
            return ()
        if not isinstance(value, dict):
            self.fail("app.env", "a mapping of environment variable names to values", value, sec)
        out = []
        for name, v in value.items():
            if not _ENV_NAME_RE.match(name):
                self.fail(f"app.env.{name}", "an environment variable name (letters, digits, _)", name, value)
            if isinstance(v, bool):
                v = "true" if v else "false"
            if not isinstance(v, str | int | float):
                self.fail(f"app.env.{name}", "a text or number value", v, value)
            if "\x00" in str(v):
                self.fail(f"app.env.{name}", "a value without NUL characters", v, value)
            out.append((name, str(v)))
        return tuple(out)

    def shared(self, key: str, value: Any, sec: Mapping, done: dict) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            self.fail("app.shared", "a list of paths relative to the app (kept across releases)", value, sec)
        out = []
        for i, item in enumerate(value):
            out.append(self.relpath(False, "a path relative to the app")(f"app.shared[{i}]", item, sec))
        if len(set(out)) != len(out):
            twice = next(a for i, a in enumerate(out) if a in out[:i])
            self.fail("app.shared", f"paths without duplicates ({twice!r} is listed twice)", value, sec)
        for a in out:
            for b in out:
                if a != b and (b + "/").startswith(a + "/"):
                    self.fail("app.shared", f"paths that do not contain each other ({a!r} holds {b!r})",
                              value, sec)
        return tuple(out)


_FULL_DAYS = {"monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"}


def _is_remote_url(repo: str) -> bool:
    return "://" in repo or bool(re.match(r"^[\w.-]+@[\w.-]+:", repo))


def _valid_ref_name(name: str) -> bool:
    # git check-ref-format rules that matter for a branch name typed in a config
    return bool(name) and not (
        name.startswith(("-", "/")) or name.endswith(("/", ".", ".lock")) or ".." in name or "//" in name
        or "@{" in name or any(c in name for c in " ~^:?*[\\\x7f") or any(ord(c) < 32 for c in name))


def _placeholders(arg: str) -> list[str]:
    """The placeholder names in one command argument ("{{" and "}}" are literal braces)."""
    try:
        return [f for _, f, _, _ in string.Formatter().parse(arg) if f is not None]
    except ValueError:
        return []


def find_uv() -> str | None:
    """uv on PATH, or installed beside the running interpreter (a venv not on PATH)."""
    found = shutil.which("uv")
    if found:
        return found
    import sys
    beside = Path(sys.executable).parent / "uv"
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


def to_dict(cfg: Config) -> dict[str, Any]:
    """The effective configuration as plain data (what `check-config` prints)."""
    def conv(v: Any) -> Any:
        if isinstance(v, Window | Weekly):
            return v.text
        if isinstance(v, Check):
            return {"path": v.path, "status": list(v.status)}
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v
    out: dict[str, Any] = {"root": str(cfg.root), "python": cfg.python}
    for name in SECTIONS:
        sec = getattr(cfg, name)
        d = {}
        for f in sec.__dataclass_fields__:
            d[f] = conv(getattr(sec, f))
        if name == "app":
            d["env"] = {k: v for k, v in cfg.app.env}
        if name == "web":  # never print the token
            d = {"listen": {"host": d["host"], "port": d["port"]}, "token": "(set)" if d["token"] else ""}
        if name == "stage":
            d = {"listen": {"host": d["host"], "port": d["port"]}, "ttl_s": d["ttl_s"]}
        out[name] = d
    return out


def _sections() -> dict[str, type]:
    """The config's sections (`app`, `listen`, ...): the fields of Config that are dataclasses."""
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in fields(Config) if dataclasses.is_dataclass(hints[f.name])}


SECTIONS = tuple(_sections())


def _specs(cls: type) -> list[tuple[dataclasses.Field[Any], Spec]]:
    """The declared keys of a section (or of the top level), in declaration order."""
    return [(f, f.metadata["spec"]) for f in fields(cls) if "spec" in f.metadata]


def _top_keys() -> set[str]:
    return {f.name for f, _ in _specs(Config)} | set(SECTIONS)


def declared() -> dict[str, Spec]:
    """Every dotted key as YAML spells it (web.listen.host) and its declaration, in order."""
    out = {f.name: spec for f, spec in _specs(Config)}
    for name, cls in _sections().items():
        for f, spec in _specs(cls):
            out[f"{name}." + ".".join(spec.at or (f.name,))] = spec
    return out


def schema() -> dict[str, str]:
    """Every dotted key (as the dataclasses name it: web.host) and its reload rule, in declaration order."""
    out = {f.name: spec.reload for f, spec in _specs(Config)}
    for name, cls in _sections().items():
        for f, spec in _specs(cls):
            out[f"{name}.{f.name}"] = spec.reload
    return out


def reference_table() -> str:
    """README's table of every key (between its config-table markers), made from the declarations:
    `./dev docs` writes it, tests/test_readme_config.py fails when README differs."""
    short = {NOW: "at once", NEXT_UPDATE: "next update", NEXT_START: "next app start", RESTART: "daemon restart",
             WEB_RESTART: "`proto4d web` restart"}
    lines = ["| key | default | a change by SIGHUP applies | what it does |", "|---|---|---|---|"]
    for key, spec in declared().items():
        if spec.default is REQUIRED:
            default = "(required)"
        else:
            d = spec.default
            default = "`" + (d if isinstance(d, str) and d else json.dumps(d)) + "`"
        cells = (f"`{key}`", default, short[spec.reload], spec.doc)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def reload_differences(old: Config, new: Config) -> dict[str, list[str]]:
    """The keys whose value differs, grouped by when the change takes effect (RELOAD_RULES; every rule
    present, possibly empty). `root` cannot change while running; the caller refuses such a reload."""
    out: dict[str, list[str]] = {rule: [] for rule in RELOAD_RULES}
    for key, rule in schema().items():
        section, _, name = key.partition(".")
        a, b = getattr(old, section), getattr(new, section)
        if name:
            a, b = getattr(a, name), getattr(b, name)
        if a != b:
            out[rule].append(key)
    return out


def describe_reload_rules() -> str:
    """What `check-config` prints after the values: when each key takes effect on SIGHUP."""
    rules = schema()
    by_rule: dict[str, list[str]] = {rule: [] for rule in RELOAD_RULES}
    for key, rule in rules.items():
        section = key.partition(".")[0]
        whole = section in SECTIONS and all(r == rule for k, r in rules.items() if k.startswith(section + "."))
        name = f"{section}.*" if whole else key
        if name not in by_rule[rule]:
            by_rule[rule].append(name)
    lines = ["# A change sent by SIGHUP (kill -HUP) takes effect:"]
    for rule, keys in by_rule.items():
        lines.append(f"#   {RELOAD_RULES[rule]}: {', '.join(keys)}")
    return "\n".join(lines)
