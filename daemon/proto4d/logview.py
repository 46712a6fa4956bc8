"""`proto4d logs`: the app's output, the daemon's events as readable lines, one update's story; -f follows.

Reads the files under `root/logs` only. Following survives rotation: when the name points at a
new file (app.log and proto4d.log are rotated by renaming), the old one is read to its end and
the new one from its start. Control characters from the app never reach the terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from proto4d import config as configmod
from proto4d import fsutil
from proto4d.paths import Paths

EX_OK, EX_FAILED = 0, 1
POLL_S = 0.25
UPDATE_LOG = re.compile(r"^update_\d{8}_\d{6}(?:_\d+)?\.log$")
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def plain(text: str) -> str:
    """`text` without escape sequences or control characters (tab and newline stay)."""
    return _CONTROL.sub("", text)


def event_line(raw: str) -> str:
    """One JSON line of proto4d.log as the readable line the daemon prints on stderr."""
    try:
        event = json.loads(raw)
    except ValueError:
        return raw
    if not isinstance(event, dict):
        return raw
    ts = str(event.pop("timestamp", ""))[:19].replace("T", " ")
    level = str(event.pop("level", "info"))
    name = str(event.pop("event", ""))
    event.pop("logger", None)
    parts = [ts, f"{level:<7}", name]
    if "msg" in event:
        parts.append(f"- {event.pop('msg')}")
    for k, v in event.items():
        text = v if isinstance(v, str) else json.dumps(v, default=str)
        if " " in text or not text:
            text = repr(text)
        parts.append(f"{k}={text}")
    return " ".join(parts)


def last_lines(path: Path, n: int) -> tuple[list[str], int]:
    """The last n lines (all when n <= 0) and the offset after them."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if n <= 0:
            f.seek(0)
            data = f.read()
        else:
            chunk = min(size, max(8192, n * 400))
            while True:
                f.seek(size - chunk)
                data = f.read(chunk)
                if data.count(b"\n") > n or chunk == size:
                    break
                chunk = min(size, chunk * 4)
    lines = data.decode("utf-8", errors="replace").splitlines()
    return (lines[-n:] if n > 0 else lines), size


def follow(path: Path, offset: int, stop: Callable[[str], bool] = lambda _: False,
           poll_s: float = POLL_S) -> Iterator[str]:
    """Lines added to `path` after `offset`, across rotation, until a read brings a line for which
    `stop(line)` is true (that read's other lines included), or Ctrl-C."""
    f: IO[bytes] | None = None
    ino: int | None = None
    buf = b""
    try:
        while True:
            if f is None:
                try:
                    f = open(path, "rb")  # noqa: SIM115 - held while following
                    ino = os.fstat(f.fileno()).st_ino
                    f.seek(min(offset, os.fstat(f.fileno()).st_size))
                except OSError:
                    f = None
            if f is not None:
                data = f.read()
                if data:
                    buf += data
                    *lines, buf = buf.split(b"\n")
                    ended = False
                    for line in lines:
                        text = line.decode("utf-8", errors="replace")
                        yield text
                        ended = ended or stop(text)
                    if ended:  # what was written with the last line (an update's timings) is shown too
                        return
                    continue
                try:
                    st = os.stat(path)
                    rotated = st.st_ino != ino or st.st_size < f.tell()
                except OSError:
                    rotated = False  # between the rename and the new file: keep the old handle
                if rotated:  # the old file has been read to its end: the new one from its start
                    f.close()
                    f, offset, buf = None, 0, b""
                    continue
            time.sleep(poll_s)
    finally:
        if f is not None:
            f.close()


def find_update_log(paths: Paths, ref: str) -> Path | None:
    """The update log for a request id or a log name; "" = the newest."""
    try:
        names = sorted((n for n in os.listdir(paths.logs) if UPDATE_LOG.match(n)), reverse=True)
    except OSError:
        return None
    if not ref:
        return paths.logs / names[0] if names else None
    if UPDATE_LOG.match(ref) and ref in names:
        return paths.logs / ref
    if UPDATE_LOG.match(ref + ".log") and ref + ".log" in names:
        return paths.logs / (ref + ".log")
    if re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", ref):
        answer = fsutil.read_json(paths.answers / f"{ref}.json")
        if isinstance(answer, dict) and isinstance(answer.get("log"), str):
            name = Path(answer["log"]).name
            if name in names:
                return paths.logs / name
    needle = f"(id {ref})"
    for name in names:
        with contextlib.suppress(OSError), open(paths.logs / name, encoding="utf-8", errors="replace") as f:
            if needle in f.readline():
                return paths.logs / name
    return None


def cmd_logs(args: argparse.Namespace) -> int:
    cfg = configmod.load(args.config)
    paths = Paths(cfg.root)
    out = sys.stdout
    show: Callable[[str], str] = plain
    stop: Callable[[str], bool] = lambda _: False  # noqa: E731
    n = args.lines
    if args.app:
        path = paths.app_log
    elif args.daemon:
        path = paths.daemon_log
        show = lambda line: plain(event_line(line))  # noqa: E731
    else:
        found = find_update_log(paths, args.update or "")
        if found is None:
            what = f"no update log for {args.update!r}" if args.update else "no update has run yet"
            print(f"proto4d logs: {what} (looked in {paths.logs})", file=sys.stderr)
            return EX_FAILED
        path, n = found, 0
        stop = lambda line: line[10:].startswith("outcome: ")  # noqa: E731 - the story's last line
    if not path.exists() and not args.follow:
        print(f"proto4d logs: {path} does not exist yet", file=sys.stderr)
        return EX_FAILED
    offset = 0
    ended = False
    if path.exists():
        lines, offset = last_lines(path, n)
        for line in lines:
            out.write(show(line) + "\n")
            ended = ended or stop(line)
    out.flush()
    if args.follow and not ended:
        try:
            for line in follow(path, offset, stop):
                out.write(show(line) + "\n")
                out.flush()
        except KeyboardInterrupt:
            return EX_OK
    return EX_OK


