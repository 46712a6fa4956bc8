"""What proto4d writes is private to its user: 0600 files, 0700 directories, never wider than the
umask; logs created or left wider by an older version are tightened; a readable .env is warned about."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest

from proto4d import fsutil, log


def mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.mark.parametrize(("umask", "expected"), [(0o000, 0o600), (0o022, 0o600), (0o077, 0o600), (0o277, 0o400)])
def test_atomic_write_is_private_whatever_the_umask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   umask: int, expected: int) -> None:
    monkeypatch.setattr(fsutil, "UMASK", umask)
    f = tmp_path / "status.json"
    fsutil.atomic_write_json(f, {"clients": ["203.0.113.7"]})
    assert mode(f) == expected


@pytest.mark.parametrize(("umask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o000, 0o666)])
def test_a_file_for_others_follows_the_umask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             umask: int, expected: int) -> None:
    monkeypatch.setattr(fsutil, "UMASK", umask)
    f = tmp_path / "notice.json"
    fsutil.atomic_write_json(f, {}, mode=None)
    assert mode(f) == expected


def test_the_umask_read_at_import_is_the_process_umask() -> None:
    current = os.umask(0o022)
    os.umask(current)
    assert current == fsutil.UMASK


def test_private_opener_creates_0600_and_tightens_an_old_log(tmp_path: Path) -> None:
    new = tmp_path / "app.log"
    with open(new, "a", opener=fsutil.private_opener) as f:
        f.write("x\n")
    assert mode(new) == 0o600 & ~fsutil.UMASK
    old = tmp_path / "old.log"
    old.write_text("from an older version\n")
    os.chmod(old, 0o644)
    with open(old, "a", opener=fsutil.private_opener) as f:
        f.write("y\n")
    assert mode(old) == 0o600 & ~fsutil.UMASK
    assert old.read_text() == "from an older version\ny\n"


def test_ensure_dir_is_0700(tmp_path: Path) -> None:
    d = fsutil.ensure_dir(tmp_path / "state" / "answers")
    assert mode(d) == 0o700 & ~fsutil.UMASK


def test_the_daemon_log_is_private(tmp_path: Path) -> None:
    logfile = tmp_path / "logs" / "proto4d.log"
    log.setup(logfile, stderr=False)
    try:
        log.get().info("hello")
    finally:
        log.setup(None, stderr=False)
    assert mode(logfile) == 0o600 & ~fsutil.UMASK


def test_a_readable_env_is_warned_about_once(tmp_path: Path) -> None:
    logfile = tmp_path / "proto4d.log"
    env = tmp_path / ".env"
    env.write_text("OPENAI_API_KEY=sk-test-1234567\n")
    os.chmod(env, 0o644)
    log.setup(logfile, stderr=False)
    try:
        log.redact_env_file(env)
        log.redact_env_file(env)
        os.chmod(env, 0o600)
        log.redact_env_file(env)
    finally:
        for h in logging.getLogger().handlers:
            h.flush()
        log.setup(None, stderr=False)
    rows = [json.loads(line) for line in logfile.read_text().splitlines()]
    warned = [r for r in rows if r["event"] == "env.readable_by_others"]
    assert len(warned) == 1, rows
    assert warned[0]["mode"] == "644" and warned[0]["fix"] == f"chmod 600 {env}"


def test_make_dirs_root_traversable_and_everything_in_it_private(tmp_path: Path) -> None:
    from proto4d.paths import Paths

    p = Paths(tmp_path / "root")
    p.make_dirs()
    assert mode(p.root) == 0o755 & ~fsutil.UMASK
    for d in (p.releases, p.venvs, p.shared, p.state, p.logs, p.requests, p.answers):
        assert mode(d) == 0o700 & ~fsutil.UMASK, d
