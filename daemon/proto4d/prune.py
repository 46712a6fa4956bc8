"""Retention applied to disk: gather the facts, let retention.py decide, remove what it names.

The decision (which releases, venvs and update logs go) is retention.py's alone; this module
only reads the facts from `root` and does the removing.
"""

from __future__ import annotations

import contextlib
import time

from proto4d import fsutil, releases, retention
from proto4d.config import Config
from proto4d.paths import Paths

UPDATE_LOGS_KEPT = 50


def apply(paths: Paths, cfg: Config, in_use: list[str], keep: list[str] | None = None) -> tuple[list[str], list[str]]:
    """Remove old releases, unreferenced venvs and old update logs; return (releases, venvs) removed.
    `keep`: releases in use besides current and previous (the staged one)."""
    rels = releases.list_releases(paths)
    current = paths.current_release()
    cur = next((r for r in rels if r.name == current), None)
    previous = cur.info.get("previous") if cur else None
    facts = [retention.ReleaseFacts(r.name, r.created_at, r.venv) for r in rels]
    doomed = retention.plan_releases(facts, current=current, previous=previous, now=time.time(),
                                     keep_days=cfg.update.keep_days, keep_min=cfg.update.keep_min)
    doomed = [n for n in doomed if n not in (keep or [])]
    for name in doomed:
        fsutil.remove_tree(paths.release(name))
    kept = [f for f in facts if f.name not in doomed]
    venvs = [p.name for p in paths.venvs.iterdir() if p.is_dir() and not p.name.startswith(".")] \
        if paths.venvs.is_dir() else []
    dead_venvs = retention.plan_venvs(venvs, kept, in_use)
    for key in dead_venvs:
        fsutil.remove_tree(paths.venvs / key)
    logs = sorted(paths.logs.glob("update_*.log"), key=lambda p: p.stat().st_mtime)
    for old in retention.plan_logs([(p.name, p.stat().st_mtime) for p in logs], now=time.time(),
                                   keep_days=cfg.update.keep_days, keep_min=UPDATE_LOGS_KEPT):
        with contextlib.suppress(OSError):
            (paths.logs / old).unlink()
    return doomed, dead_venvs
