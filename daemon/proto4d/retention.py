"""Which releases, venvs and update logs to remove: a pure decision over names, ages and references.

Retained releases are the backups. Never removed: `current`, the release before it, the
newest `keep_min`, and anything younger than `keep_days`. A venv goes when no retained
release refers to it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ReleaseFacts:
    name: str
    created_at: float
    venv: str


def plan_releases(releases: Sequence[ReleaseFacts], *, current: str | None, previous: str | None, now: float,
                  keep_days: float, keep_min: int) -> list[str]:
    """Names of releases to remove, oldest first."""
    newest_first = sorted(releases, key=lambda r: (r.created_at, r.name), reverse=True)
    # Compared without regard to case: on a case-insensitive file system (APFS) `current` may name
    # the serving release in another spelling than its directory's.
    protected = {r.name.casefold() for r in newest_first[:keep_min]}
    protected.update(n.casefold() for n in (current, previous) if n)
    cutoff = now - keep_days * 86400
    doomed = [r for r in newest_first if r.name.casefold() not in protected and r.created_at < cutoff]
    return [r.name for r in reversed(doomed)]


def plan_venvs(venvs: Iterable[str], kept_releases: Iterable[ReleaseFacts],
               in_use: Iterable[str] = ()) -> list[str]:
    """Venv keys no kept release (nor a running process) refers to."""
    referenced = {r.venv for r in kept_releases} | set(in_use)
    return sorted(v for v in venvs if v not in referenced)



def plan_logs(logs: Sequence[tuple[str, float]], *, now: float, keep_days: float, keep_min: int) -> list[str]:
    """Per-update logs to remove: older than `keep_days`, beyond the newest `keep_min`."""
    newest_first = sorted(logs, key=lambda x: (x[1], x[0]), reverse=True)
    cutoff = now - keep_days * 86400
    return [name for name, mtime in newest_first[keep_min:] if mtime < cutoff]
