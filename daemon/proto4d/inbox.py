"""The daemon's inbox: update and rollback requests, the drop-file protocol, its trust rules, answers.

`<root>/update.request` may be empty (update to the branch head) or YAML with `ref`, `force`,
`reason` (and, from `proto4d rollback`, `action: rollback` and `release`). The daemon claims
it by renaming it into `state/requests/` before reading it, so each request is acted on
exactly once; it trusts it only when it is a regular file with one link, owned by the daemon's
user, in a root directory nobody else can write. Every request gets an answer in
`state/answers/<id>.json`. The CLI side (`proto4d update`, `rollback`) is client.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from proto4d import fsutil, log
from proto4d.paths import Paths
from proto4d.states import FINAL

MAX_REQUEST_BYTES = 16 * 1024
ACTIONS = ("update", "rollback", "restart", "stage", "promote", "discard")
KNOWN_KEYS = {"id", "action", "ref", "force", "reason", "release", "requested_by", "requested_at",
              "allow_incompatible"}
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/+-]{0,199}$")
RELEASE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class RequestRejected(Exception):
    """The request is not acted on; the message says why."""


@dataclass
class Request:
    id: str
    # update | rollback | restart (the serving release again, e.g. for a new .env) | stage | promote | discard
    action: str = "update"
    ref: str | None = None
    force: bool = False
    reason: str = ""
    release: str | None = None
    requested_by: str = ""
    requested_at: float = field(default_factory=time.time)
    source: str = "file"
    # deploy a migration the previous release cannot run on (green only; its rollback restores a snapshot)
    allow_incompatible: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "action": self.action, "ref": self.ref, "force": self.force, "reason": self.reason,
                "release": self.release, "requested_by": self.requested_by, "requested_at": self.requested_at,
                "source": self.source, "allow_incompatible": self.allow_incompatible}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Request:
        return cls(id=str(d["id"]), action=d.get("action", "update"), ref=d.get("ref"), force=bool(d.get("force")),
                   reason=d.get("reason") or "", release=d.get("release"), requested_by=d.get("requested_by") or "",
                   requested_at=float(d.get("requested_at") or time.time()), source=d.get("source") or "file",
                   allow_incompatible=bool(d.get("allow_incompatible")))

    def describe(self) -> str:
        if self.action == "rollback":
            return f"rollback to {self.release or 'the previous release'}"
        if self.action == "restart":
            return "restart of the serving release"
        if self.action == "stage":
            return f"stage of {self.ref or 'the branch head'}"
        if self.action == "promote":
            return "promotion of the staged release" + (" (forced)" if self.force else "")
        if self.action == "discard":
            return "discard of the staged release"
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
    if action not in ACTIONS:
        raise RequestRejected(f"action: expected {', '.join(ACTIONS[:-1])} or {ACTIONS[-1]}, got {action!r}")
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
    if action == "restart" and req.ref:
        raise RequestRejected("ref: a restart runs the serving release again; it names no ref")
    if action in ("promote", "discard") and req.ref:
        raise RequestRejected(f"ref: {action} acts on the staged release; it names no ref (stage one with "
                              "`proto4d stage --ref REF`)")
    allow = doc.get("allow_incompatible", False)
    if not isinstance(allow, bool):
        raise RequestRejected(f"allow_incompatible: expected true or false, got {allow!r}")
    if allow and action not in ("update", "promote"):
        raise RequestRejected("allow_incompatible: only an update or a promotion carries a migration")
    req.allow_incompatible = allow
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
    """Only the daemon's user may create entries in `root`. A sticky bit is no exception: it stops
    others removing files, not adding them, and what another user adds can be a hard link to a
    daemon-owned file (an old consumed request) that passes every rule on the file itself."""
    st = os.stat(root)
    if st.st_uid != os.geteuid():
        raise RequestRejected(f"{root} is owned by uid {st.st_uid}, not by the daemon's user (uid {os.geteuid()}); "
                              "requests there are not trusted")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
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
    """The trust rules for a claimed request file, then its content (RequestRejected says why not).

    Every rule is checked on the file that is read: it is opened first (never following a symlink,
    never blocking on a fifo) and `fstat` of that descriptor decides, so nothing can be swapped in
    between the check and the read.
    """
    name = paths.request.name
    st = os.lstat(claimed)
    if stat.S_ISLNK(st.st_mode):
        raise RequestRejected(f"{name} is a symlink (to {os.readlink(claimed)}); only a regular file is accepted")
    if not stat.S_ISREG(st.st_mode):
        raise RequestRejected(f"{name} is not a regular file")
    try:
        fd = os.open(claimed, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        raise RequestRejected(f"{name} cannot be opened ({e.strerror}); only a regular file is accepted") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RequestRejected(f"{name} is not a regular file")
        if st.st_uid != os.geteuid():
            raise RequestRejected(f"{name} is owned by uid {st.st_uid}, not by the daemon's user "
                                  f"(uid {os.geteuid()})")
        if st.st_mode & stat.S_IWOTH:
            raise RequestRejected(f"{name} is world-writable; not trusted")
        if st.st_nlink != 1 and not (st.st_nlink == 2 and _is_cli_link(paths.root, st)):
            raise RequestRejected(f"{name} has {st.st_nlink} hard links; a request file has one (a hard link "
                                  "can bring back an old request)")
        check_root_trusted(paths.root)
        if st.st_size > MAX_REQUEST_BYTES:
            raise RequestRejected(f"the request file is {st.st_size} bytes; at most {MAX_REQUEST_BYTES} are accepted")
        return f.read(MAX_REQUEST_BYTES + 1)


def _is_cli_link(root: Path, st: os.stat_result) -> bool:
    """Whether the file's other link is `proto4d update`'s own temp file, which it links as
    `update.request` and then removes: the daemon can claim it in between."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(root):
            if entry.name.startswith(".update.request.") and entry.is_file(follow_symlinks=False):
                est = entry.stat(follow_symlinks=False)
                if (est.st_ino, est.st_dev) == (st.st_ino, st.st_dev):
                    return True
    return False


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
    fsutil.atomic_write_json(paths.answers / f"{req_id}.json", log.scrub_obj({
        "id": req_id, "state": state, "final": state in FINAL, "message": message, "at": time.time(), **extra}))


def read_answer(paths: Paths, req_id: str) -> dict[str, Any] | None:
    data = fsutil.read_json(paths.answers / f"{req_id}.json")
    return data if isinstance(data, dict) else None
