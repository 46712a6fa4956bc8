"""Case-insensitive file systems (APFS by default): release names matched to their entries on
disk, retention that cannot miss the serving release, and a mirror that fetches only the
configured branch and tags (refs differing only in case would collide there)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from harness import Origin, git
from proto4d import releases
from proto4d.paths import Paths
from proto4d.retention import ReleaseFacts, plan_releases

NAME = "proto4_20261126_030000_abc1234"


def make(paths: Paths, name: str, created: float = 1.0) -> None:
    d = paths.release(name)
    d.mkdir(parents=True)
    (d / "release.json").write_text(json.dumps({"name": name, "created_at": created, "venv": "v"}))


def test_a_name_in_another_case_finds_the_release_as_spelled_on_disk(tmp_path: Path):
    paths = Paths(tmp_path)
    paths.make_dirs()
    make(paths, NAME)
    rel = releases.read_release(paths, NAME.upper())
    assert rel is not None and rel.name == NAME and rel.path == paths.release(NAME)
    assert releases.read_release(paths, NAME) is not None
    assert releases.read_release(paths, "proto4_20261126_030000_fff0000") is None
    assert releases.read_release(paths, "../" + NAME) is None


def test_an_exact_spelling_wins_where_both_exist(tmp_path: Path):
    paths = Paths(tmp_path)
    paths.make_dirs()
    make(paths, NAME)
    make(paths, NAME.upper(), created=2.0)  # a case-sensitive file system can hold both
    assert releases.read_release(paths, NAME.upper()).name == NAME.upper()
    assert releases.read_release(paths, NAME).name == NAME
    assert releases.disk_name(paths, "Proto4_20261126_030000_ABC1234") is None  # ambiguous: no guess


def test_retention_never_removes_current_named_in_another_case():
    old = ReleaseFacts(NAME, 0.0, "v")
    newer = [ReleaseFacts(f"proto4_20261127_03000{i}_abc123{i}", 100.0 + i, "v") for i in range(3)]
    doomed = plan_releases([old, *newer], current=NAME.upper(), previous=None, now=10 * 86400.0, keep_days=1,
                           keep_min=1)
    assert NAME not in doomed
    doomed = plan_releases([old, *newer], current=None, previous=NAME.upper(), now=10 * 86400.0, keep_days=1,
                           keep_min=1)
    assert NAME not in doomed
    assert NAME in plan_releases([old, *newer], current=None, previous=None, now=10 * 86400.0, keep_days=1,
                                 keep_min=1)


def test_the_mirror_fetches_only_the_branch_and_tags(tmp_path: Path):
    origin = Origin(tmp_path)
    main = origin.commit("1")
    origin.tag("v1")
    # two branches that differ only in case: on APFS their loose refs collide and fail every fetch of refs/heads/*
    for branch in ("Feature", "feature"):
        git(origin.work, "push", "-q", "origin", f"HEAD:refs/heads/{branch}")
    mirror = releases.Mirror(tmp_path / "mirror.git", str(origin.bare), "main")
    mirror.fetch()
    refs = git(mirror.path, "for-each-ref", "--format=%(refname)").split()
    assert sorted(refs) == ["refs/remotes/origin/main", "refs/tags/v1"]
    assert mirror.branch_head("main") == main and mirror.resolve("v1") == main
    # a request naming another branch fetches that one, on demand
    assert mirror.resolve("feature") == main
    assert "refs/remotes/origin/feature" in git(mirror.path, "for-each-ref", "--format=%(refname)").split()
    assert mirror.resolve("no-such-branch") is None
    # ... each time it is resolved: moved upstream, then gone
    moved = origin.commit("2", push=False)
    git(origin.work, "push", "-q", "--force", "origin", "HEAD:refs/heads/feature")
    assert mirror.resolve("feature") == moved
    git(origin.work, "push", "-q", "origin", "--delete", "feature")
    assert mirror.resolve("feature") is None
    assert mirror.branch_head("main") == main and mirror.resolve(main[:10]) == main


def test_a_fetch_failure_is_one_clear_line(tmp_path: Path):
    mirror = releases.Mirror(tmp_path / "mirror.git", str(tmp_path / "nowhere.git"), "main")
    try:
        mirror.fetch()
    except releases.ReleaseError as e:
        msg = str(e)
    else:
        raise AssertionError("fetching from a missing origin succeeded")
    assert msg.startswith(f"cannot fetch {tmp_path / 'nowhere.git'}: ") and "\n" not in msg


def test_rollback_by_a_name_in_another_case_serves_the_release_as_spelled_on_disk(make_daemon, origin):
    d = make_daemon().start()
    first = d.status()["app"]["release"]
    origin.commit("2")
    assert d.update("--force", "--wait").returncode == 0
    r = d.cli("rollback", first.upper(), "--wait")
    assert r.returncode == 0, r.stdout + r.stderr
    s = d.wait_healthy(release=first)
    assert s["app"]["release"] == first and d.get()["version"] == "1"
    assert os.readlink(d.root / "current") == f"releases/{first}"  # never the spelling as typed
