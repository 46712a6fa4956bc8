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


# A config key declares its rule in its dataclass field: `port: int = field(metadata=_NEXT_START)`.
_NOW, _NEXT_UPDATE, _NEXT_START, _RESTART, _WEB_RESTART = (
    {"reload": r} for r in (NOW, NEXT_UPDATE, NEXT_START, RESTART, WEB_RESTART))


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
    repo: str = field(metadata=_NEXT_UPDATE)
    branch: str = field(metadata=_NEXT_UPDATE)
    subdir: str = field(metadata=_NEXT_UPDATE)
    workdir: str = field(metadata=_NEXT_START)
    requirements: str = field(metadata=_NEXT_UPDATE)
    command: tuple[str, ...] = field(metadata=_NEXT_START)
    env: tuple[tuple[str, str], ...] = field(metadata=_NEXT_START)
    shared: tuple[str, ...] = field(metadata=_NEXT_UPDATE)
    ready_pattern: str = field(metadata=_NEXT_START)
    access_log_regex: str = field(metadata=_NOW)
    drain: str = field(metadata=_NEXT_START)
    drain_grace_s: float = field(metadata=_NEXT_START)
    stable_s: float = field(metadata=_NOW)
    max_fast_failures: int = field(metadata=_NOW)
    log_max_bytes: int = field(metadata=_NOW)
    log_backups: int = field(metadata=_NOW)
    # SQLite files to snapshot and to copy for the canary (default: found under shared/ by header)
    databases: tuple[str, ...] = field(default=(), metadata=_NEXT_UPDATE)
    # run in the new release's venv and workdir, first on the canary's copy, then live at the switch
    migrate: tuple[str, ...] = field(default=(), metadata=_NEXT_UPDATE)

    @property
    def uses_fd(self) -> bool:
        return any("fd" in _placeholders(arg) for arg in self.command)

    @property
    def uses_port(self) -> bool:
        return any("port" in _placeholders(arg) for arg in self.command)

    @property
    def env_dict(self) -> dict[str, str]:
        return dict(self.env)


@dataclass(frozen=True)
class ListenConfig:
    host: str = field(metadata=_NEXT_START)
    port: int = field(metadata=_NEXT_START)
    backlog: int = field(metadata=_RESTART)

    @property
    def probe_host(self) -> str:
        """Where the daemon itself reaches the app: a wildcard bind is probed on loopback."""
        if self.host in ("0.0.0.0", ""):
            return "127.0.0.1"
        if self.host == "::":
            return "::1"
        return self.host


@dataclass(frozen=True)
class HealthConfig:
    checks: tuple[Check, ...] = field(metadata=_NOW)
    external_url: str = field(metadata=_NOW)
    start_timeout_s: float = field(metadata=_NOW)
    timeout_s: float = field(metadata=_NOW)
    interval_s: float = field(metadata=_NOW)


@dataclass(frozen=True)
class ActivityConfig:
    interval_s: float = field(metadata=_NOW)
    window_s: float = field(metadata=_NOW)
    ignore_paths: tuple[str, ...] = field(metadata=_NOW)
    tunnel_process: str = field(metadata=_NOW)
    history_max_bytes: int = field(metadata=_NOW)


@dataclass(frozen=True)
class SafetyConfig:
    yellow_max_users: int = field(metadata=_NOW)
    quiet_for_s: float = field(metadata=_NOW)
    red_rpm: float = field(metadata=_NOW)


@dataclass(frozen=True)
class ScheduleConfig:
    timezone: str = field(metadata=_NOW)
    preferred: tuple[Window, ...] = field(metadata=_NOW)
    acceptable: tuple[Window, ...] = field(metadata=_NOW)
    avoid: tuple[Window, ...] = field(metadata=_NOW)
    weekly: Weekly | None = field(metadata=_NOW)

    @property
    def zone(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.timezone)


@dataclass(frozen=True)
class UpdateConfig:
    notice_grace_s: float = field(metadata=_NOW)
    drain_timeout_s: float = field(metadata=_NOW)
    watch_s: float = field(metadata=_NOW)
    keep_days: float = field(metadata=_NOW)
    keep_min: int = field(metadata=_NOW)
    max_5xx_ratio: float = field(metadata=_NOW)
    min_free_mb: int = field(metadata=_NOW)
    installer: str = field(metadata=_NOW)
    canary: bool = field(metadata=_NOW)
    migrate_timeout_s: float = field(default=300, metadata=_NOW)
    # a migration the previous release cannot run on goes on only when asked (or this is true)
    allow_incompatible: bool = field(default=False, metadata=_NOW)
    # 5xx answers, and distinct clients that got one, before the ratio can roll back
    min_5xx_count: int = field(default=5, metadata=_NOW)
    min_5xx_clients: int = field(default=2, metadata=_NOW)
    # promotion in place: auto = the verified canary takes the shared socket when the data rule allows
    # (update.py: _two_starts_because); live = also with databases, when no migration is pending (the
    # canary then runs on production's data, after a snapshot); never = every release starts twice
    promote: str = field(default="auto", metadata=_NOW)


@dataclass(frozen=True)
class NotifyConfig:
    notice_file: str = field(metadata=_NOW)
    webhook_url: str = field(metadata=_NOW)
    webhook_timeout_s: float = field(metadata=_NOW)


@dataclass(frozen=True)
class WebConfig:
    """`proto4d web`: where the status page and /metrics listen; a token for any non-loopback address."""
    host: str = field(default="127.0.0.1", metadata=_WEB_RESTART)
    port: int = field(default=8099, metadata=_WEB_RESTART)
    token: str = field(default="", metadata=_WEB_RESTART)


@dataclass(frozen=True)
class Config:
    source: str
    root: Path = field(metadata=_RESTART)
    python: str = field(metadata=_NEXT_UPDATE)
    app: AppConfig
    listen: ListenConfig
    health: HealthConfig
    activity: ActivityConfig
    safety: SafetyConfig
    schedule: ScheduleConfig
    update: UpdateConfig
    notify: NotifyConfig
    web: WebConfig = WebConfig()
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
               strict_min: bool = False, unit: str = "") -> Callable[[str, Any, Mapping], Any]:
        def check(key: str, value: Any, sec: Mapping) -> Any:
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

    def text(self, allow_empty: bool = True, what: str = "text") -> Callable[[str, Any, Mapping], str]:
        def check(key: str, value: Any, sec: Mapping) -> str:
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

    def boolean(self, key: str, value: Any, sec: Mapping) -> bool:
        if not isinstance(value, bool):
            self.fail(key, "true or false", value, sec)
        return value

    def relpath(self, allow_empty: bool = True, what: str = "a relative path",
                inside: str = "the release") -> Callable[[str, Any, Mapping], str]:
        def check(key: str, value: Any, sec: Mapping) -> str:
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

    def window_list(self, key: str, value: Any, sec: Mapping) -> tuple[Window, ...]:
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

    def weekly(self, key: str, value: Any, sec: Mapping) -> Weekly | None:
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

    def url(self, allow_empty: bool = True) -> Callable[[str, Any, Mapping], str]:
        def check(key: str, value: Any, sec: Mapping) -> str:
            value = self.text(allow_empty, "an http:// or https:// URL")(key, value, sec).strip()
            if not value:
                return ""
            if not re.match(r"^https?://[^\s/]+", value) or any(c.isspace() for c in value):
                self.fail(key, "an http:// or https:// URL", value, sec)
            return value
        return check

    # -- sections

    def build(self, doc: dict) -> Config:
        self.unknown(doc, _top_keys(), "")
        if "root" not in doc:
            self.fail("root", "missing; expected a directory where proto4d keeps its state "
                      "(this key is required)")
        root_text = self.text(False, "a directory path")("root", doc["root"], doc)
        root = self.abspath(root_text)
        if root == Path("/"):
            self.fail("root", "a directory of its own, not the filesystem root", root_text, doc)
        if root.exists() and not root.is_dir():
            self.fail("root", "a directory (this path exists and is not one)", root_text, doc)
        python = self.text(False, "a Python interpreter: a command on PATH or a path")(
            "python", doc.get("python", "python3"), doc)
        python = self.python(python, doc)

        app = self.app(doc)
        listen = self.listen(doc)
        health = self.health(doc)
        activity = self.activity(doc)
        safety = self.safety(doc)
        schedule = self.schedule(doc)
        update = self.update(doc)
        notify = self.notify(doc)
        return Config(self.file, root, python, app, listen, health, activity, safety, schedule, update,
                      notify, self.web(doc), raw=doc)

    def abspath(self, text: str) -> Path:
        p = Path(os.path.expanduser(text))
        if not p.is_absolute():
            p = self.base_dir / p
        return Path(os.path.normpath(p))

    def python(self, value: str, doc: Mapping) -> str:
        if "/" in value:
            p = self.abspath(value)
            if not (p.is_file() and os.access(p, os.X_OK)):
                self.fail("python", "an executable Python interpreter", value, doc)
            return str(p)
        found = shutil.which(value)
        if not found:
            self.fail("python", "a Python interpreter found on PATH", value, doc)
        return value

    def app(self, doc: dict) -> AppConfig:
        sec = self.section(doc, "app", _keys(AppConfig), required=True)
        p = "app."
        if "repo" not in sec:
            self.fail("app.repo", "missing; expected a git URL or a local path to the app's repository "
                      "(this key is required)")
        repo = self.text(False, "a git URL or a local path")("app.repo", sec["repo"], sec).strip()
        if not _is_remote_url(repo):
            repo = str(self.abspath(repo))
        branch = self.text(False, "a branch name")("app.branch", sec.get("branch", "main"), sec).strip()
        if not _valid_ref_name(branch):
            self.fail("app.branch", "a git branch name", branch, sec)
        subdir = self.get(sec, p, "subdir", "", self.relpath())
        workdir = self.get(sec, p, "workdir", "", self.relpath())
        requirements = self.get(sec, p, "requirements", "", self.relpath(what="a requirements file path"))
        command = self.command(sec.get("command", _DEFAULT_COMMAND), sec)
        env = self.env(sec.get("env", {}), sec)
        shared = self.shared(sec.get("shared", []), sec)
        ready = self.get(sec, p, "ready_pattern", r"Uvicorn running on|Listening at:", self.text(False))
        self.regex("app.ready_pattern", ready, sec)
        alr = self.get(sec, p, "access_log_regex", "", self.text())
        if alr:
            compiled = self.regex("app.access_log_regex", alr, sec)
            missing = {"client", "method", "path", "status"} - set(compiled.groupindex)
            if missing:
                self.fail("app.access_log_regex", "a regex with the named groups client, method, path and "
                          f"status (missing: {', '.join(sorted(missing))})", alr, sec)
        drain = self.get(sec, p, "drain", "auto", self.text(False))
        if drain not in ("auto", "shim", "sigterm"):
            self.fail("app.drain", "one of auto, shim, sigterm", drain, sec)
        return AppConfig(
            repo=repo, branch=branch, subdir=subdir, workdir=workdir, requirements=requirements,
            command=command, env=env, shared=shared, ready_pattern=ready, access_log_regex=alr, drain=drain,
            drain_grace_s=self.get(sec, p, "drain_grace_s", 1.0, self.number(0, 30, unit="seconds")),
            stable_s=self.get(sec, p, "stable_s", 60, self.number(1, 3600, unit="seconds")),
            max_fast_failures=self.get(sec, p, "max_fast_failures", 5, self.number(1, 100, integer=True)),
            log_max_bytes=self.get(sec, p, "log_max_bytes", 10 << 20,
                                   self.number(4096, 1 << 34, integer=True, unit="bytes")),
            log_backups=self.get(sec, p, "log_backups", 5, self.number(0, 100, integer=True)),
            databases=self.databases(sec.get("databases", []), sec, shared),
            migrate=self.migrate(sec.get("migrate", []), sec),
        )

    def databases(self, value: Any, sec: Mapping, shared: tuple[str, ...]) -> tuple[str, ...]:
        """Database paths relative to the app; each must lie under a shared path (that is where data lives)."""
        if value is None:
            return ()
        if not isinstance(value, list):
            self.fail("app.databases", "a list of SQLite file paths relative to the app, under app.shared", value,
                      sec)
        out = []
        for i, item in enumerate(value):
            rel = self.relpath(False, "a path relative to the app")(f"app.databases[{i}]", item, sec)
            if not any(rel == s or rel.startswith(s.rstrip("/") + "/") for s in shared):
                self.fail(f"app.databases[{i}]", "a path under one of app.shared (" + ", ".join(shared)
                          + "): a database outside shared/ would be lost with its release", item, sec)
            out.append(rel)
        return tuple(out)

    def migrate(self, value: Any, sec: Mapping) -> tuple[str, ...]:
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

    def regex(self, key: str, value: str, sec: Mapping) -> re.Pattern[str]:
        try:
            return re.compile(value)
        except re.error as e:
            self.fail(key, f"a valid regular expression ({e})", value, sec)
        raise AssertionError  # unreachable

    def command(self, value: Any, sec: Mapping) -> tuple[str, ...]:
        key = "app.command"
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

    def env(self, value: Any, sec: Mapping) -> tuple[tuple[str, str], ...]:
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

    def shared(self, value: Any, sec: Mapping) -> tuple[str, ...]:
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

    def listen(self, doc: dict) -> ListenConfig:
        sec = self.section(doc, "listen", _keys(ListenConfig))
        host = self.get(sec, "listen.", "host", "0.0.0.0", self.text(False, "an IP address"))
        if host != "localhost":
            try:
                ipaddress.ip_address(host)
            except ValueError:
                self.fail("listen.host", "an IP address such as 0.0.0.0 or 127.0.0.1 (or localhost)",
                          host, sec)
        else:
            host = "127.0.0.1"
        port = self.get(sec, "listen.", "port", 8000, self.number(1, 65535, integer=True))
        backlog = self.get(sec, "listen.", "backlog", 2048, self.number(1, 65535, integer=True))
        return ListenConfig(host, port, backlog)

    def health(self, doc: dict) -> HealthConfig:
        sec = self.section(doc, "health", _keys(HealthConfig))
        raw = sec.get("checks", None)
        checks: list[Check] = []
        if raw is None:
            checks = [Check("/health", (200,))]
        else:
            if not isinstance(raw, list) or not raw:
                self.fail("health.checks", "a non-empty list of {path: /..., status: [200]}", raw, sec)
            for i, item in enumerate(raw):
                key = f"health.checks[{i}]"
                if isinstance(item, str):
                    item = {"path": item}
                if not isinstance(item, dict):
                    self.fail(key, "a mapping {path: /..., status: [200]}", item, sec)
                self.unknown(item, {"path", "status"}, key + ".")
                path = item.get("path")
                if not isinstance(path, str) or not path.startswith("/") or any(c.isspace() for c in path):
                    self.fail(f"{key}.path", "a URL path starting with /", path, item)
                status = item.get("status", [200])
                if isinstance(status, int) and not isinstance(status, bool):
                    status = [status]
                if not isinstance(status, list) or not status or any(
                        isinstance(s, bool) or not isinstance(s, int) or not 100 <= s <= 599 for s in status):
                    self.fail(f"{key}.status", "a list of HTTP status codes (100-599)", item.get("status"),
                              item)
                checks.append(Check(path, tuple(status)))
        return HealthConfig(
            checks=tuple(checks),
            external_url=self.get(sec, "health.", "external_url", "", self.url()),
            start_timeout_s=self.get(sec, "health.", "start_timeout_s", 60,
                                     self.number(0, 3600, strict_min=True, unit="seconds")),
            timeout_s=self.get(sec, "health.", "timeout_s", 5,
                               self.number(0, 300, strict_min=True, unit="seconds")),
            interval_s=self.get(sec, "health.", "interval_s", 10,
                                self.number(0, 3600, strict_min=True, unit="seconds")),
        )

    def activity(self, doc: dict) -> ActivityConfig:
        sec = self.section(doc, "activity", _keys(ActivityConfig))
        p = "activity."
        interval = self.get(sec, p, "interval_s", 5, self.number(0.1, 3600, unit="seconds"))
        window = self.get(sec, p, "window_s", 300, self.number(1, 86400, unit="seconds"))
        if window < interval:
            self.fail("activity.window_s", f"a window at least as long as activity.interval_s ({interval:g})",
                      window, sec)
        ignore = sec.get("ignore_paths", ["/health"])
        if ignore is None:
            ignore = []
        if not isinstance(ignore, list) or any(not isinstance(x, str) or not x.startswith("/")
                                               for x in ignore):
            self.fail("activity.ignore_paths", "a list of URL paths starting with /", ignore, sec)
        return ActivityConfig(
            interval_s=interval, window_s=window, ignore_paths=tuple(ignore),
            tunnel_process=self.get(sec, p, "tunnel_process", "cloudflared", self.text()).strip(),
            history_max_bytes=self.get(sec, p, "history_max_bytes", 5 << 20,
                                       self.number(4096, 1 << 32, integer=True, unit="bytes")),
        )

    def safety(self, doc: dict) -> SafetyConfig:
        sec = self.section(doc, "safety", _keys(SafetyConfig))
        return SafetyConfig(
            yellow_max_users=self.get(sec, "safety.", "yellow_max_users", 2,
                                      self.number(0, 10000, integer=True)),
            quiet_for_s=self.get(sec, "safety.", "quiet_for_s", 120, self.number(0, 86400, unit="seconds")),
            red_rpm=self.get(sec, "safety.", "red_rpm", 600, self.number(0, 1e9, unit="requests per minute")),
        )

    def schedule(self, doc: dict) -> ScheduleConfig:
        sec = self.section(doc, "schedule", _keys(ScheduleConfig))
        tz = self.get(sec, "schedule.", "timezone", "UTC", self.text(False, "an IANA time zone"))
        try:
            if tz != tz.strip() or ".." in tz or tz.startswith("/"):
                raise ValueError
            zoneinfo.ZoneInfo(tz)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
            close = difflib.get_close_matches(tz, sorted(zoneinfo.available_timezones()), n=1)
            hint = f"did you mean {close[0]}?" if close else ""
            self.fail("schedule.timezone", "an IANA time zone like Asia/Seoul", tz, sec, hint=hint)
        return ScheduleConfig(
            timezone=tz,
            preferred=self.window_list("schedule.preferred", sec.get("preferred"), sec),
            acceptable=self.window_list("schedule.acceptable", sec.get("acceptable"), sec),
            avoid=self.window_list("schedule.avoid", sec.get("avoid"), sec),
            weekly=self.weekly("schedule.weekly", sec.get("weekly"), sec),
        )

    def update(self, doc: dict) -> UpdateConfig:
        sec = self.section(doc, "update", _keys(UpdateConfig))
        p = "update."
        installer = self.get(sec, p, "installer", "auto", self.text(False))
        if installer not in ("auto", "uv", "pip"):
            self.fail("update.installer", "one of auto, uv, pip", installer, sec)
        if installer == "uv" and not find_uv():
            self.fail("update.installer", "an installer that exists here: uv was not found "
                      "(pip install uv, or use auto)", installer, sec)
        promote = self.get(sec, p, "promote", "auto", self.text(False))
        if promote not in PROMOTE_MODES:
            self.fail("update.promote", "one of " + ", ".join(PROMOTE_MODES), promote, sec)
        return UpdateConfig(
            promote=promote,
            notice_grace_s=self.get(sec, p, "notice_grace_s", 300, self.number(0, 86400, unit="seconds")),
            drain_timeout_s=self.get(sec, p, "drain_timeout_s", 60,
                                     self.number(0, 3600, strict_min=True, unit="seconds")),
            watch_s=self.get(sec, p, "watch_s", 120, self.number(0, 86400, unit="seconds")),
            keep_days=self.get(sec, p, "keep_days", 7, self.number(0, 3650, unit="days")),
            keep_min=self.get(sec, p, "keep_min", 3, self.number(1, 1000, integer=True)),
            max_5xx_ratio=self.get(sec, p, "max_5xx_ratio", 0.2, self.number(0, 1)),
            min_free_mb=self.get(sec, p, "min_free_mb", 200,
                                 self.number(0, 1 << 30, integer=True, unit="MB")),
            installer=installer,
            canary=self.get(sec, p, "canary", True, self.boolean),
            migrate_timeout_s=self.get(sec, p, "migrate_timeout_s", 300,
                                       self.number(1, 86400, unit="seconds")),
            allow_incompatible=self.get(sec, p, "allow_incompatible", False, self.boolean),
            min_5xx_count=self.get(sec, p, "min_5xx_count", 5, self.number(1, 1 << 20, integer=True)),
            min_5xx_clients=self.get(sec, p, "min_5xx_clients", 2, self.number(1, 1 << 20, integer=True)),
        )

    def notify(self, doc: dict) -> NotifyConfig:
        sec = self.section(doc, "notify", _keys(NotifyConfig))
        notice = self.get(sec, "notify.", "notice_file", "notice.json",
                          self.relpath(False, "a file path", inside="root"))
        return NotifyConfig(
            notice_file=notice,
            webhook_url=self.get(sec, "notify.", "webhook_url", "", self.url()),
            webhook_timeout_s=self.get(sec, "notify.", "webhook_timeout_s", 3,
                                       self.number(0, 60, strict_min=True, unit="seconds")),
        )

    def web(self, doc: dict) -> WebConfig:
        sec = self.section(doc, "web", {"listen", "token"})
        listen = sec.get("listen", {})
        if not isinstance(listen, dict):
            self.fail("web.listen", "a mapping {host: 127.0.0.1, port: 8099}", listen, sec)
        self.unknown(listen, {"host", "port"}, "web.listen.")
        host = self.get(listen, "web.listen.", "host", "127.0.0.1", self.text(False, "an IP address"))
        if host == "localhost":
            host = "127.0.0.1"
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            self.fail("web.listen.host", "an IP address such as 127.0.0.1 (or localhost)", host, listen)
        port = self.get(listen, "web.listen.", "port", 8099, self.number(1, 65535, integer=True))
        token = self.get(sec, "web.", "token", "", self.text(True, "a string of at least 16 characters"))
        if token and (len(token) < 16 or any(c.isspace() for c in token)):
            self.fail("web.token", "at least 16 characters without spaces (e.g. from `openssl rand -hex 16`)",
                      "(hidden)", sec)
        if not loopback and not token:
            self.fail("web.token", f"a token (at least 16 characters): required because web.listen.host {host} "
                      "is not a loopback address (or keep 127.0.0.1 and reach it through an SSH forward)")
        return WebConfig(host, port, token)


_DEFAULT_COMMAND = ["{python}", "-m", "uvicorn", "main:app", "--fd", "{fd}"]
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
    for name in ("app", "listen", "health", "activity", "safety", "schedule", "update", "notify", "web"):
        sec = getattr(cfg, name)
        d = {}
        for f in sec.__dataclass_fields__:
            d[f] = conv(getattr(sec, f))
        if name == "app":
            d["env"] = {k: v for k, v in cfg.app.env}
        if name == "web":  # never print the token
            d = {"listen": {"host": d["host"], "port": d["port"]}, "token": "(set)" if d["token"] else ""}
        out[name] = d
    return out


def _sections() -> dict[str, type]:
    """The config's sections (`app`, `listen`, ...): the fields of Config that are dataclasses."""
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in fields(Config) if dataclasses.is_dataclass(hints[f.name])}


SECTIONS = tuple(_sections())


def _keys(cls: type) -> set[str]:
    """The keys a section accepts: its fields."""
    return {f.name for f in fields(cls)}


def _top_keys() -> set[str]:
    return {f.name for f in fields(Config) if f.name not in ("source", "raw")}


def schema() -> dict[str, str]:
    """Every dotted key and its reload rule, in declaration order (a key that declares none: RESTART)."""
    out: dict[str, str] = {}
    sections = _sections()
    for f in fields(Config):
        if f.name in sections:
            for sub in fields(sections[f.name]):
                out[f"{f.name}.{sub.name}"] = sub.metadata.get("reload", RESTART)
        elif f.name in _top_keys():
            out[f.name] = f.metadata.get("reload", RESTART)
    return out


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
