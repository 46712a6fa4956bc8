"""The staged release's record (`state/stage.json`) and what each request does to a stage: no processes."""

from __future__ import annotations

import os

from proto4d import staging, states
from proto4d.paths import Paths


class NoRunner:
    staged = None


def record(**over) -> staging.StageRecord:
    base = dict(id="r1", release="proto4_20261203_100000_abc1234", commit="abc1234" + "0" * 33, ref="main",
                url="http://127.0.0.1:8001/", staged_at=1000.0, promotable=True)
    return staging.StageRecord(**{**base, **over})


def test_expiry_counts_from_the_stage_with_the_ttl_in_force() -> None:
    rec = record()
    assert not rec.expired(1000 + 59.9, 60) and rec.expired(1060, 60)
    assert rec.expired(1030, 30), "a reload that shortens stage.ttl_s applies to the staged release at once"


def test_the_record_survives_a_round_trip_and_a_damaged_one_is_nothing(tmp_path) -> None:
    paths = Paths(tmp_path)
    paths.state.mkdir(parents=True)
    staging.save(paths, record(data_dir="/x/y", pid=42))
    assert staging.load(paths) == record(data_dir="/x/y", pid=42)
    assert oct(os.stat(staging.path(paths)).st_mode & 0o777) == "0o600"
    for bad in (b"", b"{", b"[]", b'{"id": "x"}', b"\x00\xff"):
        staging.path(paths).write_bytes(bad)
        assert staging.load(paths) is None, bad
    staging.clear(paths)
    staging.clear(paths)  # twice: nothing to clear is fine
    assert not staging.path(paths).exists()


def test_each_request_says_what_happens_to_the_staged_release(tmp_path) -> None:
    book = staging.StageBook(Paths(tmp_path), NoRunner(), None, lambda: None)  # type: ignore[arg-type]
    assert all(book.note_for(a) == "" for a in ("update", "stage", "rollback", "restart", "promote"))
    book.record = record()
    assert "promoted if this update deploys the same commit, else discarded" in book.note_for("update")
    assert "discarded when this one starts preparing, unless it is the same commit" in book.note_for("stage")
    assert "stays staged" in book.note_for("rollback") and "stays staged" in book.note_for("restart")
    assert book.exited() == "it is no longer running", "a record without its process is not shown as running"


def test_staged_is_an_outcome_reached_only_from_the_canary() -> None:
    assert states.STAGED in states.FINAL
    assert [s for s, allowed in states.UPDATE.items() if states.STAGED in allowed] == [states.CANARY]
    assert states.recovery_outcome(states.STAGED) is None
