"""The verdict and the decision to start an update. Pure: plain values in, plain values out.

This module owns three judgements and their wording for an operator:
  * the verdict: an activity snapshot + `safety` -> green / yellow / red with reasons;
  * the schedule: which kind of window (avoid, preferred, acceptable) holds at an instant,
    when the next one starts, when the weekly update is due;
  * the decision: given the verdict, the time and how long it has been quiet or since the
    notice went up, whether an update starts now, posts a notice, or waits (and until when).

Windows are wall-clock times in `schedule.timezone`. On a day where a window's start or end
falls in a spring-forward gap it is moved to the first instant that exists after it; a wall
time that happens twice (fall back) means its first occurrence, so a window happens once a
day. Every function takes the time as a parameter, never reads a clock.

Every datetime this module returns is aware and in UTC (show it with `clock` or
`.astimezone(zone)`). Python compares and subtracts two datetimes of the same zone by their
wall clocks, ignoring `fold` and the offset, which is an hour off across a DST change; all
arithmetic here is done in UTC for that reason, and UTC results keep callers out of the trap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from .config import SafetyConfig, ScheduleConfig, Weekly, Window

__all__ = [
    "Decision",
    "Snapshot",
    "Verdict",
    "WindowState",
    "classify",
    "clock",
    "decide",
    "duration_words",
    "next_start",
    "next_weekly",
    "recommendation",
    "verdict",
]


# --------------------------------------------------------------------------- wording


def duration_words(seconds: float) -> str:
    """'40 s', '5 min', '1 min 30 s', '7 h 12 min', '2 d 3 h': the two largest units, truncated."""
    total = max(0, round(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "min"), (secs, "s")]
    for i, (n, unit) in enumerate(parts):
        if n:
            out = f"{n} {unit}"
            if i + 1 < len(parts) and parts[i + 1][0]:
                out += f" {parts[i + 1][0]} {parts[i + 1][1]}"
            return out
    return "0 s"


def clock(dt: datetime, zone: ZoneInfo) -> str:
    """'HH:MM' of an aware datetime in `zone`."""
    return dt.astimezone(zone).strftime("%H:%M")


def _number(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def _users(n: int) -> str:
    return "no users" if n == 0 else "1 user" if n == 1 else f"{n} users"


# --------------------------------------------------------------------------- the verdict


@dataclass(frozen=True)
class Snapshot:
    users: int
    requests_window: int
    rpm: float
    connections: int
    last_request: float | None  # epoch seconds
    tunnel: bool | None  # None = no tunnel_process configured
    app_up: bool
    window_s: float  # for wording ("in the last 5 min")
    tunnel_process: str = ""  # its name, for wording


@dataclass(frozen=True)
class Verdict:
    color: str  # "green" | "yellow" | "red"
    reasons: tuple[str, ...]  # plain words for an operator; the first one decided the colour
    users: int = 0  # carried along so `recommendation` can say whom a notice reaches
    rpm: float = 0.0


def verdict(s: Snapshot, safety: SafetyConfig) -> Verdict:
    """green: nobody; yellow: 1..yellow_max_users; red: more, or red_rpm reached."""
    ymax = safety.yellow_max_users
    span = f"in the last {duration_words(s.window_s)}"
    if s.users <= 0:
        color, why = "green", f"no users {span}"
    elif s.users <= ymax:
        limits = "1" if ymax == 1 else f"1-{ymax}"
        color, why = "yellow", f"{_users(s.users)} {span} (yellow: {limits})"
    elif ymax == 0:
        color, why = "red", f"{_users(s.users)} {span} (red: yellow_max_users is 0, so any user is red)"
    else:
        color, why = "red", f"{_users(s.users)} {span} (red: {ymax + 1} or more)"
    reasons = [why]
    if safety.red_rpm > 0 and s.rpm >= safety.red_rpm:
        busy = f"{_number(s.rpm)} requests per minute (red at {_number(safety.red_rpm)} or more)"
        if color == "red":
            reasons.append(busy)
        else:
            color = "red"
            reasons.insert(0, busy)
    if s.tunnel is False:
        name = f"tunnel process {s.tunnel_process}" if s.tunnel_process else "the tunnel process"
        reasons.append(f"{name} is not running: outside users cannot reach the app")
    if not s.app_up:
        reasons.append("the app is not serving")
    return Verdict(color, tuple(reasons), users=max(0, s.users), rpm=s.rpm)


# --------------------------------------------------------------------------- time windows


@dataclass(frozen=True)
class WindowState:
    kind: str  # "avoid" | "preferred" | "acceptable" | "open"
    window: Window | None
    ends_at: datetime | None  # UTC, when the current window (with any same-kind overlap) ends


def _utc(dt: datetime) -> datetime:
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError("times must be timezone-aware datetimes")
    return dt.astimezone(UTC)


def _wall(d: date, minute: int, zone: ZoneInfo) -> datetime:
    """The instant (in UTC) the wall clock in `zone` shows `minute` on day `d`.

    fold=0 picks the first of a repeated time. A time in a gap does not exist; the first
    instant after it is the transition itself, found by bisection between the two readings
    of the gap time (an hour or so apart).
    """
    naive = datetime.combine(d, time(minute // 60, minute % 60))
    dt = naive.replace(tzinfo=zone)
    u = dt.astimezone(UTC)
    if u.astimezone(zone).replace(tzinfo=None) == naive:
        return u
    # in a gap: with fold=0 the pre-transition offset applies (a later instant), fold=1 the other
    a = naive.replace(tzinfo=zone, fold=1).astimezone(UTC)
    b = dt.astimezone(UTC)
    lo, hi = min(a, b), max(a, b)
    after = hi.astimezone(zone).utcoffset()
    while hi - lo > timedelta(seconds=1):
        mid = lo + (hi - lo) / 2
        if mid.astimezone(zone).utcoffset() == after:
            hi = mid
        else:
            lo = mid
    return hi.replace(microsecond=0)


def _occurrence(w: Window, d: date, zone: ZoneInfo) -> tuple[datetime, datetime]:
    """The window that starts on local day `d`, as [start, end) instants."""
    end_day = d + timedelta(days=1) if w.end <= w.start else d
    return _wall(d, w.start, zone), _wall(end_day, w.end, zone)


def _containing(now: datetime, windows: Sequence[Window], zone: ZoneInfo) -> tuple[Window, datetime] | None:
    """The window holding `now` (UTC) that ends last, with its end chained through overlapping ones."""
    day = now.astimezone(zone).date()
    occs = [(w, *_occurrence(w, day + timedelta(days=k), zone)) for k in (-1, 0, 1) for w in windows]
    best: tuple[Window, datetime] | None = None
    for w, start, end in occs:
        if start <= now < end and (best is None or end > best[1]):
            best = (w, end)
    if best is None:
        return None
    # overlapping or back-to-back windows of one kind are one stretch: "until" is its end
    w, end = best
    for _ in range(len(occs)):
        later = [e for _, s, e in occs if s <= end < e]
        if not later:
            break
        end = max(later)
    return w, end


def classify(now: datetime, sched: ScheduleConfig) -> WindowState:
    """Which kind of window holds at `now` (any zone; evaluated in the schedule's).

    avoid beats preferred beats acceptable where they overlap.
    """
    zone = sched.zone
    now = _utc(now)
    for kind, windows in (("avoid", sched.avoid), ("preferred", sched.preferred),
                          ("acceptable", sched.acceptable)):
        if windows:
            found = _containing(now, windows, zone)
            if found is not None:
                return WindowState(kind, found[0], found[1])
    return WindowState("open", None, None)


def _next_occurrence(now: datetime, windows: Sequence[Window], zone: ZoneInfo
                     ) -> tuple[datetime, Window] | None:
    """(now, w) when inside window w, else the soonest (start, w) after `now` (UTC)."""
    day = now.astimezone(zone).date()
    best: tuple[datetime, Window] | None = None
    for k in (-1, 0, 1, 2):
        for w in windows:
            start, end = _occurrence(w, day + timedelta(days=k), zone)
            if start >= end:
                continue  # both ends in the same spring-forward gap: no window that day
            if start <= now < end:
                return now, w
            if start > now and (best is None or start < best[0]):
                best = (start, w)
    return best


def next_start(now: datetime, windows: Sequence[Window], zone: ZoneInfo) -> datetime | None:
    """`now` (in UTC) when inside one of `windows`, else the soonest start after it; None without windows."""
    found = _next_occurrence(_utc(now), windows, zone)
    return found[0] if found else None


def next_weekly(now: datetime, weekly: Weekly, zone: ZoneInfo) -> datetime:
    """The next time the weekly update is due, strictly after `now`."""
    now = _utc(now)
    day = now.astimezone(zone).date()
    for k in range(-1, 15):
        d = day + timedelta(days=k)
        if d.weekday() == weekly.weekday:
            t = _wall(d, weekly.minute, zone)
            if t > now:
                return t
    raise AssertionError("a weekday recurs within 15 days")  # unreachable


# --------------------------------------------------------------------------- the decision


@dataclass(frozen=True)
class Decision:
    action: str  # "start" | "notice" | "wait"
    reason: str  # what it waits for, in words, for `status`
    until: datetime | None  # when to look again / when the condition should end, if known


def decide(v: Verdict, now: datetime, safety: SafetyConfig, sched: ScheduleConfig, notice_grace_s: float, *,
           green_since: datetime | None, noticed_at: datetime | None, force: bool) -> Decision:
    """Start, post the notice, or wait; the rules in order:

    1. force starts (health checks still run);
    2. inside an avoid window: wait for its end;
    3. green: start once green has held quiet_for_s;
    4. yellow outside avoid, or red inside a preferred window: notice, then start after the grace;
    5. red elsewhere: wait for the next preferred window (or for activity to drop).
    """
    zone = sched.zone
    if force:
        return Decision("start", "forced: not waiting for a quiet moment; health checks still run", None)
    now = _utc(now)
    green_since = _utc(green_since) if green_since is not None else None
    noticed_at = _utc(noticed_at) if noticed_at is not None else None
    state = classify(now, sched)
    if state.kind == "avoid":
        assert state.window is not None and state.ends_at is not None
        return Decision("wait", f"inside the avoid window {state.window} until {clock(state.ends_at, zone)}",
                        state.ends_at)
    quiet = safety.quiet_for_s
    if v.color == "green":
        # no green_since means green only just began: it has been quiet for 0 s
        quiet_so_far = (now - green_since).total_seconds() if green_since is not None else 0.0
        if quiet_so_far >= quiet:
            return Decision("start", f"quiet for {duration_words(quiet_so_far)} "
                                     f"(needed {duration_words(quiet)})", None)
        start_at = (green_since or now) + timedelta(seconds=quiet)
        return Decision("wait", f"quiet for {duration_words(max(0.0, quiet_so_far))} of "
                                f"{duration_words(quiet)}", start_at)
    if v.color == "yellow" or state.kind == "preferred":
        who = _users(v.users) if v.users else "users"
        where = f" inside the preferred window {state.window}" if v.color == "red" else ""
        if noticed_at is None:
            return Decision("notice", f"{who} active{where}: posting a notice, then waiting "
                                      f"{duration_words(notice_grace_s)}",
                            now + timedelta(seconds=notice_grace_s))
        grace_end = noticed_at + timedelta(seconds=notice_grace_s)
        if now >= grace_end:
            return Decision("start", f"notice posted at {clock(noticed_at, zone)}, grace over", None)
        left = duration_words((grace_end - now).total_seconds())
        return Decision("wait", f"notice posted at {clock(noticed_at, zone)}; grace ends at "
                                f"{clock(grace_end, zone)} (in {left})", grace_end)
    # red outside every preferred window
    found = _next_occurrence(now, sched.preferred, zone) if sched.preferred else None
    if found is None:
        return Decision("wait", "busy (red): waiting for activity to drop", None)
    at, w = found
    return Decision("wait", f"busy (red): waiting for the preferred window {w} "
                            f"(in {duration_words((at - now).total_seconds())})", at)


def recommendation(v: Verdict, now: datetime, safety: SafetyConfig, sched: ScheduleConfig,
                   notice_grace_s: float) -> str:
    """One sentence for `proto4d activity`: what an update asked for now would do."""
    zone = sched.zone
    now = _utc(now)
    state = classify(now, sched)
    if state.kind == "avoid":
        assert state.ends_at is not None
        until = clock(state.ends_at, zone)
        return f"Inside the avoid window {state.window} until {until}: do not update now."
    if v.color == "green":
        return "Safe to update now."
    if v.color == "yellow" or state.kind == "preferred":
        after = f"start after {duration_words(notice_grace_s)}" if notice_grace_s > 0 else "start right away"
        who = _users(v.users) if v.users else "the users"
        lead = f"Busy (red) but inside the preferred window {state.window}: an" if v.color == "red" else "An"
        return f"{lead} update now would post a notice to {who} and {after}."
    found = _next_occurrence(now, sched.preferred, zone) if sched.preferred else None
    if found is None:
        return "Busy (red): wait for activity to drop (no preferred window is configured)."
    at, w = found
    return f"Busy (red): wait for the preferred window {w} (in {duration_words((at - now).total_seconds())})."
