"""`proto4d status`, `activity` and `releases`: read the files under `root` and print them.

None of these talk to the daemon; they read `state/status.json` (rewritten after every
sample) and say plainly when the daemon is not running or its status is stale.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from proto4d import config as configmod
from proto4d import fsutil, policy, releases
from proto4d.paths import Paths
from proto4d.textsafe import safe_text

EX_OK, EX_FAILED = 0, 1


def daemon_alive(paths: Paths) -> int | None:
    """The daemon's pid if one holds this root's lock, else None."""
    try:
        pid = int(paths.lock.read_text().strip() or 0)
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    import fcntl

    # The pid could be recycled: a held lock is the proof.
    try:
        fd = os.open(paths.lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return pid
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def load_status(paths: Paths, interval_s: float) -> tuple[dict[str, Any] | None, str]:
    """(status, problem): problem is "" when the daemon runs and the status is fresh."""
    status = fsutil.read_json(paths.status)
    pid = daemon_alive(paths)
    if pid is None:
        if status is None:
            return None, f"the daemon is not running (no status in {paths.status})"
        return status, f"the daemon is not running; this is its last status, written {_age(status.get('written_at'))}"
    if status is None:
        return None, f"the daemon (pid {pid}) is starting: no status written yet"
    written = _parse_iso(status.get("written_at"))
    if written is not None and time.time() - written > 3 * interval_s + 10:
        return status, f"stale: the daemon (pid {pid}) has not written its status for {_dur(time.time() - written)}"
    return status, ""


def _parse_iso(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _age(text: Any) -> str:
    ts = _parse_iso(text)
    return f"{_dur(time.time() - ts)} ago" if ts is not None else "at an unknown time"


_dur = policy.duration_words


def _mb(n: Any) -> str:
    return f"{(n or 0) / (1 << 20):.1f} MB"


# --------------------------------------------------------------------------- status


def render_status(status: dict[str, Any], problem: str) -> str:
    lines = []
    if problem:
        lines.append(f"!! {problem}")
    d, app, act, upd = (status.get(k) or {} for k in ("daemon", "app", "activity", "update"))
    lines.append(f"daemon   pid {d.get('pid')}  {d.get('state')}  proto4d {d.get('version')}  "
                 f"since {_age(d.get('started_at'))}")
    health = "healthy" if app.get("healthy") else "NOT healthy"
    lines.append(f"app      {app.get('state', '?')}  pid {app.get('pid') or '-'}  {health}  "
                 f"port {app.get('port', '?')}  restarts {app.get('restarts', 0)}")
    lines.append(f"release  {app.get('release') or '(none)'}  commit {str(app.get('commit') or '')[:12]}  "
                 f"serving since {_age(app.get('since'))}")
    if app.get("message"):
        lines.append(f"         {app['message']}")
    if app.get("last_exit"):
        lines.append(f"         last exit: {app['last_exit']}")
    if app.get("drain"):
        lines.append(f"drain    {app['drain']}")
    if app.get("access_records"):
        lines.append(f"access   records {app['access_records']}")
    spare = app.get("spare")
    if isinstance(spare, dict):
        if spare.get("state") == "warm":
            lines.append(f"spare    warm, pid {spare.get('pid')}: {spare.get('imported')} modules imported in "
                         f"{spare.get('warm_s')} s at {spare.get('warm_at')}; the next update's start is this process")
        else:
            lines.append(f"spare    importing, pid {spare.get('pid')}")
    for change in app.get("env_changed") or []:
        lines.append(f"config   changed since the app started: {change} (`proto4d restart` applies it, no gap)")
    data = status.get("data") or {}
    for db in data.get("databases") or []:
        lines.append(f"data     {db.get('path')}  {_mb(db.get('bytes'))} (WAL {_mb(db.get('wal_bytes'))})  "
                     f"schema {db.get('revision') or '-'}")
    last_snap = data.get("last_snapshot")
    if data.get("databases"):
        lines.append("         last snapshot: " + (f"{last_snap['id']}, {int(last_snap['age_s'] // 60)} min ago"
                                                     if last_snap else "none yet (one is taken before every switch)"))
    pend = data.get("pending")
    if pend:
        migs = pend.get("migrations") or []
        what = (f"{len(migs)} migration{'s' if len(migs) != 1 else ''} ({', '.join(Path(m).name for m in migs)})"
                if migs else "no migration")
        lines.append(f"pending  {pend.get('commits', 0)} commits on the branch, {what}; "
                     f"`proto4d pending` {int(pend.get('age_s', 0) // 60)} min ago")
    lines.append(f"activity {str(act.get('verdict', '?')).upper()}: {act.get('users', 0)} users, "
                 f"{act.get('requests_window', 0)} requests in window, {act.get('connections', 0)} connections, "
                 f"tunnel {_tunnel(act.get('tunnel'))}, cpu {act.get('cpu_percent', 0)}%, "
                 f"rss {_mb(act.get('rss_bytes'))}")
    for r in act.get("reasons") or []:
        lines.append(f"         - {r}")
    state = upd.get("state", "idle")
    if state == "idle":
        last = upd.get("last") or {}
        text = "idle"
        if last:
            text += f" (last: {last.get('id')} {last.get('state')}: {last.get('message', '')})"
        lines.append(f"update   {text}")
    else:
        lines.append(f"update   {state}  id {upd.get('id')}  {upd.get('action', 'update')} to {upd.get('ref')}"
                     + (f"  ({upd.get('reason')})" if upd.get("reason") else ""))
        if upd.get("waiting_for"):
            until = f" until {upd['until']}" if upd.get("until") else ""
            lines.append(f"         waiting for: {upd['waiting_for']}{until}")
        elif upd.get("message"):
            lines.append(f"         {upd['message']}")
        if upd.get("log"):
            lines.append(f"         log: {upd['log']}")
    st = status.get("stage")
    if st:
        how = ("promoted in place (one start)" if st.get("promotable") else
               "on copies of the data; a promotion starts it again")
        if st.get("running", True):
            lines.append(f"staged   {st.get('release')} ({str(st.get('commit', ''))[:7]}) at {st.get('url')}  "
                         f"until {st.get('expires_at')}; `proto4d promote` ({how}) or `proto4d discard`")
        else:
            lines.append(f"staged   {st.get('release')} ({str(st.get('commit', ''))[:7]}) has EXITED "
                         f"({st.get('exited')}): `proto4d discard`, or `proto4d stage` again")
    ah = status.get("ahead") or {}
    sha7 = str(ah.get("commit") or "")[:7]
    if ah.get("state") == "ready":
        lines.append(f"ahead    {ah.get('release')} ({sha7}) prepared while nobody was on: the next update to it "
                     "only checks it and switches")
    elif ah.get("state") in ("looking", "preparing"):
        lines.append(f"ahead    {ah.get('state')} {sha7}".rstrip() + " (the branch head, while nobody is on)")
    elif ah.get("state") == "failed":
        lines.append(f"ahead    preparing {sha7} failed: {ah.get('note')}; an update prepares it again")
    if upd.get("queued"):
        q = upd["queued"]
        lines.append(f"queued   {q.get('id')} ({q.get('action')} {q.get('ref') or q.get('release') or ''})")
    if upd.get("last_rejected"):
        rj = upd["last_rejected"]
        lines.append(f"rejected {rj.get('id')} at {rj.get('at')}: {rj.get('reason')}")
    # Every field may hold app output or file content: each line is made safe as a whole, so no
    # value can carry an escape sequence or a line break of its own.
    return "\n".join(safe_text(line) for line in lines)


def _out(text: str = "") -> None:
    """print() for text that holds values read from status files, requests or releases."""
    print(safe_text(text))


SPARKS = "▁▂▃▄▅▆▇█"
_spark_cache: dict[Path, Any] = {}


def sparkline(values: list[int | None]) -> str:
    """One character per value, scaled to the largest; a gap (not sampled) is a blank."""
    top = max((v for v in values if v is not None), default=0)
    out = []
    for v in values:
        if v is None:
            out.append(" ")
        else:
            out.append(SPARKS[min(len(SPARKS) - 1, round(v * (len(SPARKS) - 1) / top))] if top else SPARKS[0])
    return "".join(out)


def users_sparkline(paths: Paths, hours: int = 3) -> str:
    """`users` over the last hours in 5-minute buckets (the peak of each), from state/activity.jsonl."""
    from proto4d.web import history, state  # the incremental reader of the status page; loaded only by --watch

    cache = _spark_cache.setdefault(paths.activity, state.ActivityCache(paths.activity))
    b = history.buckets(cache.refresh(), time.time(), "24h")
    users = b["users"][-hours * 3600 // b["step"]:]
    peak = max((u for u in users if u is not None), default=0)
    return f"users    last {hours} h |{sparkline(users)}| now {(users[-1] or 0)}, peak {peak}"


def _tunnel(v: Any) -> str:
    return {True: "up", False: "DOWN", None: "not watched"}.get(v, str(v))


def cmd_status(args: argparse.Namespace) -> int:
    try:
        cfg = configmod.load(args.config)
    except configmod.ConfigError:
        from proto4d import configwait  # only for a config in error: it brings logging, psutil and sdnotify

        waiting = configwait.waiting_daemon(args.config)
        if waiting:
            print(f"proto4d: {waiting}", file=sys.stderr)
        raise
    paths = Paths(cfg.root)
    if args.watch is not None and args.watch <= 0:
        print("proto4d status: --watch needs a number of seconds > 0", file=sys.stderr)
        return 2
    while True:
        status, problem = load_status(paths, cfg.activity.interval_s)
        if args.json:
            out = json.dumps(status if status is not None else {"error": problem}, indent=None if args.watch else 2)
            if problem and status is not None:
                status = {**status, "problem": problem}
                out = json.dumps(status, indent=None if args.watch else 2)
        else:
            out = render_status(status, problem) if status is not None else safe_text(f"!! {problem}")
            if args.watch is not None:
                out += "\n" + users_sparkline(paths)
        if args.watch is None:
            print(out)
            return EX_OK if status is not None and not problem else EX_FAILED
        if sys.stdout.isatty() and not args.json:
            sys.stdout.write("\x1b[H\x1b[2J")
        print(out, flush=True)
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:
            return EX_OK


# --------------------------------------------------------------------------- activity


def cmd_activity(args: argparse.Namespace) -> int:
    cfg = configmod.load(args.config)
    paths = Paths(cfg.root)
    status, problem = load_status(paths, cfg.activity.interval_s)
    if status is None:
        print(safe_text(f"!! {problem}"), file=sys.stderr)
        return EX_FAILED
    act = status.get("activity") or {}
    verdict = policy.Verdict(act.get("verdict", "red"), tuple(act.get("reasons") or ()))
    now = dt.datetime.now(cfg.schedule.zone)
    rec = policy.recommendation(verdict, now, cfg.safety, cfg.schedule, cfg.update.notice_grace_s)
    window = policy.classify(now, cfg.schedule)
    if args.json:
        print(json.dumps({**act, "recommendation": rec, "window": window.kind,
                          "window_text": str(window.window) if window.window else None, "problem": problem or None},
                         indent=2))
        return EX_OK
    if problem:
        _out(f"!! {problem}")
    window_s = act.get("window_s", cfg.activity.window_s)
    _out(f"Activity at {now.strftime('%Y-%m-%d %H:%M')} ({cfg.schedule.timezone}), window {_dur(window_s)}")
    _out(f"  users        {act.get('users', 0)}")
    for c in act.get("clients") or []:
        _out(f"                 {c['address']:<40} {c['requests']} requests")
    _out(f"  requests     {act.get('requests_window', 0)} in the window ({act.get('rpm', 0)}/min)")
    last = act.get("last_request")
    _out(f"  last request {last + ' (' + _age(last) + ')' if last else 'none in the window'}")
    _out(f"  connections  {act.get('connections', 0)} established on port {cfg.listen.port}")
    tunnel_note = ""
    if act.get("tunnel") is False and act.get("tunnel_checked_at"):
        # Not found, the daemon looks again only every tunnel_rescan_s: a tunnel just started may not show yet.
        tunnel_note = (f"; looked {_age(act['tunnel_checked_at'])}, a tunnel started since shows within "
                       f"{act.get('tunnel_rescan_s', 30):g} s")
    _out(f"  tunnel       {_tunnel(act.get('tunnel'))} ({cfg.activity.tunnel_process or 'none configured'}"
         f"{tunnel_note})")
    _out(f"  app          cpu {act.get('cpu_percent', 0)}%, memory {_mb(act.get('rss_bytes'))} "
          f"in {act.get('processes', 0)} process(es)")
    _out(f"  time         {window.kind}" + (f" window {window.window}" if window.window else ""))
    _out(f"verdict: {verdict.color.upper()}")
    for r in verdict.reasons:
        _out(f"  - {r}")
    _out(f"recommendation: {rec}")
    return EX_OK


# --------------------------------------------------------------------------- releases


def cmd_releases(args: argparse.Namespace) -> int:
    cfg = configmod.load(args.config)
    paths = Paths(cfg.root)
    current = paths.current_release()
    rels = releases.list_releases(paths)
    rows = [{"name": r.name, "commit": r.commit, "subject": r.info.get("subject", ""),
             "created_at": r.created_at, "age_s": round(time.time() - r.created_at), "outcome": r.outcome,
             "venv": r.venv, "current": r.name == current, "previous": r.info.get("previous"),
             "schema": r.info.get("schema") or {}, "rollback_compatible": r.info.get("rollback_compatible")}
            for r in rels]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EX_OK
    if not rows:
        _out(f"no releases under {paths.releases}")
        return EX_OK
    schemas = any(row["schema"] for row in rows)
    _out(f"{'':2}{'release':<40} {'commit':<9} {'age':>12}  {'outcome':<12} " + ("schema   " if schemas else "")
         + "subject")
    for row in rows:
        mark = "* " if row["current"] else "  "
        schema = (",".join(row["schema"].values()) or "-")[:8] if schemas else ""
        _out(f"{mark}{row['name']:<40} {row['commit'][:7]:<9} {_dur(row['age_s']):>12}  {row['outcome']:<12} "
             + (f"{schema:<8} " if schemas else "") + row["subject"][:50])
    _out("(* = current)")
    return EX_OK

