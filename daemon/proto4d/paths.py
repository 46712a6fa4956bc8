"""Where everything lives under `root` (the on-disk contract of DESIGN.md), in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from proto4d import fsutil


@dataclass(frozen=True)
class Paths:
    root: Path

    @property
    def request(self) -> Path:
        return self.root / "update.request"

    @property
    def releases(self) -> Path:
        return self.root / "releases"

    @property
    def current(self) -> Path:
        return self.root / "current"

    @property
    def venvs(self) -> Path:
        return self.root / "venvs"

    @property
    def shared(self) -> Path:
        return self.root / "shared"

    @property
    def backups(self) -> Path:
        """Database snapshots, one directory each (see snapshots.py)."""
        return self.root / "backups"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def mirror(self) -> Path:
        return self.state / "repo.git"

    @property
    def status(self) -> Path:
        return self.state / "status.json"

    @property
    def journal(self) -> Path:
        return self.state / "journal.json"

    @property
    def activity(self) -> Path:
        return self.state / "activity.jsonl"

    @property
    def app_pids(self) -> Path:
        return self.state / "app.pids"

    @property
    def lock(self) -> Path:
        return self.state / "daemon.lock"

    @property
    def requests(self) -> Path:
        """Consumed request files, moved here before they are acted on."""
        return self.state / "requests"

    @property
    def pending_report(self) -> Path:
        """What the last `proto4d pending` found (commits, migrations): `status` shows it while it holds."""
        return self.state / "pending.json"

    @property
    def answers(self) -> Path:
        """One small JSON file per request id: its final answer (what `update --wait` waits for)."""
        return self.state / "answers"

    @property
    def daemon_log(self) -> Path:
        return self.logs / "proto4d.log"

    @property
    def app_log(self) -> Path:
        return self.logs / "app.log"

    def update_log(self, stamp: str) -> Path:
        return self.logs / f"update_{stamp}.log"

    def release(self, name: str) -> Path:
        return self.releases / name

    def current_release(self) -> str | None:
        """The release `current` points at, or None when there is none (or it dangles)."""
        try:
            target = self.current.readlink()
        except OSError:
            return None
        name = target.name
        return name if (self.releases / name).is_dir() else None

    def make_dirs(self) -> None:
        # root itself stays traversable (the hub may read notice.json); everything in it is private.
        fsutil.ensure_dir(self.root, mode=fsutil.ROOT_MODE)
        for d in (self.releases, self.venvs, self.shared, self.state, self.logs, self.requests, self.answers):
            fsutil.ensure_dir(d)
