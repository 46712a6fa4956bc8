"""Interpreters that survive upgrades: stable paths, venvs whose interpreter vanished, and their rebuild.

Homebrew cannot run here, so its layout is made on disk as it is on a Mac (a versioned
Cellar directory, the opt/ and bin/ symlinks into it) and `brew upgrade` is what it does to
that layout: the old version's directory goes. Venvs are real (built by uv, as the daemon does).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from proto4d import config, releases
from proto4d.paths import Paths


def homebrew(prefix: Path, version: str = "3.12.7") -> Path:
    """<prefix>/Cellar/python@3.12/<version>/bin/python3.12, with opt/ and bin/ links as brew makes them.

    The interpreter is a stand-in that answers python_identity's question the way Python does
    (its own path as invoked, and its version)."""
    cellar = prefix / "Cellar" / "python@3.12" / version
    exe = cellar / "bin" / "python3.12"
    exe.parent.mkdir(parents=True)
    exe.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo "$0"
        echo {version}
    """))
    exe.chmod(0o755)
    (prefix / "opt").mkdir(exist_ok=True)
    opt = prefix / "opt" / "python@3.12"
    if opt.is_symlink():
        opt.unlink()
    opt.symlink_to(Path("..") / "Cellar" / "python@3.12" / version)
    (prefix / "bin").mkdir(exist_ok=True)
    link = prefix / "bin" / "python3"
    if link.is_symlink():
        link.unlink()
    link.symlink_to(Path("..") / "Cellar" / "python@3.12" / version / "bin" / "python3.12")
    return exe


def brew_upgrade(prefix: Path, old: str, new: str) -> None:
    homebrew_new = homebrew(prefix, new)
    assert homebrew_new.exists()
    shutil.rmtree(prefix / "Cellar" / "python@3.12" / old)  # what `brew upgrade` + cleanup do


def test_stable_path_goes_through_opt_not_the_cellar(tmp_path: Path):
    prefix = tmp_path / "homebrew"
    exe = homebrew(prefix)
    assert os.path.realpath(prefix / "bin" / "python3") == str(exe)  # what the old code recorded
    stable = releases.stable_interpreter(str(prefix / "bin" / "python3"))
    assert stable == str(prefix / "opt" / "python@3.12" / "bin" / "python3.12")
    real, version = releases.python_identity(str(prefix / "bin" / "python3"))
    assert (real, version) == (stable, "3.12.7")
    brew_upgrade(prefix, "3.12.7", "3.12.8")
    assert not exe.exists()
    assert os.access(stable, os.X_OK)  # the recorded path still runs after the upgrade
    assert releases.python_identity(stable)[1] == "3.12.8"


def test_paths_outside_a_cellar_are_resolved_as_before(tmp_path: Path):
    assert releases.stable_interpreter(sys.executable) == os.path.realpath(sys.executable)
    # a Cellar-looking path with no opt/ link pointing at it stays what it is
    lone = tmp_path / "x" / "Cellar" / "python@3.12" / "3.12.1" / "bin" / "python3.12"
    lone.parent.mkdir(parents=True)
    lone.write_text("")
    assert releases.stable_interpreter(str(lone)) == str(lone)


def test_new_venv_links_are_stabilised(tmp_path: Path):
    prefix = tmp_path / "homebrew"
    exe = homebrew(prefix)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for name in ("python", "python3", "python3.12"):
        (venv / "bin" / name).symlink_to(exe)  # what venv/uv write when they resolve the base interpreter
    (venv / "bin" / "activate").write_text("# not a link\n")
    (venv / "pyvenv.cfg").write_text(f"home = {exe.parent}\ninclude-system-site-packages = false\n"
                                     f"version = 3.12.7\nexecutable = {exe}\n")
    releases._stabilise_venv(venv)
    opt_exe = prefix / "opt" / "python@3.12" / "bin" / "python3.12"
    for name in ("python", "python3", "python3.12"):
        assert os.readlink(venv / "bin" / name) == str(opt_exe)
    cfg = (venv / "pyvenv.cfg").read_text()
    assert f"home = {opt_exe.parent}\n" in cfg and f"executable = {opt_exe}\n" in cfg
    assert "Cellar" not in cfg and "version = 3.12.7" in cfg
    brew_upgrade(prefix, "3.12.7", "3.12.8")
    assert os.path.exists(venv / "bin" / "python")  # still resolves after the upgrade


def make_release(tmp_path: Path) -> tuple[config.Config, Paths, releases.Release]:
    root = tmp_path / "root"
    cfg = config.parse(f"root: {json.dumps(str(root))}\npython: {json.dumps(sys.executable)}\n"
                       f"app: {{repo: {json.dumps(str(tmp_path))}, requirements: ''}}\n", "t.yaml", tmp_path)
    paths = Paths(root)
    paths.make_dirs()
    venv = releases.ensure_venv(paths, None, sys.executable, "auto", progress=lambda _t: None)
    rel_dir = paths.release("proto4_20261126_030000_abc1234")
    rel_dir.mkdir()
    info = {"name": rel_dir.name, "commit": "abc1234" * 5, "venv": venv.key, "created_at": 1.0}
    (rel_dir / "release.json").write_text(json.dumps(info))
    rel = releases.read_release(paths, rel_dir.name)
    assert rel is not None
    return cfg, paths, rel


def test_a_venv_that_ran_is_not_started_again_until_its_interpreter_changes(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch):
    """Every update checks its venv runs; one interpreter start per venv, not per update, while nothing
    it proved has changed. A link now pointing at an interpreter that cannot run is asked again."""
    _cfg, paths, rel = make_release(tmp_path)
    venv = paths.venvs / rel.venv
    started: list[list[str]] = []
    real_run = releases.run_cmd
    monkeypatch.setattr(releases, "run_cmd", lambda argv, **kw: (started.append(list(argv)), real_run(argv, **kw))[1])
    assert releases.venv_problem(venv) is None and releases.venv_problem(venv) is None
    assert len(started) <= 1  # asked once (or not at all: the venv ran when make_release built it)
    n = len(started)
    py = releases.venv_python(venv)
    broken = tmp_path / "broken-python"
    broken.write_text("#!/bin/sh\necho 'Fatal Python error: init_fs_encoding' >&2\nexit 1\n")
    broken.chmod(0o755)
    py.unlink()
    py.symlink_to(broken)
    problem = releases.venv_problem(venv)
    assert len(started) == n + 1 and problem is not None and "exits 1" in problem and "init_fs_encoding" in problem


def test_a_dangling_venv_interpreter_is_found_and_rebuilt(tmp_path: Path):
    cfg, paths, rel = make_release(tmp_path)
    venv = paths.venvs / rel.venv
    assert releases.venv_problem(venv) is None
    # the interpreter it was built from is gone, as after `brew upgrade` of a Cellar-built venv
    gone = tmp_path / "Cellar" / "python@3.12" / "3.12.7" / "bin" / "python3.12"
    py = releases.venv_python(venv)
    py.unlink()
    py.symlink_to(gone)
    with pytest.raises(FileNotFoundError):  # what the exec of the app would have met
        subprocess.run([str(py), "-c", "pass"], check=False)
    problem = releases.venv_problem(venv)
    assert problem is not None and "gone" in problem and str(gone) in problem
    said: list[str] = []
    fixed = releases.repair_venv(cfg, paths, rel, progress=said.append)
    assert releases.venv_problem(paths.venvs / fixed.venv) is None
    assert any("rebuilding" in s for s in said), said
    r = subprocess.run([str(releases.python_for(paths, fixed)), "-c", "print('ok')"], capture_output=True, text=True)
    assert r.stdout.strip() == "ok"
    assert json.loads((rel.path / "release.json").read_text())["venv"] == fixed.venv
    # the broken one was set aside where the next start's cleanup removes it
    assert releases.cleanup_partial(paths)
    assert not [p for p in paths.venvs.iterdir() if p.name.startswith(".")]


def test_a_healthy_venv_is_left_alone(tmp_path: Path):
    cfg, paths, rel = make_release(tmp_path)
    before = (paths.venvs / rel.venv / "venv.json").stat().st_mtime_ns
    said: list[str] = []
    assert releases.repair_venv(cfg, paths, rel, progress=said.append) is rel
    assert said == [] and (paths.venvs / rel.venv / "venv.json").stat().st_mtime_ns == before


def counting_interpreter(path: Path, log: Path, answer: str | None = None) -> Path:
    """A stand-in interpreter that notes each time it is asked; it answers with its own path, or `answer`
    (as a wrapper such as a pyenv shim answers for the interpreter it picks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\necho asked >> "{log}"\necho "{answer or "$0"}"\necho 3.12.7\n')
    path.chmod(0o755)
    return path


def test_python_identity_asks_an_unchanged_interpreter_once(tmp_path: Path):
    log = tmp_path / "asked"
    exe = counting_interpreter(tmp_path / "bin" / "python3.12", log)
    for _ in range(3):
        assert releases.python_identity(str(exe)) == (str(exe), "3.12.7")
    assert log.read_text().count("asked") == 1
    # replaced in place (an upgrade): asked again
    exe.write_text(exe.read_text().replace("3.12.7", "3.12.8") + "\n")
    assert releases.python_identity(str(exe)) == (str(exe), "3.12.8")
    assert log.read_text().count("asked") == 2


def test_python_identity_asks_a_wrapper_every_time(tmp_path: Path):
    log = tmp_path / "asked"
    target = counting_interpreter(tmp_path / "real" / "python3.12", tmp_path / "unused")
    shim = counting_interpreter(tmp_path / "shims" / "python3", log, answer=str(target))
    for _ in range(2):
        assert releases.python_identity(str(shim)) == (str(target), "3.12.7")
    assert log.read_text().count("asked") == 2


def test_preflight_reads_site_packages_and_asks_the_interpreter_only_about_what_it_did_not_find(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """check_installed reads each distribution's METADATA in site-packages; a name not found there is
    asked of the venv's interpreter (every time: it may be on another path of its sys.path)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib*/python*/site-packages"))
    dist = site / "tutorpkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tutorpkg\nVersion: 1.0\n")
    req = tmp_path / "requirements.txt"
    req.write_text("tutorpkg==1.0\n")
    runs: list[list[str]] = []
    real_run = subprocess.run

    def counting(argv, *args, **kwargs):  # type: ignore[no-untyped-def]
        runs.append(list(argv))
        return real_run(argv, *args, **kwargs)

    monkeypatch.setattr(releases.subprocess, "run", counting)
    assert releases.check_installed(venv, req) == []
    assert releases.check_installed(venv, req) == []
    assert runs == [], "found in site-packages: no interpreter started"
    req.write_text("Tutor_Pkg>=1\n")  # PEP 503: the same distribution
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tutor-pkg\nVersion: 1.0\n")
    assert releases.check_installed(venv, req) == [] and runs == []
    shutil.rmtree(dist)  # removed behind proto4d's back: seen at the next look
    assert releases.check_installed(venv, req) == ["Tutor_Pkg"]
    assert releases.check_installed(venv, req) == ["Tutor_Pkg"]  # a missing package is asked about every time
    assert len(runs) == 2
