"""Update and rollback requests: the drop-file protocol, its trust rules, and the CLI that writes it.

`<root>/update.request` may be empty (update to the branch head) or YAML with `ref`, `force`,
`reason` (and, from `proto4d rollback`, `action: rollback` and `release`). The daemon claims
it by renaming it into `state/requests/` before reading it, so each request is acted on
exactly once; it trusts it only when it is a regular file owned by the daemon's user in a
root directory nobody else can write. Every request gets an answer in `state/answers/<id>.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import re
import secrets
import signal
import socket
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from proto4d import fsutil
from proto4d.paths import Paths
from proto4d.states import FINAL

MAX_REQUEST_BYTES = 16 * 1024
KNOWN_KEYS = {"id", "action", "ref", "force", "reason", "release", "requested_by", "requested_at"}
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/+-]{0,199}$")
RELEASE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class RequestRejected(Exception):
    """The request is not acted on; the message says why."""


@dataclass
class Request:
    id: str
    action: str = "update"  # update | rollback
    ref: str | None = None
    force: bool = False
    reason: str = ""
    release: str | None = None
    requested_by: str = ""
    requested_at: float = field(default_factory=time.time)
    source: str = "file"

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "action": self.action, "ref": self.ref, "force": self.force, "reason": self.reason,
                "release": self.release, "requested_by": self.requested_by, "requested_at": self.requested_at,
                "source": self.source}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Request:
        return cls(id=str(d["id"]), action=d.get("action", "update"), ref=d.get("ref"), force=bool(d.get("force")),
                   reason=d.get("reason") or "", release=d.get("release"), requested_by=d.get("requested_by") or "",
                   requested_at=float(d.get("requested_at") or time.time()), source=d.get("source") or "file")

    def describe(self) -> str:
        if self.action == "rollback":
            return f"rollback to {self.release or 'the previous release'}"
        return f"update to {self.ref or 'the branch head'}" + (" (forced)" if self.force else "")


def new_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def parse(data: bytes, *, fallback_id: str, source: str = "file") -> Request:
    """Pure: the bytes of a request file -> Request, or RequestRejected with the reason."""
    if len(data) > MAX_REQUEST_BYTES:
        raise RequestRejected(f"the request file is {len(data)} bytes; at most {MAX_REQUEST_BYTES} are accepted")
    if b"\x00" in data:
        raise RequestRejected("the request file is binary (contains NUL bytes); expected empty or YAML")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestRejected("the request file is not UTF-8 text; expected empty or YAML") from None
    if not text.strip():
        return Request(id=fallback_id, source=source)
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RequestRejected(f"the request file is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if doc is None:
        return Request(id=fallback_id, source=source)
    if not isinstance(doc, dict):
        raise RequestRejected("the request file must be empty or a YAML mapping with ref/force/reason")
    raw = _top_level_texts(text)
    unknown = sorted(str(k) for k in doc if k not in KNOWN_KEYS)
    if unknown:
        raise RequestRejected(f"unknown key(s) in the request file: {', '.join(unknown)} "
                              f"(known: {', '.join(sorted(KNOWN_KEYS))})")
    req = Request(id=fallback_id, source=source)
    if "id" in doc:
        if not isinstance(doc["id"], str) or not ID_RE.match(doc["id"]):
            raise RequestRejected("id: expected letters, digits, '-', '_' or '.' (at most 64)")
        req.id = doc["id"]
    action = doc.get("action", "update")
    if action not in ("update", "rollback"):
        raise RequestRejected(f"action: expected update or rollback, got {action!r}")
    req.action = action
    ref = doc.get("ref")
    if ref is not None:
        if not isinstance(ref, str | bool) and isinstance(raw.get("ref"), str):
            # YAML 1.1 reads `0777123` (a commit) as octal 262739, `1.10` (a tag) as 1.1, `2026-01-01` as
            # a date: the ref is the text as written.
            ref = raw["ref"]
        if not isinstance(ref, str) or not REF_RE.match(ref) or ".." in ref or ref.endswith((".lock", "/")):
            raise RequestRejected(f"ref: expected a branch, tag or commit name, got {ref!r}")
        req.ref = ref
    force = doc.get("force", False)
    if not isinstance(force, bool):
        raise RequestRejected(f"force: expected true or false, got {force!r}")
    req.force = force
    reason = doc.get("reason", "")
    if reason is None:
        reason = ""
    if not isinstance(reason, str) or len(reason) > 500:
        raise RequestRejected("reason: expected text of at most 500 characters")
    req.reason = reason.replace("\n", " ").strip()
    release = doc.get("release")
    if release is not None:
        if action != "rollback":
            raise RequestRejected("release: only a rollback request names a release (use ref for an update)")
        if not isinstance(release, str) or not RELEASE_NAME_RE.match(release):
            raise RequestRejected(f"release: expected a release name, got {release!r}")
        req.release = release
    if action == "rollback" and req.ref:
        raise RequestRejected("ref: a rollback request names a release, not a ref")
    by = doc.get("requested_by", "")
    if isinstance(by, str):
        req.requested_by = by[:200]
    return req


def _top_level_texts(text: str) -> dict[str, str | None]:
    """The top-level keys as written: key -> the plain text of its scalar value (None for a list or
    mapping). Refuses a key given twice (YAML would silently keep the last)."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    out: dict[str, str | None] = {}
    lines: dict[str, int] = {}
    for key_node, value_node in node.value if isinstance(node, yaml.MappingNode) else ():
        if not isinstance(key_node, yaml.ScalarNode):
            continue
        key, line = key_node.value, key_node.start_mark.line + 1
        if key in out:
            raise RequestRejected(f"{key}: given twice (lines {lines[key]} and {line}); give each key once")
        out[key] = value_node.value if isinstance(value_node, yaml.ScalarNode) else None
        lines[key] = line
    return out


def check_root_trusted(root: Path) -> None:
    st = os.stat(root)
    if st.st_uid != os.geteuid():
        raise RequestRejected(f"{root} is owned by uid {st.st_uid}, not by the daemon's user (uid {os.geteuid()}); "
                              "requests there are not trusted")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise RequestRejected(f"{root} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
                              "requests there are not trusted: chmod go-w it")


def claim(paths: Paths) -> tuple[Path, bytes] | None:
    """Take `update.request` if there is one: rename it into state/requests/, then vet and read it.

    Returns (claimed path, content) or None when there is no request; raises RequestRejected
    (after the claim, so a bad file is consumed once and reported once: it is set aside as
    `*.rejected`, never read again, not even by the next daemon).
    """
    fsutil.ensure_dir(paths.requests)
    target = paths.requests / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}.request"
    try:
        os.rename(paths.request, target)
    except FileNotFoundError:
        return None
    try:
        return target, vet(paths, target)
    except RequestRejected:
        set_aside(target)
        raise


def vet(paths: Paths, claimed: Path) -> bytes:
    """The trust rules for a claimed request file, then its content (RequestRejected says why not)."""
    st = os.lstat(claimed)
    if stat.S_ISLNK(st.st_mode):
        raise RequestRejected(f"{paths.request.name} is a symlink (to {os.readlink(claimed)}); only a regular file "
                              "is accepted")
    if not stat.S_ISREG(st.st_mode):
        raise RequestRejected(f"{paths.request.name} is not a regular file")
    if st.st_uid != os.geteuid():
        raise RequestRejected(f"{paths.request.name} is owned by uid {st.st_uid}, not by the daemon's user "
                              f"(uid {os.geteuid()})")
    if st.st_mode & stat.S_IWOTH:
        raise RequestRejected(f"{paths.request.name} is world-writable; not trusted")
    check_root_trusted(paths.root)
    if st.st_size > MAX_REQUEST_BYTES:
        raise RequestRejected(f"the request file is {st.st_size} bytes; at most {MAX_REQUEST_BYTES} are accepted")
    fd = os.open(claimed, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        return f.read(MAX_REQUEST_BYTES + 1)


def set_aside(claimed: Path) -> None:
    """A rejected request file is kept (for the operator) under a name nothing reads again."""
    with contextlib.suppress(OSError):
        os.rename(claimed, f"{claimed}.rejected")


def prune_consumed(paths: Paths, keep: int = 100) -> None:
    for d in (paths.requests, paths.answers):
        if not d.is_dir():
            continue
        entries = sorted(d.iterdir(), key=lambda p: p.stat().st_mtime if p.exists() else 0)
        for old in entries[:-keep]:
            with contextlib.suppress(OSError):
                fsutil.remove_tree(old)  # a rejected `update.request` may be a directory


def write_answer(paths: Paths, req_id: str, state: str, message: str, **extra: Any) -> None:
    fsutil.atomic_write_json(paths.answers / f"{req_id}.json", {
        "id": req_id, "state": state, "final": state in FINAL, "message": message, "at": time.time(), **extra})


def read_answer(paths: Paths, req_id: str) -> dict[str, Any] | None:
    data = fsutil.read_json(paths.answers / f"{req_id}.json")
    return data if isinstance(data, dict) else None


# --------------------------------------------------------------------------- CLI


def cmd_update(args: argparse.Namespace) -> int:
    doc: dict[str, Any] = {"action": "update"}
    if args.ref:
        doc["ref"] = args.ref
    if args.force:
        doc["force"] = True
    if args.reason:
        doc["reason"] = args.reason
    return _submit(args, doc)


def cmd_rollback(args: argparse.Namespace) -> int:
    doc: dict[str, Any] = {"action": "rollback", "force": True}
    if args.release:
        doc["release"] = args.release
    if args.reason:
        doc["reason"] = args.reason
    return _submit(args, doc)


def _submit(args: argparse.Namespace, doc: dict[str, Any]) -> int:
    from proto4d import config as configmod
    from proto4d import views

    cfg = configmod.load(args.config)
    paths = Paths(cfg.root)
    doc["id"] = new_id()
    try:
        doc["requested_by"] = f"{getpass.getuser()}@{socket.gethostname()}"
    except Exception:
        doc["requested_by"] = "unknown"
    # Validate with the daemon's own parser so a mistake is reported here, not in the daemon's log.
    try:
        req = parse(yaml.safe_dump(doc).encode(), fallback_id=doc["id"])
    except RequestRejected as e:
        print(f"proto4d: {e}", file=sys.stderr)
        return 2
    if not paths.root.is_dir():
        print(f"proto4d: {paths.root} does not exist: has the daemon ever run with this config ({cfg.source})?",
              file=sys.stderr)
        return 1
    daemon = views.daemon_alive(paths)
    try:
        _drop(paths, yaml.safe_dump(doc, sort_keys=False).encode(), daemon_running=daemon is not None)
    except OSError as e:
        print(f"proto4d: cannot write {paths.request}: {e.strerror or e}", file=sys.stderr)
        return 1
    except TimeoutError as e:
        print(f"proto4d: {e}", file=sys.stderr)
        return 1
    print(f"requested: {req.describe()} (id {req.id})")
    if daemon is None:
        print(f"warning: the daemon is not running for {paths.root}; the request waits in {paths.request.name} "
              "until it starts", file=sys.stderr)
        return 0 if not args.wait else 1
    with contextlib.suppress(OSError):
        os.kill(daemon, signal.SIGUSR2)  # "look at the request file now"; the daemon polls it anyway
    return follow(paths, req.id, wait=args.wait, timeout=args.timeout)


def _drop(paths: Paths, data: bytes, daemon_running: bool) -> None:
    """Write the request file without ever clobbering one the daemon has not picked up yet."""
    tmp = paths.root / f".update.request.{os.getpid()}.{secrets.token_hex(3)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        deadline = time.monotonic() + (15 if daemon_running else 0)
        while True:
            try:
                os.link(tmp, paths.request)  # fails if a request is already waiting
                return
            except FileExistsError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"another request is waiting in {paths.request} and the daemon has not "
                                       "picked it up; try again in a moment") from None
                time.sleep(0.1)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def follow(paths: Paths, req_id: str, *, wait: bool, timeout: float | None) -> int:
    """Print the request's progress; without `wait`, only until the daemon has accepted it."""
    deadline = time.monotonic() + timeout if timeout else None
    accept_deadline = time.monotonic() + 30
    shown_state = None
    log_pos = 0
    log_path: Path | None = None
    while True:
        answer = read_answer(paths, req_id)
        if answer is not None:
            state = answer.get("state")
            if state != shown_state and not wait:
                print(f"{state}: {answer.get('message', '')}")
                shown_state = state
            if wait and answer.get("log") and log_path is None:
                log_path = paths.root / answer["log"]
            if wait and log_path is not None:
                log_pos = _print_new(log_path, log_pos)
            if answer.get("final"):
                if wait:
                    if log_path is not None:
                        _print_new(log_path, log_pos)
                    print(f"{state}: {answer.get('message', '')}")
                if state == "done" and answer.get("verified", True):
                    return 0
                return 1
            if not wait and state in ("accepted", "queued"):
                return 0
        elif time.monotonic() > accept_deadline:
            print("proto4d: the daemon has not answered in 30 s (is it running? see `proto4d status`)",
                  file=sys.stderr)
            return 1
        if deadline is not None and time.monotonic() > deadline:
            print(f"proto4d: stopped following after {timeout:g} s; the operation goes on (see `proto4d status`)",
                  file=sys.stderr)
            return 1
        time.sleep(0.2)


def _print_new(path: Path, pos: int) -> int:
    """Print whole lines appended to `path` since byte `pos`; return the new position."""
    try:
        with open(path, "rb") as f:
            f.seek(pos)
            chunk = f.read()
    except OSError:
        return pos
    end = chunk.rfind(b"\n")
    if end < 0:
        return pos
    sys.stdout.write(chunk[: end + 1].decode("utf-8", "replace"))
    sys.stdout.flush()
    return pos + end + 1
