"""The request file's trust rules on a real file system (inbox.claim / vet): the decision is taken on
the descriptor that is read, a file with a second link is refused unless that link is `proto4d update`'s
own temp file, and a root others can write is refused, sticky or not. (The whole table against a real
daemon is TRUST_CASES in tests/test_bad_input_e2e.py.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from proto4d.inbox import RequestRejected, claim
from proto4d.paths import Paths


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    p = Paths(tmp_path / "root")
    p.make_dirs()
    os.chmod(p.root, 0o700)
    return p


def test_a_plain_request_is_read(paths: Paths) -> None:
    paths.request.write_bytes(b"ref: main\n")
    claimed, data = claim(paths)
    assert data == b"ref: main\n" and claimed.parent == paths.requests


def test_a_hard_link_to_a_consumed_request_is_refused(paths: Paths) -> None:
    old = paths.requests / "20200101-000000-abcdef.request.taken"
    old.write_bytes(b"force: true\n")
    os.link(old, paths.request)
    with pytest.raises(RequestRejected, match="has 2 hard links"):
        claim(paths)
    assert not paths.request.exists()  # consumed once, set aside


def test_the_clis_own_temp_link_is_not_a_second_link(paths: Paths) -> None:
    # `proto4d update` links its temp file as update.request, then removes the temp: the daemon may
    # claim in between.
    tmp = paths.root / f".update.request.{os.getpid()}.abc123"
    tmp.write_bytes(b"reason: from the CLI\n")
    os.link(tmp, paths.request)
    _, data = claim(paths)
    assert data == b"reason: from the CLI\n"


def test_a_link_named_like_the_cli_but_elsewhere_is_refused(paths: Paths) -> None:
    other = paths.state / ".update.request.1.abc"
    other.write_bytes(b"force: true\n")
    os.link(other, paths.request)
    with pytest.raises(RequestRejected, match="has 2 hard links"):
        claim(paths)


@pytest.mark.parametrize("mode", [0o1777, 0o1770, 0o777, 0o720])
def test_a_root_others_can_write_is_refused_sticky_or_not(paths: Paths, mode: int) -> None:
    paths.request.write_bytes(b"")
    os.chmod(paths.root, mode)
    try:
        with pytest.raises(RequestRejected, match=f"writable by group or others \\(mode {mode:o}\\)"):
            claim(paths)
    finally:
        os.chmod(paths.root, 0o700)


def test_a_fifo_is_refused_without_blocking(paths: Paths) -> None:
    os.mkfifo(paths.request)
    with pytest.raises(RequestRejected, match="not a regular file"):
        claim(paths)
