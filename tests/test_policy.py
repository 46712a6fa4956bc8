"""Table tests for proto4d.policy: the verdict, the schedule windows (with DST), the decision."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from proto4d import config
from proto4d.config import SafetyConfig, ScheduleConfig, Weekly, Window
from proto4d.policy import (
    Decision,
    Snapshot,
    Verdict,
    WindowState,
    classify,
    decide,
    duration_words,
    next_start,
    next_weekly,
    recommendation,
    verdict,
)

SEOUL = ZoneInfo("Asia/Seoul")
NY = ZoneInfo("America/New_York")
BERLIN = ZoneInfo("Europe/Berlin")


def W(text: str) -> Window:
    a, b = text.split("-")
    h1, m1 = (int(x) for x in a.split(":"))
    h2, m2 = (int(x) for x in b.split(":"))
    return Window(h1 * 60 + m1, (h2 * 60 + m2) % 1440, text)


def sched(tz: str = "Asia/Seoul", preferred: tuple[str, ...] = (), acceptable: tuple[str, ...] = (),
          avoid: tuple[str, ...] = (), weekly: Weekly | None = None) -> ScheduleConfig:
    return ScheduleConfig(tz, tuple(map(W, preferred)), tuple(map(W, acceptable)), tuple(map(W, avoid)),
                          weekly)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def kst(*args: int) -> datetime:
    return datetime(*args, tzinfo=SEOUL)


def ny(*args: int, fold: int = 0) -> datetime:
    return datetime(*args, tzinfo=NY, fold=fold)


def berlin(*args: int) -> datetime:
    return datetime(*args, tzinfo=BERLIN)


SAFETY = SafetyConfig(yellow_max_users=2, quiet_for_s=120, red_rpm=60)
QUIET = "no users in the last 5 min"
ONE = "1 user in the last 5 min (yellow: 1-2)"


def snap(users: int = 0, rpm: float = 0.0, tunnel: bool | None = None, app_up: bool = True,
         window_s: float = 300, tunnel_process: str = "") -> Snapshot:
    return Snapshot(users=users, requests_window=users * 3, rpm=rpm, connections=2, last_request=None,
                    tunnel=tunnel, app_up=app_up, window_s=window_s, tunnel_process=tunnel_process)


# --------------------------------------------------------------------------- verdict

VERDICT_ROWS = [
    ("0 users", snap(0), SAFETY, "green", ("no users in the last 5 min",)),
    ("1 user", snap(1), SAFETY, "yellow", ("1 user in the last 5 min (yellow: 1-2)",)),
    ("2 users", snap(2), SAFETY, "yellow", ("2 users in the last 5 min (yellow: 1-2)",)),
    ("3 users", snap(3), SAFETY, "red", ("3 users in the last 5 min (red: 3 or more)",)),
    ("40 users", snap(40), SAFETY, "red", ("40 users in the last 5 min (red: 3 or more)",)),
    ("yellow_max_users 0: 0 users", snap(0), SafetyConfig(0, 120, 60), "green", (QUIET,)),
    ("yellow_max_users 0: 1 user", snap(1), SafetyConfig(0, 120, 60), "red",
     ("1 user in the last 5 min (red: yellow_max_users is 0, so any user is red)",)),
    ("yellow_max_users 1", snap(1), SafetyConfig(1, 120, 60), "yellow",
     ("1 user in the last 5 min (yellow: 1)",)),
    ("yellow_max_users 5: 5 users", snap(5), SafetyConfig(5, 120, 60), "yellow",
     ("5 users in the last 5 min (yellow: 1-5)",)),
    ("yellow_max_users 5: 6 users", snap(6), SafetyConfig(5, 120, 60), "red",
     ("6 users in the last 5 min (red: 6 or more)",)),
    ("rpm just below red_rpm", snap(1, rpm=59.9), SAFETY, "yellow", (ONE,)),
    ("rpm at red_rpm, 0 users", snap(0, rpm=60), SAFETY, "red",
     ("60 requests per minute (red at 60 or more)", "no users in the last 5 min")),
    ("rpm above red_rpm, 1 user", snap(1, rpm=72.5), SAFETY, "red",
     ("72.5 requests per minute (red at 60 or more)", "1 user in the last 5 min (yellow: 1-2)")),
    ("rpm above red_rpm, already red by users", snap(4, rpm=1500), SAFETY, "red",
     ("4 users in the last 5 min (red: 3 or more)", "1500 requests per minute (red at 60 or more)")),
    ("red_rpm 0 disables it", snap(0, rpm=10_000), SafetyConfig(2, 120, 0), "green",
     ("no users in the last 5 min",)),
    ("tunnel down, named", snap(0, tunnel=False, tunnel_process="cloudflared"), SAFETY, "green",
     ("no users in the last 5 min",
      "tunnel process cloudflared is not running: outside users cannot reach the app")),
    ("tunnel down, unnamed, yellow stays yellow", snap(1, tunnel=False), SAFETY, "yellow",
     ("1 user in the last 5 min (yellow: 1-2)",
      "the tunnel process is not running: outside users cannot reach the app")),
    ("tunnel up", snap(0, tunnel=True), SAFETY, "green", ("no users in the last 5 min",)),
    ("tunnel not configured", snap(0, tunnel=None), SAFETY, "green", ("no users in the last 5 min",)),
    ("app down", snap(0, app_up=False), SAFETY, "green", (QUIET, "the app is not serving")),
    ("app down and tunnel down, red", snap(3, tunnel=False, app_up=False, tunnel_process="cloudflared"),
     SAFETY, "red", ("3 users in the last 5 min (red: 3 or more)",
             "tunnel process cloudflared is not running: outside users cannot reach the app",
             "the app is not serving")),
    ("window wording 90 s", snap(0, window_s=90), SAFETY, "green", ("no users in the last 1 min 30 s",)),
    ("window wording 1 h", snap(2, window_s=3600), SAFETY, "yellow",
     ("2 users in the last 1 h (yellow: 1-2)",)),
]


@pytest.mark.parametrize(("s", "safety", "color", "reasons"), [r[1:] for r in VERDICT_ROWS],
                         ids=[r[0] for r in VERDICT_ROWS])
def test_verdict(s: Snapshot, safety: SafetyConfig, color: str, reasons: tuple[str, ...]) -> None:
    v = verdict(s, safety)
    assert v.color == color
    assert v.reasons == reasons
    assert v.users == s.users


# --------------------------------------------------------------------------- duration_words


@pytest.mark.parametrize(("seconds", "words"), [
    (0, "0 s"), (0.4, "0 s"), (-5, "0 s"), (1, "1 s"), (40, "40 s"), (59.6, "1 min"), (60, "1 min"),
    (90, "1 min 30 s"), (300, "5 min"), (3599, "59 min 59 s"), (3600, "1 h"), (3601, "1 h"),
    (3660, "1 h 1 min"), (7 * 3600 + 12 * 60 + 40, "7 h 12 min"), (86400, "1 d"), (90000, "1 d 1 h"),
    (86400 + 59, "1 d"),
])
def test_duration_words(seconds: float, words: str) -> None:
    assert duration_words(seconds) == words


# --------------------------------------------------------------------------- classify

DAY = sched(preferred=("02:00-06:00",), acceptable=("14:00-16:00",), avoid=("09:00-12:00", "19:00-22:00"))
OVERLAP = sched(preferred=("08:00-12:00",), acceptable=("07:00-13:00",), avoid=("10:00-11:00",))
WRAP = sched(preferred=("23:00-01:00",), avoid=("22:00-23:30",))
CHAIN = sched(avoid=("09:00-12:00", "11:00-13:00", "13:00-14:00"))
TO_MIDNIGHT = sched(acceptable=("22:00-24:00",))
NY_SCHED_SPRING = sched("America/New_York", preferred=("02:30-04:00",), avoid=("01:00-03:00",),
                        acceptable=("02:00-02:30",))
NY_GAP_ONLY = sched("America/New_York", acceptable=("02:00-02:30",))
NY_SCHED_FALL = sched("America/New_York", preferred=("01:00-01:30",), acceptable=("01:30-03:00",))
BERLIN_SCHED = sched("Europe/Berlin", preferred=("02:00-06:00",))

CLASSIFY_ROWS = [
    # Asia/Seoul (UTC+9, no DST) with `now` given in UTC
    ("seoul preferred", DAY, utc(2026, 11, 25, 18, 0), "preferred", "02:00-06:00", kst(2026, 11, 26, 6, 0)),
    ("seoul preferred start edge", DAY, utc(2026, 11, 25, 17, 0), "preferred", "02:00-06:00",
     kst(2026, 11, 26, 6, 0)),
    ("seoul preferred end edge is outside", DAY, utc(2026, 11, 25, 21, 0), "open", None, None),
    ("seoul 1 min before preferred", DAY, utc(2026, 11, 25, 16, 59), "open", None, None),
    ("seoul avoid morning", DAY, utc(2026, 11, 26, 1, 30), "avoid", "09:00-12:00", kst(2026, 11, 26, 12, 0)),
    ("seoul avoid evening", DAY, utc(2026, 11, 26, 10, 0), "avoid", "19:00-22:00", kst(2026, 11, 26, 22, 0)),
    ("seoul acceptable", DAY, utc(2026, 11, 26, 5, 0), "acceptable", "14:00-16:00", kst(2026, 11, 26, 16, 0)),
    ("seoul open", DAY, utc(2026, 11, 26, 8, 0), "open", None, None),
    ("now in another zone", DAY, ny(2026, 11, 25, 13, 0), "preferred", "02:00-06:00",
     kst(2026, 11, 26, 6, 0)),
    # overlaps: avoid beats preferred beats acceptable
    ("overlap: acceptable only", OVERLAP, kst(2026, 11, 26, 7, 30), "acceptable", "07:00-13:00",
     kst(2026, 11, 26, 13, 0)),
    ("overlap: preferred over acceptable", OVERLAP, kst(2026, 11, 26, 9, 0), "preferred", "08:00-12:00",
     kst(2026, 11, 26, 12, 0)),
    ("overlap: avoid over both", OVERLAP, kst(2026, 11, 26, 10, 0), "avoid", "10:00-11:00",
     kst(2026, 11, 26, 11, 0)),
    ("overlap: after avoid, preferred again", OVERLAP, kst(2026, 11, 26, 11, 0), "preferred", "08:00-12:00",
     kst(2026, 11, 26, 12, 0)),
    ("overlap: after preferred, acceptable again", OVERLAP, kst(2026, 11, 26, 12, 30), "acceptable",
     "07:00-13:00", kst(2026, 11, 26, 13, 0)),
    # overlapping and back-to-back windows of one kind are one stretch
    ("chain: until the last one ends", CHAIN, kst(2026, 11, 26, 9, 30), "avoid", "09:00-12:00",
     kst(2026, 11, 26, 14, 0)),
    ("chain: inside the later one", CHAIN, kst(2026, 11, 26, 12, 30), "avoid", "11:00-13:00",
     kst(2026, 11, 26, 14, 0)),
    # midnight wrap, both sides of midnight
    ("wrap: before (inside the avoid window)", WRAP, kst(2026, 11, 26, 22, 59), "avoid", "22:00-23:30",
     kst(2026, 11, 26, 23, 30)),
    ("wrap: start, avoid beats preferred", WRAP, kst(2026, 11, 26, 23, 0), "avoid", "22:00-23:30",
     kst(2026, 11, 26, 23, 30)),
    ("wrap: inside before midnight", WRAP, kst(2026, 11, 26, 23, 45), "preferred", "23:00-01:00",
     kst(2026, 11, 27, 1, 0)),
    ("wrap: at midnight", WRAP, kst(2026, 11, 27, 0, 0), "preferred", "23:00-01:00", kst(2026, 11, 27, 1, 0)),
    ("wrap: inside after midnight", WRAP, kst(2026, 11, 27, 0, 59), "preferred", "23:00-01:00",
     kst(2026, 11, 27, 1, 0)),
    ("wrap: after", WRAP, kst(2026, 11, 27, 1, 0), "open", None, None),
    ("wrap: well before", WRAP, kst(2026, 11, 26, 21, 0), "open", None, None),
    ("24:00 end", TO_MIDNIGHT, kst(2026, 11, 26, 23, 59), "acceptable", "22:00-24:00",
     kst(2026, 11, 27, 0, 0)),
    ("24:00 end, after", TO_MIDNIGHT, kst(2026, 11, 27, 0, 0), "open", None, None),
    # America/New_York, spring forward 2026-03-08 02:00 EST -> 03:00 EDT (07:00 UTC)
    ("NY spring: before the gap", NY_SCHED_SPRING, utc(2026, 3, 8, 6, 59), "avoid", "01:00-03:00",
     utc(2026, 3, 8, 7, 0)),
    ("NY spring: avoid ends at the jump, preferred starts there", NY_SCHED_SPRING, utc(2026, 3, 8, 7, 0),
     "preferred", "02:30-04:00", ny(2026, 3, 8, 4, 0)),
    ("NY spring: window inside the gap does not happen", NY_GAP_ONLY, utc(2026, 3, 8, 7, 0), "open", None,
     None),
    ("NY spring: next day normal", NY_SCHED_SPRING, ny(2026, 3, 9, 2, 15), "avoid", "01:00-03:00",
     ny(2026, 3, 9, 3, 0)),
    ("NY spring: next day, 02:15 acceptable exists again", NY_GAP_ONLY, ny(2026, 3, 9, 2, 15), "acceptable",
     "02:00-02:30", ny(2026, 3, 9, 2, 30)),
    # fall back 2026-11-01 02:00 EDT -> 01:00 EST (06:00 UTC): 01:00-02:00 happens twice
    ("NY fall: first 01:15 is in the window", NY_SCHED_FALL, utc(2026, 11, 1, 5, 15), "preferred",
     "01:00-01:30", utc(2026, 11, 1, 5, 30)),
    ("NY fall: second 01:15 is not (counts once)", sched("America/New_York", preferred=("01:00-01:30",)),
     utc(2026, 11, 1, 6, 15), "open", None, None),
    ("NY fall: a window ending after the repeat spans it", NY_SCHED_FALL, ny(2026, 11, 1, 1, 15, fold=1),
     "acceptable", "01:30-03:00", utc(2026, 11, 1, 8, 0)),
    # Europe/Berlin: 2026-03-29 02:00 CET -> 03:00 CEST, 2026-10-25 03:00 CEST -> 02:00 CET
    ("Berlin spring: before", BERLIN_SCHED, utc(2026, 3, 29, 0, 59), "open", None, None),
    ("Berlin spring: 02:00 starts at 03:00 CEST", BERLIN_SCHED, utc(2026, 3, 29, 1, 0), "preferred",
     "02:00-06:00", berlin(2026, 3, 29, 6, 0)),
    ("Berlin fall: first 02:30", BERLIN_SCHED, utc(2026, 10, 25, 0, 30), "preferred", "02:00-06:00",
     utc(2026, 10, 25, 5, 0)),
    ("Berlin fall: second 02:30 is still inside", BERLIN_SCHED, utc(2026, 10, 25, 1, 30), "preferred",
     "02:00-06:00", utc(2026, 10, 25, 5, 0)),
    ("Berlin fall: 06:00 CET ends it", BERLIN_SCHED, utc(2026, 10, 25, 5, 0), "open", None, None),
    ("no windows", sched(), utc(2026, 11, 26, 0, 0), "open", None, None),
]


@pytest.mark.parametrize(("sch", "now", "kind", "window", "ends_at"), [r[1:] for r in CLASSIFY_ROWS],
                         ids=[r[0] for r in CLASSIFY_ROWS])
def test_classify(sch: ScheduleConfig, now: datetime, kind: str, window: str | None,
                  ends_at: datetime | None) -> None:
    state = classify(now, sch)
    assert (state.kind, state.window.text if state.window else None) == (kind, window)
    assert state.ends_at == ends_at
    if ends_at is not None:
        assert state.ends_at.utcoffset() is not None


def test_classify_needs_an_aware_time() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        classify(datetime(2026, 11, 26, 3, 0), DAY)
    with pytest.raises(ValueError, match="timezone-aware"):
        classify(datetime(2026, 11, 26, 3, 0), sched())


# --------------------------------------------------------------------------- next_start

NEXT_START_ROWS = [
    ("inside returns now", ["02:00-06:00"], SEOUL, utc(2026, 11, 25, 18, 0), utc(2026, 11, 25, 18, 0)),
    ("before, same day", ["02:00-06:00"], SEOUL, kst(2026, 11, 26, 1, 0), kst(2026, 11, 26, 2, 0)),
    ("at the end: the next day", ["02:00-06:00"], SEOUL, kst(2026, 11, 26, 6, 0), kst(2026, 11, 27, 2, 0)),
    ("after, next day", ["02:00-06:00"], SEOUL, kst(2026, 11, 26, 18, 48), kst(2026, 11, 27, 2, 0)),
    ("the soonest of several", ["02:00-06:00", "14:00-15:00", "20:00-21:00"], SEOUL, kst(2026, 11, 26, 10, 0),
     kst(2026, 11, 26, 14, 0)),
    ("the soonest, wrapping the day", ["14:00-15:00", "01:00-02:00"], SEOUL, kst(2026, 11, 26, 16, 0),
     kst(2026, 11, 27, 1, 0)),
    ("wrap window, inside after midnight", ["23:00-01:00"], SEOUL, kst(2026, 11, 27, 0, 30),
     kst(2026, 11, 27, 0, 30)),
    ("wrap window, before", ["23:00-01:00"], SEOUL, kst(2026, 11, 26, 22, 0), kst(2026, 11, 26, 23, 0)),
    ("wrap window, after", ["23:00-01:00"], SEOUL, kst(2026, 11, 27, 1, 0), kst(2026, 11, 27, 23, 0)),
    ("no windows", [], SEOUL, kst(2026, 11, 26, 1, 0), None),
    ("NY: start in the gap moves to the jump", ["02:30-04:00"], NY, ny(2026, 3, 7, 12, 0),
     utc(2026, 3, 8, 7, 0)),
    ("NY: the day after the jump is normal", ["02:30-04:00"], NY, utc(2026, 3, 8, 8, 30),
     ny(2026, 3, 9, 2, 30)),
    ("NY: a window wholly inside the gap skips that day", ["02:00-02:30"], NY, ny(2026, 3, 7, 12, 0),
     ny(2026, 3, 9, 2, 0)),
    ("NY fall: the repeated hour counts once", ["01:15-01:45"], NY, utc(2026, 11, 1, 6, 0),
     ny(2026, 11, 2, 1, 15)),
    ("NY fall: before, the first occurrence", ["01:15-01:45"], NY, utc(2026, 11, 1, 4, 0),
     utc(2026, 11, 1, 5, 15)),
    ("Berlin spring", ["02:00-06:00"], BERLIN, berlin(2026, 3, 28, 12, 0), utc(2026, 3, 29, 1, 0)),
    ("Berlin fall", ["02:00-06:00"], BERLIN, berlin(2026, 10, 24, 12, 0), utc(2026, 10, 25, 0, 0)),
]


@pytest.mark.parametrize(("windows", "zone", "now", "expected"), [r[1:] for r in NEXT_START_ROWS],
                         ids=[r[0] for r in NEXT_START_ROWS])
def test_next_start(windows: list[str], zone: ZoneInfo, now: datetime, expected: datetime | None) -> None:
    assert next_start(now, [W(w) for w in windows], zone) == expected


# --------------------------------------------------------------------------- next_weekly

TUE_3 = Weekly(1, 180, "tue 03:00")
NEXT_WEEKLY_ROWS = [
    ("same day, before", TUE_3, SEOUL, kst(2026, 11, 24, 2, 59), kst(2026, 11, 24, 3, 0)),
    ("exactly at: a week later", TUE_3, SEOUL, kst(2026, 11, 24, 3, 0), kst(2026, 12, 1, 3, 0)),
    ("same day, after", TUE_3, SEOUL, kst(2026, 11, 24, 3, 1), kst(2026, 12, 1, 3, 0)),
    ("from sunday", TUE_3, SEOUL, kst(2026, 11, 22, 12, 0), kst(2026, 11, 24, 3, 0)),
    ("from wednesday, across the week", TUE_3, SEOUL, kst(2026, 11, 25, 12, 0), kst(2026, 12, 1, 3, 0)),
    ("across a month and year", TUE_3, SEOUL, kst(2026, 12, 30, 0, 0), kst(2027, 1, 5, 3, 0)),
    ("UTC monday evening is Seoul tuesday", TUE_3, SEOUL, utc(2026, 11, 23, 17, 59), kst(2026, 11, 24, 3, 0)),
    ("UTC monday after 18:00 is past it", TUE_3, SEOUL, utc(2026, 11, 23, 18, 0), kst(2026, 12, 1, 3, 0)),
    ("sunday 23:59 for monday 00:00", Weekly(0, 0, "mon 00:00"), SEOUL, kst(2026, 11, 29, 23, 59),
     kst(2026, 11, 30, 0, 0)),
    ("NY spring: 02:30 does not exist, 03:00 EDT", Weekly(6, 150, "sun 02:30"), NY, ny(2026, 3, 1, 12, 0),
     utc(2026, 3, 8, 7, 0)),
    ("NY spring: at that instant, a week later", Weekly(6, 150, "sun 02:30"), NY, utc(2026, 3, 8, 7, 0),
     ny(2026, 3, 15, 2, 30)),
    ("NY fall: first 01:30", Weekly(6, 90, "sun 01:30"), NY, utc(2026, 11, 1, 5, 29),
     utc(2026, 11, 1, 5, 30)),
    ("NY fall: second 01:30 does not count", Weekly(6, 90, "sun 01:30"), NY, utc(2026, 11, 1, 5, 30),
     ny(2026, 11, 8, 1, 30)),
    ("NY: a week across the spring change is 167 h", Weekly(5, 720, "sat 12:00"), NY, ny(2026, 3, 7, 12, 0),
     ny(2026, 3, 14, 12, 0)),
]


@pytest.mark.parametrize(("weekly", "zone", "now", "expected"), [r[1:] for r in NEXT_WEEKLY_ROWS],
                         ids=[r[0] for r in NEXT_WEEKLY_ROWS])
def test_next_weekly(weekly: Weekly, zone: ZoneInfo, now: datetime, expected: datetime) -> None:
    got = next_weekly(now, weekly, zone)
    assert got == expected
    assert got > now


def test_next_weekly_across_dst_is_wall_clock() -> None:
    got = next_weekly(ny(2026, 3, 7, 12, 0), Weekly(5, 720, "sat 12:00"), NY)
    assert got - ny(2026, 3, 7, 12, 0) == timedelta(hours=167)


# --------------------------------------------------------------------------- decide

D_SCHED = sched(preferred=("02:00-06:00",), acceptable=("14:00-16:00",), avoid=("09:00-12:00",))
NO_PREF = sched(avoid=("09:00-12:00",))
OPEN = kst(2026, 11, 26, 15, 0)  # inside acceptable, outside preferred and avoid
OPEN2 = kst(2026, 11, 26, 18, 48)
AVOID = kst(2026, 11, 26, 10, 0)
PREF = kst(2026, 11, 26, 3, 0)
GREEN = Verdict("green", ("no users in the last 5 min",))
YELLOW = Verdict("yellow", ("1 user in the last 5 min (yellow: 1-2)",), users=1)
RED = Verdict("red", ("5 users in the last 5 min (red: 3 or more)",), users=5)
S = timedelta(seconds=1)
GRACE = 300.0

DECIDE_ROWS = [
    # 1. force
    ("force inside avoid", RED, AVOID, SAFETY, D_SCHED, GRACE, None, None, True,
     Decision("start", "forced: not waiting for a quiet moment; health checks still run", None)),
    ("force when red outside preferred", RED, OPEN, SAFETY, D_SCHED, GRACE, None, None, True,
     Decision("start", "forced: not waiting for a quiet moment; health checks still run", None)),
    # 2. avoid
    ("avoid, even green and quiet", GREEN, AVOID, SAFETY, D_SCHED, GRACE, AVOID - 3600 * S, None, False,
     Decision("wait", "inside the avoid window 09:00-12:00 until 12:00", kst(2026, 11, 26, 12, 0))),
    ("avoid, yellow posts no notice", YELLOW, AVOID, SAFETY, D_SCHED, GRACE, None, None, False,
     Decision("wait", "inside the avoid window 09:00-12:00 until 12:00", kst(2026, 11, 26, 12, 0))),
    ("avoid, now given in UTC", RED, utc(2026, 11, 26, 1, 0), SAFETY, D_SCHED, GRACE, None, None, False,
     Decision("wait", "inside the avoid window 09:00-12:00 until 12:00", kst(2026, 11, 26, 12, 0))),
    # 3. green
    ("green, quiet exactly reached", GREEN, OPEN, SAFETY, D_SCHED, GRACE, OPEN - 120 * S, None, False,
     Decision("start", "quiet for 2 min (needed 2 min)", None)),
    ("green, quiet well past", GREEN, OPEN, SAFETY, D_SCHED, GRACE, OPEN - 4000 * S, None, False,
     Decision("start", "quiet for 1 h 6 min (needed 2 min)", None)),
    ("green, 1 s short", GREEN, OPEN, SAFETY, D_SCHED, GRACE, OPEN - 119 * S, None, False,
     Decision("wait", "quiet for 1 min 59 s of 2 min", OPEN + S)),
    ("green, 40 s in", GREEN, OPEN, SAFETY, D_SCHED, GRACE, OPEN - 40 * S, None, False,
     Decision("wait", "quiet for 40 s of 2 min", OPEN + 80 * S)),
    ("green, just turned green", GREEN, OPEN, SAFETY, D_SCHED, GRACE, None, None, False,
     Decision("wait", "quiet for 0 s of 2 min", OPEN + 120 * S)),
    ("green, quiet_for_s 0", GREEN, OPEN, SafetyConfig(2, 0, 60), D_SCHED, GRACE, None, None, False,
     Decision("start", "quiet for 0 s (needed 0 s)", None)),
    ("green inside preferred: still the quiet rule", GREEN, PREF, SAFETY, D_SCHED, GRACE, PREF - 10 * S, None,
     False, Decision("wait", "quiet for 10 s of 2 min", PREF + 110 * S)),
    ("green, a notice already up does not matter", GREEN, OPEN, SAFETY, D_SCHED, GRACE, OPEN - 130 * S,
     OPEN - 200 * S, False, Decision("start", "quiet for 2 min 10 s (needed 2 min)", None)),
    # 4. yellow outside avoid, red inside preferred
    ("yellow: post the notice", YELLOW, OPEN, SAFETY, D_SCHED, GRACE, None, None, False,
     Decision("notice", "1 user active: posting a notice, then waiting 5 min", OPEN + 300 * S)),
    ("yellow: grace running", YELLOW, OPEN, SAFETY, D_SCHED, GRACE, None, OPEN - 299 * S, False,
     Decision("wait", "notice posted at 14:55; grace ends at 15:00 (in 1 s)", OPEN + S)),
    ("yellow: grace exactly over", YELLOW, OPEN, SAFETY, D_SCHED, GRACE, None, OPEN - 300 * S, False,
     Decision("start", "notice posted at 14:55, grace over", None)),
    ("yellow: no windows at all", YELLOW, OPEN, SAFETY, sched(), GRACE, None, None, False,
     Decision("notice", "1 user active: posting a notice, then waiting 5 min", OPEN + 300 * S)),
    ("yellow: grace 0 still posts first", YELLOW, OPEN, SAFETY, D_SCHED, 0.0, None, None, False,
     Decision("notice", "1 user active: posting a notice, then waiting 0 s", OPEN)),
    ("yellow: grace 0, posted now", YELLOW, OPEN, SAFETY, D_SCHED, 0.0, None, OPEN, False,
     Decision("start", "notice posted at 15:00, grace over", None)),
    ("red inside preferred: notice", RED, PREF, SAFETY, D_SCHED, GRACE, None, None, False,
     Decision("notice", "5 users active inside the preferred window 02:00-06:00: posting a notice, then "
              "waiting 5 min", PREF + 300 * S)),
    ("red inside preferred: grace running", RED, PREF, SAFETY, D_SCHED, GRACE, None, PREF - 60 * S, False,
     Decision("wait", "notice posted at 02:59; grace ends at 03:04 (in 4 min)", PREF + 240 * S)),
    ("red inside preferred: grace exactly over", RED, PREF, SAFETY, D_SCHED, GRACE, None, PREF - 300 * S,
     False, Decision("start", "notice posted at 02:55, grace over", None)),
    ("red inside preferred, now in UTC", RED, utc(2026, 11, 25, 18, 0), SAFETY, D_SCHED, GRACE, None,
     utc(2026, 11, 25, 17, 55), False, Decision("start", "notice posted at 02:55, grace over", None)),
    # 5. red outside preferred
    ("red outside preferred: wait for it", RED, OPEN2, SAFETY, D_SCHED, GRACE, None, None, False,
     Decision("wait", "busy (red): waiting for the preferred window 02:00-06:00 (in 7 h 12 min)",
              kst(2026, 11, 27, 2, 0))),
    ("red inside acceptable is not preferred", RED, OPEN, SAFETY, D_SCHED, GRACE, None, OPEN - 3600 * S,
     False, Decision("wait", "busy (red): waiting for the preferred window 02:00-06:00 (in 11 h)",
              kst(2026, 11, 27, 2, 0))),
    ("red at the preferred end edge", RED, kst(2026, 11, 26, 6, 0), SAFETY, D_SCHED, GRACE, None, None, False,
     Decision("wait", "busy (red): waiting for the preferred window 02:00-06:00 (in 20 h)",
              kst(2026, 11, 27, 2, 0))),
    ("red, no preferred window", RED, OPEN, SAFETY, NO_PREF, GRACE, None, None, False,
     Decision("wait", "busy (red): waiting for activity to drop", None)),
    ("red, two preferred windows: the sooner", RED, OPEN2, SAFETY,
     sched(preferred=("02:00-06:00", "22:30-23:00")), GRACE, None, None, False,
     Decision("wait", "busy (red): waiting for the preferred window 22:30-23:00 (in 3 h 42 min)",
              kst(2026, 11, 26, 22, 30))),
]


@pytest.mark.parametrize(
    ("v", "now", "safety", "sch", "grace", "green_since", "noticed_at", "force", "expected"),
    [r[1:] for r in DECIDE_ROWS], ids=[r[0] for r in DECIDE_ROWS])
def test_decide(v: Verdict, now: datetime, safety: SafetyConfig, sch: ScheduleConfig, grace: float,
                green_since: datetime | None, noticed_at: datetime | None, force: bool,
                expected: Decision) -> None:
    got = decide(v, now, safety, sch, grace, green_since=green_since, noticed_at=noticed_at, force=force)
    assert got == expected


@pytest.mark.parametrize(("now", "green_since", "expected"), [
    # both in New York across the fall-back hour: 1 min apart on the wall clock, 61 min in fact
    (ny(2026, 11, 1, 1, 30, fold=1), ny(2026, 11, 1, 1, 29),
     Decision("start", "quiet for 1 h 1 min (needed 2 min)", None)),
    # and across spring forward: 61 min apart on the wall clock, 1 min in fact
    (ny(2026, 3, 8, 3, 0), ny(2026, 3, 8, 1, 59), Decision("wait", "quiet for 1 min of 2 min",
                                                           utc(2026, 3, 8, 7, 1))),
])
def test_decide_quiet_time_is_real_time_across_dst(now: datetime, green_since: datetime,
                                                   expected: Decision) -> None:
    sch = sched("America/New_York")
    got = decide(GREEN, now, SAFETY, sch, GRACE, green_since=green_since, noticed_at=None, force=False)
    assert got == expected


def test_decide_dst_avoid_end() -> None:
    """An avoid window ending in the spring-forward gap ends at the jump."""
    sch = sched("America/New_York", avoid=("01:00-02:30",))
    got = decide(GREEN, utc(2026, 3, 8, 6, 30), SAFETY, sch, GRACE, green_since=None, noticed_at=None,
                 force=False)
    assert got == Decision("wait", "inside the avoid window 01:00-02:30 until 03:00", utc(2026, 3, 8, 7, 0))


# --------------------------------------------------------------------------- recommendation

AVOID_NOW = "Inside the avoid window 09:00-12:00 until 12:00: do not update now."
RECOMMEND_ROWS = [
    ("green", GREEN, OPEN, D_SCHED, GRACE, "Safe to update now."),
    ("yellow", YELLOW, OPEN, D_SCHED, GRACE,
     "An update now would post a notice to 1 user and start after 5 min."),
    ("yellow, 2 users, grace 90 s", Verdict("yellow", ("x",), users=2), OPEN, D_SCHED, 90.0,
     "An update now would post a notice to 2 users and start after 1 min 30 s."),
    ("yellow, grace 0", YELLOW, OPEN, D_SCHED, 0.0,
     "An update now would post a notice to 1 user and start right away."),
    ("red outside preferred", RED, OPEN2, D_SCHED, GRACE,
     "Busy (red): wait for the preferred window 02:00-06:00 (in 7 h 12 min)."),
    ("red inside preferred", Verdict("red", ("x",), users=4), PREF, D_SCHED, GRACE,
     "Busy (red) but inside the preferred window 02:00-06:00: an update now would post a notice to 4 users "
     "and start after 5 min."),
    ("red by rpm alone", Verdict("red", ("x",), users=0, rpm=100), PREF, D_SCHED, GRACE,
     "Busy (red) but inside the preferred window 02:00-06:00: an update now would post a notice to the users "
     "and start after 5 min."),
    ("red, no preferred", RED, OPEN, NO_PREF, GRACE,
     "Busy (red): wait for activity to drop (no preferred window is configured)."),
    ("avoid", GREEN, AVOID, D_SCHED, GRACE, AVOID_NOW),
    ("avoid, red", RED, AVOID, D_SCHED, GRACE, AVOID_NOW),
]


@pytest.mark.parametrize(("v", "now", "sch", "grace", "expected"), [r[1:] for r in RECOMMEND_ROWS],
                         ids=[r[0] for r in RECOMMEND_ROWS])
def test_recommendation(v: Verdict, now: datetime, sch: ScheduleConfig, grace: float, expected: str) -> None:
    assert recommendation(v, now, SAFETY, sch, grace) == expected


# --------------------------------------------------------------------------- with a parsed config


def test_policy_with_a_parsed_config(tmp_path: Path) -> None:
    cfg = config.parse(f"""
root: {tmp_path / "state"}
app: {{repo: {tmp_path / "repo"}}}
safety: {{yellow_max_users: 2, quiet_for_s: 120}}
schedule:
  timezone: Asia/Seoul
  preferred: ["02:00-06:00"]
  acceptable: ["14:00-16:00"]
  avoid: ["09:00-12:00", "19:00-22:00"]
  weekly: "tue 03:00"
""")
    v = verdict(snap(3), cfg.safety)
    assert v.color == "red"
    assert classify(utc(2026, 11, 26, 11, 0), cfg.schedule) == WindowState(
        "avoid", cfg.schedule.avoid[1], kst(2026, 11, 26, 22, 0))
    assert cfg.schedule.weekly is not None
    due = next_weekly(kst(2026, 11, 26, 12, 0), cfg.schedule.weekly, cfg.schedule.zone)
    assert due == kst(2026, 12, 1, 3, 0)
    d = decide(v, kst(2026, 11, 26, 18, 48), cfg.safety, cfg.schedule, cfg.update.notice_grace_s,
               green_since=None, noticed_at=None, force=False)
    assert (d.action, d.until) == ("wait", kst(2026, 11, 27, 2, 0))
