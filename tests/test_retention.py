"""Retention as a pure decision: what goes and what must stay."""

from __future__ import annotations

import pytest

from proto4d.retention import ReleaseFacts, plan_logs, plan_releases, plan_venvs

DAY = 86400.0
NOW = 100 * DAY


def rels(*ages_days: float) -> list[ReleaseFacts]:
    return [ReleaseFacts(f"r{i}", NOW - age * DAY, f"v{i % 2}") for i, age in enumerate(ages_days)]


@pytest.mark.parametrize(("ages", "current", "previous", "keep_days", "keep_min", "expected"), [
    ((1, 2, 3), "r0", "r1", 7, 3, []),                        # all young
    ((1, 8, 9, 10), "r0", "r1", 7, 1, ["r3", "r2"]),          # old ones go, oldest first; previous stays
    ((1, 8, 9, 10), "r0", "r1", 7, 3, ["r3"]),                # newest 3 kept regardless of age
    ((20, 30, 40), "r2", "r1", 7, 1, []),                     # current and previous kept even when old
    ((20, 30, 40), "r2", None, 7, 1, ["r1"]),                 # no previous known: only the newest and current
    ((0.5, 0.6), None, None, 0, 1, ["r1"]),                   # keep_days 0: only keep_min protects
    ((8, 9, 10, 11), "r0", "r1", 7, 2, ["r3", "r2"]),
    ((), None, None, 7, 3, []),
])
def test_plan_releases(ages, current, previous, keep_days, keep_min, expected):
    assert plan_releases(rels(*ages), current=current, previous=previous, now=NOW, keep_days=keep_days,
                         keep_min=keep_min) == expected


def test_venvs_go_only_when_no_kept_release_or_process_uses_them():
    kept = [ReleaseFacts("a", 0, "v1"), ReleaseFacts("b", 0, "v2")]
    assert plan_venvs(["v1", "v2", "v3", "v4"], kept) == ["v3", "v4"]
    assert plan_venvs(["v1", "v3"], kept, in_use=["v3"]) == []


def test_update_logs_keep_the_newest_and_the_young():
    logs = [(f"update_{i}.log", NOW - i * DAY) for i in range(10)]
    assert plan_logs(logs, now=NOW, keep_days=7, keep_min=3) == ["update_8.log", "update_9.log"]
    assert plan_logs(logs, now=NOW, keep_days=0, keep_min=8) == ["update_8.log", "update_9.log"]
    assert plan_logs(logs, now=NOW, keep_days=30, keep_min=1) == []
