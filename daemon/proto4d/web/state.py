"""Reads the files under `root` into the one document the page and /metrics show.

Everything is read, nothing written. activity.jsonl (up to a few MiB) is read incrementally:
only the bytes added since the last look, from the start again when the daemon trimmed it.
Update logs are parsed once per (name, size, mtime).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from proto4d import config as configmod
from proto4d import fsutil, policy, releases, snapshots, views
from proto4d.paths import Paths
from proto4d.web import history

MAX_UPDATES = 50      # the update logs retention keeps at most this many
KEEP_S = 7 * 24 * 3600 + 3600


class ActivityCache:
    """The rows of activity.jsonl (or activity_5m.jsonl) from the last 7 days, kept up to date by
    reading only what was added."""

    def __init__(self, path: Path, parse: Callable[[Any], history.Row | None] = history.parse_row) -> None:
        self.path = path
        self.parse = parse
        self.rows: list[history.Row] = []
        self._ino: int | None = None
        self._offset = 0
        self._lock = threading.Lock()

    def refresh(self) -> list[history.Row]:
        with self._lock:
            try:
                st = self.path.stat()
            except OSError:
                self.rows, self._ino, self._offset = [], None, 0
                return self.rows
            if st.st_ino != self._ino or st.st_size < self._offset:  # trimmed (rewritten by rename)
                self.rows, self._ino, self._offset = [], st.st_ino, 0
            if st.st_size > self._offset:
                with open(self.path, "rb") as f:
                    f.seek(self._offset)
                    data = f.read(st.st_size - self._offset)
                end = data.rfind(b"\n") + 1  # a line still being written waits for the next look
                self._offset += end
                for raw in data[:end].splitlines():
                    with contextlib.suppress(ValueError):
                        row = self.parse(json.loads(raw))
                        if row is not None:
                            self.rows.append(row)
                cutoff = time.time() - KEEP_S
                if self.rows and self.rows[0].t < cutoff:
                    self.rows = [r for r in self.rows if r.t >= cutoff]
            return self.rows


class UpdateLogs:
    """The retained update logs, parsed (cached by name, size and mtime)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self._cache: dict[str, tuple[tuple[int, float], dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def all(self) -> list[dict[str, Any]]:
        """Newest first."""
        with self._lock:
            try:
                names = sorted((n for n in os.listdir(self.logs) if history.LOG_NAME.match(n)), reverse=True)
            except OSError:
                return []
            names = names[:MAX_UPDATES]
            out = []
            for name in names:
                p = self.logs / name
                try:
                    st = p.stat()
                except OSError:
                    continue
                key = (st.st_size, st.st_mtime)
                hit = self._cache.get(name)
                if hit is None or hit[0] != key:
                    try:
                        text = p.read_text(encoding="utf-8", errors="replace")
                    except OSError:
                        continue
                    parsed = history.parse_update_log(name, text)
                    if parsed is None:
                        continue
                    hit = (key, parsed)
                    self._cache[name] = hit
                out.append(hit[1])
            for gone in set(self._cache) - set(names):
                del self._cache[gone]
            return out


def update_log_path(paths: Paths, name: str) -> Path | None:
    """The update log called `name`, or None: only plain names of the update-log shape, inside logs/,
    not a symlink (the page serves these files; nothing else under root may be reached this way)."""
    if not history.LOG_NAME.match(name):
        return None
    p = paths.logs / name
    try:
        if p.is_symlink() or not p.is_file():
            return None
        if p.resolve().parent != paths.logs.resolve():
            return None
    except OSError:
        return None
    return p


class StateReader:
    def __init__(self, cfg: configmod.Config) -> None:
        self.cfg = cfg
        self.paths = Paths(cfg.root)
        self.activity = ActivityCache(self.paths.activity)
        self.rollup = ActivityCache(self.paths.activity.with_name("activity_5m.jsonl"), history.parse_rollup)
        self.updates = UpdateLogs(self.paths.logs)

    def history(self, span: str) -> dict[str, Any]:
        # The 5-minute peaks reach back 7 days; the samples cover the latest day or two (and the
        # 5 minutes not rolled up yet). A bucket keeps the peak of both, so overlap is harmless.
        rows = self.activity.refresh()
        out = history.buckets([*self.rollup.refresh(), *rows], time.time(), span)
        out["markers"] = history.markers(self.updates.all(), out["start"], out["end"])
        out["samples"] = sum(1 for r in rows if r.t >= out["start"])
        return out

    def snapshot(self) -> dict[str, Any]:
        cfg, paths = self.cfg, self.paths
        status, problem = views.load_status(paths, cfg.activity.interval_s)
        status = status or {}
        act = status.get("activity") or {}
        now = dt.datetime.now(cfg.schedule.zone)
        verdict = policy.Verdict(act.get("verdict", "red"), tuple(act.get("reasons") or ()))
        window = policy.classify(now, cfg.schedule)
        nxt = {}
        for kind in ("preferred", "acceptable"):
            at = policy.next_start(now, getattr(cfg.schedule, kind), cfg.schedule.zone)
            nxt[kind] = at.astimezone(cfg.schedule.zone).isoformat(timespec="minutes") if at else None
        updates = self.updates.all()
        upd = status.get("update") or {}
        journal = fsutil.read_json(paths.journal)
        live = None
        if upd.get("state") not in (None, "idle") and isinstance(journal, dict) and journal.get("id") == upd.get("id"):
            live = _live_steps(journal)
        app = status.get("app") or {}
        current = paths.current_release()
        rels = []
        for r in releases.list_releases(paths):
            rels.append({"name": r.name, "commit": r.commit, "subject": r.info.get("subject", ""),
                         "created_at": r.created_at, "outcome": r.outcome, "current": r.name == current})
        subject = next((r["subject"] for r in rels if r["name"] == app.get("release")), "")
        snaps = []
        for sn in snapshots.listing(paths.backups)[:20]:
            snaps.append({"id": sn.id, "created_at": sn.created_at, "release": sn.info.get("release", ""),
                          "reason": sn.info.get("reason", ""),
                          "databases": [{"path": d.get("path"), "bytes": d.get("bytes"),
                                         "rows": sum((d.get("rows") or {}).values())} for d in sn.databases]})
        verdict_doc = {"color": verdict.color, "reasons": list(verdict.reasons),
                       "recommendation": policy.recommendation(verdict, now, cfg.safety, cfg.schedule,
                                                               cfg.update.notice_grace_s),
                       "window": window.kind, "window_text": str(window.window) if window.window else None,
                       "next": nxt, "timezone": cfg.schedule.timezone}
        if not act:  # no sample to judge from: say so rather than a red that nobody measured
            verdict_doc.update(color="unknown", reasons=[problem or "no activity sample yet"],
                               recommendation="Nothing to judge from until the daemon samples activity.")
        return {
            "now": time.time(),
            "problem": problem,
            "alive": bool(status) and not problem.startswith("the daemon is not running"),
            "daemon": status.get("daemon") or {},
            "app": {**app, "subject": subject},
            "health": status.get("health"),
            "activity": act,
            "verdict": verdict_doc,
            "update": {**upd, "steps": live},
            "stage": status.get("stage"),
            "updates": [_brief(u) for u in updates[:20]],
            "releases": rels,
            "data": status.get("data"),
            "snapshots": snaps,
            "commands": _commands(cfg, rels, current, snaps, staged=bool(status.get("stage"))),
        }


def _live_steps(journal: dict[str, Any]) -> list[dict[str, Any]]:
    steps = [s for s in journal.get("steps") or [] if isinstance(s, dict) and "at" in s]
    out = []
    for a, b in zip(steps, [*steps[1:], None], strict=False):
        out.append({"state": a.get("state"), "at": a["at"],
                    "seconds": round(b["at"] - a["at"], 2) if b else None})
    return out


def _brief(u: dict[str, Any]) -> dict[str, Any]:
    return {k: u.get(k) for k in ("id", "what", "log", "started_at", "finished_at", "outcome", "seconds",
                                  "message", "waited_s", "steps")}


def _commands(cfg: configmod.Config, rels: list[dict[str, Any]], current: str | None,
              snaps: list[dict[str, Any]], staged: bool = False) -> list[str]:
    conf = f" --config {cfg.source}" if cfg.source else ""
    out = [f"proto4d status{conf}", f"proto4d pending{conf}", f"proto4d update{conf} --wait",
           f"proto4d rollback{conf} --wait"]
    out += [f"proto4d promote{conf} --wait", f"proto4d discard{conf}"] if staged else [f"proto4d stage{conf} --wait"]
    older = [r["name"] for r in rels if r["name"] != current]
    if older:
        out.append(f"proto4d rollback{conf} {older[0]} --wait")
    out.append(f"proto4d logs{conf} --update")
    if snaps:
        out.append(f"proto4d backups{conf} --restore {snaps[0]['id']}   # says what it replaces; add --yes to act")
    return out
