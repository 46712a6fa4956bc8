"""Durable means durable on macOS: the journal's writes end in F_FULLFSYNC where the platform has it.

Linux has no F_FULLFSYNC, so the macOS branch runs here with the constant and the fcntl call
seen through a spy; the file, its rename and the fallback are real."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

from proto4d import fsutil

MAC_F_FULLFSYNC = 51  # its value in <sys/fcntl.h> on macOS


def spy(monkeypatch: pytest.MonkeyPatch, refuse: bool = False) -> dict[str, list[int]]:
    calls: dict[str, list[int]] = {"full": [], "fsync": []}
    real_fsync = os.fsync

    def fake_fcntl(fd: int, cmd: int, *args: object) -> int:
        assert cmd == MAC_F_FULLFSYNC
        calls["full"].append(fd)
        if refuse:
            raise OSError(45, "Operation not supported")  # what a FAT or SMB volume answers
        return 0

    def counting_fsync(fd: int) -> None:
        calls["fsync"].append(fd)
        real_fsync(fd)

    monkeypatch.setattr(fcntl, "F_FULLFSYNC", MAC_F_FULLFSYNC, raising=False)
    monkeypatch.setattr(fcntl, "fcntl", fake_fcntl)
    monkeypatch.setattr(os, "fsync", counting_fsync)
    return calls


def test_full_fsync_where_the_platform_has_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls = spy(monkeypatch)
    fsutil.atomic_write_json(tmp_path / "journal.json", {"state": "switching"})
    assert json.loads((tmp_path / "journal.json").read_text()) == {"state": "switching"}
    assert len(calls["full"]) == 2 and calls["fsync"] == []  # the file, then its directory (the rename)


def test_fsync_when_the_volume_refuses_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls = spy(monkeypatch, refuse=True)
    fsutil.atomic_write(tmp_path / "journal.json", b"{}")
    assert len(calls["full"]) == 2 and len(calls["fsync"]) == 2


def test_status_writes_skip_the_flush(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls = spy(monkeypatch)
    fsutil.atomic_write(tmp_path / "status.json", b"{}", durable=False)
    assert calls == {"full": [], "fsync": []}


@pytest.mark.skipif(hasattr(fcntl, "F_FULLFSYNC"), reason="this platform has F_FULLFSYNC")
def test_plain_fsync_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    seen: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (seen.append(fd), real(fd))[1])
    fsutil.atomic_write(tmp_path / "j", b"x")
    assert len(seen) == 2
