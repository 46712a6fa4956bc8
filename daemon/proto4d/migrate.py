"""The migration step: run `app.migrate` for a release, and read which schema revision a database has.

The command is an argv (no shell) with `{python}` (the release venv's interpreter) and
`{release}` filled in, run in the release's workdir, so alembic's relative
`sqlite:///data/app.db` resolves through that tree's shared links: the canary's copies
when run from the canary's tree, the live database at the switch.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from proto4d import procs
from proto4d.appuser import AppUser


@dataclass(frozen=True)
class Migration:
    ok: bool
    seconds: float
    argv: tuple[str, ...]
    output: str  # the last lines, for the update log and the abort reason

    def describe(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        return f"{' '.join(self.argv)}: {verdict} in {self.seconds:.2f} s"


def argv_for(template: Sequence[str], python: Path, release: Path) -> list[str]:
    values = {"python": str(python), "release": str(release)}
    return [arg.format(**values) for arg in template]


def run(template: Sequence[str], *, python: Path, release: Path, workdir: Path, env: Mapping[str, str],
        timeout: float, cancel: procs.Cancel | None = None,
        registry: procs.PidRegistry | None = None, user: AppUser | None = None) -> Migration:
    argv = argv_for(template, python, release)
    t = time.monotonic()
    problem = (user.problem() or user.cannot_run(python)) if user is not None else None
    if problem:
        return Migration(False, 0.0, tuple(argv), problem)
    try:
        procs.run(argv, cwd=workdir, env={**env, **(user.env() if user else {})}, timeout=timeout, cancel=cancel,
                  registry=registry, kind="migrate", user=user.popen() if user else None, background=False)
        return Migration(True, time.monotonic() - t, tuple(argv), "")
    except procs.CommandFailed as e:
        return Migration(False, time.monotonic() - t, tuple(argv), e.tail)
    except OSError as e:  # the interpreter or the tool is missing: a failed migration with its reason
        return Migration(False, time.monotonic() - t, tuple(argv), f"{type(e).__name__}: {e}")


def schema_revision(db: Path) -> str | None:
    """alembic's revision of a database (None: not a database, or not managed by alembic)."""
    import sqlite3  # only apps with a database pay for the module

    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return None
    try:
        rows = con.execute("SELECT version_num FROM alembic_version").fetchall()
        return ",".join(sorted(r[0] for r in rows)) or None
    except sqlite3.Error:
        return None
    finally:
        con.close()
