"""`proto4d update`, `rollback`, `restart`, `stage`, `promote`, `discard`: write a request file for the
daemon and follow its answer.

The request is validated here with the daemon's own parser (inbox.parse), dropped without ever
clobbering one the daemon has not picked up, announced with SIGUSR2, and followed through
`state/answers/<id>.json` (and the update log with `--wait`). What the daemon wrote is shown
through textsafe: an answer or a log line can hold text that came from the app.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import secrets
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from proto4d.inbox import RequestRejected, new_id, parse, read_answer
from proto4d.paths import Paths
from proto4d.textsafe import safe_text


def _request(args: argparse.Namespace, action: str, *, force: bool = False) -> int:
    """The request document of `action` from the options its command has (--ref, --force, --reason,
    RELEASE, --allow-incompatible); `force`: the action never waits for a quiet moment."""
    doc: dict[str, Any] = {"action": action}
    if force or getattr(args, "force", False):
        doc["force"] = True
    for key in ("ref", "release", "reason"):
        if getattr(args, key, None):
            doc[key] = getattr(args, key)
    if getattr(args, "allow_incompatible", False):
        doc["allow_incompatible"] = True
    return _submit(args, doc)


def cmd_update(args: argparse.Namespace) -> int:
    return _request(args, "update")


def cmd_restart(args: argparse.Namespace) -> int:
    return _request(args, "restart", force=True)


def cmd_rollback(args: argparse.Namespace) -> int:
    return _request(args, "rollback", force=True)


def cmd_stage(args: argparse.Namespace) -> int:
    return _request(args, "stage")


def cmd_promote(args: argparse.Namespace) -> int:
    return _request(args, "promote")


def cmd_discard(args: argparse.Namespace) -> int:
    return _request(args, "discard", force=True)


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
                print(safe_text(f"{state}: {answer.get('message', '')}"))
                shown_state = state
            if wait and answer.get("log") and log_path is None:
                log_path = paths.root / answer["log"]
            if wait and log_path is not None:
                log_pos = _print_new(log_path, log_pos)
            if answer.get("final"):
                if wait:
                    if log_path is not None:
                        _print_new(log_path, log_pos)
                    print(safe_text(f"{state}: {answer.get('message', '')}"))
                if (state == "done" and answer.get("verified", True)) or state == "staged":
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
    sys.stdout.write(safe_text(chunk[: end + 1].decode("utf-8", "replace"), multiline=True))
    sys.stdout.flush()
    return pos + end + 1
