"""Pure: activity rows -> chart buckets; an update log's text -> the facts of that update.

No I/O here: `state.py` reads the files and passes plain values in, which keeps these
decisions testable as tables.
"""

from __future__ import annotations

import datetime as dt
import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# span -> (seconds, bucket seconds); "1h" is the view during a class
SPANS = {"1h": (3600, 30), "24h": (24 * 3600, 300), "7d": (7 * 24 * 3600, 3600)}
OUTCOMES = ("done", "rolled_back", "aborted", "rejected")
WAITING = ("waiting", "noticed")  # the update waited for a quiet moment (or the notice's grace)

LOG_NAME = re.compile(r"^update_(\d{8})_(\d{6})(?:_\d+)?\.log$")
_LINE = re.compile(r"^(\d\d):(\d\d):(\d\d)  (.*)$")
_ENTER = re.compile(r"^([a-z_]+) \.\.\.$")
_DONE = re.compile(r"^  ([a-z_]+) done in ([\d.]+) s$")
_OUTCOME = re.compile(r"^outcome: ([A-Z_]+) after ([\d.]+) s: (.*)$")
_ID = re.compile(r"\(id ([A-Za-z0-9][A-Za-z0-9_.-]*)\)")


@dataclass(frozen=True)
class Row:
    t: float          # epoch seconds
    users: int
    rpm: float
    verdict: str


def parse_row(obj: Any) -> Row | None:
    """One line of activity.jsonl, or None when it is not a usable sample."""
    if not isinstance(obj, dict):
        return None
    try:
        t = dt.datetime.fromisoformat(str(obj["sampled_at"])).timestamp()
        return Row(t, int(obj.get("users") or 0), float(obj.get("rpm") or 0.0), str(obj.get("verdict") or ""))
    except (KeyError, TypeError, ValueError):
        return None


def parse_rollup(obj: Any) -> Row | None:
    """One line of activity_5m.jsonl (the daemon's 5-minute peaks), as a row at the bucket's start."""
    if not isinstance(obj, dict):
        return None
    try:
        return Row(float(obj["t"]), int(obj.get("users") or 0), float(obj.get("rpm") or 0.0), "")
    except (KeyError, TypeError, ValueError):
        return None


def buckets(rows: Sequence[Row], now: float, span: str) -> dict[str, Any]:
    """The chart's series for `span`: per bucket the most users seen and the highest requests/min.

    A bucket with no sample is None (the daemon was not running): the chart shows a gap, not a zero.
    """
    total, step = SPANS[span]
    end = (int(now) // step + 1) * step
    start = end - total
    n = total // step
    users: list[int | None] = [None] * n
    rpm: list[float | None] = [None] * n
    for r in rows:
        if r.t < start or r.t >= end:
            continue
        i = int((r.t - start) // step)
        users[i] = max(users[i] or 0, r.users)
        rpm[i] = max(rpm[i] or 0.0, round(r.rpm, 1))
    return {"span": span, "start": start, "end": end, "step": step, "users": users, "rpm": rpm}


def parse_update_log(name: str, text: str, tz: dt.tzinfo | None = None) -> dict[str, Any] | None:
    """The facts of one `logs/update_<stamp>.log`: id, what, steps with times and durations, outcome.

    Lines carry only a wall-clock time (HH:MM:SS, the daemon's local time); the date comes from the
    file name and moves on by a day whenever the clock goes backwards (an update across midnight).
    """
    m = LOG_NAME.match(name)
    if m is None:
        return None
    try:
        base = dt.datetime.strptime(m.group(1) + m.group(2), "%Y%m%d%H%M%S")
    except ValueError:
        return None
    base = base.replace(tzinfo=tz) if tz is not None else base.astimezone()
    day, last = base.date(), base.time()
    out: dict[str, Any] = {"log": name, "id": "", "what": "", "started_at": base.timestamp(), "steps": [],
                           "outcome": None, "seconds": None, "message": "", "waited_s": None}
    steps: list[dict[str, Any]] = out["steps"]
    for raw in text.splitlines():
        lm = _LINE.match(raw)
        if lm is None:
            continue
        clock = dt.time(int(lm.group(1)), int(lm.group(2)), int(lm.group(3)))
        if clock < last:
            day += dt.timedelta(days=1)
        last = clock
        at = dt.datetime.combine(day, clock, base.tzinfo).timestamp()
        body = lm.group(4)
        if not out["what"]:
            out["what"] = body.split(" requested by ")[0] if " requested by " in body else body
            idm = _ID.search(body)
            out["id"] = idm.group(1) if idm else ""
            out["started_at"] = at
            continue
        if em := _ENTER.match(body):
            steps.append({"state": em.group(1), "at": at, "seconds": None})
        elif dm := _DONE.match(body):
            for s in reversed(steps):
                if s["state"] == dm.group(1):
                    s["seconds"] = float(dm.group(2))
                    break
        elif om := _OUTCOME.match(body):
            out["outcome"] = om.group(1).lower()
            out["seconds"] = float(om.group(2))
            out["message"] = om.group(3)
            out["finished_at"] = at
    # A step without its "done" line lasted until the next one began (waiting has no done line).
    for a, b in itertools.pairwise(steps):
        if a["seconds"] is None:
            a["seconds"] = round(max(0.0, b["at"] - a["at"]), 2)
    if steps and steps[-1]["seconds"] is None and out.get("finished_at") is not None:
        steps[-1]["seconds"] = round(max(0.0, out["finished_at"] - steps[-1]["at"]), 2)
    waited = sum(s["seconds"] or 0 for s in steps if s["state"] in WAITING)
    out["waited_s"] = round(waited, 2) if waited else None
    return out


def markers(updates: Iterable[dict[str, Any]], start: float, end: float) -> list[dict[str, Any]]:
    """Chart marks for updates inside [start, end): requested, waited (a span), and how it ended."""
    out: list[dict[str, Any]] = []
    for u in updates:
        label = u.get("what") or u.get("id") or ""
        if start <= u["started_at"] < end:
            out.append({"kind": "requested", "t": u["started_at"], "label": label, "log": u["log"]})
        waits = [s for s in u.get("steps") or [] if s["state"] in WAITING and s.get("seconds")]
        if waits and u.get("waited_s"):  # waiting and the notice's grace: one span
            t0 = waits[0]["at"]
            t1 = max(s["at"] + s["seconds"] for s in waits)
            if t1 > start and t0 < end:
                out.append({"kind": "waited", "t": t0, "until": t1, "label": label, "log": u["log"]})
        fin = u.get("finished_at")
        if fin is not None and start <= fin < end and u.get("outcome"):
            out.append({"kind": u["outcome"], "t": fin, "label": f"{label}: {u.get('message', '')}",
                        "log": u["log"]})
    out.sort(key=lambda m: m["t"])
    return out


def step_durations(updates: Iterable[dict[str, Any]]) -> dict[str, tuple[int, float]]:
    """Per step name: how many times it ran and its total seconds, over the given updates."""
    acc: dict[str, tuple[int, float]] = {}
    for u in updates:
        for s in u.get("steps") or []:
            if s.get("seconds") is None or s["state"] in OUTCOMES:
                continue
            n, total = acc.get(s["state"], (0, 0.0))
            acc[s["state"]] = (n + 1, total + float(s["seconds"]))
    return acc
