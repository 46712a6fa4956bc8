"""The app's own user (`app.user`): who app processes and migrations run as, and what they must own.

A daemon that runs as root (a LaunchDaemon, a system service) would otherwise hand root to
the app students talk to. With `app.user` the app, its canary and its migrations run as that
user: it owns what it writes (`shared/`, the canary's copies) and nothing else, so it cannot
drop an `update.request`, edit a release or read the daemon's state. The daemon keeps its
own user. A daemon that is not root cannot switch users: a start then fails with that
reason (and the backoff retries, in case the operator fixes it), never runs the app as the
wrong user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["AppUser", "for_name", "lookup", "resolve"]


@dataclass(frozen=True)
class AppUser:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str

    def problem(self) -> str | None:
        """Why the daemon cannot start a process as this user (None: it can)."""
        if self.uid < 0:
            return f"app.user {self.name}: no such user on this machine"
        if os.geteuid() != 0:
            return (f"app.user {self.name}: the daemon runs as uid {os.geteuid()}, not root, so it cannot start "
                    f"the app as another user (run the daemon as root, or leave app.user empty)")
        return None

    def cannot_run(self, program: Path) -> str | None:
        """Why this user could not execute `program` (its real path: a venv's python is a link to the
        interpreter it was made from, e.g. under a home directory that is 0700), or None."""
        return self._blocked(program, "reach", "execute", (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH),
                             "build venvs from a Python every user can run (the `python` key), or open that directory")

    def cannot_read(self, path: Path) -> str | None:
        """Why this user could not read `path` (e.g. the drain shim inside a proto4d installed under a
        private home directory), or None."""
        return self._blocked(path, "read", "read", (stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH),
                             "install proto4d where every user can read it, or open that directory")

    def _blocked(self, path: Path, reach: str, verb: str, bits: tuple[int, int, int], fix: str) -> str | None:
        real = Path(os.path.realpath(path))
        for d in reversed(real.parents):
            if not self._may(d, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH):
                st = os.stat(d)
                return (f"app.user {self.name} cannot {reach} {real} ({d} is {stat.filemode(st.st_mode)}, "
                        f"owner uid {st.st_uid}): {fix}")
        if not self._may(real, *bits):
            return f"app.user {self.name} may not {verb} {real}"
        return None

    def _may(self, path: Path, u: int, g: int, o: int) -> bool:
        try:
            st = os.stat(path)
        except OSError:
            return True  # not there: the start reports that itself
        if st.st_uid == self.uid:
            return bool(st.st_mode & u)
        if st.st_gid == self.gid or st.st_gid in self.groups:
            return bool(st.st_mode & g)
        return bool(st.st_mode & o)

    def popen(self) -> dict[str, Any]:
        """subprocess/asyncio keyword arguments: the user, its group and its supplementary groups."""
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups)}

    def env(self) -> dict[str, str]:
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name}

    def give(self, top: Path) -> None:
        """Make `top` and everything under it (symlinks not followed) the app user's."""
        if not os.path.lexists(top):
            return
        for path in [top, *_walk(top)]:
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                    continue  # a hard link may be a release's file (the canary's tree links them): never given
                if (st.st_uid, st.st_gid) != (self.uid, self.gid):
                    os.lchown(path, self.uid, self.gid)

    def prepare(self, *, root: Path, shared: Path, state: Path, cwd: Path, venv: Path) -> None:
        """Before a process starts as this user: what it writes is its own (shared/, and for a canary
        under state/ that canary's copies), and it can reach its working directory and its venv."""
        if self.uid < 0 or self.problem():
            return  # the start fails with the reason; nothing to hand over
        self.give(shared)
        self.reach(root, cwd)
        if root in venv.parents:
            self.reach(root, venv)
        parts = cwd.relative_to(state).parts if state in cwd.parents else ()
        if len(parts) >= 2:  # state/canary/<release>/tree/...: its copies are in .../shared (canarydata)
            self.give(state / parts[0] / parts[1] / "shared")

    def reach(self, base: Path, target: Path) -> None:
        """Let the user traverse (search, never list) the directories from `base` down to `target`.

        The canary runs from under `state/`, private to the daemon (0700); it gets o+x on the
        way there, so the app user passes through without seeing any name in it (the files in
        state/ are 0600 anyway)."""
        path = base
        for part in (target.relative_to(base).parts if target != base else ()):
            _add_search(path)
            path = path / part
        _add_search(path)


def _add_search(d: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(d)
        if stat.S_ISDIR(st.st_mode) and not st.st_mode & stat.S_IXOTH:
            os.chmod(d, stat.S_IMODE(st.st_mode) | stat.S_IXOTH)


def _walk(top: Path) -> Iterable[Path]:
    if not top.is_dir() or top.is_symlink():
        return
    for dirpath, dirnames, filenames in os.walk(top):  # os.walk does not follow symlinked directories
        for name in dirnames + filenames:
            yield Path(dirpath) / name


def lookup(name: str) -> AppUser:
    """A user by name or numeric uid; KeyError when this machine has none."""
    entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    groups = tuple(g for g in os.getgrouplist(entry.pw_name, entry.pw_gid))
    return AppUser(entry.pw_name, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir)


def resolve(name: str) -> AppUser | None:
    """`app.user` at a start: None for the daemon's own user; a user whose `problem()` says why not
    when it is unknown (the start then fails with that reason, never runs as the daemon's user)."""
    try:
        return for_name(name)
    except (KeyError, ValueError, OverflowError):
        return AppUser(name, -1, -1, (), "/nonexistent")


def for_name(name: str) -> AppUser | None:
    """The user app processes switch to; None when `app.user` is empty or is the daemon's own user."""
    if not name:
        return None
    user = lookup(name)
    return None if user.uid == os.geteuid() else user
