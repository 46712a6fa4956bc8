"""The mirror's git work as the daemon does it: the `git` program and a short-lived export process, so the
resident daemon never loads GitPython or tarfile (issue 12: RSS ≤ 30 MiB once it has fetched). Real git,
real processes; every check runs in a fresh interpreter where `sys.modules` is the daemon's own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import psutil
import pytest

from harness import Origin, git, wait_for
from proto4d import procs, releases
from proto4d.procs import Cancel, Cancelled, PidRegistry

DAEMON_PATH = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from proto4d import lean
    lean.daemon_imports()  # as `proto4d run` does
    import proto4d.supervisor, proto4d.update
    from proto4d import releases
    from proto4d.procs import PidRegistry
    base, origin = Path(sys.argv[1]), sys.argv[2]
    mirror = releases.Mirror(base / "repo.git", origin, "main")
    mirror.fetch(timeout=60)
    head = mirror.branch_head("main")
    assert mirror.resolve("v1") == head and mirror.has_commit(head) and mirror.is_ancestor(head, head)
    commits = mirror.log_between(None, head)
    dest = base / "release"
    dest.mkdir()
    mirror.export(head, "app", dest, registry=PidRegistry(base / "app.pids"))
    mirror.pin("r1", head)
    print(json.dumps({"modules": sorted(m for m in ("git", "gitdb", "tarfile", "ssl", "_ssl", "_hashlib")
                                        if sys.modules.get(m) is not None),
                      "files": sorted(p.name for p in dest.iterdir()), "subject": mirror.subject(head),
                      "commits": commits}))
""")


@pytest.fixture
def sub_origin(tmp_path: Path) -> Origin:
    o = Origin(tmp_path, subdir="app")
    o.commit("1", files={"data/seed.txt": "seed\n"}, message="first version")
    o.tag("v1")
    return o


def test_fetch_resolve_and_export_leave_no_gitpython_tarfile_or_openssl_in_the_daemon(tmp_path: Path,
                                                                                    sub_origin: Origin):
    base = tmp_path / "work"
    base.mkdir()
    r = subprocess.run([sys.executable, "-c", DAEMON_PATH, str(base), str(sub_origin.bare)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["modules"] == [], f"the daemon's code path loaded {out['modules']}"
    assert {"VERSION", "main.py", "data"} <= set(out["files"]), out["files"]
    assert out["subject"] == "first version" and len(out["commits"]) == 1
    assert (base / "release" / "data" / "seed.txt").read_text() == "seed\n"
    assert git(base / "repo.git", "rev-parse", "refs/proto4d/releases/r1") == git(sub_origin.work, "rev-parse", "HEAD")
    assert json.loads((base / "app.pids").read_text()) == []  # the export helper was recorded, and is gone


def fetched(tmp_path: Path, origin: Origin) -> tuple[releases.Mirror, str]:
    mirror = releases.Mirror(tmp_path / "repo.git", str(origin.bare), "main")
    mirror.fetch(timeout=60)
    head = mirror.branch_head("main")
    assert head is not None
    return mirror, head


def export_error(mirror: releases.Mirror, sha: str, subdir: str, dest: Path) -> str:
    dest.mkdir(exist_ok=True)
    with pytest.raises(releases.ReleaseError) as e:
        mirror.export(sha, subdir, dest)
    return str(e.value)


def test_export_errors_name_the_subdir_and_the_commit(tmp_path: Path, sub_origin: Origin):
    mirror, head = fetched(tmp_path, sub_origin)
    assert export_error(mirror, head, "nope", tmp_path / "a") == \
        f"app.subdir 'nope' does not exist at commit {head[:7]}"
    assert export_error(mirror, head, "app/VERSION", tmp_path / "b") == \
        f"app.subdir 'app/VERSION' is a file at commit {head[:7]}, not a directory"


def test_a_link_out_of_the_release_is_refused_with_the_unpacker_s_reason(tmp_path: Path, sub_origin: Origin):
    os.symlink("/etc/passwd", sub_origin.app / "leak")
    sub_origin.commit("2")
    mirror, head = fetched(tmp_path, sub_origin)
    msg = export_error(mirror, head, "app", tmp_path / "rel")
    assert msg.startswith(f"cannot unpack commit {head[:7]}: ") and "leak" in msg and "\n" not in msg, msg


def test_a_write_past_the_file_size_limit_is_reported_as_such(tmp_path: Path, sub_origin: Origin):
    """RLIMIT_FSIZE set in a fresh interpreter (not in this test process), inherited by the export helper."""
    sub_origin.commit("2", files={"blob.bin": "\0" * (2 << 20)})
    mirror, head = fetched(tmp_path, sub_origin)
    (tmp_path / "rel").mkdir()
    script = textwrap.dedent("""
        import resource, sys
        from pathlib import Path
        from proto4d import releases
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        try:
            releases.Mirror(Path(sys.argv[1]), sys.argv[2], "main").export(sys.argv[3], "app", Path(sys.argv[4]))
        except releases.ReleaseError as e:
            print(e)
    """)
    r = subprocess.run([sys.executable, "-c", script, str(mirror.path), str(sub_origin.bare), head,
                        str(tmp_path / "rel")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"cannot write the release tree into {tmp_path / 'rel'}: File too large", r.stdout


def test_a_cancelled_export_ends_its_helper_and_git(tmp_path: Path, sub_origin: Origin,
                                                    monkeypatch: pytest.MonkeyPatch):
    """The daemon stopping mid-export: the helper and the git it runs go with their process group."""
    mirror, head = fetched(tmp_path, sub_origin)
    real_git = shutil.which("git")
    fake = tmp_path / "bin" / "git"
    fake.parent.mkdir()
    # `git archive` that never ends (a huge tree on a slow disk); every other git command is the real one
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = archive ] && exec sleep 600; done\nexec {real_git} "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    registry = PidRegistry(tmp_path / "app.pids")
    cancel = Cancel()
    (tmp_path / "rel").mkdir()
    result: list[BaseException | None] = []

    def run() -> None:
        try:
            mirror.export(head, "app", tmp_path / "rel", cancel, registry)
            result.append(None)
        except BaseException as e:
            result.append(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    wait_for(lambda: registry.pids(), 30, "the export helper to be recorded")
    helper = next(iter(registry.pids()))
    wait_for(lambda: any(p.name() == "sleep" for p in psutil.Process(helper).children(recursive=True)), 30,
             "the helper to start git archive")
    cancel.cancel()
    worker.join(30)
    assert len(result) == 1 and isinstance(result[0], Cancelled), result
    assert registry.pids() == set()
    wait_for(lambda: not procs.group_alive(helper), 10, "the helper's process group to end")


def test_answers_are_kept_until_the_next_fetch(tmp_path: Path, sub_origin: Origin):
    """An update asks the branch head and a few facts twice (at the request, then when preparing): the
    second answers come from memory, and a fetch (the only thing that moves a ref) forgets them."""
    mirror = releases.Mirror(tmp_path / "repo.git", str(sub_origin.bare), "main")
    mirror.fetch(timeout=60)
    first = mirror.branch_head("main")
    assert first and mirror.has_commit(first) and mirror.subject(first) == "first version"
    asked: list[tuple[str, ...]] = []
    real = mirror._run_local

    def counting(args, timeout=None):  # type: ignore[no-untyped-def]
        asked.append(tuple(args))
        return real(args, timeout)

    mirror._run_local = counting  # type: ignore[method-assign]
    assert mirror.branch_head("main") == first and mirror.has_commit(first)
    assert mirror.subject(first) == "first version" and mirror.is_ancestor(first, first)
    assert mirror.is_ancestor(first, first)
    assert [a for a in asked if "merge-base" not in a] == []  # only the first is_ancestor asked git
    sub_origin.commit("2", message="second version")
    assert mirror.branch_head("main") == first  # not fetched yet: the mirror's ref has not moved
    mirror.fetch(timeout=60)
    second = mirror.branch_head("main")
    assert second != first and mirror.subject(second) == "second version"
    assert mirror.is_ancestor(first, second) and not mirror.is_ancestor(second, first)
    # remote.origin.url is written once, not before every fetch
    assert sum(1 for a in asked if "config" in a) == 0
