"""`proto4d pending`: what an update would bring, before asking for one.

Commits between the running release and the branch head (subjects), requirement lines added
and removed, `.env.example` keys that are new (and which of them the shared `.env` lacks, the
preflight would refuse those), migration files added, and whether a release is staged.

The daemon's mirror (`state/repo.git`) belongs to the daemon alone (it clears stale git locks
when it opens it), so this command fetches into its own bare repository, `state/pending.git`,
which borrows the mirror's objects through git's alternates: only what is new is downloaded.
The URL (which may carry a token) is given to git through its environment, never written to a
file or put on a command line other users can read.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import subprocess
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from proto4d import config as configmod
from proto4d import fsutil
from proto4d.envwatch import parse_env
from proto4d.paths import Paths
from proto4d.textsafe import safe_text

EX_OK, EX_FAILED = 0, 1
MIGRATION_DIR = re.compile(r"(^|/)(migrations|alembic)/versions/[^/]+\.py$")


class PendingError(Exception):
    """Git could not answer (unreachable origin, unknown commit); the message says which."""


@dataclass
class Pending:
    running: str | None
    head: str
    branch: str
    commits: list[str] = field(default_factory=list)
    requirements_added: list[str] = field(default_factory=list)
    requirements_removed: list[str] = field(default_factory=list)
    env_keys_new: list[str] = field(default_factory=list)
    env_keys_missing: list[str] = field(default_factory=list)
    migrations: list[str] = field(default_factory=list)
    staged: dict[str, Any] | None = None
    ahead: str = ""  # the head's release, prepared ahead while nobody was on (update.prepare_ahead_s)

    @property
    def up_to_date(self) -> bool:
        return self.running == self.head


# -- pure: diffs and texts -> what changes


def requirement_changes(diff: str) -> tuple[list[str], list[str]]:
    """Lines added and removed by a unified diff of a requirements file (comments and blanks left out)."""
    added, removed = [], []
    for line in diff.splitlines():
        if line.startswith(("+++", "---")):
            continue
        body = line[1:].split("#", 1)[0].strip()
        if not body:
            continue
        if line.startswith("+"):
            added.append(body)
        elif line.startswith("-"):
            removed.append(body)
    return added, removed


def new_env_keys(old_example: str, new_example: str, shared_env: str | None) -> tuple[list[str], list[str]]:
    """Keys the new `.env.example` lists that the old one did not; of all its keys, those the shared `.env` lacks."""
    old, new = set(parse_env(old_example)), set(parse_env(new_example))
    missing = sorted(new - set(parse_env(shared_env))) if shared_env is not None else []
    return sorted(new - old), missing


def migration_files(name_status: str) -> list[str]:
    """Added files that look like migrations (alembic's `versions/`), from `git diff --name-status`."""
    out = []
    for line in name_status.splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[0].startswith("A") and MIGRATION_DIR.search(parts[-1]):
            out.append(parts[-1])
    return out


# -- git


def _git(git_dir: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    try:
        r = subprocess.run(["git", "--git-dir", str(git_dir), *args], capture_output=True, text=True,
                           timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PendingError(f"git {args[0]}: {e}") from None
    if r.returncode != 0:
        raise PendingError(f"git {args[0]}: {r.stderr.strip()[-400:] or r.returncode}")
    return r.stdout


def fetch(paths: Paths, url: str, branch: str) -> tuple[Path, str]:
    """Fetch the branch head into state/pending.git; return (git dir, head sha)."""
    repo = paths.state / "pending.git"
    fsutil.ensure_dir(paths.state, 0o700)
    lock = os.open(paths.state / "pending.lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (repo / "HEAD").exists():
            tmp = repo.with_name("pending.git.tmp")
            fsutil.remove_tree(tmp)
            _git(tmp, "init", "--quiet", "--bare")
            os.replace(tmp, repo)
        mirror_objects = paths.mirror / "objects"
        if mirror_objects.is_dir():
            fsutil.atomic_write(repo / "objects" / "info" / "alternates", f"{mirror_objects}\n")
        env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_COUNT": "1",
               "GIT_CONFIG_KEY_0": "remote.origin.url", "GIT_CONFIG_VALUE_0": url}
        _git(repo, "fetch", "--quiet", "--force", "--no-write-fetch-head", "origin",
             f"+refs/heads/{branch}:refs/remotes/origin/{branch}", env=env)
        head = _git(repo, "rev-parse", "--verify", f"refs/remotes/origin/{branch}^{{commit}}").strip()
        return repo, head
    finally:
        os.close(lock)


def _show(repo: Path, sha: str, path: str) -> str | None:
    try:
        return _git(repo, "show", f"{sha}:{path}")
    except PendingError:
        return None


def _has(repo: Path, sha: str) -> bool:
    try:
        _git(repo, "cat-file", "-e", f"{sha}^{{commit}}")
        return True
    except PendingError:
        return False


def collect(cfg: configmod.Config, paths: Paths, running: str | None) -> Pending:
    repo, head = fetch(paths, cfg.app.repo, cfg.app.branch)
    p = Pending(running=running, head=head, branch=cfg.app.branch)
    status = fsutil.read_json(paths.status) or {}
    p.staged = status.get("stage") or None
    if running == head:
        return p
    ahead = status.get("ahead") or {}
    if ahead.get("state") == "ready" and ahead.get("commit") == head:
        p.ahead = str(ahead.get("release") or "")
    sub = cfg.app.subdir

    def in_app(rel: str) -> str:
        return f"{sub}/{rel}" if sub else rel

    base = running if running and _has(repo, running) else None
    spec = f"{base}..{head}" if base else head
    log = _git(repo, "log", "--format=%h %s (%an, %ad)", "--date=short", "-100", spec)
    p.commits = [line for line in log.splitlines() if line.strip()]
    if base is None:
        return p
    if cfg.app.requirements:
        diff = _git(repo, "diff", base, head, "--", in_app(cfg.app.requirements))
        p.requirements_added, p.requirements_removed = requirement_changes(diff)
    for rel in _env_files(cfg.app.shared):
        new_example = _show(repo, head, in_app(rel + ".example"))
        if new_example is None:
            continue
        old_example = _show(repo, base, in_app(rel + ".example")) or ""
        try:
            shared_env: str | None = (paths.shared / rel).read_text(errors="replace")
        except OSError:
            shared_env = ""
        new, missing = new_env_keys(old_example, new_example, shared_env)
        p.env_keys_new += [f"{rel}: {k}" for k in new]
        p.env_keys_missing += [f"{rel}: {k}" for k in missing]
    names = _git(repo, "diff", "--name-status", base, head, "--", sub or ".")
    p.migrations = migration_files(names)
    return p


def _env_files(shared: Iterable[str]) -> list[str]:
    return [rel for rel in shared if Path(rel).name == ".env"]


def _running_commit(paths: Paths) -> str | None:
    status = fsutil.read_json(paths.status) or {}
    commit = (status.get("app") or {}).get("commit")
    if commit:
        return str(commit)
    name = paths.current_release()
    info = fsutil.read_json(paths.release(name) / "release.json") if name else None
    return info.get("commit") if isinstance(info, dict) else None


def render(p: Pending) -> str:
    if p.up_to_date:
        lines = [f"nothing pending: {p.branch} is at {p.head[:7]}, which is what runs"]
    else:
        lines = [f"an update would go from {p.running[:7] if p.running else '(nothing running)'} to "
                 f"{p.head[:7]} ({p.branch} head): {len(p.commits)} commit(s)"]
        lines += [f"  {c}" for c in p.commits]
        if p.requirements_added or p.requirements_removed:
            lines.append("requirements (a new venv is built before the switch):")
            lines += [f"  + {r}" for r in p.requirements_added] + [f"  - {r}" for r in p.requirements_removed]
        else:
            lines.append("requirements: unchanged (the running venv is reused)")
        if p.env_keys_new:
            lines.append("new keys in .env.example: " + ", ".join(p.env_keys_new))
        if p.env_keys_missing:
            lines.append("MISSING from the shared .env (the update would be refused until added): "
                         + ", ".join(p.env_keys_missing))
        if p.migrations:
            lines.append("migrations added (run on a copy first, then at the switch):")
            lines += [f"  {m}" for m in p.migrations]
        if p.ahead:
            lines.append(f"prepared ahead: {p.ahead} (while nobody was on; the update only checks it and switches)")
    lines.append(f"staged: {p.staged.get('release')} at {p.staged.get('url')}" if p.staged else "staged: none")
    return "\n".join(lines)


def cmd_pending(args: argparse.Namespace) -> int:
    cfg = configmod.load(args.config)
    paths = Paths(cfg.root)
    try:
        p = collect(cfg, paths, _running_commit(paths))
    except PendingError as e:
        print(safe_text(f"proto4d pending: cannot tell what an update would bring: {e}"))
        return EX_FAILED
    with contextlib.suppress(OSError):  # status shows it while the running commit is the one compared
        fsutil.atomic_write_json(paths.pending_report, {
            "checked_at": time.time(), "running": p.running, "head": p.head, "branch": p.branch,
            "commits": len(p.commits), "migrations": p.migrations}, durable=False)
    # Commit subjects and authors come from the repository: shown through textsafe.
    print(json.dumps(asdict(p) | {"up_to_date": p.up_to_date}, indent=2) if args.json
          else safe_text(render(p), multiline=True))
    return EX_OK
